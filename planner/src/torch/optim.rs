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
use crate::timeline::{Component, Extent, Layout, Name, Step};
use crate::units::DType;

/// Allocates the optimizer state; `shard` divides it (ZeRO stage ≥ 1).
pub fn states(s: &mut Step, params: &[Param], t: &TrainSpec, shard: u64) {
    let sd = state_dtype(t.precision);
    let shard = shard.max(1);
    let sharded = |l: Layout| Extent::Shard(l, shard);
    for p in params {
        let n = p.numel();
        let opt = effective(t.optimizer, p.role);
        let extent = match opt {
            // exp_avg and exp_avg_sq, kept as one entry.
            Optimizer::AdamW => sharded(Layout::new(&[2, p.rows, p.cols], sd)),
            Optimizer::AdamW8bit => {
                // Two uint8 states and two fp32 absmax per block, each split over the
                // ranks on its own: one flat byte buffer.
                let per = |b: u64| b.div_ceil(shard);
                let states = per(n.saturating_mul(2));
                let absmax = per(DType::F32.size(&[2, n.div_ceil(ABSMAX_BLOCK)]).0);
                Extent::Layout(Layout::new(&[states.saturating_add(absmax)], DType::U8))
            }
            Optimizer::Sgd | Optimizer::Muon => sharded(Layout::new(&p.shape(), sd)),
            Optimizer::Adafactor => {
                // Row and column statistics for matrices, a full second moment for vectors.
                let len = if p.rows > 1 {
                    p.rows.saturating_add(p.cols)
                } else {
                    n
                };
                sharded(Layout::new(&[len], DType::F32))
            }
        };
        let bytes = match &extent {
            Extent::Shard(l, r) => l.bytes().0.div_ceil(*r),
            Extent::Layout(l) => l.bytes().0,
            Extent::Bytes(b) => b.0,
        };
        if bytes > 0 {
            s.persistent(
                format!("{} state of {}", opt, p.name),
                Component::Optimizer,
                extent,
            );
        }
    }
}

/// Elements per absmax in bitsandbytes' blockwise 8-bit optimizers.
const ABSMAX_BLOCK: u64 = 256;

/// The optimizer that actually updates a parameter (Muon hands embeddings, the head and
/// vectors to AdamW, as nanochat's setup_optimizers does).
fn effective(opt: Optimizer, role: Role) -> Optimizer {
    match (opt, role) {
        (Optimizer::Muon, Role::Matrix) => Optimizer::Muon,
        (Optimizer::Muon, _) => Optimizer::AdamW,
        (o, _) => o,
    }
}

fn state_dtype(p: Precision) -> DType {
    match p {
        Precision::Bf16 => DType::Bf16,
        _ => DType::F32,
    }
}

/// This rank's part of `p`: its own shape when whole, a flat shard otherwise.
fn part(p: &Param, shard: u64, dtype: DType) -> Layout {
    if shard > 1 {
        Layout::new(&[p.numel().div_ceil(shard)], dtype)
    } else {
        Layout::new(&p.shape(), dtype)
    }
}

/// The step's temporaries, played into the timeline.
pub fn step(s: &mut Step, params: &[Param], t: &TrainSpec, cuda: bool, shard: u64) {
    let sd = state_dtype(t.precision);
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
                            Name::of("adamw foreach sqrt(exp_avg_sq) of ", &p.name, ""),
                            Component::Temporaries,
                            part(p, shard, sd),
                        )
                    })
                    .collect();
                ids.into_iter().for_each(|id| s.free(id));
            } else {
                let n = largest(&adam_like);
                let a = s.alloc(
                    "adamw exp_avg_sq.sqrt()",
                    Component::Temporaries,
                    Layout::new(&[n], sd),
                );
                s.transient(
                    "adamw denominator",
                    Component::Temporaries,
                    Layout::new(&[n], sd),
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
                    let x = Layout::new(&[m.rows, m.cols], DType::Bf16);
                    let gram = Layout::new(&[side, side], DType::Bf16);
                    s.transient(
                        "muon newton-schulz",
                        Component::Temporaries,
                        Layout::concat(&[x.clone(), x, gram.clone(), gram]),
                    );
                }
            }
        }
        Optimizer::AdamW8bit | Optimizer::Sgd => {}
        Optimizer::Adafactor => {
            let n = largest(&|_| true);
            // The update, its square and the factored estimate, in fp32.
            s.transient(
                "adafactor update",
                Component::Temporaries,
                Layout::new(&[3, n], DType::F32),
            );
        }
    }
}
