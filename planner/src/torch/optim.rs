//! Optimizer state and step temporaries, per parameter, as each implementation keeps them.
//!
//! - AdamW (torch 2.15 `torch/optim/adam.py`): `exp_avg` and `exp_avg_sq` in the
//!   parameter's dtype. `_single_tensor_adam` makes `exp_avg_sq.sqrt()` and its quotient
//!   one parameter at a time (two state-sized buffers of the largest parameter);
//!   `_multi_tensor_adam` makes `_foreach_sqrt(exp_avg_sqs)` for the whole group at once (one
//!   copy of every parameter); `_fused_adam` keeps nothing. `adamw` is what
//!   `_default_to_fused_or_foreach` picks: foreach on CUDA, the single-tensor loop on CPU.
//! - bitsandbytes 0.50 (`optim/optimizer.py`, `Optimizer2State.init_state`): parameters with
//!   fewer than `min_8bit_size` = 4,096 elements keep two fp32 states; the others two uint8
//!   states and two fp32 absmax per 256-element block. Paged variants put states of at
//!   least 10⁵ elements in CUDA managed memory (`get_state_buffer`): on the card, outside
//!   PyTorch's allocator (`paged_bytes`). The update is one fused kernel.
//! - torchao 0.18 (`optim/adam.py`, `subclass_8bit.py`, `subclass_4bit.py`): parameters of
//!   at least 4,096 elements divisible by the block (256 for 8-bit, 128 for 4-bit) keep
//!   codes (one byte, or half a byte, an element), an fp32 scale per block and the
//!   quantization map (256 or 16 fp32); the others `zeros_like(p)`. The step is
//!   `single_param_adam` under `torch.compile`; on the CPU inductor's code allocates the
//!   updated moments in fp32 per parameter (`torchao_cpu_buffers`).
//! - `sgd` (momentum): one momentum buffer, updated in place. `adafactor` (transformers
//!   `optimization.py`): row and column statistics for matrices, a full second moment for
//!   vectors; per parameter `grad**2 + eps` and the factored estimate are live together.
//! - `muon` (torch 2.15 `torch/optim/_muon.py`): one momentum buffer for the block matrices;
//!   the step makes the Nesterov update `grad.lerp(buf)` (fp32), its bf16 copy, the Gram
//!   matrix and its polynomial, and the next iterate. Embeddings, the head and vectors go to
//!   AdamW (nanochat's `setup_optimizers` split).

use crate::params::{Param, Role};
use crate::spec::{Optimizer, Precision, TrainSpec};
use crate::timeline::{Component, Extent, Layout, Name, Step};
use crate::units::DType;

/// Elements per absmax in bitsandbytes' blockwise 8-bit optimizers.
const ABSMAX_BLOCK: u64 = 256;
/// bitsandbytes' and torchao's `min_8bit_size`: smaller parameters keep 32-bit states.
const MIN_8BIT_SIZE: u64 = 4096;
/// bitsandbytes pages a state only from this many elements (`get_state_buffer`).
const MIN_PAGED: u64 = 100_000;
/// torchao's block sizes and quantization maps (`AdamW8bit`, `AdamW4bit`).
const TORCHAO_8BIT_BLOCK: u64 = 256;
const TORCHAO_4BIT_BLOCK: u64 = 128;
const TORCHAO_8BIT_QMAP: u64 = 256;
const TORCHAO_4BIT_QMAP: u64 = 16;

/// How AdamW's step runs over the parameters it updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AdamStep {
    Single,
    Foreach,
    Fused,
}

/// The AdamW loop `opt` uses on this device, if it is a torch AdamW.
fn adam_step(opt: Optimizer, cuda: bool) -> Option<AdamStep> {
    match opt {
        Optimizer::AdamW if cuda => Some(AdamStep::Foreach),
        Optimizer::AdamW => Some(AdamStep::Single),
        Optimizer::AdamWSingle => Some(AdamStep::Single),
        Optimizer::AdamWForeach => Some(AdamStep::Foreach),
        Optimizer::AdamWFused => Some(AdamStep::Fused),
        _ => None,
    }
}

