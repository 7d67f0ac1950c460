//! Optimizer state and step temporaries, per parameter.
//!
//! - `adamw` (torch.optim.AdamW): `exp_avg` and `exp_avg_sq` in the parameter's dtype.
//!   On CUDA the default multi-tensor (foreach) step allocates `sqrt(exp_avg_sq)` for the
//!   whole group at once (one copy of the state-sized parameters); on CPU the
//!   single-tensor step makes `exp_avg_sq.sqrt()` and its quotient, one parameter at a time.
//! - `adamw-8bit` (bitsandbytes): two uint8 states plus an fp32 absmax per 256-element block.
//! - `sgd`: one momentum buffer. `adafactor` (transformers): row and column statistics for
//!   matrices, a full second moment for vectors; per-parameter update temporaries.
//! - `muon` (nanochat): one momentum buffer for the block matrices (Newton–Schulz in bf16
//!   on the update), AdamW for the embedding and the head.

use crate::params::{Param, Role};
use crate::spec::{Optimizer, Precision, TrainSpec};
use crate::timeline::{Component, Step};
use crate::units::Bytes;

/// Allocates the optimizer state; `shard` divides it (ZeRO stage ≥ 1).
pub fn states(s: &mut Step, params: &[Param], t: &TrainSpec, shard: u64) {
    let sb = state_bytes(t.precision);
    let per = |n: u64, bytes: u64| Bytes::of(n, bytes).0.div_ceil(shard.max(1));
    for p in params {
        let n = p.numel();
        let opt = effective(t.optimizer, p.role);
        let bytes = match opt {
            Optimizer::AdamW => per(n, 2 * sb),
            Optimizer::AdamW8bit => per(n, 2) + per(n.div_ceil(256), 8),
            Optimizer::Sgd | Optimizer::Muon => per(n, sb),
            Optimizer::Adafactor => {
                if p.rows > 1 {
                    per(p.rows.saturating_add(p.cols), 4)
                } else {
                    per(n, 4)
                }
            }
        };
        if bytes > 0 {
            s.persistent(
                format!("{} state of {}", opt, p.name),
                Component::Optimizer,
                Bytes(bytes),
            );
        }
    }
}

/// The optimizer that actually updates a parameter (Muon hands embeddings, the head and
/// vectors to AdamW, as nanochat's setup_optimizers does).
fn effective(opt: Optimizer, role: Role) -> Optimizer {
    match (opt, role) {
        (Optimizer::Muon, Role::Matrix) => Optimizer::Muon,
        (Optimizer::Muon, _) => Optimizer::AdamW,
        (o, _) => o,
    }
}

fn state_bytes(p: Precision) -> u64 {
    match p {
        Precision::Bf16 => 2,
        _ => 4,
    }
}

/// The step's temporaries, played into the timeline.
pub fn step(s: &mut Step, params: &[Param], t: &TrainSpec, cuda: bool, shard: u64) {
    let sb = state_bytes(t.precision);
    let shard = shard.max(1);
    let largest = |pred: &dyn Fn(&Param) -> bool| {
        params
            .iter()
            .filter(|p| pred(p))
            .map(|p| p.numel().div_ceil(shard))
            .max()
            .unwrap_or(0)
    };
    let adam_like = |p: &Param| effective(t.optimizer, p.role) == Optimizer::AdamW;
    match t.optimizer {
        Optimizer::AdamW | Optimizer::Muon => {
            if cuda {
                // `_foreach_sqrt` returns one tensor per parameter, all alive until the
                // update is done.
                let ids: Vec<_> = params
                    .iter()
                    .filter(|p| adam_like(p))
                    .map(|p| {
                        s.alloc(
                            format!("adamw foreach sqrt(exp_avg_sq) of {}", p.name),
                            Component::Temporaries,
                            Bytes::of(p.numel().div_ceil(shard), sb),
                        )
                    })
                    .collect();
                ids.into_iter().for_each(|id| s.free(id));
            } else {
                let n = largest(&adam_like);
                let a = s.alloc(
                    "adamw exp_avg_sq.sqrt()",
                    Component::Temporaries,
                    Bytes::of(n, sb),
                );
                s.transient(
                    "adamw denominator",
                    Component::Temporaries,
                    Bytes::of(n, sb),
                );
                s.free(a);
            }
            if t.optimizer == Optimizer::Muon {
                // Newton–Schulz on the largest matrix: X, X·Xᵀ, and the polynomial's product, in bf16.
                let m = params
                    .iter()
                    .filter(|p| p.role == Role::Matrix)
                    .max_by_key(|p| p.numel());
                if let Some(m) = m {
                    let side = m.rows.min(m.cols);
                    let x = Bytes::of(m.numel(), 2);
                    let gram = Bytes::of(side.saturating_mul(side), 2);
                    s.transient(
                        "muon newton-schulz",
                        Component::Temporaries,
                        x + x + gram + gram,
                    );
                }
            }
        }
        Optimizer::AdamW8bit | Optimizer::Sgd => {}
        Optimizer::Adafactor => {
            let n = largest(&|_| true);
            s.transient(
                "adafactor update",
                Component::Temporaries,
                Bytes::of(n, 4 * 3),
            );
        }
    }
}
