//! torchtitan 0.3.0's Llama 3 (`torchtitan/models/llama3/model.py` on
//! `torchtitan/models/common/decoder.py`, `attention.py`, `feed_forward.py`, `rope.py`,
//! `nn_modules.py`), as its trainer runs it: eager, or each block compiled
//! (`torchtitan/distributed/compile.py`, `apply_compile`: `block.compile(fullgraph=True)`
//! after the checkpointing wrapper) with the final norm and `lm_head` eager.
//!
//! A block is `x + attention(attention_norm(x))`, then `h + feed_forward(ffn_norm(h))`:
//! `nn.RMSNorm`, one fused `wqkv` projection, complex RoPE, flex attention (`enable_gqa`,
//! so k and v reach the kernel at their own N·K width; its block mask is a few index
//! tensors, not a T × T matrix), `wo`, and the SiLU-gated `w1`/`w3`/`w2` MLP. Eager, a
//! block saves what transformers' Llama block saves (`block::llama`, read from the
//! saved-tensor hooks on the CPU: the fused projection's input once, RoPE's multiply by
//! the complex table keeps only the table) except that `nn.RMSNorm`'s decomposition keeps
//! its normalized input in fp32 where the stream is bf16. Compiled, a block keeps what the
//! partitioner keeps for transformers' Llama (`compiled::llama`), k and v at N·K; over
//! `SelectiveAC` the policy's kept outputs that backward reads (`checkpoint.rs`).
//!
//! The loss is `loss.rs`'s: `chunked` is `ChunkedLossWrapper` (8 chunks along the
//! sequence, each chunk's `lm_head`, cross-entropy and backward inside the loss call),
//! `float-cast` is `CrossEntropyLoss` over the whole logits; `compile` compiles the
//! cross-entropy of each (`components/loss.py`).
//!
//! Measured on the CPU (`tests/data/torch_torchtitan.json`) with torchtitan's own
//! `ScaledDotProductAttention` module in place of flex attention, whose backward does not
//! run on the CPU; both keep q, k, v, the output and the log-sum-exp.

use super::block::{self, Dims};
use super::compiled;
use super::recipe::{Implementation, Recipe};
use crate::spec::{LossMode, ModelSpec, TrainSpec};
use crate::timeline::Layout;
use crate::units::DType;

pub struct Torchtitan;

impl Implementation for Torchtitan {
    fn recipe(&self, m: &ModelSpec, t: &TrainSpec) -> Recipe {
        let d = Dims::new(m, t);
        let eager = block::Transformers.recipe(m, t);
        let mut encoder = if t.compile {
            compiled::llama(&d, d.k)
        } else {
            block::llama_normed(&d, t.attention, false, DType::F32)
        };
        encoder.fused_qkv = true;
        Recipe {
            encoder,
            head: Some(final_norm(&d, t)),
            ..eager
        }
    }
}

/// What the eager final norm keeps: a bf16 stream's fp32 copy, the fp32 normalized input,
/// and, where `lm_head` runs on the whole output (`float-cast`), that output. The chunked
/// wrapper detaches its chunks, so the norm's output is not kept past the loss.
fn final_norm(d: &Dims, t: &TrainSpec) -> Vec<(&'static str, Layout)> {
    let mut kept = Vec::with_capacity(3);
    if d.r != DType::F32 {
        kept.push(("final norm x.float()", d.tok(d.h, DType::F32)));
    }
    kept.push(("final norm normalized (fp32)", d.tok(d.h, DType::F32)));
    if t.loss != LossMode::Chunked {
        kept.push(("final norm output", d.tok(d.h, d.c)));
    }
    kept
}