/// One parameter's state: bytes in the allocator, bytes in managed memory.
struct State {
    extent: Extent,
    paged: u64,
}

fn state_of(p: &Param, opt: Optimizer, sd: DType, shard: u64) -> State {
    let n = p.numel();
    let sharded = |l: Layout| Extent::Shard(l, shard);
    let flat = |b: u64| Extent::Layout(Layout::new(&[b.div_ceil(shard)], DType::U8));
    let plain = |extent| State { extent, paged: 0 };
    match effective(opt, p.role) {
        Optimizer::Sgd | Optimizer::Muon => plain(sharded(Layout::new(&p.shape(), sd))),
        Optimizer::Adafactor => {
            let len = if p.rows > 1 {
                p.rows.saturating_add(p.cols)
            } else {
                n
            };
            plain(sharded(Layout::new(&[len], DType::F32)))
        }
        Optimizer::PagedAdamW if n >= MIN_PAGED => State {
            extent: flat(0),
            paged: DType::F32.size(&[2, n]).0.div_ceil(shard),
        },
        Optimizer::AdamW8bit | Optimizer::PagedAdamW8bit if n >= MIN_8BIT_SIZE => {
            // Two uint8 states and two fp32 absmax per block, each split over the ranks.
            let states = n.saturating_mul(2);
            let absmax = DType::F32.size(&[2, n.div_ceil(ABSMAX_BLOCK)]).0;
            if opt == Optimizer::PagedAdamW8bit && n >= MIN_PAGED {
                State {
                    extent: flat(absmax),
                    paged: states.div_ceil(shard),
                }
            } else {
                plain(flat(states.saturating_add(absmax)))
            }
        }
        Optimizer::AdamW8bit | Optimizer::PagedAdamW8bit | Optimizer::PagedAdamW => {
            plain(sharded(Layout::new(&[2, p.rows, p.cols], DType::F32)))
        }
        o @ (Optimizer::TorchaoAdamW8bit | Optimizer::TorchaoAdamW4bit) => {
            match torchao_blocks(o, n) {
                Some((block, qmap, codes)) => {
                    let one = codes + DType::F32.size(&[n / block + qmap]).0;
                    plain(flat(one.saturating_mul(2)))
                }
                None => plain(sharded(Layout::new(&[2, p.rows, p.cols], sd))),
            }
        }
        _ => plain(sharded(Layout::new(&[2, p.rows, p.cols], sd))),
    }
}

/// torchao's quantized state of an `n`-element parameter: (block, quantization map
/// entries, code bytes), or `None` where the parameter keeps `zeros_like(p)` states.
fn torchao_blocks(o: Optimizer, n: u64) -> Option<(u64, u64, u64)> {
    let (block, qmap, codes) = if o == Optimizer::TorchaoAdamW8bit {
        (TORCHAO_8BIT_BLOCK, TORCHAO_8BIT_QMAP, n)
    } else {
        (TORCHAO_4BIT_BLOCK, TORCHAO_4BIT_QMAP, n / 2)
    };
    (n >= MIN_8BIT_SIZE && n.is_multiple_of(block)).then_some((block, qmap, codes))
}

/// The buffers inductor's CPU code for torchao's compiled `single_param_adam` allocates
/// for an `n`-element quantized parameter with blocks of `block` (measured,
/// `tests/data/torch_regimes.json`): the two updated moments in fp32 before they are
/// quantized again, and their new per-block scales; the 4-bit step makes four more
/// fp32 copies and the two moments' new codes one byte an element (before packing).
fn torchao_cpu_buffers(o: Optimizer, n: u64, block: u64) -> Layout {
    let scales = Layout::new(&[2, n / block], DType::F32);
    if o == Optimizer::TorchaoAdamW8bit {
        return Layout::concat(&[Layout::new(&[2, n], DType::F32), scales]);
    }
    Layout::concat(&[
        Layout::new(&[6, n], DType::F32),
        Layout::new(&[2, n], DType::U8),
        scales,
    ])
}

