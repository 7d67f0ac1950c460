//! `fit`: the fastest configuration that fits, keeping the global batch.
//!
//! Searches micro-batch (the divisors of the per-GPU batch when the global batch is fixed,
//! so accumulation makes up the rest), sequence length when it is not fixed (longest that
//! fits first: the sequence length is the user's modelling choice, not a speed knob),
//! checkpointing and the loss mode. Every candidate is a full estimate; those that fit
//! with the margin are ranked by estimated tokens per second.

use crate::config::MAX_COUNT;
use crate::error::{PlanError, Result};
use crate::report::{estimate, Report};
use crate::spec::{Arch, Change, Checkpointing, Choice, Engine, LossMode, RunSpec};
use crate::timeline::{Step, Timeline};
use serde::Serialize;

/// What the user fixed about the global batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GlobalBatch {
    /// Sequences per optimizer step over all GPUs.
    Sequences(u64),
    /// Tokens per optimizer step over all GPUs.
    Tokens(u64),
    /// Not fixed: accumulation 1, the largest micro-batch that pays.
    Free,
}

#[derive(Debug, Clone)]
pub struct FitRequest {
    /// The run to start from: model, precision, optimizer, hardware are kept.
    pub base: RunSpec,
    /// Fixed sequence length, or None to search.
    pub seq_len: Option<u64>,
    pub global: GlobalBatch,
    /// Fraction of capacity to keep free.
    pub margin: f64,
    /// Also consider the fused loss (needs a fused linear-cross-entropy kernel in the training code).
    pub allow_fused: bool,
    /// Kinds of change the search and the ladder must not make (`fit --keep`).
    pub keep: Vec<Change>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub micro_batch: u64,
    pub seq_len: u64,
    pub grad_accum: u64,
    pub checkpointing: Checkpointing,
    pub loss: LossMode,
    /// Rows per chunk of the chunked loss when the search made them fewer than the run's
    /// `loss_chunk` (None when the run's chunk is kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_chunk: Option<u64>,
    pub fits: bool,
    pub report: Report,
    #[serde(skip)]
    pub spec: RunSpec,
}

impl Candidate {
    /// The loss as the tables name it (see [`loss_label`]).
    pub fn loss_label(&self) -> String {
        loss_label(self.loss, self.loss_chunk)
    }
}

