//! Where the model state lives under each sharding and precision regime.
//!
//! - ZeRO-3 (DeepSpeed `runtime/zero/stage3.py`) and FSDP2 (torch 2.15
//!   `torch/distributed/fsdp/_fully_shard/_fsdp_param_group.py`): each rank keeps 1/G of
//!   every parameter; a block's full parameters are gathered (one flat buffer) for its
//!   forward and freed after it (`reshard_after_forward = true`), gathered again for its
//!   backward. FSDP2 prefetches the next block's all-gather during backward
//!   (`_backward_prefetch`), so two blocks' full parameters are live there; its root module
//!   (embedding, final norm, head) is not resharded after forward, so the root's
//!   parameters stay gathered from the forward to the end of backward. With
//!   `reshard_after_forward = false` a block's gathered parameters live from its forward
//!   to its backward. G is `gpus_per_node` under hybrid sharding (HSDP: shard within a
//!   node, replicate across nodes).
//! - FSDP2's reduce (`_fsdp_collectives.py`, `foreach_reduce`): each unsharded gradient is
//!   copied into a flat reduce-scatter input in `reduce_dtype`; the output shard is cast to
//!   the parameter's dtype and becomes the sharded gradient.
//! - `bf16-mixed` without parameter sharding (DeepSpeed `runtime/bf16_optimizer.py`): the
//!   module holds bf16 compute weights and produces bf16 gradients; the optimizer owns fp32
//!   masters. After backward every master gets its fp32 gradient (`update_hp_grads`), then
//!   the bf16 gradients are cleared (`clear_lp_grads`), the masters step and are copied
//!   back into the bf16 weights. Under FSDP2 the fp32 sharded parameters are the masters
//!   and the gathered ones are bf16 (`MixedPrecisionPolicy(param_dtype = bf16)`).

use super::{Grads, Run};
use crate::params::{self, Param};
use crate::spec::{ReduceDtype, Sharding};
use crate::timeline::{Component, Layout, Name, Step, TensorId};
use crate::units::DType;

fn fsdp2(run: &Run) -> bool {
    run.sharding == Sharding::Fsdp2 && run.stage >= 3 && run.shards > 1
}

fn sharded_params(run: &Run) -> bool {
    run.stage >= 3 && run.shards > 1
}

/// The dtype of the parameters the matmuls read (bf16 copies under `bf16-mixed`).
fn compute_dtype(run: &Run) -> DType {
    if run.t.precision.is_mixed() {
        run.d.c
    } else {
        run.d.p
    }
}

/// `bf16-mixed` with whole parameters on each rank: the module's bf16 weights beside the
/// optimizer's fp32 masters.
pub fn compute_weights(s: &mut Step, run: &Run) {
    if run.t.precision.is_mixed() && !sharded_params(run) {
        s.persistent(
            "bf16 compute weights",
            Component::WeightCopies,
            Layout::new(&[params::count(run.m)], run.d.c),
        );
    }
}

/// The dtype of the gradients the step keeps: the module's bf16 gradients under
/// `bf16-mixed` unless they are reduce-scattered into fp32 shards at once.
pub fn grad_dtype(run: &Run) -> DType {
    if run.t.precision.is_mixed() && run.stage < 2 {
        run.d.c
    } else {
        run.d.p
    }
}

/// What a gradient passes through before it is reduce-scattered.
pub fn pre_reduce(run: &Run) -> Vec<DType> {
    if run.sharding != Sharding::Fsdp2 {
        return vec![grad_dtype(run)];
    }
    let reduce = match (run.t.precision.is_mixed(), run.t.reduce_dtype) {
        (true, ReduceDtype::Bf16) => DType::Bf16,
        (true, ReduceDtype::Fp32) => DType::F32,
        (false, _) => run.d.p,
    };
    vec![compute_dtype(run), reduce]
}

/// Whether a block's gathered parameters are freed after its forward.
pub fn reshards_after_forward(run: &Run) -> bool {
    sharded_params(run) && (run.sharding != Sharding::Fsdp2 || run.reshard_after_forward)
}

/// Block `l`'s gathered parameters (`numel` elements), when parameters are sharded.
pub fn gathered(s: &mut Step, run: &Run, l: u64, numel: u64) -> Option<TensorId> {
    sharded_params(run).then(|| {
        let name = if run.sharding == Sharding::Fsdp2 {
            " gathered weights (FSDP2)"
        } else {
            " gathered weights (ZeRO-3)"
        };
        s.alloc(
            Name::block("block ", l, [name, "", ""]),
            Component::WeightCopies,
            Layout::new(&[numel], compute_dtype(run)),
        )
    })
}

/// FSDP2's backward prefetch: while block `l` runs backward, block `l - 1` is gathered.
pub fn prefetch(s: &mut Step, run: &Run, l: u64) -> Option<TensorId> {
    if !fsdp2(run) || !reshards_after_forward(run) || l == 0 {
        return None;
    }
    let numel = run
        .layer_params(l - 1)
        .map(Param::numel)
        .fold(0, u64::saturating_add);
    gathered(s, run, l - 1, numel)
}

/// FSDP2's root parameters (everything outside the blocks), gathered for the whole step.
pub fn root_gathered(s: &mut Step, run: &Run) -> Vec<TensorId> {
    if !fsdp2(run) {
        return Vec::new();
    }
    let numel = run
        .params
        .iter()
        .filter(|p| p.layer.is_none())
        .map(Param::numel)
        .fold(0, u64::saturating_add);
    vec![s.alloc(
        "root parameters gathered (FSDP2)",
        Component::WeightCopies,
        Layout::new(&[numel], compute_dtype(run)),
    )]
}

/// `bf16-mixed` without sharded gradients: the masters' fp32 gradients are made from the
/// bf16 ones, which are then freed. Returns the fp32 gradients, freed after the step.
pub fn master_gradients(s: &mut Step, run: &Run, grads: &mut Grads) -> Option<TensorId> {
    if !run.t.precision.is_mixed() || run.stage >= 2 {
        return None;
    }
    let n = params::count(run.m).div_ceil(run.optimizer_shards());
    let id = s.alloc(
        "fp32 master gradients",
        Component::Gradients,
        Layout::new(&[n], DType::F32),
    );
    grads.free_all(s);
    Some(id)
}
