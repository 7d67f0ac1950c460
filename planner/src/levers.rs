//! When nothing fits: the levers `fit` reaches for next, in the order of what they give
//! up, each searched with the same global batch and sequence length as the run asked.
//!
//! 1. ZeRO over the GPUs the run already has (when it has several and shards less than
//!    ZeRO-3): the numbers stay the same, the step communicates more.
//! 2. An 8-bit optimizer (bitsandbytes' AdamW8bit for AdamW, its paged 8-bit for paged
//!    AdamW): the moments are quantized.
//! 3. Pure bf16: parameters, gradients and optimizer state in bf16, no fp32 master.
//! 4. Both.
//! 5. LoRA, then QLoRA, at rank 16 (`lora_fit`): only adapters train.
//! 6. More GPUs with ZeRO (FSDP2 when the run already uses it): the smallest count up to
//!    [`MAX_LADDER_GPUS`] that fits with ZeRO-3 and splits the global batch, then the
//!    lowest stage that fits at that count.
//! 7. DeepSpeed's ZeRO-Offload of the optimizer (ZeRO-2, or the run's stage when it has
//!    one), then with ZeRO-3 of the parameters too (ZeRO-Infinity on the CPU): fp32
//!    masters, Adam moments and gradients in host memory, the Adam step on the CPU, the
//!    16-bit gradients and parameters over PCIe each step (`report`'s throughput counts
//!    those bytes at PCIe 4.0 x16 and the state at host-memory speed).
//! 8. Saved activations offloaded to host memory.
//!
//! Beside the ladder, with a fixed sequence length: the longest of its halvings (down to
//! 128) that fits with nothing else changed ([`shorter`]).
//!
//! Each step is tried on the run as asked; on several GPUs, steps 2–5 and 8 are also
//! tried with ZeRO over them (sharding costs no numbers), the lowest stage that fits. A
//! step the run cannot take (already taken, or a combination the frameworks refuse,
//! `check_run`) is left out; one that is tried and still does not fit is kept with its
//! smallest candidate, so the caller can say how far it is.

use crate::config::{check_run, RawConfig};
use crate::fit::{try_fit, Attempt, Candidate, FitRequest, FitResult, GlobalBatch, Miss};
use crate::lora_fit::{adapters, with_adapters, DEFAULT_RANK};
use crate::spec::{Change, Offload, Optimizer, Precision, Quantize, RunSpec, Sharding};
use crate::Result;
use serde::Serialize;

/// The most GPUs the ladder proposes.
pub const MAX_LADDER_GPUS: u64 = 64;

/// One change to the run as asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Lever {
    /// ZeRO (or FSDP2) over the GPUs the run already has.
    Shard { sharding: Sharding },
    /// The optimizer's state in 8 bits.
    Optimizer8bit { optimizer: Optimizer },
    /// Everything in bf16, no fp32 master weights.
    PureBf16,
    /// LoRA adapters of this rank over a frozen bf16 base.
    Lora { rank: u64 },
    /// LoRA adapters over an NF4 base, 8-bit AdamW for the adapters.
    Qlora { rank: u64 },
    /// This many GPUs (more than the run has), model state sharded.
    MoreGpus { gpus: u64, sharding: Sharding },
    /// DeepSpeed's CPU offload of the optimizer state (and with `params` of the 16-bit
    /// parameters, under ZeRO-3).
    OffloadOptimizer { sharding: Sharding, params: bool },
    /// Saved activations in host memory between forward and backward.
    OffloadActivations,
}

impl Lever {
    /// The kind of change this lever makes (what `fit --keep` names).
    pub fn kind(&self) -> Change {
        match self {
            Lever::Shard { .. } => Change::Sharding,
            Lever::Optimizer8bit { .. } => Change::Optimizer,
            Lever::PureBf16 => Change::Precision,
            Lever::Lora { .. } | Lever::Qlora { .. } => Change::Lora,
            Lever::MoreGpus { .. } => Change::Gpus,
            Lever::OffloadOptimizer { .. } | Lever::OffloadActivations => Change::Offload,
        }
    }
}

