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

use super::recipe::{Implementation, Recipe};
use crate::spec::{Arch, Attention, ModelSpec, Precision, TrainSpec};
use crate::timeline::Layout;
use crate::units::DType;

/// A tensor a block saves for backward.
#[derive(Debug, Clone)]
pub struct Saved {
    pub name: &'static str,
    pub layout: Layout,
    /// Part of the attention core (dropped by selective checkpointing and recomputed).
    pub attention_core: bool,
}

/// One block's memory behaviour.
#[derive(Debug, Clone)]
pub struct Block {
    pub saved: Vec<Saved>,
    /// The largest short-lived buffer during the block's forward.
    pub fwd_transient: Layout,
    /// The largest extra live bytes during the block's backward (gradients of its
    /// intermediate activations), beyond the incoming and outgoing gradient.
    pub bwd_transient: Layout,
}

impl Default for Block {
    fn default() -> Block {
        let none = Layout::new(&[0], DType::U8);
        Block {
            saved: Vec::new(),
            fwd_transient: none.clone(),
            bwd_transient: none,
        }
    }
}

impl Block {
    fn keep(&mut self, name: &'static str, layout: Layout) {
        self.saved.push(Saved {
            name,
            layout,
            attention_core: false,
        });
    }

    fn keep_core(&mut self, name: &'static str, layout: Layout) {
        self.saved.push(Saved {
            name,
            layout,
            attention_core: true,
        });
    }

    /// Raises the forward workspace to `w` if that is larger.
    fn fwd_at_least(&mut self, w: Layout) {
        if w.bytes() > self.fwd_transient.bytes() {
            self.fwd_transient = w;
        }
    }
}

/// Dimensions in elements and byte widths for one block.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub b: u64,
    pub t: u64,
    pub h: u64,
    pub q: u64,
    pub k: u64,
    pub i: u64,
    pub heads: u64,
    /// Compute (matmul output) dtype.
    pub c: DType,
    /// Residual stream dtype.
    pub r: DType,
    /// Parameter (and gradient) dtype.
    pub p: DType,
    pub autocast: bool,
}

impl Dims {
    pub fn new(m: &ModelSpec, t: &TrainSpec) -> Dims {
        let autocast = t.precision.is_autocast();
        let (c, r) = match t.precision {
            Precision::Fp32 => (DType::F32, DType::F32),
            Precision::Bf16 | Precision::Bf16Mixed => (DType::Bf16, DType::Bf16),
            Precision::Bf16Autocast => (DType::Bf16, DType::F32),
            Precision::Fp16Autocast => (DType::F16, DType::F32),
        };
        Dims {
            b: t.micro_batch,
            t: t.seq_len,
            h: m.hidden_size,
            q: m.num_heads.saturating_mul(m.head_dim),
            k: m.num_kv_heads.saturating_mul(m.head_dim),
            i: m.intermediate_size,
            heads: m.num_heads,
            c,
            r,
            p: if t.precision == Precision::Bf16 {
                DType::Bf16
            } else {
                DType::F32
            },
            autocast,
        }
    }

    /// A B × T × `width` tensor.
    pub fn tok(&self, width: u64, dtype: DType) -> Layout {
        Layout::new(&[self.b, self.t, width], dtype)
    }

    /// `k` B × T × `width` tensors kept together.
    pub fn tok_n(&self, k: u64, width: u64, dtype: DType) -> Layout {
        Layout::new(&[k, self.b, self.t, width], dtype)
    }

    /// One B × heads × T × T attention matrix.
    pub fn scores(&self, dtype: DType) -> Layout {
        Layout::new(&[self.b, self.heads, self.t, self.t], dtype)
    }
}

/// Hugging Face transformers' modeling files (and nanochat's `gpt.py`).
pub struct Transformers;

