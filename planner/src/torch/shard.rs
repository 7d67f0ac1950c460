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
//!   node, replicate across nodes). torchtitan groups an untied model otherwise
//!   ([`own_groups`]).
//! - FSDP2's reduce (`_fsdp_collectives.py`, `foreach_reduce`), per parameter group: the
//!   group's unsharded gradients (its own only: a tied head's waits for the root's hook)
//!   wait for its post-backward hook, are copied into one flat
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
//! - DeepSpeed's CPU offload (DeepSpeed 0.19.6, `deepspeed/runtime/zero/`; `docs/model.md`
//!   cites the lines; the buffers' element counts checked on DeepSpeed's CPU accelerator,
//!   `tools/measure_deepspeed_offload.py`): with `offload_optimizer` the fp32 masters, the Adam moments
//!   (DeepSpeedCPUAdam, fp32) and the gradient partitions live in host memory and the step
//!   runs on the CPU; the device keeps the 16-bit parameters (their ZeRO-3 partitions), and
//!   under ZeRO-1/2 `temp_grad_buffer_for_gpu_offload`, one largest parameter in the 16-bit
//!   dtype. ZeRO-2/3 copy each gradient to the host as it is reduced, so none stays on the
//!   device; ZeRO-1 reduces at the end of backward, so the full 16-bit gradients do. With
//!   `offload_param` (ZeRO-3) the 16-bit partitions live on the host too and every module's
//!   parameters are gathered to the device for its forward and backward; the embedding,
//!   final norm and head are taken to stay gathered for the whole step. Pinned host
//!   buffers go through PyTorch's `CachingHostAllocator`, which rounds each to a power of
//!   two (torch 2.15 `ATen/core/CachingHostAllocator.h`, `allocate`). The reduce bucket
//!   (`reduce_bucket_size`), ZeRO-3's prefetch and its persistent small parameters exist
//!   with and without offload and are outside the inventory either way.

use super::loss::HeadGrad;
use super::{Grads, Run};
use crate::params::{self, Param, Role};
use crate::spec::{Implementation, Offload, ReduceDtype, RunSpec, Sharding, TrainSpec};
use crate::timeline::{Component, Layout, Name, Step, TensorId};
use crate::units::DType;
use std::rc::Rc;

fn fsdp2(run: &Run) -> bool {
    run.sharding == Sharding::Fsdp2 && run.stage >= 3 && run.shards > 1
}

/// torchtitan 0.3.0's `apply_fsdp_to_decoder` (`torchtitan/distributed/fsdp.py`, as its
/// llama3 `parallelize` calls it) on an untied model: the embedding is a group of its own,
/// resharded after forward as the blocks are (`reshard_after_forward_policy` "default",
/// or kept with "never"); the final norm and `lm_head` are one group that is not
/// (`reshard_after_forward = policy == "always"`), so it stays gathered from the head's
/// forward to its post-backward, where its gradients are reduce-scattered (under the
/// chunked loss it is resharded when the loss's loop ends and gathered again by the
/// norm's pre-backward, [`head_sync_deferred`]); the root
/// holds no parameters. Block 0's backward prefetches the embedding's all-gather, as any
/// group's backward prefetches the group before it. A tied model is one group of the
/// embedding, the norm and the head, not resharded: the root's timeline.
pub fn own_groups(run: &Run) -> bool {
    fsdp2(run) && run.t.implementation == Implementation::Torchtitan && !run.m.tie_embeddings
}

/// torchtitan under FSDP2, tied or not: `lm_head` is in a group of its own or in the
/// tied one (`fully_shard([tok_embeddings, norm, lm_head])`), so its chunked loss runs
/// with lm_head's gradient sync off ([`Reducer::chunk`]).
pub fn head_sync_deferred(run: &Run) -> bool {
    fsdp2(run) && run.t.implementation == Implementation::Torchtitan
}

