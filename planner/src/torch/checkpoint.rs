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
//!   CUDA the flash kernel's output and log-sum-exp are kept. torchtitan 0.3.0's block has
//!   one fused `wqkv` projection, so it runs five mm (wqkv, wo, w1, w3, w2) and keeps the
//!   1st, 3rd and 5th: the fused projection's output (N·(Q+2K)), gate and w2's output; its
//!   attention's v is its own tensor, not an mm output, and is recomputed.
//! - offloading (`torch.autograd.graph.save_on_cpu`, torchtune's `OffloadActivations`):
//!   each saved tensor is copied to host memory as forward saves it and its device copy
//!   freed; backward brings one block's set back before that block's backward. The block
//!   inputs (the residual stream) stay on the device here.

use super::block::{Block, Dims};
use crate::spec::Checkpointing;
use crate::timeline::{Component, Layout, Name, Step, TensorId};

/// Saved tensors that are the outputs of kept mm ops (the same storage), with separate
/// q, k and v projections and with torchtitan's fused one.
const MM_KEPT: [&str; 2] = ["v", "gate"];
const MM_KEPT_FUSED: [&str; 1] = ["gate"];
/// Compiled, backward recomputes each tensor where it first reads it (the partitioner
/// orders the recomputation as autograd would run it): the normalized block input and
/// its rstd are first read by the fused projection's weight gradient and the norm's
/// backward, the block's last, after the MLP's backward has freed its tensors; they are
/// left out of the recomputed set the block's backward peaks over.
const READ_LAST: [&str; 2] = ["qkv input (cast once)", "attention norm rstd"];
/// What the flash kernel returns and the policy keeps on CUDA.
const ATTENTION_KEPT: [&str; 2] = ["attention output", "log-sum-exp"];

fn policy_keeps(blk: &Block, name: &str, cuda: bool) -> bool {
    let mm: &[&str] = if blk.fused_qkv {
        &MM_KEPT_FUSED
    } else {
        &MM_KEPT
    };
    mm.contains(&name) || (cuda && ATTENTION_KEPT.contains(&name))
}

/// The kept mm outputs the block does not otherwise save: q_proj's (or the fused
/// projection's) and down_proj's. Compiled, down_proj's output feeds only the residual
/// add, whose backward reads nothing, so the partitioner does not save it.
fn extra(blk: &Block, d: &Dims) -> Vec<(&'static str, Layout)> {
    let first = if blk.fused_qkv {
        (
            " wqkv output (kept by the op policy)",
            d.tok(d.q.saturating_add(d.k.saturating_mul(2)), d.c),
        )
    } else {
        (" q_proj output (kept by the op policy)", d.tok(d.q, d.c))
    };
    let down = (" down_proj output (kept by the op policy)", d.tok(d.h, d.c));
    let mut out = vec![first];
    if !blk.compiled {
        out.push(down);
    }
    out
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
        if policy_keeps(blk, sv.name, cuda) {
            kept.push(id);
        } else {
            s.free(id);
        }
    }
    for (name, layout) in extra(blk, d) {
        kept.push(s.alloc(
            Name::block("block ", l, [name, "", ""]),
            Component::Activations,
            layout,
        ));
    }
    kept
}

/// Backward's recomputation under the op policy: everything the policy did not keep.
/// The kept mm outputs that no backward op saves ([`extra`], the last of `kept`, where
/// the forward left them on the device) only feed the recomputation, which consumes
/// them: they are freed once it is done.
pub fn op_recompute(
    s: &mut Step,
    blk: &Block,
    l: u64,
    d: &Dims,
    cuda: bool,
    kept: &mut Vec<TensorId>,
) -> Vec<TensorId> {
    let recomputed = blk
        .saved
        .iter()
        .filter(|sv| !policy_keeps(blk, sv.name, cuda))
        .filter(|sv| !(blk.compiled && READ_LAST.contains(&sv.name)))
        .map(|sv| {
            s.alloc(
                Name::block("block ", l, [" ", sv.name, " (recomputed)"]),
                Component::Activations,
                sv.layout.clone(),
            )
        })
        .collect();
    let extras = extra(blk, d).len();
    if kept.len() >= extras {
        kept.drain(kept.len() - extras..).for_each(|id| s.free(id));
    }
    recomputed
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
            .filter(|sv| policy_keeps(blk, sv.name, cuda))
            .map(|sv| sv.layout.clone())
            .chain(extra(blk, d).into_iter().map(|(_, l)| l))
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
