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

/// What `Saved::linears` names for a tensor kept only for a norm's weight gradient (the
/// normalized input of `weight * normed`): never a LoRA target, so LoRA drops it.
pub const NORM_WEIGHT: &[&str] = &["norm weight"];

/// What `Saved::linears` names for a tensor kept only for the 3-D expert stacks' weight
/// gradients: not `nn.Linear`, never a LoRA target.
pub const EXPERT_WEIGHTS: &[&str] = &["expert stacks"];

/// A tensor a block saves for backward.
#[derive(Debug, Clone)]
pub struct Saved {
    pub name: &'static str,
    pub layout: Layout,
    /// Part of the attention core (dropped by selective checkpointing and recomputed).
    pub attention_core: bool,
    /// The linears (PEFT names) that keep this tensor only to compute their weight's
    /// gradient; empty when something else needs it too. LoRA drops it where all of
    /// them are frozen (`torch::lora`).
    pub linears: &'static [&'static str],
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
    /// Whether autograd keeps the block's input (and the final norm's) for backward
    /// when no checkpoint wrapper does: an RMSNorm that upcasts a bf16 stream keeps its
    /// fp32 copy instead, and the residual add keeps nothing.
    pub input_saved: bool,
    /// One fused q/k/v projection (torchtitan) instead of three: what the op-level
    /// checkpointing policy counts as matmuls (`checkpoint.rs`).
    pub fused_qkv: bool,
    /// Cut by AOTAutograd's partitioner (`compiled.rs`): under the op-level policy it
    /// saves a kept mm output only where backward reads it.
    pub compiled: bool,
}

impl Default for Block {
    fn default() -> Block {
        let none = Layout::new(&[0], DType::U8);
        Block {
            saved: Vec::new(),
            fwd_transient: none.clone(),
            bwd_transient: none,
            input_saved: true,
            fused_qkv: false,
            compiled: false,
        }
    }
}

impl Block {
    fn keep(&mut self, name: &'static str, layout: Layout) {
        self.keep_input(name, layout, &[]);
    }

