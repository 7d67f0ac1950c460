//! Fixes re-planned against the run config: each saver alone and combined, each one a
//! config `estimate` reads back, ranked by the planner's predicted peak.

use super::{Edit, Fix, FixKind};
use crate::config::{check_run, MAX_COUNT};
use crate::report::estimate;
use crate::spec::{Checkpointing, LossMode, RunSpec, Sharding};

/// Whether a changed run stays within what a config may say (halving the micro-batch
/// doubles the accumulation, which has its own bound).
fn writable(s: &RunSpec) -> bool {
    s.train.grad_accum <= MAX_COUNT && check_run(s).is_ok()
}

/// A candidate change: its edits, the run it gives, and whether it keeps the global batch.
type Candidate = (Vec<Edit>, RunSpec, bool);

fn halve_micro_batch(s: &mut RunSpec) -> Edit {
    s.train.micro_batch /= 2;
    s.train.grad_accum = s.train.grad_accum.saturating_mul(2);
    Edit::MicroBatch {
        micro_batch: s.train.micro_batch,
        grad_accum: s.train.grad_accum,
    }
}

/// Each saver alone.
fn single_changes(spec: &RunSpec) -> Vec<Candidate> {
    let mut cands = Vec::new();
    let t = &spec.train;
    let with = |f: &dyn Fn(&mut RunSpec) -> Edit| {
        let mut s = spec.clone();
        let e = f(&mut s);
        (vec![e], s)
    };
    if t.micro_batch >= 2 {
        let (e, s) = with(&halve_micro_batch);
        cands.push((e, s, t.micro_batch.is_multiple_of(2)));
    }
    for loss in [LossMode::Chunked, LossMode::Fused] {
        if t.loss != loss {
            let (e, s) = with(&|s| {
                s.train.loss = loss;
                Edit::Loss { loss }
            });
            cands.push((e, s, true));
        }
    }
    if t.checkpointing != Checkpointing::Full {
        let (e, s) = with(&|s| {
            s.train.checkpointing = Checkpointing::Full;
            Edit::Checkpointing {
                checkpointing: Checkpointing::Full,
            }
        });
        cands.push((e, s, true));
    }
    if t.seq_len >= 2 {
        let (e, s) = with(&|s| {
            s.train.seq_len /= 2;
            Edit::SeqLen {
                seq_len: s.train.seq_len,
            }
        });
        cands.push((e, s, false));
    }
    if spec.hardware.gpus > 1 {
        for sharding in [Sharding::Zero2, Sharding::Zero3] {
            if spec.hardware.sharding.stage() < sharding.stage() {
                let (e, s) = with(&|s| {
                    s.hardware.sharding = sharding;
                    Edit::Sharding { sharding }
                });
                cands.push((e, s, true));
            }
        }
    }
    cands
}

/// Single changes rarely suffice for a run far over: also the smallest-loss setups,
/// halving the micro-batch (accumulating more) until the plan fits.
fn combined(spec: &RunSpec, full: bool) -> Candidate {
    let t = &spec.train;
    let mut s = spec.clone();
    let mut edits = Vec::new();
    if t.loss == LossMode::FloatCast {
        s.train.loss = LossMode::Chunked;
        edits.push(Edit::Loss {
            loss: LossMode::Chunked,
        });
    }
    if full && t.checkpointing != Checkpointing::Full {
        s.train.checkpointing = Checkpointing::Full;
        edits.push(Edit::Checkpointing {
            checkpointing: Checkpointing::Full,
        });
    }
    let mut keeps = true;
    let mut last = None;
    while !estimate(&s).fits && s.train.micro_batch >= 2 {
        keeps &= s.train.micro_batch.is_multiple_of(2);
        last = Some(halve_micro_batch(&mut s));
    }
    edits.extend(last);
    (edits, s, keeps)
}

/// Re-plans the run with each candidate change; fitting first, then those keeping the
/// global batch, then by predicted peak.
pub fn planned_fixes(spec: &RunSpec) -> Vec<Fix> {
    let mut cands = single_changes(spec);
    for full in [false, true] {
        let c = combined(spec, full);
        if c.0.len() >= 2 && !cands.iter().any(|x| x.1 == c.1) {
            cands.push(c);
        }
    }
    let mut fixes: Vec<Fix> = cands
        .into_iter()
        // A fix is a plan `--out` may write: it must be one `estimate` reads back.
        .filter(|(_, s, _)| writable(s))
        .map(|(edits, s, keeps)| {
            let r = estimate(&s);
            Fix {
                kind: FixKind::Edits { edits },
                predicted_peak_bytes: Some(r.device_bytes),
                fits: Some(r.fits),
                keeps_global_batch: keeps,
                spec: Some(s),
            }
        })
        .collect();
    fixes.sort_by_key(|f| {
        (
            f.fits != Some(true),
            !f.keeps_global_batch,
            f.predicted_peak_bytes.unwrap_or(u64::MAX),
        )
    });
    fixes
}