/// Levers taken together and what the search found with them.
#[derive(Debug, Clone, Serialize)]
pub struct Alternative {
    pub levers: Vec<Lever>,
    pub fits: bool,
    /// The fastest plan that fits with the lever; None when it does not fit.
    pub best: Option<Candidate>,
    /// When it does not fit: why (its smallest candidate).
    pub miss: Option<Miss>,
    /// The whole search, for callers that write the plan in a launcher's format.
    #[serde(skip)]
    pub result: Option<FitResult>,
}

/// "Nothing fits" with what would: the run's miss and each lever tried, in ladder order.
#[derive(Debug, Clone, Serialize)]
pub struct Ladder {
    /// Why the run as asked fits nothing (one per `--seq-len` length tried).
    pub misses: Vec<Miss>,
    pub alternatives: Vec<Alternative>,
    /// With a fixed sequence length: the longest of its halvings down to
    /// [`MIN_SHORTER_SEQ`] that fits with the run's other settings; None when none does
    /// (or the length was searched).
    pub shorter: Option<Shorter>,
}

/// The shortest length [`shorter`] tries.
pub const MIN_SHORTER_SEQ: u64 = 128;

/// A shorter sequence length that fits the run as asked, and the plan there.
#[derive(Debug, Clone, Serialize)]
pub struct Shorter {
    pub seq_len: u64,
    /// The plan's peak: live tensor bytes, and what the device would show.
    pub peak_allocated_bytes: u64,
    pub device_bytes: u64,
    pub micro_batch: u64,
    pub grad_accum: u64,
    pub checkpointing: crate::spec::Checkpointing,
    pub loss: crate::spec::LossMode,
    /// The loss chunk's rows when the search changed them ([`Candidate::loss_chunk`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_chunk: Option<u64>,
}

impl Ladder {
    /// The alternatives that fit, nearest (cheapest) first.
    pub fn nearest(&self) -> impl Iterator<Item = &Alternative> {
        self.alternatives.iter().filter(|a| a.fits)
    }
}

/// The run after `levers`, in order, or None when the run cannot take them.
pub fn apply(base: &RunSpec, levers: &[Lever]) -> Option<RunSpec> {
    let mut s = base.clone();
    for &lever in levers {
        match lever {
            Lever::Shard { sharding } => s.hardware.sharding = sharding,
            Lever::Optimizer8bit { optimizer } => s.train.optimizer = optimizer,
            Lever::PureBf16 => s.train.precision = Precision::Bf16,
            Lever::Lora { rank } => s = with_adapters(&s, rank, false).ok()?,
            Lever::Qlora { rank } => s = with_adapters(&s, rank, true).ok()?,
            // On the CPU more processes share the host's memory: no lever.
            Lever::MoreGpus { .. } if !s.hardware.device.is_cuda() => return None,
            Lever::MoreGpus { gpus, sharding } => {
                s.hardware.gpus = gpus;
                s.hardware.gpus_per_node = gpus;
                s.hardware.sharding = sharding;
            }
            Lever::OffloadOptimizer { sharding, params } => {
                // DeepSpeed's bf16 mode: bf16 weights over fp32 masters (what the
                // Trainer's bf16 is under DeepSpeed).
                if matches!(s.train.precision, Precision::Bf16Autocast | Precision::Bf16) {
                    s.train.precision = Precision::Bf16Mixed;
                }
                s.hardware.sharding = sharding;
                s.hardware.offload_optimizer = Offload::Cpu;
                if params {
                    s.hardware.offload_params = Offload::Cpu;
                }
            }
            Lever::OffloadActivations => s.train.offload_activations = true,
        }
    }
    check_run(&s).ok().map(|()| s)
}

/// `raw` with an alternative's plan `spec` in it: [`RawConfig::with_spec`], and the keys
/// a lever sets that the plan's numbers do not carry (the `[lora]` section, offloading,
/// the node size of more GPUs).
pub fn raw_with(raw: &RawConfig, levers: &[Lever], spec: &RunSpec) -> RawConfig {
    let mut r = raw.with_spec(spec);
    for &lever in levers {
        match lever {
            Lever::Lora { rank } => r.lora = Some(adapters(rank, false)),
            Lever::Qlora { rank } => r.lora = Some(adapters(rank, true)),
            Lever::OffloadActivations => r.train.offload_activations = Some(true),
            Lever::MoreGpus { .. } => r.hardware.gpus_per_node = None,
            _ => {}
        }
    }
    r
}