    /// A tensor kept only as the input of `linears`, for their weight gradients.
    fn keep_input(&mut self, name: &'static str, layout: Layout, linears: &'static [&'static str]) {
        self.saved.push(Saved {
            name,
            layout,
            attention_core: false,
            linears,
        });
    }

    fn keep_core(&mut self, name: &'static str, layout: Layout) {
        self.saved.push(Saved {
            name,
            layout,
            attention_core: true,
            linears: &[],
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
            // nanochat's bf16 `wte` makes the residual stream bf16 (`torch::nanochat`).
            Precision::Bf16Autocast if super::nanochat::bf16_stream(t) => {
                (DType::Bf16, DType::Bf16)
            }
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
        let rope = (!matches!(m.arch, Arch::Gpt2 | Arch::T5))
            .then(|| Layout::new(&[2, d.t, m.head_dim], DType::F32));
        let mut stem = vec![("embedding output", d.tok(d.h, d.r))];
        if m.arch == Arch::Nanochat {
            // `norm(wte(idx))`: the norm keeps fp32 of the un-normed embedding (a bf16
            // one as its fp32 copy).
            stem[0] = ("embedding output", d.tok(d.h, DType::F32));
            stem.push(("norm(embedding)", d.tok(d.h, d.r)));
        }
        let (encoder, decoder) = match m.arch {
            Arch::Llama | Arch::Qwen2 => {
                (llama(&d, t.attention, m.num_heads != m.num_kv_heads), None)
            }
            Arch::Nanochat => (nanochat(&d, t.attention), None),
            Arch::Qwen3
            | Arch::Gemma2
            | Arch::Gemma3
            | Arch::Phi3
            | Arch::Olmo2
            | Arch::Mixtral
            | Arch::Qwen3Moe => (decoder(&d, m, effective_attention(m, t.attention)), None),
            Arch::Gpt2 => (gpt2(&d, t.attention), None),
            Arch::T5 => (t5(&d, false), Some(t5(&d, true))),
        };
        Recipe {
            rope,
            stem,
            encoder,
            decoder,
            head: None,
        }
    }
}

/// The attention a family really runs: Gemma 2 declares `_supports_sdpa = False`
/// (sdpa has no logit soft-capping), so transformers runs its eager path whatever is asked.
pub fn effective_attention(m: &ModelSpec, asked: Attention) -> Attention {
    if m.arch == Arch::Gemma2 {
        Attention::Eager
    } else {
        asked
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
            // `softmax(scores, dtype=float32).to(query.dtype)`: fp32, and where the
            // compute dtype is narrower (autocast or a bf16 model) the second matmul saves
            // its bf16 copy.
            let narrow = d.c != DType::F32;
            blk.keep_core("softmax(scores)", d.scores(DType::F32));
            if narrow {
                blk.keep_core("softmax(scores) bf16", d.scores(d.c));
            }
            // probs @ v is (B, heads, T, D); its contiguous transpose is a copy o_proj saves.
            blk.keep_input(
                "attention output (contiguous)",
                d.tok(d.q, d.c),
                &["o_proj"],
            );
            // The scores and their softmax, both at least fp32 wide.
            let wide = Layout::new(&[2, d.b, d.heads, d.t, d.t], DType::F32);
            blk.fwd_at_least(wide);
        }
    }
}

pub(super) fn llama(d: &Dims, attention: Attention, gqa: bool) -> Block {
    llama_normed(d, attention, gqa, d.r)
}

/// [`llama`] with the norms' normalized input kept in `normalized`: transformers' RMSNorm
/// casts it back to the stream's dtype before the weight, `nn.RMSNorm` (torchtitan) keeps
/// its fp32 decomposition's.
pub(super) fn llama_normed(d: &Dims, attention: Attention, gqa: bool, normalized: DType) -> Block {
    let mut blk = Block::default();
    let (c, r) = (d.c, d.r);
    // `hidden_states.to(float32)`: a copy of a bf16 residual stream, kept by `pow` and the
    // multiply by the reciprocal RMS (an fp32 stream is kept as it is, by the frame).
    if r != DType::F32 {
        blk.keep("input_layernorm x.float()", d.tok(d.h, DType::F32));
    }
    // input_layernorm: fp32 normalized input, then weight * x (fp32 under autocast).
    blk.keep_input(
        "input_layernorm normalized",
        d.tok(d.h, normalized),
        NORM_WEIGHT,
    );
    if d.autocast {
        // q, k and v projections each cast the norm output to bf16 and save their copy.
        blk.keep_input("q_proj input (bf16 copy)", d.tok(d.h, d.c), &["q_proj"]);
        blk.keep_input("k_proj input (bf16 copy)", d.tok(d.h, d.c), &["k_proj"]);
        blk.keep_input("v_proj input (bf16 copy)", d.tok(d.h, d.c), &["v_proj"]);
    } else {
        let qkv = &["q_proj", "k_proj", "v_proj"];
        blk.keep_input("input_layernorm output", d.tok(d.h, r), qkv);
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
    // The mid-block residual sum is what the next norm keeps: itself when fp32, else its
    // fp32 copy (the sum of bf16 tensors is not kept by the add).
    if r == DType::F32 {
        blk.keep("residual after attention", d.tok(d.h, r));
    } else {
        blk.keep("post_attention_layernorm x.float()", d.tok(d.h, DType::F32));
    }
    blk.keep_input(
        "post_attention_layernorm normalized",
        d.tok(d.h, normalized),
        NORM_WEIGHT,
    );
    if d.autocast {
        blk.keep_input(
            "gate_proj input (bf16 copy)",
            d.tok(d.h, d.c),
            &["gate_proj"],
        );
        blk.keep_input("up_proj input (bf16 copy)", d.tok(d.h, d.c), &["up_proj"]);
    } else {
        let gate_up = &["gate_proj", "up_proj"];
        blk.keep_input("post_attention_layernorm output", d.tok(d.h, r), gate_up);
    }
    blk.keep("gate", d.tok(d.i, c));
    blk.keep("silu(gate)", d.tok(d.i, c));
    blk.keep("up", d.tok(d.i, c));
    blk.keep_input("silu(gate) * up", d.tok(d.i, c), &["down_proj"]);
    blk.fwd_at_least(Layout::concat(&[d.tok(d.h, r), d.tok(d.q, r)]));
    // Backward of the MLP: once down_proj's backward has freed the product it saved, the
    // gradients of the product, silu(gate) and up are live at once.
    blk.bwd_transient = d.tok_n(2, d.i, c);
    blk.input_saved = r == DType::F32;
    blk
}

/// nanochat's block. Its `norm` is `F.rms_norm` without a weight, which keeps fp32 of its
/// input: an fp32 input itself, a bf16 input the fp32 copy its decomposition computes in;
/// its output has the input's dtype. An fp32 output feeding linears under autocast is
/// cast to one bf16 copy per linear (each saves its copy) and then freed; any other
/// output the linears save as it is (measured, tests/data/torch_cpu.json: fp32, bf16
/// autocast over an fp32 stream, pure bf16; torch_nanochat_wte.json: autocast over a
/// bf16 stream).
fn nanochat(d: &Dims, attention: Attention) -> Block {
    let mut blk = Block::default();
    let (c, r, f32) = (d.c, d.r, DType::F32);
    let cast = d.autocast && r == f32;
    // The attention norm keeps a bf16 stream's fp32 copy (an fp32 stream is the block
    // input itself, which the frame keeps); c_q, c_k and c_v save its output or copies.
    if r != f32 {
        blk.keep("norm input (fp32 copy)", d.tok(d.h, f32));
    }
    if cast {
        blk.keep("c_q input (bf16 copy)", d.tok(d.h, d.c));
        blk.keep("c_k input (bf16 copy)", d.tok(d.h, d.c));
        blk.keep("c_v input (bf16 copy)", d.tok(d.h, d.c));
    } else {
        blk.keep("norm output", d.tok(d.h, r));
    }
    // RoPE multiplies by cos/sin (no gradient needed), so it saves neither q nor k; the
    // norms of q and k keep fp32 of the rotated q and k. nanochat keeps cos/sin in bf16
    // and casts the rotated halves back to q's dtype, so from here to the attention
    // output everything stays in compute precision.
    blk.keep("q rotated (fp32, kept by its norm)", d.tok(d.q, f32));
    blk.keep("k rotated (fp32, kept by its norm)", d.tok(d.k, f32));
    blk.keep_core("q normed", d.tok(d.q, c));
    blk.keep_core("k normed", d.tok(d.k, c));
    blk.keep_core("v", d.tok(d.k, c));
    let attn = Dims { r: c, ..*d };
    attention_core(&mut blk, &attn, attention, false);
    // The MLP norm keeps fp32 of the residual: an fp32 one itself, a bf16 one its copy.
    blk.keep("residual after attention (fp32)", d.tok(d.h, f32));
    if cast {
        blk.keep("c_fc input (bf16 copy)", d.tok(d.h, d.c));
    } else {
        blk.keep("norm output (mlp)", d.tok(d.h, r));
    }
    // relu saves its output (which square saves too); c_proj saves relu².
    blk.keep("relu", d.tok(d.i, c));
    blk.keep("relu²", d.tok(d.i, c));
    blk.fwd_transient = d.tok_n(3, d.q, r);
    blk.bwd_transient = Layout::concat(&[d.tok_n(3, d.i, c), d.tok(d.h, r)]);
    blk.input_saved = r == f32;
    blk
}

fn gpt2(d: &Dims, attention: Attention) -> Block {
    let mut blk = Block::default();
    let (c, r) = (d.c, d.r);
    // LayerNorm saves its input, mean and rstd, not its output; the output is what
    // c_attn (Conv1D: addmm) saves, or under autocast (where layer_norm runs in fp32)
    // the bf16 copy addmm makes of it, the fp32 output then freed (measured,
    // tests/data/torch_cpu.json).
    let ln_output = |blk: &mut Block, name: &'static str, copy: &'static str| {
        if d.autocast {
            blk.keep(copy, d.tok(d.h, d.c));
        } else {
            blk.keep(name, d.tok(d.h, r));
        }
    };
    ln_output(
        &mut blk,
        "ln_1 output",
        "c_attn input (bf16 copy of ln_1's)",
    );
    blk.keep_core("qkv", d.tok(d.q.saturating_add(2 * d.k), c));
    attention_core(&mut blk, d, attention, false);
    blk.keep("residual after attention", d.tok(d.h, r));
    ln_output(&mut blk, "ln_2 output", "c_fc input (bf16 copy of ln_2's)");
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

/// How a family's RMSNorm is written in transformers 5.23, which decides what it saves.
/// Each upcasts its input (`x.to(float32)`, kept by `pow` and the multiply by the
/// reciprocal RMS) and keeps the normalized tensor for its weight's gradient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Norm {
    /// Llama, Qwen3, Mistral, Phi-3, Mixtral: `weight * normed.to(input_dtype)`; the
    /// product takes the weight's dtype (fp32 under autocast).
    Llama,
    /// Gemma: `(normed * (1 + weight.float())).type_as(x)`: the fp32 normed is kept, the
    /// output has the input's dtype.
    Gemma,
    /// OLMo 2: `(weight * normed).to(input_dtype)`: the same as Gemma's for memory.
    Olmo,
}

/// The family's pieces, as its modeling file composes them.
struct Family {
    norm: Norm,
    /// Width of the q/k norms' input: per head (Qwen3, Gemma 3), all heads (OLMo 2), none.
    qk_norm: bool,
    /// Phi-3's `qkv_proj` and `gate_up_proj`.
    fused: bool,
    /// Gemma: norms after the attention and the MLP as well as before.
    sandwich: bool,
    /// OLMo 2: norms only after the attention and the MLP.
    post_only: bool,
}

impl Family {
    fn of(arch: Arch) -> Family {
        let base = Family {
            norm: Norm::Llama,
            qk_norm: false,
            fused: false,
            sandwich: false,
            post_only: false,
        };
        match arch {
            Arch::Qwen3 | Arch::Qwen3Moe => Family {
                qk_norm: true,
                ..base
            },
            Arch::Gemma2 => Family {
                norm: Norm::Gemma,
                sandwich: true,
                ..base
            },
            Arch::Gemma3 => Family {
                norm: Norm::Gemma,
                sandwich: true,
                qk_norm: true,
                ..base
            },
            Arch::Phi3 => Family {
                fused: true,
                ..base
            },
            Arch::Olmo2 => Family {
                norm: Norm::Olmo,
                qk_norm: true,
                post_only: true,
                ..base
            },
            _ => base,
        }
    }
}

/// What an RMSNorm of a tensor `x` (dtype `dt`, width `w`) keeps, and the dtype of its
/// output. `x_new` says whether `x` itself is new here (a projection's output) rather
/// than a tensor something else keeps anyway (the block input, the residual).
fn rms_norm(
    blk: &mut Block,
    d: &Dims,
    norm: Norm,
    names: [&'static str; 2],
    w: u64,
    dt: DType,
    x_new: bool,
) -> DType {
    // x.to(float32): a copy unless x already is fp32, and then x itself stays alive.
    if dt != DType::F32 || x_new {
        blk.keep(names[0], d.tok(w, DType::F32));
    }
    match norm {
        Norm::Llama => {
            blk.keep_input(names[1], d.tok(w, dt), NORM_WEIGHT);
            if d.p == DType::F32 {
                DType::F32
            } else {
                dt
            }
        }
        Norm::Gemma | Norm::Olmo => {
            blk.keep_input(names[1], d.tok(w, DType::F32), NORM_WEIGHT);
            dt
        }
    }
}

/// The saved input of the linears that read `x` (dtype `dt`): autocast gives each its
/// own compute-dtype copy; otherwise they share `x`, kept once if it is new here.
fn linear_inputs(
    blk: &mut Block,
    d: &Dims,
    linears: &'static [&'static str],
    w: u64,
    dt: DType,
    x_new: bool,
) {
    if d.autocast && dt != d.c {
        for i in 0..linears.len() {
            blk.keep_input(INPUT_NAMES[i], d.tok(w, d.c), &linears[i..=i]);
        }
    } else if x_new {
        blk.keep_input("shared linear input", d.tok(w, dt), linears);
    }
}

/// Names of the per-linear compute-dtype input copies, in the order of `linears`.
const INPUT_NAMES: [&str; 3] = [
    "1st linear's input (compute-dtype copy)",
    "2nd linear's input (compute-dtype copy)",
    "3rd linear's input (compute-dtype copy)",
];

/// The attention half of a transformers decoder block of the newer families.
fn decoder_attention(blk: &mut Block, d: &Dims, m: &ModelSpec, f: &Family, attention: Attention) {
    let c = d.c;
    // The input norm's output feeds the projections (OLMo 2: the block input itself,
    // which the frame keeps anyway).
    let names: &'static [&'static str] = if f.fused {
        &["qkv_proj"]
    } else {
        &["q_proj", "k_proj", "v_proj"]
    };
    if f.post_only {
        linear_inputs(blk, d, names, d.h, d.r, false);
    } else {
        let norm = ["input_layernorm x.float()", "input_layernorm normed"];
        let x = rms_norm(blk, d, f.norm, norm, d.h, d.r, false);
        linear_inputs(blk, d, names, d.h, x, true);
    }
    // q and k through their norms (Qwen3, Gemma 3 per head; OLMo 2 over all heads).
    if f.qk_norm {
        rms_norm(
            blk,
            d,
            f.norm,
            ["q_proj output (fp32)", "q_norm normed"],
            d.q,
            c,
            true,
        );
        rms_norm(
            blk,
            d,
            f.norm,
            ["k_proj output (fp32)", "k_norm normed"],
            d.k,
            c,
            true,
        );
    }
    // RoPE saves only cos and sin; the attention keeps q and k rotated, cast to compute
    // precision, and v (Phi-3: v is a view of qkv, which it keeps whole).
    blk.keep_core("q rotated", d.tok(d.q, c));
    blk.keep_core("k rotated", d.tok(d.k, c));
    if f.fused {
        let qkv = d.q.saturating_add(2 * d.k);
        blk.keep_core("qkv (kept whole by the v view)", d.tok(qkv, c));
    } else {
        blk.keep_core("v", d.tok(d.k, c));
    }
    let gqa = m.num_heads != m.num_kv_heads && attention == Attention::Eager;
    attention_core(blk, d, attention, gqa);
    if m.arch == Arch::Gemma2 && attention == Attention::Eager {
        // attn_logit_softcapping: scores / cap, tanh (kept), × cap.
        blk.keep_core("tanh(scores / softcap)", d.scores(c));
    }
    if f.sandwich || f.post_only {
        let norm = ["o_proj output (fp32)", "post_attention_layernorm normed"];
        rms_norm(blk, d, f.norm, norm, d.h, c, true);
    }
}

/// A transformers decoder block of the newer families: Qwen3 (QK-norm), Gemma 2/3
/// (sandwich norms, GeGLU), Phi-3 (fused projections), OLMo 2 (post-norms, QK-norm),
/// and Mixtral / Qwen3-MoE (a routed mixture of experts).
fn decoder(d: &Dims, m: &ModelSpec, attention: Attention) -> Block {
    let mut blk = Block::default();
    let f = Family::of(m.arch);
    let (c, r) = (d.c, d.r);
    decoder_attention(&mut blk, d, m, &f, attention);
    // The residual sum is kept where the next op keeps its input as is: the MLP's norm
    // upcasting an fp32 residual, or (OLMo 2) the MLP's linears without autocast.
    let residual_kept = if f.post_only {
        !d.autocast
    } else {
        r == DType::F32
    };
    if residual_kept {
        blk.keep("residual after attention", d.tok(d.h, r));
    }
    let x = if f.post_only {
        r
    } else {
        let names = if f.sandwich {
            [
                "pre_feedforward_layernorm x.float()",
                "pre_feedforward_layernorm normed",
            ]
        } else {
            [
                "post_attention_layernorm x.float()",
                "post_attention_layernorm normed",
            ]
        };
        rms_norm(&mut blk, d, f.norm, names, d.h, r, false)
    };
    if m.features.experts > 0 {
        experts(&mut blk, d, m, x);
    } else {
        let names: &'static [&'static str] = if f.fused {
            &["gate_up_proj"]
        } else {
            &["gate_proj", "up_proj"]
        };
        linear_inputs(&mut blk, d, names, d.h, x, !f.post_only);
        // gate and up (Phi-3: one tensor, chunked), act(gate), their product.
        blk.keep("gate", d.tok(d.i, c));
        blk.keep("act(gate)", d.tok(d.i, c));
        blk.keep("up", d.tok(d.i, c));
        blk.keep_input("act(gate) * up", d.tok(d.i, c), &["down_proj"]);
        blk.bwd_transient = Layout::concat(&[d.tok_n(3, d.i, c), d.tok(d.h, r)]);
    }
    if f.sandwich || f.post_only {
        let norm = [
            "down_proj output (fp32)",
            "post_feedforward_layernorm normed",
        ];
        rms_norm(&mut blk, d, f.norm, norm, d.h, c, true);
    }
    blk.fwd_at_least(Layout::concat(&[d.tok(d.h, r), d.tok(d.q, r)]));
    blk
}

/// A mixture of experts as transformers 5.23 runs it by default on torch 2.15
/// (`integrations/moe.py` `grouped_mm_experts_forward`, the `experts_implementation`
/// that `get_correct_experts_implementation` picks when `F.grouped_mm` exists): the
/// router's logits and fp32 softmax over the experts with its top-k; the N·k
/// (token, expert) rows sorted by expert and gathered, `gate_up` and `down` as grouped
/// matmuls over them, the activation and product, the routing weights' multiply, then
/// the sum back per token. Every token goes to exactly `k` experts, so the rows sum to
/// N·k whatever the routing: the saved memory does not depend on it. Only the size of
/// one expert's group does (N·k/E rows when the routing is uniform, the expected case
/// modelled here; at most N rows when one expert gets every token, the worst case), and
/// it enters only the forward transient. Under autocast every routed tensor is fp32
/// (`grouped_mm` runs uncast, on the fp32 norm output) and the expert stacks get no
/// compute-dtype copy.
fn experts(blk: &mut Block, d: &Dims, m: &ModelSpec, x: DType) {
    let f = &m.features;
    let (e, k, w) = (f.experts, f.experts_per_token, f.expert_intermediate);
    // `grouped_mm` is not on autocast's cast list: the experts compute in the dtype of
    // their input, the norm's output (fp32 under autocast), with the fp32 stacks.
    let c = x;
    let n = d.b.saturating_mul(d.t);
    let rows = n.saturating_mul(k);
    let routed = |width: u64, dtype: DType| Layout::new(&[rows, width], dtype);
    // The router's linear keeps its input (autocast: a compute-dtype copy), its logits
    // go to fp32 for the softmax, which keeps its output; top-k keeps the indices.
    linear_inputs(blk, d, &["router"], d.h, x, false);
    blk.keep("router softmax (fp32)", Layout::new(&[n, e], DType::F32));
    blk.keep("router top-k indices", Layout::new(&[n, k], DType::I64));
    blk.keep(
        "router top-k weights (fp32)",
        Layout::new(&[n, k], DType::F32),
    );
    // Per expert: the gathered rows (a copy), gate_up's output (kept whole by the gate
    // view), act(gate), the product, down's output (kept by the weighting multiply).
    // The gathered rows and the product are kept only for the experts' weight gradients
    // (`grouped_mm` keeps each operand for the other's gradient): LoRA, which leaves the
    // 3-D expert stacks frozen, drops them.
    blk.keep_input("expert rows (gathered)", routed(d.h, x), EXPERT_WEIGHTS);
    blk.keep("expert gate_up", routed(2 * w, c));
    blk.keep("expert act(gate)", routed(w, c));
    blk.keep_input("expert act(gate) * up", routed(w, c), EXPERT_WEIGHTS);
    blk.keep("expert down output", routed(d.h, c));
    blk.keep("expert token indices", Layout::new(&[rows], DType::I64));
    let per_expert = rows / e.max(1);
    let one = Layout::new(&[per_expert.max(1), 3 * w], c);
    blk.fwd_at_least(one.clone());
    blk.bwd_transient = Layout::concat(&[one, d.tok(d.h, d.r)]);
}

/// A layer that attends through a sliding window with sdpa, when the sequence is longer
/// than the window: transformers 5.23 hands sdpa an explicit mask (`masking_utils`
/// `sliding_window_causal_mask`; the full-attention layers use `is_causal` and no mask),
/// the mask is kept for backward, B × 1 × T × T in compute precision, and with a mask
/// `sdpa_attention_forward` does not use sdpa's own GQA: `repeat_kv` copies k and v to
/// every head, and those copies are what sdpa keeps. Eager attention builds its additive
/// mask either way; flash-attention kernels take the window as an argument and keep no
/// mask (not modelled: the torch engine models sdpa and eager).
pub fn windowed(blk: &Block, m: &ModelSpec, t: &TrainSpec) -> Option<Block> {
    let f = &m.features;
    let sdpa = effective_attention(m, t.attention) == Attention::Sdpa;
    if f.sliding_window == 0 || t.seq_len <= f.sliding_window || !sdpa {
        return None;
    }
    let d = Dims::new(m, t);
    let mut out = blk.clone();
    if m.num_heads != m.num_kv_heads {
        for sv in out.saved.iter_mut() {
            if matches!(sv.name, "k rotated" | "v") {
                sv.layout = d.tok(d.q, d.c);
            }
        }
    }
    out.keep_core("sliding-window mask", Layout::new(&[d.b, 1, d.t, d.t], d.c));
    Some(out)
}