/// The embedding's gathered weight under [`own_groups`], from its pre-forward (or its
/// prefetch in backward) to its reshard.
pub fn embedding_gathered(s: &mut Step, run: &Run) -> Option<TensorId> {
    group_gathered(s, run, "embedding gathered (FSDP2, its own group)", |p| {
        p.role == Role::Embedding
    })
}

/// The final norm's and the head's gathered weights under [`own_groups`].
pub fn head_gathered(s: &mut Step, run: &Run) -> Option<TensorId> {
    group_gathered(
        s,
        run,
        "final norm and head gathered (FSDP2, their own group)",
        |p| p.role != Role::Embedding,
    )
}

/// One of torchtitan's groups outside the blocks, gathered: the parameters `which` picks.
fn group_gathered(
    s: &mut Step,
    run: &Run,
    name: &'static str,
    which: impl Fn(&Param) -> bool,
) -> Option<TensorId> {
    own_groups(run).then(|| {
        let numel = root_numel(run, which);
        s.alloc(
            name,
            Component::WeightCopies,
            Layout::new(&[numel], compute_dtype(run)),
        )
    })
}

/// Elements of the parameters outside the blocks that `which` selects.
fn root_numel(run: &Run, which: impl Fn(&Param) -> bool) -> u64 {
    run.params
        .iter()
        .filter(|p| p.layer.is_none() && which(p))
        .map(Param::numel)
        .fold(0, u64::saturating_add)
}

/// ZeRO-3 over several GPUs, or with its partitions on the host (gathered even on one).
fn sharded_params(run: &Run) -> bool {
    run.stage >= 3 && (run.shards > 1 || run.offload_params)
}

