//! What one transformer block keeps for backward, op by op, as PyTorch eager runs the
//! Hugging Face (and nanochat) implementations.
//!
//! Notation: N = micro_batch × seq_len tokens, H hidden, Q = heads × head_dim,
//! K = kv_heads × head_dim, I intermediate, T sequence. `c` is the byte width of what a
//! matmul produces (2 under autocast or pure bf16, 4 in fp32), `r` that of the residual
//! stream and the norms (4 under autocast: the embedding and the residual adds stay fp32).
//!
//! Llama/Qwen2 (fp32), per block, in elements: the two RMSNorms keep their normalized
//! input and output (2 × 2NH), the attention keeps q, k, v, the rotate_half copies, the
//! rotated q and k, the attention output and its contiguous copy (5NQ + 4NK) plus the
//! log-sum-exp (B·heads·T fp32), the residual keeps the mid-block sum (NH), the MLP keeps
//! gate, silu(gate), up and their product (4NI). The classical Megatron count
//! `sbh(34 + 5as/h)` (docs/model.md) is the same accounting for GPT-3 with dropout.
//! Under autocast each linear saves its own bf16 copy of its input (autocast does not
//! cache activations), and elementwise ops that mix bf16 with fp32 promote to fp32.

use crate::spec::{Arch, Attention, ModelSpec, Precision, TrainSpec};
use crate::units::Bytes;

/// A tensor a block saves for backward.
#[derive(Debug, Clone)]
pub struct Saved {
    pub name: &'static str,
    pub bytes: Bytes,
    /// Part of the attention core (dropped by selective checkpointing and recomputed).
    pub attention_core: bool,
}

/// One block's memory behaviour.
#[derive(Debug, Clone, Default)]
pub struct Block {
    pub saved: Vec<Saved>,
    /// The largest short-lived buffer during the block's forward.
    pub fwd_transient: Bytes,
    /// The largest extra live bytes during the block's backward (gradients of its
    /// intermediate activations), beyond the incoming and outgoing gradient.
    pub bwd_transient: Bytes,
}

impl Block {
    fn keep(&mut self, name: &'static str, bytes: Bytes) {
        self.saved.push(Saved {
            name,
            bytes,
            attention_core: false,
        });
    }

    fn keep_core(&mut self, name: &'static str, bytes: Bytes) {
        self.saved.push(Saved {
            name,
            bytes,
            attention_core: true,
        });
    }
}

/// Dimensions in elements and byte widths for one block.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub b: u64,
    pub t: u64,
    pub n: u64,
    pub h: u64,
    pub q: u64,
    pub k: u64,
    pub i: u64,
    pub heads: u64,
    /// Compute (matmul output) bytes per element.
    pub c: u64,
    /// Residual stream bytes per element.
    pub r: u64,
    pub autocast: bool,
}

impl Dims {
    pub fn new(m: &ModelSpec, t: &TrainSpec) -> Dims {
        let autocast = t.precision.is_autocast();
        let (c, r) = match t.precision {
            Precision::Fp32 => (4, 4),
            Precision::Bf16 => (2, 2),
            _ => (2, 4),
        };
        Dims {
            b: t.micro_batch,
            t: t.seq_len,
            n: t.tokens_per_micro_batch(),
            h: m.hidden_size,
            q: m.num_heads.saturating_mul(m.head_dim),
            k: m.num_kv_heads.saturating_mul(m.head_dim),
            i: m.intermediate_size,
            heads: m.num_heads,
            c,
            r,
            autocast,
        }
    }

    /// Bytes of `width` elements per token at `bytes` each.
    pub fn tok(&self, width: u64, bytes: u64) -> Bytes {
        Bytes::of(self.n.saturating_mul(width), bytes)
    }

    /// Bytes of one B × heads × T × T attention matrix.
    pub fn scores(&self, bytes: u64) -> Bytes {
        Bytes::of(
            self.b
                .saturating_mul(self.heads)
                .saturating_mul(self.t)
                .saturating_mul(self.t),
            bytes,
        )
    }
}

/// The recipe for one decoder block of `m` (an encoder block for T5 is the same without
/// cross-attention; see `t5_blocks`).
pub fn block(m: &ModelSpec, t: &TrainSpec) -> Block {
    let d = Dims::new(m, t);
    match m.arch {
        Arch::Llama | Arch::Qwen2 => llama(&d, t.attention, m.num_heads != m.num_kv_heads),
        Arch::Nanochat => nanochat(&d, t.attention),
        Arch::Gpt2 => gpt2(&d, t.attention),
        Arch::T5 => t5(&d, false),
    }
}