/// The offload rung: the optimizer under the run's ZeRO stage (ZeRO-2 when it has none),
/// then the optimizer and the parameters under ZeRO-3; none when the run offloads
/// already, and none that changes the sharding `fit --keep sharding` keeps.
fn offload_steps(req: &FitRequest) -> Vec<Vec<Lever>> {
    let base = &req.base.hardware;
    if base.offloads() {
        return Vec::new();
    }
    let stage = match base.sharding {
        z @ (Sharding::Zero1 | Sharding::Zero2 | Sharding::Zero3) => z,
        _ => Sharding::Zero2,
    };
    let keep = req.keep.contains(&Change::Sharding);
    [(stage, false), (Sharding::Zero3, true)]
        .into_iter()
        .filter(|(s, _)| !keep || *s == base.sharding)
        .map(|(sharding, params)| vec![Lever::OffloadOptimizer { sharding, params }])
        .collect()
}

/// The 8-bit form of the run's optimizer, if it has one.
fn eight_bit(o: Optimizer) -> Option<Optimizer> {
    match o {
        Optimizer::AdamW
        | Optimizer::AdamWForeach
        | Optimizer::AdamWFused
        | Optimizer::AdamWSingle => Some(Optimizer::AdamW8bit),
        Optimizer::PagedAdamW => Some(Optimizer::PagedAdamW8bit),
        _ => None,
    }
}

/// The stages above the run's own, lowest first (FSDP2 stays FSDP2).
fn stages_above(s: Sharding) -> Vec<Sharding> {
    let zero = [Sharding::Zero1, Sharding::Zero2, Sharding::Zero3];
    match s {
        Sharding::Fsdp2 => vec![],
        s => zero.into_iter().filter(|z| z.stage() > s.stage()).collect(),
    }
}

/// The steps that change the run's training (not its hardware), in ladder order.
fn training_levers(base: &RunSpec) -> Vec<Vec<Lever>> {
    let t = &base.train;
    let mut v = Vec::new();
    let eight = eight_bit(t.optimizer).map(|optimizer| Lever::Optimizer8bit { optimizer });
    v.extend(eight.map(|e| vec![e]));
    if t.precision != Precision::Bf16 {
        v.push(vec![Lever::PureBf16]);
        v.extend(eight.map(|e| vec![e, Lever::PureBf16]));
    }
    match &base.lora {
        None => {
            v.push(vec![Lever::Lora { rank: DEFAULT_RANK }]);
            v.push(vec![Lever::Qlora { rank: DEFAULT_RANK }]);
        }
        Some(l) if l.quantize == Quantize::None => v.push(vec![Lever::Qlora { rank: l.rank }]),
        Some(_) => {}
    }
    v
}

/// `levers` alone, then with each ZeRO stage above the run's over the GPUs it has.
fn with_shards(base: &RunSpec, levers: Vec<Lever>) -> Vec<Vec<Lever>> {
    let mut v = vec![levers.clone()];
    if base.hardware.gpus > 1 {
        for sharding in stages_above(base.hardware.sharding) {
            let mut l = vec![Lever::Shard { sharding }];
            l.extend(&levers);
            v.push(l);
        }
    }
    v
}

/// The search with `spec` in place of the request's run.
fn attempt(req: &FitRequest, spec: RunSpec) -> Result<Attempt> {
    try_fit(&FitRequest {
        base: spec,
        ..req.clone()
    })
}

fn alternative(levers: &[Lever], a: Attempt) -> Alternative {
    let levers = levers.to_vec();
    match a {
        Attempt::Fits(r) => Alternative {
            levers,
            fits: true,
            best: Some(r.best.clone()),
            miss: None,
            result: Some(*r),
        },
        Attempt::Misses(m) => Alternative {
            levers,
            fits: false,
            best: None,
            miss: Some(*m),
            result: None,
        },
    }
}

