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
//! - FSDP2's reduce (`_fsdp_collectives.py`, `foreach_reduce`), per parameter group: the
//!   group's unsharded gradients wait for its post-backward hook, are copied into one flat
//!   reduce-scatter input in `reduce_dtype` (kept until the next group's hook) and freed;
//!   the output shard holds the sharded gradients ([`Reducer`]). The root's pre-backward
//!   prefetches the last block when backward starts ([`root_prefetch`]). Measured on the
//!   CPU over gloo, 2 and 4 processes (`tests/data/torch_fsdp.json`); gloo's copy of the
//!   reduce-scatter input is modelled on the CPU only.
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
use std::rc::Rc;

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

/// What a gradient passes through before it is reduce-scattered (ZeRO-2/3: the gradient
/// itself; FSDP2 reduces a whole group at once, see [`Reducer`]).
pub fn pre_reduce(run: &Run) -> Vec<DType> {
    vec![grad_dtype(run)]
}

/// FSDP2's gradients through backward, per parameter group (a block, or the root):
/// autograd makes each parameter's unsharded gradient in the compute dtype and they all
/// wait for the group's post-backward hook (`_fsdp_param_group.py`, `post_backward`,
/// `_take_unsharded_grads_to_reduce`; `_set_unsharded_grad_dtypes` leaves them in the
/// dtype autograd made). There `foreach_reduce` (`_fsdp_collectives.py`) frees the
/// previous group's reduce-scatter input (`reduce_scatter_states`, at most
/// `reduce_scatter_max_input_buffers = 1` kept), allocates this group's flat input in
/// `reduce_dtype` (every parameter's dim 0 padded to a multiple of G), copies the
/// gradients in and frees them, allocates the output (1/G of the input), reduce-scatters,
/// and makes the sharded gradients views into that output, or into one cast copy when the
/// parameters' dtype differs from `reduce_dtype`. The input is kept until the next group's
/// post-backward; the root's, until the end of backward.
#[derive(Clone)]
pub struct Reducer {
    /// The dtype autograd makes the unsharded gradients in (the gathered parameters').
    dtype: DType,
    /// The group's unsharded gradients so far, and the indices of their parameters.
    unsharded: Vec<TensorId>,
    params: Vec<usize>,
    /// The last group's reduce-scatter input.
    input: Option<TensorId>,
}

/// The reducer of an FSDP2 run.
pub fn reducer(run: &Run) -> Option<Reducer> {
    fsdp2(run).then(|| Reducer {
        dtype: compute_dtype(run),
        unsharded: Vec::new(),
        params: Vec::new(),
        input: None,
    })
}

/// FSDP2's reduce-scatter runs in this dtype.
fn reduce_dtype(run: &Run) -> DType {
    match (run.t.precision.is_mixed(), run.t.reduce_dtype) {
        (true, ReduceDtype::Bf16) => DType::Bf16,
        (true, ReduceDtype::Fp32) => DType::F32,
        (false, _) => run.d.p,
    }
}

impl Reducer {
    /// Autograd's unsharded gradient of parameter `i` (`layout` in the parameter's dtype);
    /// a second one for the same parameter (a tied head) is added in place.
    pub fn unsharded(&mut self, s: &mut Step, i: usize, p: &Param, layout: Layout) {
        let full = Layout::new(&layout.shape, self.dtype);
        if self.params.contains(&i) {
            s.transient(
                Name::of("grad of ", &p.name, " (unsharded, to accumulate)"),
                Component::Temporaries,
                full,
            );
            return;
        }
        self.params.push(i);
        self.unsharded.push(s.alloc(
            Name::of("grad of ", &p.name, " (unsharded)"),
            Component::Gradients,
            full,
        ));
    }
}

/// The post-backward hook of the group whose gradients are pending (see [`Reducer`]).
/// `block` is the group's block, `None` for the root.
pub fn post_backward(s: &mut Step, run: &Run, grads: &mut Grads, block: Option<u64>) {
    let name = |what: &'static str| match block {
        Some(l) => Name::block("block ", l, [" ", what, ""]),
        None => Name::of("root ", &Rc::from(""), what),
    };
    let Some(mut r) = grads.fsdp2.take() else {
        return;
    };
    if r.params.is_empty() {
        grads.fsdp2 = Some(r);
        return;
    }
    let g = run.shards;
    let padded = r
        .params
        .iter()
        .map(|&i| {
            // Dim 0 is padded: the rows of a matrix, the length of a vector.
            let p = &grads.at.params[i];
            let (dim0, rest) = if p.rows == 1 {
                (p.cols, 1)
            } else {
                (p.rows, p.cols)
            };
            dim0.div_ceil(g).saturating_mul(g).saturating_mul(rest)
        })
        .fold(0, u64::saturating_add);
    let reduce = reduce_dtype(run);
    if let Some(old) = r.input.take() {
        s.free(old);
    }
    let input = s.alloc(
        name("reduce-scatter input (FSDP2)"),
        Component::Temporaries,
        Layout::new(&[padded], reduce),
    );
    r.unsharded.drain(..).for_each(|id| s.free(id));
    let shard = Layout::new(&[padded / g], reduce);
    let mut out = s.alloc(
        name("reduce-scatter output (FSDP2)"),
        Component::Gradients,
        shard,
    );
    if !run.cuda {
        // Gloo reduce-scatters by an all-reduce of a copy of the whole input
        // (ProcessGroupGloo's reduce-scatter; NCCL writes into the output directly).
        s.transient(
            "gloo's copy of the reduce-scatter input",
            Component::Temporaries,
            Layout::new(&[padded], reduce),
        );
    }
    if reduce != run.d.p {
        let cast = s.alloc(
            name("sharded gradients (FSDP2)"),
            Component::Gradients,
            Layout::new(&[padded / g], run.d.p),
        );
        s.free(out);
        out = cast;
    }
    let first = r.params[0];
    r.params.clear();
    match grads.ids[first] {
        // Accumulation: added into the sharded gradients kept from earlier micro-steps.
        Some(_) => s.free(out),
        None => grads.ids[first] = Some(out),
    }
    r.input = Some(input);
    grads.fsdp2 = Some(r);
}

/// The end of backward (`_root_post_backward_final_callback`): the root's post-backward,
/// then the last reduce-scatter input is released.
pub fn end_of_backward(s: &mut Step, run: &Run, grads: &mut Grads) {
    post_backward(s, run, grads, None);
    if let Some(id) = grads.fsdp2.as_mut().and_then(|r| r.input.take()) {
        s.free(id);
    }
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

/// FSDP2's root pre-backward (`_fsdp_state.py`, `FSDPState._pre_backward`, registered on
/// the root's outputs, the loss among them): it fires when backward starts, before the
/// loss's own backward, and prefetches the last block's all-gather
/// (`FSDPParamGroup._backward_prefetch`), so that block's gathered parameters are live
/// through the loss and head backward.
pub fn root_prefetch(s: &mut Step, run: &Run) -> Option<TensorId> {
    prefetch(s, run, run.layers)
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
