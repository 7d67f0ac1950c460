//! `fit`: the fastest configuration that fits, keeping the global batch.
//!
//! Searches micro-batch (the divisors of the per-GPU batch when the global batch is fixed,
//! so accumulation makes up the rest), sequence length when it is not fixed (longest that
//! fits first: the sequence length is the user's modelling choice, not a speed knob),
//! checkpointing and the loss mode. Every candidate is a full estimate; those that fit
//! with the margin are ranked by estimated tokens per second.

use crate::error::{PlanError, Result};
use crate::report::{estimate, Report};
use crate::spec::{Arch, Checkpointing, Choice, Engine, LossMode, RunSpec};
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
}

#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub micro_batch: u64,
    pub seq_len: u64,
    pub grad_accum: u64,
    pub checkpointing: Checkpointing,
    pub loss: LossMode,
    pub fits: bool,
    pub report: Report,
    #[serde(skip)]
    pub spec: RunSpec,
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
}

const SEQS: [u64; 7] = [256, 512, 1024, 2048, 4096, 8192, 16384];
const FREE_MICRO: [u64; 16] = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256];
const MAX_CANDIDATE_MICRO: usize = 48;
/// Relative throughput difference below which candidates count as equally fast.
const SPEED_TIE: f64 = 0.01;

fn divisors(n: u64) -> Vec<u64> {
    let mut small = Vec::new();
    let mut large = Vec::new();
    let mut i = 1u64;
    while i.saturating_mul(i) <= n {
        if n.is_multiple_of(i) {
            small.push(i);
            if i != n / i {
                large.push(n / i);
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

pub fn fit(req: &FitRequest) -> Result<FitResult> {
    if !(0.0..0.9).contains(&req.margin) {
        return Err(PlanError::invalid(
            "--margin",
            req.margin,
            "a fraction from 0 to 0.9 (e.g. 10%)",
        ));
    }
    let gpus = req.base.hardware.gpus.max(1);
    let losses: Vec<LossMode> = LossMode::ALL
        .iter()
        .map(|(_, l)| *l)
        .filter(|l| {
            *l != LossMode::Fused || (req.allow_fused && req.base.train.engine == Engine::Torch)
        })
        .collect();
    let mut all = Vec::new();
    for seq in seq_candidates(req) {
        let per_gpu = match req.global {
            GlobalBatch::Sequences(g) => {
                if g % gpus != 0 {
                    return Err(PlanError::invalid(
                        "--global-batch",
                        g,
                        format!("a multiple of --gpus = {gpus}"),
                    ));
                }
                Some(g / gpus)
            }
            GlobalBatch::Tokens(t) => {
                let per = seq.saturating_mul(gpus);
                if t % per != 0 {
                    if req.seq_len.is_some() {
                        return Err(PlanError::invalid(
                            "--global-batch-tokens",
                            t,
                            format!("a multiple of seq_len × gpus = {per}"),
                        ));
                    }
                    continue;
                }
                Some(t / per)
            }
            GlobalBatch::Free => None,
        };
        let micros: Vec<u64> = match per_gpu {
            Some(0) => continue,
            Some(g) => divisors(g)
                .into_iter()
                .filter(|mb| g / mb <= crate::config::MAX_COUNT)
                .take(MAX_CANDIDATE_MICRO)
                .collect(),
            None => FREE_MICRO.to_vec(),
        };
        for &ck in &[
            Checkpointing::None,
            Checkpointing::Selective,
            Checkpointing::Full,
        ] {
            for &loss in &losses {
                for &mb in &micros {
                    let mut spec = req.base.clone();
                    spec.train.seq_len = seq;
                    spec.train.micro_batch = mb;
                    spec.train.grad_accum = per_gpu.map(|g| g / mb).unwrap_or(1);
                    spec.train.checkpointing = ck;
                    spec.train.loss = loss;
                    let report = estimate(&spec);
                    let fits = report.fits_with_margin(req.margin);
                    all.push(Candidate {
                        micro_batch: mb,
                        seq_len: seq,
                        grad_accum: spec.train.grad_accum,
                        checkpointing: ck,
                        loss,
                        fits,
                        report,
                        spec,
                    });
                    // Memory never falls as the micro-batch grows: stop at the first miss.
                    if !fits {
                        break;
                    }
                }
            }
        }
    }
    let seq_fixed = req.seq_len.is_some();
    // Throughput estimates within about 1 % are a tie, broken by memory: bucketing them on
    // a log scale keeps the order total.
    let speed = |c: &Candidate| {
        (c.report.est_tokens_per_second.max(1.0).ln() / SPEED_TIE.ln_1p()).floor() as i64
    };
    all.sort_by(|a, b| {
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
    });
    let best = match all.first() {
        Some(c) if c.fits => c.clone(),
        _ => {
            let smallest = all.iter().min_by_key(|c| c.report.device_bytes);
            let detail = smallest
                .map(|c| {
                    format!(
                        "; the smallest candidate (micro-batch {}, seq {}, checkpointing {}, loss {}) needs {} of {}",
                        c.micro_batch,
                        c.seq_len,
                        c.checkpointing,
                        c.loss,
                        crate::Bytes(c.report.device_bytes),
                        crate::Bytes(c.report.capacity_bytes)
                    )
                })
                .unwrap_or_default();
            return Err(PlanError::NoSolution(format!(
                "nothing fits {} with a {:.0} % margin{detail}; try more GPUs with sharding, a smaller model, or a shorter sequence",
                req.base.hardware.device.name(),
                req.margin * 100.0
            )));
        }
    };
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
    Ok(FitResult {
        best,
        candidates: all,
        baseline,
        speedup,
        margin: req.margin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn divisors_in_order() {
        assert_eq!(divisors(64), vec![1, 2, 4, 8, 16, 32, 64]);
        assert_eq!(divisors(12), vec![1, 2, 3, 4, 6, 12]);
        assert_eq!(divisors(1), vec![1]);
    }
}