/// The first of `steps` that fits, or the last one tried (with its miss); None when the
/// run can take none of them.
fn first_fitting(req: &FitRequest, steps: &[Vec<Lever>]) -> Option<Alternative> {
    let mut last = None;
    let allowed = |levers: &&Vec<Lever>| levers.iter().all(|l| !req.keep.contains(&l.kind()));
    for levers in steps.iter().filter(allowed) {
        let Some(spec) = apply(&req.base, levers) else {
            continue;
        };
        let Ok(a) = attempt(req, spec) else {
            continue;
        };
        let alt = alternative(levers, a);
        if alt.fits {
            return Some(alt);
        }
        last = Some(alt);
    }
    last
}

/// Whether `gpus` GPUs split the request's global batch (sequences only: a token count
/// is checked by the search at each length).
fn splits(req: &FitRequest, gpus: u64) -> bool {
    match req.global {
        GlobalBatch::Sequences(g) => g.is_multiple_of(gpus),
        _ => true,
    }
}

/// The smallest GPU count above the run's that fits with full sharding, at the lowest
/// stage that fits there; the largest count tried, with its miss, when none does.
///
/// Each GPU's share of the sharded state, and of a fixed global batch, only falls as GPUs
/// are added, so the counts are probed at doubling steps up to the first that fits, then
/// halved back to the smallest (about a dozen searches, not 63).
fn more_gpus(req: &FitRequest) -> Option<Alternative> {
    let h = &req.base.hardware;
    let full = if h.sharding == Sharding::Fsdp2 {
        Sharding::Fsdp2
    } else {
        Sharding::Zero3
    };
    let counts: Vec<u64> = ((h.gpus + 1)..=MAX_LADDER_GPUS)
        .filter(|&n| splits(req, n))
        .collect();
    let at = |i: usize| {
        let gpus = counts[i];
        first_fitting(
            req,
            &[vec![Lever::MoreGpus {
                gpus,
                sharding: full,
            }]],
        )
    };
    let (mut lo, mut found, mut last) = (0, None, None);
    let mut i = 0;
    while i < counts.len() {
        match at(i) {
            Some(a) if a.fits => {
                found = Some((i, a));
                break;
            }
            a => {
                lo = i + 1;
                last = a.or(last);
            }
        }
        i = if i + 1 == counts.len() {
            i + 1
        } else {
            (2 * i + 1).min(counts.len() - 1)
        };
    }
    let (mut hi, mut best) = found?;
    while lo < hi {
        let mid = (lo + hi) / 2;
        match at(mid) {
            Some(a) if a.fits => (hi, best) = (mid, a),
            _ => lo = mid + 1,
        }
    }
    Some(lowest_stage(req, counts[hi], full).unwrap_or(best))
}

/// The lowest stage below `full` that fits on `gpus` GPUs, if any.
fn lowest_stage(req: &FitRequest, gpus: u64, full: Sharding) -> Option<Alternative> {
    let lower: Vec<Vec<Lever>> = stages_above(req.base.hardware.sharding)
        .into_iter()
        .filter(|s| *s != full)
        .map(|sharding| vec![Lever::MoreGpus { gpus, sharding }])
        .collect();
    first_fitting(req, &lower).filter(|a| a.fits)
}

/// Every step of the ladder the run can take, in order (see the module's list).
pub fn alternatives(req: &FitRequest) -> Vec<Alternative> {
    let base = &req.base;
    let mut out = Vec::new();
    if base.hardware.gpus > 1 {
        let shard: Vec<Vec<Lever>> = stages_above(base.hardware.sharding)
            .into_iter()
            .map(|sharding| vec![Lever::Shard { sharding }])
            .collect();
        out.extend(first_fitting(req, &shard));
    }
    for levers in training_levers(base) {
        out.extend(first_fitting(req, &with_shards(base, levers)));
    }
    // More GPUs only help sharded, so keeping the sharding keeps the GPU count too.
    if !req
        .keep
        .iter()
        .any(|k| matches!(k, Change::Gpus | Change::Sharding))
    {
        out.extend(more_gpus(req));
    }
    out.extend(first_fitting(req, &offload_steps(req)));
    if !base.train.offload_activations {
        let offload = with_shards(base, vec![Lever::OffloadActivations]);
        out.extend(first_fitting(req, &offload));
    }
    out
}