impl Implementation for Transformers {
    fn recipe(&self, m: &ModelSpec, t: &TrainSpec) -> Recipe {
        let d = Dims::new(m, t);
        // cos and sin, (T, head_dim) each in fp32, shared by every block.
        let rope = matches!(m.arch, Arch::Llama | Arch::Qwen2 | Arch::Nanochat)
            .then(|| Layout::new(&[2, d.t, m.head_dim], DType::F32));
        let mut stem = vec![("embedding output", d.tok(d.h, d.r))];
        if m.arch == Arch::Nanochat {
            // `norm(wte(idx))`: the un-normed embedding stays saved for the norm's backward.
            stem.push(("norm(embedding)", d.tok(d.h, d.r)));
        }
        let (encoder, decoder) = match m.arch {
            Arch::Llama | Arch::Qwen2 => {
                (llama(&d, t.attention, m.num_heads != m.num_kv_heads), None)
            }
            Arch::Nanochat => (nanochat(&d, t.attention), None),
            Arch::Gpt2 => (gpt2(&d, t.attention), None),
            Arch::T5 => (t5(&d, false), Some(t5(&d, true))),
        };
        Recipe {
            rope,
            stem,
            encoder,
            decoder,
        }
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
            blk.keep_core("log-sum-exp", Layout::new(&[d.b, d.heads, d.t], DType::F32));
        }
        Attention::Eager => {
            // Under autocast softmax runs in fp32 and the second matmul saves its bf16 copy.
            blk.keep_core(
                "softmax(scores)",
                d.scores(if d.autocast { DType::F32 } else { d.c }),
            );
            if d.autocast {
                blk.keep_core("softmax(scores) bf16", d.scores(d.c));
            }
            // probs @ v is (B, heads, T, D); its contiguous transpose is a copy o_proj saves.
            blk.keep("attention output (contiguous)", d.tok(d.q, d.c));
            // The scores and their softmax, both at least fp32 wide.
            let wide = Layout::new(&[2, d.b, d.heads, d.t, d.t], DType::F32);
            blk.fwd_at_least(wide);
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
        blk.keep("q_proj input (bf16 copy)", d.tok(d.h, d.c));
        blk.keep("k_proj input (bf16 copy)", d.tok(d.h, d.c));
        blk.keep("v_proj input (bf16 copy)", d.tok(d.h, d.c));
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
        blk.keep("gate_proj input (bf16 copy)", d.tok(d.h, d.c));
        blk.keep("up_proj input (bf16 copy)", d.tok(d.h, d.c));
    } else {
        blk.keep("post_attention_layernorm output", d.tok(d.h, r));
    }
    blk.keep("gate", d.tok(d.i, c));
    blk.keep("silu(gate)", d.tok(d.i, c));
    blk.keep("up", d.tok(d.i, c));
    blk.keep("silu(gate) * up", d.tok(d.i, c));
    blk.fwd_at_least(Layout::concat(&[d.tok(d.h, r), d.tok(d.q, r)]));
    // Backward of the MLP holds the gradients of gate, up and their product at once.
    blk.bwd_transient = Layout::concat(&[d.tok_n(3, d.i, c), d.tok(d.h, r)]);
    blk
}

fn nanochat(d: &Dims, attention: Attention) -> Block {
    let mut blk = Block::default();
    let (c, r) = (d.c, d.r);
    // F.rms_norm without weight: saves its input and the reciprocal RMS; the output feeds
    // c_q, c_k, c_v (one bf16 copy each under autocast).
    blk.keep("norm output", d.tok(d.h, r));
    if d.autocast {
        blk.keep("c_q input (bf16 copy)", d.tok(d.h, d.c));
        blk.keep("c_k input (bf16 copy)", d.tok(d.h, d.c));
        blk.keep("c_v input (bf16 copy)", d.tok(d.h, d.c));
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
        blk.keep("c_fc input (bf16 copy)", d.tok(d.h, d.c));
    }
    // relu saves its output (which square saves too); c_proj saves relu².
    blk.keep("relu", d.tok(d.i, c));
    blk.keep("relu²", d.tok(d.i, c));
    blk.fwd_transient = d.tok_n(3, d.q, r);
    blk.bwd_transient = Layout::concat(&[d.tok_n(3, d.i, c), d.tok(d.h, r)]);
    blk
}

fn gpt2(d: &Dims, attention: Attention) -> Block {
    let mut blk = Block::default();
    let (c, r) = (d.c, d.r);
    // LayerNorm saves its input, mean and rstd; its output feeds c_attn (Conv1D: addmm).
    blk.keep("ln_1 output", d.tok(d.h, r));
    if d.autocast {
        blk.keep("c_attn input (bf16 copy)", d.tok(d.h, d.c));
    }
    blk.keep_core("qkv", d.tok(d.q.saturating_add(2 * d.k), c));
    attention_core(&mut blk, d, attention, false);
    blk.keep("residual after attention", d.tok(d.h, r));
    blk.keep("ln_2 output", d.tok(d.h, r));
    if d.autocast {
        blk.keep("c_fc input (bf16 copy)", d.tok(d.h, d.c));
    }
    blk.keep("c_fc output", d.tok(d.i, c));
    blk.keep("gelu_new intermediates", d.tok_n(3, d.i, c));
    blk.keep("gelu output", d.tok(d.i, c));
    blk.fwd_transient = d.tok_n(3, d.i, c);
    blk.bwd_transient = Layout::concat(&[d.tok_n(3, d.i, c), d.tok(d.h, r)]);
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
        blk.keep_core("softmax(scores)", d.scores(DType::F32));
        if d.autocast {
            blk.keep_core("softmax(scores) bf16", d.scores(d.c));
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
    let scores2 = Layout::new(&[2, d.b, d.heads, d.t, d.t], DType::F32);
    blk.fwd_transient = scores2.clone();
    blk.bwd_transient = Layout::concat(&[scores2, d.tok(d.i, c)]);
    blk
}