/// Allocates the optimizer state; `shard` divides it (ZeRO stage ≥ 1). Returns the bytes
/// kept in managed memory instead (paged optimizers).
pub fn states(s: &mut Step, params: &[Param], t: &TrainSpec, shard: u64) -> u64 {
    let sd = state_dtype(t.precision);
    let shard = shard.max(1);
    let mut paged = 0u64;
    for p in params {
        let st = state_of(p, t.optimizer, p.dtype.unwrap_or(sd), shard);
        paged = paged.saturating_add(st.paged);
        let bytes = match &st.extent {
            Extent::Shard(l, r) => l.bytes().0.div_ceil(*r),
            Extent::Layout(l) => l.bytes().0,
            Extent::Bytes(b) => b.0,
        };
        if bytes > 0 {
            s.persistent(
                Name::of(state_prefix(effective(t.optimizer, p.role)), &p.name, ""),
                Component::Optimizer,
                st.extent,
            );
        }
    }
    paged
}

/// Whether `opt` keeps any state in managed memory (bitsandbytes' paged optimizers).
pub fn pages(opt: Optimizer) -> bool {
    matches!(opt, Optimizer::PagedAdamW | Optimizer::PagedAdamW8bit)
}

/// The optimizer state's bytes in managed memory, as [`states`] returns them, without
/// playing the state into a step.
pub fn paged(params: &[Param], t: &TrainSpec, shard: u64) -> u64 {
    if !pages(t.optimizer) {
        return 0;
    }
    let sd = state_dtype(t.precision);
    let shard = shard.max(1);
    params
        .iter()
        .map(|p| state_of(p, t.optimizer, p.dtype.unwrap_or(sd), shard).paged)
        .fold(0, u64::saturating_add)
}