/// The dtype of the parameters the matmuls read (bf16 copies under `bf16-mixed`).
pub(super) fn compute_dtype(run: &Run) -> DType {
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
    if run.offload_optimizer {
        // DeepSpeed's 16-bit gradients, copied to the host's fp32 partitions.
        compute_dtype(run)
    } else if run.t.precision.is_mixed() && run.stage < 2 {
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
    /// The dtype a gradient accumulates in while its sync is off (`reduce_dtype`).
    unsynced: DType,
    /// lm_head's gradient from the current loss chunk's matmul ([`Reducer::chunk`]).
    made: Option<TensorId>,
}

/// The reducer of an FSDP2 run.
pub fn reducer(run: &Run) -> Option<Reducer> {
    fsdp2(run).then(|| Reducer {
        dtype: compute_dtype(run),
        unsharded: Vec::new(),
        params: Vec::new(),
        input: None,
        unsynced: reduce_dtype(run),
        made: None,
    })
}

/// Whether `reduce_dtype` applies: under `bf16-mixed`, and under torchtitan whatever the
/// parameters' dtype (its `MixedPrecisionPolicy` always carries `mixed_precision_reduce`,
/// fp32 by default, over pure bf16 parameters too: `distributed/fsdp.py`). Otherwise
/// FSDP2 has no policy and reduces in the parameters' dtype.
pub fn reduce_policy(t: &TrainSpec) -> bool {
    t.precision.is_mixed() || t.implementation == Implementation::Torchtitan
}

/// FSDP2's reduce-scatter runs in this dtype ([`reduce_policy`]).
fn reduce_dtype(run: &Run) -> DType {
    match (reduce_policy(run.t), run.t.reduce_dtype) {
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

    /// lm_head's gradient (parameter `i`, `full` its layout) in one chunk of torchtitan's
    /// chunked loss under [`own_groups`]. `ChunkedLossWrapper` (`components/loss.py`)
    /// turns lm_head's gradient sync off for every chunk but the last
    /// (`set_requires_gradient_sync(False)`); while it is off, FSDP2 sets the unsharded
    /// parameter's `grad_dtype` to `reduce_dtype` (`FSDPParam.unsharded_grad_dtype`,
    /// `_set_unsharded_grad_dtypes`), so where that is wider than the compute dtype,
    /// AccumulateGrad upcasts each chunk's matmul gradient: into the unsharded gradient
    /// on the first chunk, into a copy it adds in place on the others. The last chunk
    /// syncs: `grad_dtype` is cleared and its gradient is added as made; the caller then
    /// runs the group's post-backward ([`post_backward`]), inside the loss.
    pub fn chunk(&mut self, s: &mut Step, i: usize, p: &Param, full: &Layout, at: HeadGrad) {
        let HeadGrad::Accumulated { first, last } = at else {
            let made = Layout::new(&full.shape, self.dtype);
            self.made = Some(s.alloc(
                Name::of("grad of ", &p.name, " (unsharded)"),
                Component::Gradients,
                made,
            ));
            return;
        };
        let Some(made) = self.made.take() else {
            return;
        };
        let upcast = !last && self.unsynced.bytes() > self.dtype.bytes();
        let wide = Layout::new(&full.shape, self.unsynced);
        match (first, upcast) {
            (true, false) => {
                self.params.push(i);
                self.unsharded.push(made);
                return;
            }
            (true, true) => {
                self.params.push(i);
                let acc = s.alloc(
                    Name::of("grad of ", &p.name, " (unsharded, upcast while unsynced)"),
                    Component::Gradients,
                    wide,
                );
                self.unsharded.push(acc);
            }
            (false, true) => s.transient(
                Name::of("grad of ", &p.name, " (upcast, to accumulate)"),
                Component::Temporaries,
                wide,
            ),
            (false, false) => {}
        }
        s.free(made);
    }

    /// Keeps pending only the gradients of `block`'s group (every one for the root's
    /// hook, `None`) and returns the others: a block's hook leaves the root's (a tied
    /// head's gradient, made before the blocks' backward) to the root's hook.
    fn keep_group(&mut self, params: &[Param], block: Option<u64>) -> Vec<(usize, TensorId)> {
        let (group, later): (Vec<_>, Vec<_>) = self
            .params
            .iter()
            .copied()
            .zip(self.unsharded.iter().copied())
            .partition(|&(i, _)| block.is_none() || params[i].layer == block);
        (self.params, self.unsharded) = group.into_iter().unzip();
        later
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
    let later = r.keep_group(&grads.at.params, block);
    if r.params.is_empty() {
        (r.params, r.unsharded) = later.into_iter().unzip();
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
    (r.params, r.unsharded) = later.into_iter().unzip();
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

/// Whether block `l`'s gathered parameters are freed after its forward (DeepSpeed
/// ZeRO-3: by its reuse distance, `deepspeed::releases_after_forward`).
pub fn reshards_after_forward(run: &Run, l: u64) -> bool {
    if super::deepspeed::zero(run) {
        return run.stage >= 3 && super::deepspeed::releases_after_forward(run, l);
    }
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

/// FSDP2's backward prefetch: while block `l` runs backward, block `l - 1` is gathered;
/// while block 0 does, torchtitan's embedding group ([`own_groups`]).
pub fn prefetch(s: &mut Step, run: &Run, l: u64) -> Option<TensorId> {
    if l == 0 && run.reshard_after_forward {
        return embedding_gathered(s, run);
    }
    if !fsdp2(run) || !reshards_after_forward(run, l) || l == 0 {
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
    if own_groups(run) {
        return None;
    }
    prefetch(s, run, run.layers)
}

/// Under [`own_groups`] the root holds no parameter group and prefetches nothing: the
/// last block's all-gather is prefetched by the [norm, lm_head] group's pre-backward,
/// when backward reaches `lm_head` (after the loss's own backward).
pub fn head_prefetch(s: &mut Step, run: &Run) -> Option<TensorId> {
    if !own_groups(run) {
        return None;
    }
    prefetch(s, run, run.layers)
}

/// FSDP2's root parameters (everything outside the blocks), gathered for the whole step.
pub fn root_gathered(s: &mut Step, run: &Run) -> Vec<TensorId> {
    if super::deepspeed::zero(run) {
        if run.stage < 3 {
            return Vec::new();
        }
        return super::deepspeed::root_gathered(s, run);
    }
    let from_host = run.offload_params && sharded_params(run);
    if !(fsdp2(run) || from_host) || own_groups(run) {
        return Vec::new();
    }
    let numel = root_numel(run, |_| true);
    let name = if fsdp2(run) {
        "root parameters gathered (FSDP2)"
    } else {
        "root parameters gathered (ZeRO-3, from host)"
    };
    vec![s.alloc(
        name,
        Component::WeightCopies,
        Layout::new(&[numel], compute_dtype(run)),
    )]
}

/// `bf16-mixed` without sharded gradients: the masters' fp32 gradients are made from the
/// bf16 ones, which are then freed. Returns the fp32 gradients, freed after the step.
pub fn master_gradients(s: &mut Step, run: &Run, grads: &mut Grads) -> Option<TensorId> {
    if !run.t.precision.is_mixed() || run.stage >= 2 || run.offload_optimizer {
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

/// The dtype the device keeps the stored parameters (or their ZeRO-3 shards) in; None
/// when none are there. Offloading the optimizer moves the fp32 masters to the host: the
/// device keeps the 16-bit parameters (under ZeRO-1/2 as [`compute_weights`]). Offloading
/// the parameters moves the 16-bit partitions too; without the optimizer offload the fp32
/// masters stay on the device (stage3.py makes them on `self.device`).
pub fn stored_weights(run: &Run) -> Option<DType> {
    if !run.offload_optimizer {
        return Some(run.d.p);
    }
    match (run.offload_params, run.t.precision.is_mixed()) {
        (true, _) => None,
        (false, true) => sharded_params(run).then_some(run.d.c),
        (false, false) => Some(run.d.p),
    }
}

/// ZeRO-2/3 with the optimizer offloaded: each gradient goes to the host as it is reduced.
pub fn grads_to_host(run: &Run) -> bool {
    run.offload_optimizer && run.stage >= 2
}

/// ZeRO-1/2's `temp_grad_buffer_for_gpu_offload`: one largest parameter, 16-bit.
pub fn offload_buffers(s: &mut Step, run: &Run) {
    if !run.offload_optimizer || run.stage >= 3 {
        return;
    }
    let largest = run.trainable.iter().map(Param::numel).max().unwrap_or(0);
    s.persistent(
        "gradient staging buffer (ZeRO-Offload)",
        Component::Gradients,
        Layout::new(&[largest], compute_dtype(run)),
    );
}

/// DeepSpeed's default `sub_group_size`: ZeRO-3 steps (and pins) its partition in groups
/// of this many elements.
pub const SUB_GROUP_SIZE: u64 = 1_000_000_000;

/// One buffer DeepSpeed keeps in host memory for an offloaded run.
#[derive(Debug, Clone, PartialEq)]
pub struct HostBuffer {
    pub name: &'static str,
    /// As allocated (pinned ones rounded).
    pub bytes: u64,
    /// The tensors' own bytes, before the pinned allocator's rounding.
    pub tensor_bytes: u64,
    /// Page-locked (`pin_memory = true`, DeepSpeed's default), rounded as
    /// `CachingHostAllocator` rounds it.
    pub pinned: bool,
}

fn pinned(bytes: u64) -> u64 {
    if bytes == 0 {
        0
    } else {
        bytes.checked_next_power_of_two().unwrap_or(bytes)
    }
}

/// What one rank keeps in host memory under DeepSpeed's CPU offload (nothing without it).
/// P parameters over N ranks, 16-bit dtype of c bytes (2 under bf16, 4 in fp32).
pub fn host_buffers(spec: &RunSpec) -> Vec<HostBuffer> {
    let h = &spec.hardware;
    if !h.offloads() {
        return Vec::new();
    }
    let all = params::shared(&spec.model);
    let n = h.shard_group().max(1);
    let total = params::count(&spec.model);
    let part = total.div_ceil(n);
    let c = spec.train.precision.compute_bytes();
    let buf = |name, bytes: u64, pin: bool| HostBuffer {
        name,
        bytes: if pin { pinned(bytes) } else { bytes },
        tensor_bytes: bytes,
        pinned: pin,
    };
    let mut v = Vec::new();
    if h.offload_params == Offload::Cpu {
        // stage3.py: `param_groups_fp16_flat_cpu_memory`, pinned, one per group.
        v.push(buf("offload: 16-bit parameter partitions", part * c, true));
    }
    if h.offload_optimizer != Offload::Cpu {
        return v;
    }
    v.push(buf(
        "offload: Adam moments (DeepSpeedCPUAdam, fp32)",
        part * 8,
        false,
    ));
    if h.sharding.stage() >= 3 {
        // Masters converted and cloned (not pinned); fp32 gradients pinned per sub-group;
        // the flat gradient-accumulation buffer in the 16-bit dtype, pinned.
        v.push(buf("offload: fp32 master partition", part * 4, false));
        let groups = part / SUB_GROUP_SIZE;
        let rest = part % SUB_GROUP_SIZE;
        let grads = pinned(SUB_GROUP_SIZE * 4) * groups + pinned(rest * 4);
        v.push(HostBuffer {
            name: "offload: fp32 gradient partition",
            bytes: grads,
            tensor_bytes: part * 4,
            pinned: true,
        });
        v.push(buf(
            "offload: gradient accumulation partition",
            part * c,
            true,
        ));
        return v;
    }
    // stage_1_and_2.py: masters, the 16-bit copy-back buffer, the fp32 gradients and the
    // staging buffer of one largest parameter, all pinned.
    let largest = all.iter().map(Param::numel).max().unwrap_or(0);
    v.push(buf("offload: fp32 master partition", part * 4, true));
    v.push(buf("offload: 16-bit parameter buffer", part * c, true));
    v.push(buf("offload: fp32 gradient partition", part * 4, true));
    v.push(buf(
        "offload: gradient staging buffer (host)",
        largest * c,
        true,
    ));
    if spec.train.grad_accum > 1 {
        // `accumulated_grads_in_cpu`: one pinned buffer per parameter of the partition.
        let each: u64 = all
            .iter()
            .map(|p| pinned(p.numel() * c))
            .fold(0, u64::saturating_add);
        v.push(HostBuffer {
            name: "offload: accumulated gradients",
            bytes: each.div_ceil(n),
            tensor_bytes: (total * c).div_ceil(n),
            pinned: true,
        });
    }
    v
}

/// The bytes of [`host_buffers`].
pub fn host_bytes(spec: &RunSpec) -> u64 {
    host_buffers(spec)
        .iter()
        .map(|b| b.bytes)
        .fold(0, u64::saturating_add)
}

/// Bytes one rank moves between host and device per optimizer step under DeepSpeed's
/// offload: its 16-bit gradient partition to the host each micro-step, its updated
/// parameters back once (ZeRO-1/2, and ZeRO-3 without parameter offload), and with the
/// parameters offloaded its partition up for each gather, forward and backward, each
/// micro-step.
pub fn offload_traffic(spec: &RunSpec) -> u64 {
    let h = &spec.hardware;
    if !h.offloads() {
        return 0;
    }
    let c = spec.train.precision.compute_bytes();
    let part = params::count(&spec.model).div_ceil(h.shard_group().max(1)) * c;
    let micro = spec.train.grad_accum.max(1);
    let mut bytes = 0u64;
    if h.offload_optimizer == Offload::Cpu {
        bytes = bytes.saturating_add(part.saturating_mul(micro));
        if h.offload_params != Offload::Cpu {
            bytes = bytes.saturating_add(part);
        }
    }
    if h.offload_params == Offload::Cpu {
        bytes = bytes.saturating_add(part.saturating_mul(2 * micro));
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Context, RawConfig};
    use crate::presets::Presets;

    const COUNTED: &str = include_str!("../../../tests/data/deepspeed_offload_cpu.json");

    /// The measurement's Llama (tools/measure_deepspeed_offload.py) in bf16-mixed, one GPU.
    fn run(sharding: &str, params: &str, accum: u64) -> RunSpec {
        let toml = format!(
            "[model]\narch = \"llama\"\nhidden_size = 256\nnum_layers = 2\nnum_heads = 4\nnum_kv_heads = 2\nintermediate_size = 512\nvocab_size = 4096\ntie_embeddings = false\n[train]\nprecision = \"bf16-mixed\"\ngrad_accum = {accum}\n[hardware]\ngpu = \"h100-80gb\"\nsharding = \"{sharding}\"\noffload_optimizer = \"cpu\"\noffload_params = \"{params}\"\n"
        );
        RawConfig::from_toml(&toml)
            .unwrap()
            .resolve(&Presets::builtin().unwrap(), &Context::default())
            .unwrap()
    }

    /// Each host buffer's tensor bytes are what DeepSpeed 0.19.6 made on its CPU
    /// accelerator after one step (element counts × dtype, `tests/data/deepspeed_offload_cpu.json`),
    /// and so is ZeRO-2's device-side staging buffer.
    #[test]
    fn host_buffers_are_the_buffers_deepspeed_makes() {
        let v: serde_json::Value = serde_json::from_str(COUNTED).unwrap();
        let cases = [
            ("zero2_offload_optimizer", run("zero2", "none", 1)),
            ("zero2_offload_optimizer_accum2", run("zero2", "none", 2)),
            ("zero3_offload_optimizer", run("zero3", "none", 1)),
            ("zero3_offload_both", run("zero3", "cpu", 1)),
        ];
        let size = |d: &serde_json::Value| match d.as_str().or(d[0].as_str()) {
            Some("float32") => 4,
            Some("bfloat16") => 2,
            other => panic!("{other:?}"),
        };
        let rows = [
            (
                "offload: Adam moments (DeepSpeedCPUAdam, fp32)",
                "adam_moments",
            ),
            ("offload: fp32 master partition", "fp32_master"),
            ("offload: fp32 gradient partition", "fp32_grads"),
            ("offload: 16-bit parameter buffer", "bit16_buffer"),
            ("offload: gradient staging buffer (host)", "staging_host"),
            ("offload: accumulated gradients", "accumulated_grads"),
            (
                "offload: gradient accumulation partition",
                "grad_accumulation",
            ),
            ("offload: 16-bit parameter partitions", "bit16_partitions"),
        ];
        for (case, spec) in cases {
            let c = &v["cases"][case];
            assert_eq!(
                c["params"].as_u64(),
                Some(params::count(&spec.model)),
                "{case}"
            );
            let ours = host_buffers(&spec);
            for (name, key) in rows {
                let counted = c[key]["numel"].as_u64().filter(|n| *n > 0);
                let want = counted.map(|n| n * size(&c[key]["dtype"]));
                let got = ours.iter().find(|b| b.name == name).map(|b| b.tensor_bytes);
                assert_eq!(got, want, "{case}: {name}");
            }
            if let Some(n) = c["staging_device"]["numel"].as_u64() {
                let t = crate::report::play(&spec);
                let staging = t
                    .tensors
                    .iter()
                    .find(|x| x.name == "gradient staging buffer (ZeRO-Offload)")
                    .unwrap();
                assert_eq!(staging.bytes.0, n * 2, "{case}");
            }
        }
    }
}