/// `fit` that never dead-ends: the first length of `lengths` (or the request's own) that
/// fits, or the ladder of levers at the last length tried, with the longest shorter
/// length that fits as asked.
pub fn fit_or_ladder(
    req: &FitRequest,
    lengths: &[u64],
) -> Result<std::result::Result<FitResult, Ladder>> {
    let misses = match crate::fit::fit_first(req, lengths)? {
        Ok(r) => return Ok(Ok(r)),
        Err(m) => m,
    };
    let at = FitRequest {
        seq_len: lengths.last().copied().or(req.seq_len),
        ..req.clone()
    };
    Ok(Err(Ladder {
        misses,
        alternatives: alternatives(&at),
        shorter: shorter(&at),
    }))
}

/// The halvings of a fixed sequence length, longest first, down to [`MIN_SHORTER_SEQ`].
fn halvings(seq: u64) -> impl Iterator<Item = u64> {
    std::iter::successors(Some(seq / 2), |s| Some(s / 2)).take_while(|&s| s >= MIN_SHORTER_SEQ)
}

/// The longest halving of the request's fixed sequence length that fits with everything
/// else as asked (the search still picks micro-batch, checkpointing and loss); None when
/// the length is searched or no halving fits.
pub fn shorter(req: &FitRequest) -> Option<Shorter> {
    halvings(req.seq_len?).find_map(|seq_len| {
        let at = FitRequest {
            seq_len: Some(seq_len),
            ..req.clone()
        };
        let Ok(Attempt::Fits(r)) = try_fit(&at) else {
            return None;
        };
        let b = &r.best;
        Some(Shorter {
            seq_len,
            peak_allocated_bytes: b.report.peak_allocated_bytes,
            device_bytes: b.report.device_bytes,
            micro_batch: b.micro_batch,
            grad_accum: b.grad_accum,
            checkpointing: b.checkpointing,
            loss: b.loss,
            loss_chunk: b.loss_chunk,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::estimate;

    fn raw(model: &str, gpu: &str, gpus: u64) -> RawConfig {
        RawConfig {
            model: crate::RawModel {
                preset: Some(model.into()),
                ..crate::RawModel::default()
            },
            train: crate::RawTrain {
                seq_len: Some(2048),
                ..crate::RawTrain::default()
            },
            hardware: crate::RawHardware {
                gpu: Some(gpu.into()),
                gpus: Some(gpus),
                ..crate::RawHardware::default()
            },
            lora: None,
        }
    }

    fn resolve(raw: &RawConfig) -> RunSpec {
        let presets = crate::Presets::builtin().expect("presets");
        raw.resolve(&presets, &crate::Context::default())
            .expect("valid")
    }

    fn request(raw: &RawConfig, seq: u64, global: u64) -> FitRequest {
        FitRequest {
            base: resolve(raw),
            seq_len: Some(seq),
            global: GlobalBatch::Sequences(global),
            margin: 0.1,
            allow_fused: false,
            keep: Vec::new(),
        }
    }

    /// The place of a step in the ladder: sharding the GPUs there are adds nothing.
    fn rung(levers: &[Lever]) -> u8 {
        levers
            .iter()
            .map(|l| match l {
                Lever::Shard { .. } => 0,
                Lever::Optimizer8bit { .. } => 1,
                Lever::PureBf16 => 2,
                Lever::Lora { .. } => 4,
                Lever::Qlora { .. } => 5,
                Lever::MoreGpus { .. } => 6,
                Lever::OffloadOptimizer { .. } => 7,
                Lever::OffloadActivations => 8,
            })
            .sum()
    }

    /// Each plan the ladder says fits is a valid run that the planner, estimated again,
    /// says fits with the margin, with the asked global batch and length, differs from
    /// the run only by its levers and the search's choices, and is written back as the
    /// same run.
    fn check_plans(raw: &RawConfig, req: &FitRequest, alts: &[Alternative]) {
        for a in alts {
            assert_eq!(a.fits, a.best.is_some());
            assert_eq!(a.fits, a.miss.is_none());
            let Some(best) = &a.best else {
                let m = a.miss.as_ref().unwrap();
                assert!(m.smallest.as_ref().unwrap().report.device_bytes > m.usable_bytes);
                continue;
            };
            check_run(&best.spec).unwrap();
            let again = estimate(&best.spec);
            assert!(again.fits_with_margin(0.1), "{:?}", a.levers);
            assert_eq!(again.device_bytes, best.report.device_bytes);
            let asked = req.base.global_batch_tokens() / req.base.train.seq_len;
            let GlobalBatch::Sequences(g) = req.global else {
                panic!()
            };
            assert_eq!(best.spec.global_batch(), g, "{asked}");
            assert_eq!(best.spec.train.seq_len, req.seq_len.unwrap());
            let mut want = apply(&req.base, &a.levers).unwrap();
            want.train.micro_batch = best.micro_batch;
            want.train.grad_accum = best.grad_accum;
            want.train.checkpointing = best.checkpointing;
            want.train.loss = best.loss;
            if let Some(rows) = best.loss_chunk {
                want.train.loss_chunk = rows;
            }
            assert_eq!(best.spec, want, "{:?}", a.levers);
            assert_eq!(resolve(&raw_with(raw, &a.levers, &best.spec)), best.spec);
        }
    }

    /// Llama-3.1-8B on one RTX 4090 at 2048 × 32: full fine-tuning fits nothing; the
    /// ladder tries every step in order, and each plan it says fits does.
    #[test]
    fn the_ladder_is_in_order_and_each_plan_fits() {
        let raw = raw("llama-3.1-8b", "rtx4090-24gb", 1);
        let req = request(&raw, 2048, 32);
        let Err(ladder) = fit_or_ladder(&req, &[]).unwrap() else {
            panic!("full fine-tuning of 8 B parameters fits 24 GB");
        };
        assert_eq!(ladder.misses.len(), 1);
        let rungs: Vec<u8> = ladder
            .alternatives
            .iter()
            .map(|a| rung(&a.levers))
            .collect();
        // One GPU: no sharding over the GPUs there are; every other step is tried.
        assert_eq!(rungs, [1, 2, 3, 4, 5, 6, 7, 8], "{:?}", ladder.alternatives);
        check_plans(&raw, &req, &ladder.alternatives);
        // Full fine-tuning in 8-bit or bf16 state does not fit one card: 8 B bf16
        // weights and gradients alone are 32 GB. LoRA and QLoRA do.
        let fits: Vec<bool> = ladder.alternatives.iter().map(|a| a.fits).collect();
        assert_eq!(fits[..5], [false, false, false, true, true]);
        assert_eq!(
            ladder.nearest().next().unwrap().levers,
            [Lever::Lora { rank: 16 }]
        );
    }

    /// `fit --keep`: a kept kind of change is never a lever (keeping the sharding keeps
    /// the GPU count too), and the search keeps the run's checkpointing and loss.
    #[test]
    fn kept_kinds_are_not_changed() {
        let raw = raw("llama-3.1-8b", "rtx4090-24gb", 1);
        let mut req = request(&raw, 2048, 32);
        req.keep = vec![Change::Lora, Change::Sharding];
        let Err(ladder) = fit_or_ladder(&req, &[]).unwrap() else {
            panic!("full fine-tuning of 8 B parameters fits 24 GB");
        };
        let kinds: Vec<Change> = ladder
            .alternatives
            .iter()
            .flat_map(|a| a.levers.iter().map(Lever::kind))
            .collect();
        assert!(!kinds.is_empty());
        for kept in [Change::Lora, Change::Sharding, Change::Gpus] {
            assert!(!kinds.contains(&kept), "{kept}: {kinds:?}");
        }
        let small = raw_model_fit("smollm2-135m", &[Change::Checkpointing, Change::Loss]);
        let base = &small.base.train;
        let r = crate::fit::fit(&small).expect("135 M parameters fit 24 GB");
        assert!(r
            .candidates
            .iter()
            .all(|c| c.checkpointing == base.checkpointing && c.loss == base.loss));
    }

    fn raw_model_fit(model: &str, keep: &[Change]) -> FitRequest {
        let mut req = request(&raw(model, "rtx4090-24gb", 1), 2048, 32);
        req.keep = keep.to_vec();
        req
    }

    /// More GPUs: the count is the smallest that splits the global batch and fits with
    /// ZeRO-3; every smaller count that splits it does not fit.
    #[test]
    fn more_gpus_is_the_smallest_count_that_fits() {
        let req = request(&raw("llama-3.1-8b", "rtx4090-24gb", 1), 2048, 32);
        let alt = more_gpus(&req).expect("a count up to 64 fits");
        let [Lever::MoreGpus { gpus, sharding }] = alt.levers[..] else {
            panic!("{:?}", alt.levers)
        };
        assert!(alt.fits && gpus > 1 && 32 % gpus == 0, "{gpus}");
        let misses = |levers: Vec<Lever>| {
            let spec = apply(&req.base, &levers).unwrap();
            matches!(attempt(&req, spec).unwrap(), Attempt::Misses(_))
        };
        for n in (2..gpus).filter(|n| 32 % n == 0) {
            let zero3 = Lever::MoreGpus {
                gpus: n,
                sharding: Sharding::Zero3,
            };
            assert!(misses(vec![zero3]), "{n} GPUs fit before {gpus}");
        }
        // The lowest stage that fits at that count.
        for lower in [Sharding::Zero1, Sharding::Zero2]
            .into_iter()
            .filter(|s| *s < sharding)
        {
            assert!(
                misses(vec![Lever::MoreGpus {
                    gpus,
                    sharding: lower
                }]),
                "{lower}"
            );
        }
    }

    /// Several GPUs: sharding them comes first; each later step is tried with the lowest
    /// ZeRO stage over them that fits. (On 24 GB cards 8-bit AdamW under ZeRO-3 no longer
    /// fits 8 B once DeepSpeed's buckets and gathered root parameters are counted.)
    #[test]
    fn on_several_gpus_each_step_is_sharded_as_little_as_fits() {
        let raw = raw("llama-3.1-8b", "rtx5090-32gb", 8);
        let req = request(&raw, 2048, 32);
        let alts = alternatives(&req);
        assert!(
            matches!(alts[0].levers[..], [Lever::Shard { .. }]),
            "{:?}",
            alts[0].levers
        );
        let rungs: Vec<u8> = alts.iter().map(|a| rung(&a.levers)).collect();
        assert!(rungs.windows(2).all(|w| w[0] < w[1]), "{rungs:?}");
        check_plans(&raw, &req, &alts);
        let eight = alts.iter().find(|a| rung(&a.levers) == 1).unwrap();
        assert!(eight.fits, "8-bit AdamW with ZeRO over 8 GPUs fits 8 B");
        let [Lever::Shard { sharding }, Lever::Optimizer8bit { .. }] = eight.levers[..] else {
            panic!("{:?}", eight.levers)
        };
        let mut lower: Vec<Vec<Lever>> = vec![eight.levers[1..].to_vec()];
        for s in [Sharding::Zero1, Sharding::Zero2]
            .into_iter()
            .filter(|s| *s < sharding)
        {
            lower.push(vec![Lever::Shard { sharding: s }, eight.levers[1]]);
        }
        for levers in lower {
            let spec = apply(&req.base, &levers).unwrap();
            assert!(
                matches!(attempt(&req, spec).unwrap(), Attempt::Misses(_)),
                "{levers:?}"
            );
        }
    }

    /// A lever the run has already taken, or cannot take, is not offered.
    #[test]
    fn levers_already_taken_are_left_out() {
        let mut r = raw("smollm2-135m", "rtx4060-laptop-8gb", 1);
        r.train.optimizer = Some("adamw-8bit".into());
        r.train.precision = Some("bf16".into());
        r.lora = Some(adapters(8, true));
        assert!(training_levers(&resolve(&r)).is_empty());
        r.lora = Some(adapters(8, false));
        assert_eq!(
            training_levers(&resolve(&r)),
            [vec![Lever::Qlora { rank: 8 }]]
        );
        let mut cpu = raw("smollm2-135m", "cpu", 1);
        cpu.train.precision = Some("fp32".into());
        let spec = resolve(&cpu);
        assert!(apply(&spec, &[Lever::OffloadActivations]).is_none());
        let more = Lever::MoreGpus {
            gpus: 2,
            sharding: Sharding::Zero3,
        };
        assert!(apply(&spec, &[more]).is_none());
    }

    /// A fixed length that fits nothing: the ladder names the longest halving that fits
    /// as asked; the next longer one (or the length asked) does not fit.
    #[test]
    fn the_longest_shorter_length_that_fits_is_named() {
        let req = request(&raw("qwen2.5-0.5b", "rtx3060-12gb", 1), 16384, 16);
        let Err(ladder) = fit_or_ladder(&req, &[]).unwrap() else {
            panic!("16 × 16384 tokens of Qwen2.5-0.5B fit 12 GB");
        };
        let s = ladder.shorter.expect("a halving of 16384 fits");
        let fits = |seq: u64| {
            let at = FitRequest {
                seq_len: Some(seq),
                ..req.clone()
            };
            match try_fit(&at).unwrap() {
                Attempt::Fits(r) => Some(r.best),
                Attempt::Misses(_) => None,
            }
        };
        assert!(s.seq_len < 16384 && 16384 % s.seq_len == 0, "{}", s.seq_len);
        assert!(fits(2 * s.seq_len).is_none(), "{} fits", 2 * s.seq_len);
        let best = fits(s.seq_len).expect("the named length fits");
        assert_eq!(best.report.peak_allocated_bytes, s.peak_allocated_bytes);
        assert_eq!(best.report.device_bytes, s.device_bytes);
        assert_eq!(
            (best.micro_batch, best.grad_accum),
            (s.micro_batch, s.grad_accum)
        );
        assert_eq!(best.micro_batch * best.grad_accum, 16);
    }

    /// No halving fits (full fine-tuning of 8 B parameters on 24 GB needs its model state
    /// at any length), and a searched length has no halvings.
    #[test]
    fn no_shorter_length_when_none_fits() {
        let req = request(&raw("llama-3.1-8b", "rtx4090-24gb", 1), 2048, 32);
        let Err(ladder) = fit_or_ladder(&req, &[]).unwrap() else {
            panic!("full fine-tuning of 8 B parameters fits 24 GB");
        };
        assert!(ladder.shorter.is_none());
        assert_eq!(halvings(2048).collect::<Vec<_>>(), [1024, 512, 256, 128]);
        assert_eq!(halvings(255).count(), 0);
        let searched = FitRequest {
            seq_len: None,
            ..req
        };
        assert!(shorter(&searched).is_none());
    }

    /// Seed 004's fallback ladder: the first length that fits is taken, and each longer
    /// one is kept with why it did not.
    #[test]
    fn the_first_length_that_fits_is_taken() {
        let req = request(&raw("qwen2.5-0.5b", "rtx4060ti-16gb", 1), 2048, 16);
        let lengths = [32768, 16384, 8192, 4096];
        let misses: Vec<bool> = lengths
            .iter()
            .map(|&s| {
                let at = FitRequest {
                    seq_len: Some(s),
                    ..req.clone()
                };
                matches!(try_fit(&at).unwrap(), Attempt::Misses(_))
            })
            .collect();
        // The case needs a length that does not fit before one that does.
        let k = misses.iter().position(|m| !m).expect("a length fits");
        assert!(k > 0, "{misses:?}");
        let r = crate::fit::fit_first(&req, &lengths)
            .unwrap()
            .expect("fits");
        assert_eq!(r.best.seq_len, lengths[k]);
        let longer: Vec<Option<u64>> = r.longer.iter().map(|m| m.seq_len).collect();
        let want: Vec<Option<u64>> = lengths[..k].iter().map(|s| Some(*s)).collect();
        assert_eq!(longer, want);
        for m in &r.longer {
            let c = m.smallest.as_ref().unwrap();
            assert!(c.report.device_bytes > m.usable_bytes);
        }
        // When no length fits, every one is kept with why.
        let all = crate::fit::fit_first(&req, &lengths[..k])
            .unwrap()
            .unwrap_err();
        assert_eq!(all.len(), k);
    }
}