/// `"{optimizer} state of "`, fixed per optimizer so that state names are formatted only
/// when shown.
fn state_prefix(o: Optimizer) -> &'static str {
    match o {
        Optimizer::AdamW => "adamw state of ",
        Optimizer::AdamWForeach => "adamw-foreach state of ",
        Optimizer::AdamWFused => "adamw-fused state of ",
        Optimizer::AdamWSingle => "adamw-single state of ",
        Optimizer::AdamW8bit => "adamw-8bit state of ",
        Optimizer::PagedAdamW => "paged-adamw state of ",
        Optimizer::PagedAdamW8bit => "paged-adamw-8bit state of ",
        Optimizer::TorchaoAdamW8bit => "torchao-adamw-8bit state of ",
        Optimizer::TorchaoAdamW4bit => "torchao-adamw-4bit state of ",
        Optimizer::Sgd => "sgd state of ",
        Optimizer::Adafactor => "adafactor state of ",
        Optimizer::Muon => "muon state of ",
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

/// The state dtype of parameters without their own (LoRA's fp32 adapters have theirs).
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

/// The step's temporaries over all parameters, played into the timeline.
pub fn step(s: &mut Step, params: &[Param], t: &TrainSpec, cuda: bool, shard: u64) {
    let shard = shard.max(1);
    let adam: Vec<&Param> = params
        .iter()
        .filter(|p| adam_step(effective(t.optimizer, p.role), cuda).is_some())
        .collect();
    // Muon's AdamW part is torch's default AdamW.
    let adam_opt = effective(t.optimizer, Role::Embedding);
    match adam_step(adam_opt, cuda) {
        Some(AdamStep::Foreach) => foreach_sqrt(s, &adam, t, shard),
        Some(AdamStep::Single) => {
            if let Some(p) = adam.iter().max_by_key(|p| p.numel()) {
                per_param(s, p, t, cuda, shard);
            }
        }
        _ => {}
    }
    let own: Vec<&Param> = params
        .iter()
        .filter(|p| adam_step(effective(t.optimizer, p.role), cuda).is_none())
        .collect();
    if let Some(p) = own.iter().max_by_key(|p| p.numel()) {
        per_param(s, p, t, cuda, shard);
    }
}

/// `_foreach_sqrt` returns one tensor per parameter, all alive until the update is done.
fn foreach_sqrt(s: &mut Step, ps: &[&Param], t: &TrainSpec, shard: u64) {
    let sd = state_dtype(t.precision);
    let ids: Vec<_> = ps
        .iter()
        .map(|p| {
            s.alloc(
                Name::of("adamw foreach sqrt(exp_avg_sq) of ", &p.name, ""),
                Component::Temporaries,
                part(p, shard, p.dtype.unwrap_or(sd)),
            )
        })
        .collect();
    ids.into_iter().for_each(|id| s.free(id));
}

/// The temporaries of stepping one parameter on its own: the single-tensor loops, and each
/// hook of an optimizer stepped inside backward.
pub fn per_param(s: &mut Step, p: &Param, t: &TrainSpec, cuda: bool, shard: u64) {
    let sd = p.dtype.unwrap_or(state_dtype(t.precision));
    let n = p.numel().div_ceil(shard.max(1));
    let opt = effective(t.optimizer, p.role);
    match opt {
        _ if adam_step(opt, cuda) == Some(AdamStep::Fused) => {}
        _ if adam_step(opt, cuda) == Some(AdamStep::Foreach) => {
            // A foreach step over one parameter: its sqrt.
            s.transient(
                Name::of("adamw foreach sqrt(exp_avg_sq) of ", &p.name, ""),
                Component::Temporaries,
                part(p, shard, sd),
            );
        }
        _ if adam_step(opt, cuda) == Some(AdamStep::Single) => {
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
        Optimizer::Muon => muon(s, p),
        o @ (Optimizer::TorchaoAdamW8bit | Optimizer::TorchaoAdamW4bit) if !cuda => {
            // On CUDA inductor's kernels for the step are not measured; none are counted.
            if let Some((block, ..)) = torchao_blocks(o, n) {
                s.transient(
                    "torchao step buffers (inductor, CPU)",
                    Component::Temporaries,
                    torchao_cpu_buffers(o, n, block),
                );
            }
        }
        Optimizer::Adafactor => {
            // `grad**2 + eps`, still referenced while `_approx_sq_grad`'s outer product
            // (the factored estimate) is made; the product with the gradient is in place.
            s.transient(
                "adafactor update",
                Component::Temporaries,
                Layout::new(&[2, n], DType::F32),
            );
        }
        _ => {}
    }
}

/// Newton–Schulz on one matrix: the fp32 Nesterov update, its bf16 iterate X, the Gram
/// matrix X·Xᵀ and its polynomial, and the next iterate.
fn muon(s: &mut Step, m: &Param) {
    let side = m.rows.min(m.cols);
    let x = Layout::new(&[m.rows, m.cols], DType::Bf16);
    let gram = Layout::new(&[side, side], DType::Bf16);
    s.transient(
        "muon newton-schulz",
        Component::Temporaries,
        Layout::concat(&[
            Layout::new(&[m.rows, m.cols], DType::F32),
            x.clone(),
            x,
            gram.clone(),
            gram,
        ]),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Choice;

    /// `paged` is the managed bytes `states` returns, for every optimizer (only the
    /// paged ones have any).
    #[test]
    fn paged_bytes_match_the_played_states() {
        let toml = "[model]\npreset = \"smollm2-135m\"\n[hardware]\ngpu = \"h100-80gb\"\n";
        let spec = crate::config::RawConfig::from_toml(toml)
            .unwrap()
            .resolve(
                &crate::presets::Presets::builtin().unwrap(),
                &crate::config::Context::default(),
            )
            .unwrap();
        let params = crate::params::parameters(&spec.model);
        let mut t = spec.train.clone();
        for (_, o) in Optimizer::ALL {
            t.optimizer = *o;
            for shard in [1, 3] {
                let played = states(&mut Step::new(), &params, &t, shard);
                assert_eq!(paged(&params, &t, shard), played, "{o:?}");
                assert_eq!(played > 0, pages(*o), "{o:?}");
            }
        }
    }

    #[test]
    fn state_prefixes_are_the_optimizers_names() {
        for (name, o) in Optimizer::ALL {
            assert_eq!(state_prefix(*o), format!("{name} state of "));
        }
    }
}