/// Attention core: sdpa keeps its output and the log-sum-exp; eager keeps the scores'
/// softmax (fp32) and, under autocast, the bf16 copy the second matmul saves.
fn attention_core(blk: &mut Block, d: &Dims, attention: Attention, gqa_copies: bool) {
    if gqa_copies {
        // repeat_kv expands k and v to all heads with a copy before the attention.
        blk.keep_core("repeat_kv(k)", d.tok(d.q, d.c));
        blk.keep_core("repeat_kv(v)", d.tok(d.q, d.c));
    }
    match attention {
        Attention::Sdpa => {
            // The kernels write the output as (B, T, heads, D): the following
            // `transpose(1, 2).contiguous()` is free, and o_proj saves this same tensor.
            blk.keep_core("attention output", d.tok(d.q, d.c));
            blk.keep_core(
                "log-sum-exp",
                Bytes::of(d.b.saturating_mul(d.heads).saturating_mul(d.t), 4),
            );
        }
        Attention::Eager => {
            blk.keep_core(
                "softmax(scores)",
                d.scores(if d.autocast { 4 } else { d.c }),
            );
            if d.autocast {
                blk.keep_core("softmax(scores) bf16", d.scores(2));
            }
            // probs @ v is (B, heads, T, D); its contiguous transpose is a copy o_proj saves.
            blk.keep("attention output (contiguous)", d.tok(d.q, d.c));
            blk.fwd_transient = blk
                .fwd_transient
                .max(d.scores(d.c.max(4)) + d.scores(d.c.max(4)));
        }
    }
}

fn llama(d: &Dims, attention: Attention, gqa: bool) -> Block {
    let mut blk = Block::default();
    let (c, r) = (d.c, d.r);
    // input_layernorm: fp32 normalized input, then weight * x (fp32 under autocast).
    blk.keep("input_layernorm normalized", d.tok(d.h, r));
    if d.autocast {
        // q, k and v projections each cast the norm output to bf16 and save their copy.
        blk.keep("q_proj input (bf16 copy)", d.tok(d.h, 2));
        blk.keep("k_proj input (bf16 copy)", d.tok(d.h, 2));
        blk.keep("v_proj input (bf16 copy)", d.tok(d.h, 2));
    } else {
        blk.keep("input_layernorm output", d.tok(d.h, r));
    }
    // RoPE: `q * cos + rotate_half(q) * sin`; cos and sin need no gradient, so the
    // multiplications save only them, not q or its rotate_half copy. The sum is promoted
    // to the dtype of cos/sin (the residual's) and saved by the attention.
    // The attention runs in compute precision (autocast casts its inputs), so what it
    // saves is q and k rotated at width c.
    blk.keep_core("q rotated", d.tok(d.q, c));
    blk.keep_core("k rotated", d.tok(d.k, c));
    blk.keep_core("v", d.tok(d.k, c));
    attention_core(&mut blk, d, attention, gqa && attention == Attention::Eager);
    blk.keep("residual after attention", d.tok(d.h, r));
    blk.keep("post_attention_layernorm normalized", d.tok(d.h, r));
    if d.autocast {
        blk.keep("gate_proj input (bf16 copy)", d.tok(d.h, 2));
        blk.keep("up_proj input (bf16 copy)", d.tok(d.h, 2));
    } else {
        blk.keep("post_attention_layernorm output", d.tok(d.h, r));
    }
    blk.keep("gate", d.tok(d.i, c));
    blk.keep("silu(gate)", d.tok(d.i, c));
    blk.keep("up", d.tok(d.i, c));
    blk.keep("silu(gate) * up", d.tok(d.i, c));
    blk.fwd_transient = blk.fwd_transient.max(d.tok(d.h, r) + d.tok(d.q, r));
    // Backward of the MLP holds the gradients of gate, up and their product at once.
    blk.bwd_transient = d.tok(d.i, c).saturating_mul(3) + d.tok(d.h, r);
    blk
}