/// A loss mode as the tables name it: the mode, and the chunk's rows when the search
/// changed them ("chunked by 256 rows").
pub fn loss_label(loss: LossMode, chunk: Option<u64>) -> String {
    match chunk {
        Some(rows) => format!("{loss} by {rows} rows"),
        None => loss.to_string(),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct FitResult {
    pub best: Candidate,
    /// Every candidate evaluated, best first.
    pub candidates: Vec<Candidate>,
    /// The cautious configuration people start from: micro-batch 1 with full checkpointing.
    pub baseline: Option<Candidate>,
    /// best tokens/s over baseline tokens/s.
    pub speedup: Option<f64>,
    pub margin: f64,
    /// The sequence lengths of a `--seq-len` list tried before this one, each with why it
    /// did not fit (see [`fit_first`]); empty for a single length.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub longer: Vec<Miss>,
}

/// Why a search found nothing that fits: its smallest candidate and what it needs.
#[derive(Debug, Clone, Serialize)]
pub struct Miss {
    /// The sequence length asked for; None when it was searched.
    pub seq_len: Option<u64>,
    pub margin: f64,
    /// The device bytes the margin leaves usable.
    pub usable_bytes: u64,
    /// The candidate that needs the least device memory; None when there was none.
    pub smallest: Option<Candidate>,
}

/// What a search came to: a plan, or why there is none.
#[derive(Debug, Clone)]
pub enum Attempt {
    Fits(Box<FitResult>),
    Misses(Box<Miss>),
}

const SEQS: [u64; 7] = [256, 512, 1024, 2048, 4096, 8192, 16384];
const FREE_MICRO: [u64; 16] = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256];
const MAX_CANDIDATE_MICRO: usize = 48;
/// Relative throughput difference below which candidates count as equally fast.
const SPEED_TIE: f64 = 0.01;

/// The micro-batches that split a per-GPU batch of `n` sequences with both the micro-batch
/// and the accumulation within the config's bound (`MAX_COUNT`), ascending: what `fit`
/// writes, `estimate` reads. Trial division up to `min(√n, MAX_COUNT)` finds each such
/// divisor or its co-divisor, so even `n` near `u64::MAX` costs at most 2^20 steps.
fn micro_batches(n: u64) -> Vec<u64> {
    let mut small = Vec::new();
    let mut large = Vec::new();
    let mut i = 1u64;
    // `i <= n / i` is `i² <= n` without the overflow.
    while i <= MAX_COUNT && i <= n / i {
        if n.is_multiple_of(i) {
            let j = n / i;
            if j <= MAX_COUNT {
                small.push(i);
            }
            if j != i && j <= MAX_COUNT {
                large.push(j);
            }
        }
        i += 1;
    }
    small.extend(large.into_iter().rev());
    small
}

fn seq_candidates(req: &FitRequest) -> Vec<u64> {
    if let Some(s) = req.seq_len {
        return vec![s];
    }
    let m = &req.base.model;
    let max = if m.arch == Arch::Gpt2 {
        m.max_positions
    } else {
        8192
    };
    let mut v: Vec<u64> = SEQS.iter().copied().filter(|s| *s <= max).collect();
    if m.arch == Arch::Gpt2 && !v.contains(&max) {
        v.push(max);
    }
    v.sort_unstable_by(|a, b| b.cmp(a));
    v
}

/// Sequences per GPU per optimizer step at `seq`, `Ok(None)` when the batch is free, or
/// `Err(None)` when this sequence length cannot hold the requested tokens exactly.
fn per_gpu_batch(
    req: &FitRequest,
    seq: u64,
) -> std::result::Result<Option<u64>, Option<PlanError>> {
    let gpus = req.base.hardware.gpus.max(1);
    let per = match req.global {
        GlobalBatch::Sequences(g) => {
            if g % gpus != 0 {
                return Err(Some(PlanError::invalid(
                    "--global-batch",
                    g,
                    format!("a multiple of --gpus = {gpus}"),
                )));
            }
            g / gpus
        }
        GlobalBatch::Tokens(t) => {
            let per = seq.saturating_mul(gpus);
            if t % per != 0 {
                return Err(req.seq_len.map(|_| {
                    PlanError::invalid(
                        "--global-batch-tokens",
                        t,
                        format!("a multiple of seq_len × gpus = {per}"),
                    )
                }));
            }
            t / per
        }
        GlobalBatch::Free => return Ok(None),
    };
    Ok(Some(per))
}

/// A global batch no micro-batch × accumulation within the config's bounds makes up.
fn unsplittable(req: &FitRequest) -> PlanError {
    let (key, value) = match req.global {
        GlobalBatch::Tokens(t) => ("--global-batch-tokens", t),
        GlobalBatch::Sequences(g) => ("--global-batch", g),
        GlobalBatch::Free => ("--global-batch", 0),
    };
    PlanError::invalid(
        key,
        value,
        format!(
            "a batch per GPU that splits into micro-batch × accumulation, each at most {MAX_COUNT}"
        ),
    )
}

/// Whether the search may stop a mode at its first micro-batch that does not fit. The
/// torch engine's live peak never falls as the micro-batch grows, and its device bytes
/// fall by at most two allocator segments (40 MiB; both property-tested), so a stop can
/// pass over a larger micro-batch only when it fits within that much; the candle engine's
/// fitted working sets can fall below their calibrated domain, so every micro-batch is
/// tried.
fn stops_at_first_miss(spec: &RunSpec) -> bool {
    spec.train.engine == Engine::Torch
}

/// Estimates one candidate, with its step's timeline still in its report. `chunk`: rows
/// per loss chunk in place of the run's.
fn estimated(
    req: &FitRequest,
    seq: u64,
    per_gpu: Option<u64>,
    mode: Mode,
    mb: u64,
    chunk: Option<u64>,
) -> Candidate {
    let mut spec = req.base.clone();
    spec.train.seq_len = seq;
    spec.train.micro_batch = mb;
    spec.train.grad_accum = per_gpu.map(|g| g / mb).unwrap_or(1);
    spec.train.checkpointing = mode.0;
    spec.train.loss = mode.1;
    if let Some(rows) = chunk {
        spec.train.loss_chunk = rows;
    }
    let report = estimate(&spec);
    Candidate {
        micro_batch: mb,
        seq_len: seq,
        grad_accum: spec.train.grad_accum,
        checkpointing: mode.0,
        loss: mode.1,
        loss_chunk: chunk,
        fits: report.fits_with_margin(req.margin),
        report,
        spec,
    }
}

/// The fewest rows `fit` gives a loss chunk: TRL's chunked NLL measured 256-row chunks
/// as the knee of memory against time (`REFERENCES.md`).
pub const MIN_LOSS_CHUNK: u64 = 256;

/// One candidate. A chunked loss that does not fit while its peak is in the loss tries
/// chunks of half the rows, down to [`MIN_LOSS_CHUNK`], and is the first that fits (or
/// the smallest): a chunk of the run's size may be the whole micro-batch.
fn candidate(req: &FitRequest, seq: u64, per_gpu: Option<u64>, mode: Mode, mb: u64) -> Candidate {
    let mut c = estimated(req, seq, per_gpu, mode, mb, None);
    if mode.1 != LossMode::Chunked || req.keep.contains(&Change::Loss) {
        return c;
    }
    let mut rows = req.base.train.loss_chunk.min(mb * seq);
    while !c.fits && c.report.peak_phase.ends_with("loss") && rows > MIN_LOSS_CHUNK {
        rows = (rows / 2).max(MIN_LOSS_CHUNK);
        c = estimated(req, seq, per_gpu, mode, mb, Some(rows));
    }
    c
}

/// (checkpointing, loss) of a candidate.
type Mode = (Checkpointing, LossMode);

fn modes(req: &FitRequest) -> Vec<Mode> {
    let t = &req.base.train;
    let losses: Vec<LossMode> = if req.keep.contains(&Change::Loss) {
        vec![t.loss]
    } else {
        LossMode::ALL
            .iter()
            .map(|(_, l)| *l)
            .filter(|l| *l != LossMode::Fused || (req.allow_fused && t.engine == Engine::Torch))
            .collect()
    };
    let policies = if req.keep.contains(&Change::Checkpointing) {
        vec![t.checkpointing]
    } else {
        vec![
            Checkpointing::None,
            Checkpointing::Selective,
            Checkpointing::Full,
        ]
    };
    policies
        .iter()
        .flat_map(|ck| losses.iter().map(move |l| (*ck, *l)))
        .collect()
}

/// What the search found: every candidate it estimated, in search order, and the timeline
/// of the best so far (the first that [`order`] puts before all others). Only the numbers
/// of the rest are kept: the timeline of a step is most of an estimate's memory, and only
/// the best candidate's is ever shown.
#[derive(Default)]
struct Searched {
    all: Vec<Candidate>,
    /// The best fitting candidate so far (an index into `all`) and its timeline.
    best: Option<(usize, Timeline)>,
}

impl Searched {
    /// Keeps `c`, and its timeline when it is the new best: ranking sorts stably, so the
    /// best is the first candidate no later one is strictly before.
    fn push(&mut self, mut c: Candidate, seq_fixed: bool) {
        let timeline = std::mem::replace(&mut c.report.timeline, Step::new().finish());
        let before = |b: &(usize, Timeline)| order(&c, &self.all[b.0], seq_fixed).is_lt();
        if c.fits && self.best.as_ref().is_none_or(before) {
            self.best = Some((self.all.len(), timeline));
        }
        self.all.push(c);
    }
}

/// Every candidate the search estimates, in search order. With `prune`, a mode stops at
/// its first micro-batch that does not fit where the engine's peak is monotone.
fn search(req: &FitRequest, prune: bool) -> Result<Searched> {
    if !(0.0..0.9).contains(&req.margin) {
        return Err(PlanError::invalid(
            "--margin",
            req.margin,
            "a fraction from 0 to 0.9 (e.g. 10%)",
        ));
    }
    let prune = prune && stops_at_first_miss(&req.base);
    let modes = modes(req);
    let mut found = Searched::default();
    for seq in seq_candidates(req) {
        let per_gpu = match per_gpu_batch(req, seq) {
            Ok(p) => p,
            Err(Some(e)) => return Err(e),
            Err(None) => continue,
        };
        let micros: Vec<u64> = match per_gpu {
            Some(0) => continue,
            Some(g) => micro_batches(g)
                .into_iter()
                .take(MAX_CANDIDATE_MICRO)
                .collect(),
            None => FREE_MICRO.to_vec(),
        };
        if micros.is_empty() {
            if req.seq_len.is_none() && matches!(req.global, GlobalBatch::Tokens(_)) {
                continue;
            }
            return Err(unsplittable(req));
        }
        for &mode in &modes {
            for &mb in &micros {
                let c = candidate(req, seq, per_gpu, mode, mb);
                let fits = c.fits;
                found.push(c, req.seq_len.is_some());
                if prune && !fits {
                    break;
                }
            }
        }
    }
    Ok(found)
}

/// Best first: fitting, then the longest sequence (when it is searched), then the fastest,
/// then the smallest. Throughput estimates within about 1 % are a tie, broken by memory:
/// bucketing them on a log scale keeps the order total.
fn order(a: &Candidate, b: &Candidate, seq_fixed: bool) -> std::cmp::Ordering {
    let speed = |c: &Candidate| {
        (c.report.est_tokens_per_second.max(1.0).ln() / SPEED_TIE.ln_1p()).floor() as i64
    };
    b.fits
        .cmp(&a.fits)
        .then_with(|| {
            if seq_fixed {
                std::cmp::Ordering::Equal
            } else {
                b.seq_len.cmp(&a.seq_len)
            }
        })
        .then_with(|| speed(b).cmp(&speed(a)))
        .then_with(|| a.report.device_bytes.cmp(&b.report.device_bytes))
}

/// Sorts best first by [`order`], stably: equals keep their search order.
fn rank(all: &mut [Candidate], seq_fixed: bool) {
    all.sort_by(|a, b| order(a, b, seq_fixed));
}

fn miss(req: &FitRequest, all: &[Candidate]) -> Miss {
    let capacity = req.base.hardware.device.capacity().0;
    Miss {
        seq_len: req.seq_len,
        margin: req.margin,
        usable_bytes: (capacity as f64 * (1.0 - req.margin.clamp(0.0, 0.99))) as u64,
        smallest: all.iter().min_by_key(|c| c.report.device_bytes).cloned(),
    }
}

fn no_solution(req: &FitRequest, miss: &Miss) -> PlanError {
    let detail = miss
        .smallest
        .as_ref()
        .map(|c| {
            format!(
                "; the smallest candidate (micro-batch {}, seq {}, checkpointing {}, loss {}) needs {} of {}",
                c.micro_batch,
                c.seq_len,
                c.checkpointing,
                c.loss_label(),
                crate::Bytes(c.report.device_bytes),
                crate::Bytes(c.report.capacity_bytes)
            )
        })
        .unwrap_or_default();
    PlanError::NoSolution(format!(
        "nothing fits {} with a {:.0} % margin{detail}; try more GPUs with sharding, a smaller model, or a shorter sequence",
        req.base.hardware.device.name(),
        req.margin * 100.0
    ))
}

/// The fastest configuration that fits, with every candidate estimated on the way.
pub fn fit(req: &FitRequest) -> Result<FitResult> {
    match try_fit(req)? {
        Attempt::Fits(r) => Ok(*r),
        Attempt::Misses(m) => Err(no_solution(req, &m)),
    }
}

/// [`fit`], with "nothing fits" as data (the smallest candidate) rather than an error;
/// errors are the request's own (a margin or global batch out of range).
pub fn try_fit(req: &FitRequest) -> Result<Attempt> {
    Ok(conclude(req, search(req, true)?))
}

/// `--seq-len 1024,768,512`: [`try_fit`] at each length in order, the first that fits
/// (with why each longer one did not in [`FitResult::longer`]), or every length's miss.
/// No lengths: the request's own sequence length (or the search over lengths).
pub fn fit_first(
    req: &FitRequest,
    lengths: &[u64],
) -> Result<std::result::Result<FitResult, Vec<Miss>>> {
    if lengths.is_empty() {
        return Ok(match try_fit(req)? {
            Attempt::Fits(r) => Ok(*r),
            Attempt::Misses(m) => Err(vec![*m]),
        });
    }
    let mut misses = Vec::new();
    for &seq in lengths {
        let at = FitRequest {
            seq_len: Some(seq),
            ..req.clone()
        };
        match try_fit(&at)? {
            Attempt::Fits(mut r) => {
                r.longer = misses;
                return Ok(Ok(*r));
            }
            Attempt::Misses(m) => misses.push(*m),
        }
    }
    Ok(Err(misses))
}

/// `fit` without pruning: every micro-batch of every mode is estimated. The reference the
/// property tests hold the pruned search to; not meant for callers.
#[doc(hidden)]
pub fn fit_exhaustive(req: &FitRequest) -> Result<FitResult> {
    match conclude(req, search(req, false)?) {
        Attempt::Fits(r) => Ok(*r),
        Attempt::Misses(m) => Err(no_solution(req, &m)),
    }
}

fn conclude(req: &FitRequest, found: Searched) -> Attempt {
    let Searched { mut all, best } = found;
    rank(&mut all, req.seq_len.is_some());
    let (mut best, timeline) = match (all.first(), best) {
        (Some(c), Some((_, t))) if c.fits => (c.clone(), t),
        _ => return Attempt::Misses(Box::new(miss(req, &all))),
    };
    // The one timeline worth keeping: callers may show where the chosen plan peaks.
    best.report.timeline = timeline;
    let baseline = all
        .iter()
        .find(|c| {
            c.micro_batch == 1
                && c.checkpointing == Checkpointing::Full
                && c.loss == LossMode::FloatCast
                && c.seq_len == best.seq_len
        })
        .cloned();
    let speedup = baseline.as_ref().filter(|b| b.fits).map(|b| {
        best.report.est_tokens_per_second / b.report.est_tokens_per_second.max(f64::MIN_POSITIVE)
    });
    Attempt::Fits(Box::new(FitResult {
        best,
        candidates: all,
        baseline,
        speedup,
        margin: req.margin,
        longer: Vec::new(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divisors_in_order() {
        assert_eq!(micro_batches(64), vec![1, 2, 4, 8, 16, 32, 64]);
        assert_eq!(micro_batches(12), vec![1, 2, 3, 4, 6, 12]);
        assert_eq!(micro_batches(1), vec![1]);
        assert_eq!(micro_batches(49), vec![1, 7, 49]);
    }

    /// Regression: the old loop compared `i.saturating_mul(i) <= n`, which stays true once
    /// `i²` saturates, so `u64::MAX` (and anything above (2^32 − 1)²) never finished.
    #[test]
    fn micro_batches_finish_near_u64_max() {
        let start = std::time::Instant::now();
        // u64::MAX = 3 · 5 · 17 · 257 · 641 · 65537 · 6700417: no divisor pair within 2^20.
        assert!(micro_batches(u64::MAX).is_empty());
        // 2^40 splits only as 2^20 × 2^20 within the bound.
        assert_eq!(micro_batches(1 << 40), vec![1 << 20]);
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
    }

    /// Regression: a per-GPU batch of 2^21 gave micro-batch 1 × accumulation 2^21, a plan
    /// `estimate` refuses (`train.grad_accum` is at most `MAX_COUNT`).
    #[test]
    fn no_micro_batch_needs_accumulation_above_the_config_bound() {
        for n in [
            MAX_COUNT + 1,
            2 * MAX_COUNT,
            3 * MAX_COUNT + 3,
            MAX_COUNT * 12,
        ] {
            let m = micro_batches(n);
            assert!(!m.is_empty(), "{n}");
            for mb in m {
                assert_eq!(n % mb, 0);
                assert!(
                    mb <= MAX_COUNT && n / mb <= MAX_COUNT,
                    "{n} = {mb} × {}",
                    n / mb
                );
            }
        }
        assert_eq!(micro_batches(2 * MAX_COUNT)[0], 2);
    }

    /// The best keeps the timeline of its own estimate (kept during the search, not
    /// estimated again).
    #[test]
    fn the_best_keeps_its_own_timeline() {
        for global in [GlobalBatch::Sequences(64), GlobalBatch::Free] {
            let f = fit(&request(global)).unwrap();
            let (kept, again) = (&f.best.report.timeline, estimate(&f.best.spec).timeline);
            assert!(!kept.events.is_empty());
            let bytes = |t: &Timeline| t.tensors.iter().map(|x| x.bytes).collect::<Vec<_>>();
            assert_eq!(bytes(kept), bytes(&again));
            assert_eq!(kept.events.len(), again.events.len());
            assert_eq!(kept.peak.event, again.peak.event);
            // The candidates (the best among them) keep only their numbers.
            assert!(f
                .candidates
                .iter()
                .all(|c| c.report.timeline.events.is_empty()));
        }
    }

    fn request(global: GlobalBatch) -> FitRequest {
        let raw = crate::RawConfig {
            model: crate::RawModel {
                preset: Some("smollm2-135m".into()),
                ..crate::RawModel::default()
            },
            train: crate::RawTrain {
                seq_len: Some(256),
                ..crate::RawTrain::default()
            },
            hardware: crate::RawHardware {
                gpu: Some("h100-80gb".into()),
                ..crate::RawHardware::default()
            },
            lora: None,
        };
        let presets = crate::Presets::builtin().expect("presets");
        FitRequest {
            base: raw
                .resolve(&presets, &crate::Context::default())
                .expect("valid"),
            seq_len: Some(256),
            global,
            margin: 0.1,
            allow_fused: false,
            keep: Vec::new(),
        }
    }

    /// A chunked loss whose chunk (the run's, here the whole micro-batch) does not fit is
    /// tried with half the rows until one fits; the candidate is the first that does and
    /// its plan has that chunk. Where the run's chunk fits, it is kept.
    #[test]
    fn a_chunked_loss_that_does_not_fit_takes_fewer_rows() {
        let mut req = request(GlobalBatch::Sequences(1));
        req.base.hardware.device = crate::spec::Device::Gpu(
            crate::Presets::builtin()
                .unwrap()
                .gpu("rtx4060-laptop-8gb")
                .unwrap()
                .clone(),
        );
        req.seq_len = Some(4096);
        req.keep = vec![Change::Checkpointing];
        let t = &mut req.base.train;
        (t.seq_len, t.checkpointing, t.loss_chunk) = (4096, Checkpointing::Full, 4096);
        let at = |rows: u64| {
            let mut s = req.base.clone();
            (s.train.micro_batch, s.train.loss, s.train.loss_chunk) = (1, LossMode::Chunked, rows);
            estimate(&s)
        };
        let (whole, quarter) = (at(4096).device_bytes, at(1024).device_bytes);
        assert!(quarter < whole, "{quarter} {whole}");
        let capacity = at(4096).capacity_bytes as f64;
        req.margin = 1.0 - (whole + quarter) as f64 / 2.0 / capacity;
        let best = fit(&req).unwrap().best;
        let rows = best.loss_chunk.expect("a smaller chunk");
        assert_eq!(
            (best.loss, best.spec.train.loss_chunk),
            (LossMode::Chunked, rows)
        );
        assert!(best.fits && rows < 4096);
        assert!(
            !at(rows * 2).fits_with_margin(req.margin),
            "the first that fits"
        );
        assert_eq!(best.loss_label(), format!("chunked by {rows} rows"));
        req.margin = 0.1;
        assert_eq!(fit(&req).unwrap().best.loss_chunk, None);
        req.margin = 1.0 - (whole + quarter) as f64 / 2.0 / capacity;
        req.keep.push(Change::Loss);
        req.base.train.loss = LossMode::Chunked;
        assert!(fit(&req).is_err(), "--keep loss keeps the run's chunk");
    }

    /// Regression: `fit --global-batch 18446744073709551615` never returned.
    #[test]
    fn a_global_batch_of_u64_max_is_refused_at_once() {
        let start = std::time::Instant::now();
        let err = fit(&request(GlobalBatch::Sequences(u64::MAX))).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("--global-batch = 18446744073709551615: "),
            "{err}"
        );
        assert!(start.elapsed() < std::time::Duration::from_secs(1));
    }

    /// Regression: the plan written for a global batch of 2^21 had `grad_accum` = 2^21.
    #[test]
    fn every_candidate_is_a_plan_the_config_accepts() {
        let f = fit(&request(GlobalBatch::Sequences(2 * MAX_COUNT))).unwrap();
        assert!(!f.candidates.is_empty());
        for c in &f.candidates {
            assert!(c.grad_accum <= MAX_COUNT && c.micro_batch <= MAX_COUNT);
            assert_eq!(c.micro_batch * c.grad_accum, 2 * MAX_COUNT);
        }
    }
}
