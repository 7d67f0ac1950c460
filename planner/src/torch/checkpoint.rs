//! Checkpointing policies beyond "keep everything" and "recompute the block", and
//! activation offloading.
//!
//! - `every-N` (transformers' `every_n_layers`, torchtitan's layer mode): the blocks whose
//!   index is a multiple of N run under `torch.utils.checkpoint` and keep only their input;
//!   the others keep their whole saved set. `torch::play` asks `Checkpointing::whole_block`.
//! - `selective-op` (torchtitan `torchtitan/distributed/activation_checkpoint.py`,
//!   `_apply_op_sac` with `_get_custom_policy`): each block runs under
//!   `torch.utils.checkpoint` with `create_selective_checkpoint_contexts`; the outputs of
//!   ops in `_save_list` are kept (`CheckpointPolicy.MUST_SAVE`), everything else is
//!   recomputed in backward. `_save_list` holds `aten.mm` and the CUDA attention kernels
//!   (`_scaled_dot_product_flash_attention`, `_efficient_attention`, `_cudnn_attention`);
//!   every second `aten.mm` of a block is recomputed, counted from the block's start.
//!   A Llama block runs seven mm (q, k, v, o, gate, up, down): the 1st, 3rd, 5th and 7th are
//!   kept, i.e. q_proj's and v_proj's outputs, gate and down_proj's output. v and gate are
//!   tensors the block saves anyway (sdpa saves v, silu saves gate); q_proj's output is
//!   not (the attention saves q rotated) and neither is down_proj's. On CPU the attention
//!   is `_scaled_dot_product_flash_attention_for_cpu`, not in the list: recomputed. On
//!   CUDA the flash kernel's output and log-sum-exp are kept.
//! - offloading (`torch.autograd.graph.save_on_cpu`, torchtune's `OffloadActivations`):
//!   each saved tensor is copied to host memory as forward saves it and its device copy
//!   freed; backward brings one block's set back before that block's backward. The block
//!   inputs (the residual stream) stay on the device here.

use super::block::{Block, Dims};
use crate::spec::Checkpointing;
use crate::timeline::{Component, Layout, Name, Step, TensorId};

/// Saved tensors that are the outputs of kept mm ops (the same storage).
const MM_KEPT: [&str; 2] = ["v", "gate"];
/// What the flash kernel returns and the policy keeps on CUDA.
const ATTENTION_KEPT: [&str; 2] = ["attention output", "log-sum-exp"];

fn policy_keeps(name: &str, cuda: bool) -> bool {
    MM_KEPT.contains(&name) || (cuda && ATTENTION_KEPT.contains(&name))
}

/// The kept mm outputs the block does not otherwise save: q_proj's and down_proj's.
fn extra(d: &Dims) -> [(&'static str, Layout); 2] {
    [
        (" q_proj output (kept by the op policy)", d.tok(d.q, d.c)),
        (" down_proj output (kept by the op policy)", d.tok(d.h, d.c)),
    ]
}

/// Forward under the op policy: of `made` (the whole saved set, in order) the kept ones
/// stay, the rest are freed, and the kept mm outputs the block does not save are added.
pub fn op_forward(
    s: &mut Step,
    blk: &Block,
    l: u64,
    made: Vec<TensorId>,
    d: &Dims,
    cuda: bool,
) -> Vec<TensorId> {
    let mut kept = Vec::new();
    for (sv, id) in blk.saved.iter().zip(made) {
        if policy_keeps(sv.name, cuda) {
            kept.push(id);
        } else {
            s.free(id);
        }
    }
    for (name, layout) in extra(d) {
        kept.push(s.alloc(
            Name::block("block ", l, [name, "", ""]),
            Component::Activations,
            layout,
        ));
    }
    kept
}

/// Backward's recomputation under the op policy: everything the policy did not keep.
pub fn op_recompute(s: &mut Step, blk: &Block, l: u64, _d: &Dims, cuda: bool) -> Vec<TensorId> {
    blk.saved
        .iter()
        .filter(|sv| !policy_keeps(sv.name, cuda))
        .map(|sv| {
            s.alloc(
                Name::block("block ", l, [" ", sv.name, " (recomputed)"]),
                Component::Activations,
                sv.layout.clone(),
            )
        })
        .collect()
}

/// Frees the block's saved tensors from the device; returns their layouts, which come
/// back one tensor each (`save_on_cpu`'s unpack hook copies each saved tensor back on
/// its own, so each is rounded by the caching allocator on its own).
pub fn offload(s: &mut Step, saved: Vec<TensorId>, layouts: &[Layout]) -> Vec<Layout> {
    saved.into_iter().for_each(|id| s.free(id));
    layouts.to_vec()
}

/// What block `l` keeps after its forward under `ck` (what offloading moves to host).
pub fn kept_layouts(ck: Checkpointing, l: u64, blk: &Block, d: &Dims, cuda: bool) -> Vec<Layout> {
    if ck.whole_block(l) {
        return Vec::new();
    }
    match ck {
        Checkpointing::SelectiveOp => blk
            .saved
            .iter()
            .filter(|sv| policy_keeps(sv.name, cuda))
            .map(|sv| sv.layout.clone())
            .chain(extra(d).into_iter().map(|(_, l)| l))
            .collect(),
        Checkpointing::Selective => blk
            .saved
            .iter()
            .filter(|sv| !sv.attention_core)
            .map(|sv| sv.layout.clone())
            .collect(),
        _ => blk.saved.iter().map(|sv| sv.layout.clone()).collect(),
    }
}

/// Bytes block `l` offloads to host memory.
pub fn offloaded_bytes(ck: Checkpointing, l: u64, blk: &Block, d: &Dims, cuda: bool) -> u64 {
    kept_layouts(ck, l, blk, d, cuda)
        .iter()
        .map(|l| l.bytes().0)
        .fold(0, u64::saturating_add)
}