fn nanochat(d: &Dims, attention: Attention) -> Block {
    let mut blk = Block::default();
    let (c, r) = (d.c, d.r);
    // F.rms_norm without weight: saves its input and the reciprocal RMS; the output feeds
    // c_q, c_k, c_v (one bf16 copy each under autocast).
    blk.keep("norm output", d.tok(d.h, r));
    if d.autocast {
        blk.keep("c_q input (bf16 copy)", d.tok(d.h, 2));
        blk.keep("c_k input (bf16 copy)", d.tok(d.h, 2));
        blk.keep("c_v input (bf16 copy)", d.tok(d.h, 2));
    }
    // RoPE multiplies by cos/sin (no gradient needed): q and k themselves are not saved.
    // nanochat keeps cos/sin in bf16 and casts the rotated halves back to q's dtype, so
    // from here to the attention output everything stays in compute precision.
    blk.keep("q rotated (cat)", d.tok(d.q, c));
    blk.keep("k rotated (cat)", d.tok(d.k, c));
    blk.keep_core("q normed", d.tok(d.q, c));
    blk.keep_core("k normed", d.tok(d.k, c));
    blk.keep_core("v", d.tok(d.k, c));
    let attn = Dims { r: c, ..*d };
    attention_core(&mut blk, &attn, attention, false);
    blk.keep("residual after attention", d.tok(d.h, r));
    blk.keep("norm output (mlp)", d.tok(d.h, r));
    if d.autocast {
        blk.keep("c_fc input (bf16 copy)", d.tok(d.h, 2));
    }
    // relu saves its output (which square saves too); c_proj saves relu².
    blk.keep("relu", d.tok(d.i, c));
    blk.keep("relu²", d.tok(d.i, c));
    blk.fwd_transient = d.tok(d.q, r).saturating_mul(3);
    blk.bwd_transient = d.tok(d.i, c).saturating_mul(3) + d.tok(d.h, r);
    blk
}

fn gpt2(d: &Dims, attention: Attention) -> Block {
    let mut blk = Block::default();
    let (c, r) = (d.c, d.r);
    // LayerNorm saves its input, mean and rstd; its output feeds c_attn (Conv1D: addmm).
    blk.keep("ln_1 output", d.tok(d.h, r));
    if d.autocast {
        blk.keep("c_attn input (bf16 copy)", d.tok(d.h, 2));
    }
    blk.keep_core("qkv", d.tok(d.q.saturating_add(2 * d.k), c));
    attention_core(&mut blk, d, attention, false);
    blk.keep("residual after attention", d.tok(d.h, r));
    blk.keep("ln_2 output", d.tok(d.h, r));
    if d.autocast {
        blk.keep("c_fc input (bf16 copy)", d.tok(d.h, 2));
    }
    blk.keep("c_fc output", d.tok(d.i, c));
    blk.keep("gelu_new intermediates", d.tok(d.i, c).saturating_mul(3));
    blk.keep("gelu output", d.tok(d.i, c));
    blk.fwd_transient = d.tok(d.i, c).saturating_mul(3);
    blk.bwd_transient = d.tok(d.i, c).saturating_mul(3) + d.tok(d.h, r);
    blk
}

/// T5 (ChatLM-mini-Chinese): relative position bias added to the scores, so the
/// attention is the eager path (scores materialized) whatever `attention` says.
fn t5(d: &Dims, cross: bool) -> Block {
    let mut blk = Block::default();
    let (c, r) = (d.c, d.r);
    let attn = |blk: &mut Block| {
        blk.keep("layer_norm output", d.tok(d.h, r));
        blk.keep("q", d.tok(d.q, c));
        blk.keep("k", d.tok(d.q, c));
        blk.keep("v", d.tok(d.q, c));
        blk.keep_core("softmax(scores)", d.scores(4));
        if d.autocast {
            blk.keep_core("softmax(scores) bf16", d.scores(2));
        }
        blk.keep("attention output", d.tok(d.q, c));
        blk.keep("residual", d.tok(d.h, r));
    };
    attn(&mut blk);
    if cross {
        attn(&mut blk);
    }
    blk.keep("ffn layer_norm output", d.tok(d.h, r));
    blk.keep("wi output", d.tok(d.i, c));
    blk.keep("relu output", d.tok(d.i, c));
    blk.fwd_transient = d.scores(4).saturating_mul(2);
    blk.bwd_transient = d.scores(4).saturating_mul(2) + d.tok(d.i, c);
    blk
}

/// T5's encoder and decoder blocks.
pub fn t5_blocks(m: &ModelSpec, t: &TrainSpec) -> (Block, Block) {
    let d = Dims::new(m, t);
    (t5(&d, false), t5(&d, true))
}
