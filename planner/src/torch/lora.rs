//! LoRA and QLoRA in the torch inventory: what PEFT's forward keeps instead of what
//! full fine-tuning keeps (PEFT 0.21 `tuners/lora/layer.py`, `Linear.forward`).
//!
//! Per targeted linear `result = base(x) + lora_B(lora_A(dropout(x))) * scaling`:
//! * the frozen base linear keeps only its weight for the input gradient, not `x`
//!   (autograd saves a matmul operand only for the other operand's gradient);
//! * `x = x.to(lora_A.weight.dtype)`: with bf16 activations and fp32 adapters (no
//!   autocast) a fp32 copy of `x`, kept by `lora_A`; under autocast `lora_A` keeps its own
//!   compute-dtype copy, as the full fine-tuned linear did;
//! * dropout (p > 0, `nn.Dropout`; `nn.Identity` at 0) keeps its scaled Bernoulli noise
//!   (ATen's CPU `dropout` is `x * noise` in x's dtype) and `lora_A` keeps the dropped
//!   copy instead of `x`;
//! * `lora_B` keeps `lora_A(x)`, N × rank.
//!
//! A tensor a block keeps only as the input of linears (`Saved::linears`) is dropped when
//! none of them is targeted. QLoRA's quantized linears dequantize their weight to the
//! compute dtype for each matmul, forward and backward (bitsandbytes 0.50.2
//! `autograd/_functions.py` `MatMul4Bit`, which keeps only the packed weight): one
//! out × in transient per matmul, never saved. An 8-bit base linear (`Linear8bitLt`)
//! keeps its input: the CPU training path (`MatMul8bitFp`) stores it as `ctx.A`
//! unconditionally, and the CUDA one (`MatMul8bitLt`) in `ctx.tensors` once anything
//! upstream needs a gradient.

use super::block::{Block, Dims, Saved, EXPERT_WEIGHTS, NORM_WEIGHT};
use crate::lora::{module_of, LoraSpec};
use crate::params::Param;
use crate::spec::Quantize;
use crate::timeline::Layout;
use crate::units::DType;

/// (PEFT name, out, in) of block 0's linears.
fn shapes(params: &[Param]) -> Vec<(&str, u64, u64)> {
    params
        .iter()
        .filter(|p| p.layer == Some(0) && !p.trainable)
        .filter_map(|p| module_of(p).map(|m| (m, p.rows, p.cols)))
        .collect()
}

/// The block as LoRA runs it: what the frozen linears and the adapters keep, then the
/// quantized base's dequantized transients. `input_grad`: whether the block's input
/// requires grad (false for the first block when the embedding is frozen and nothing
/// calls `enable_input_require_grads`, as gradient checkpointing does).
pub fn adjust(blk: &Block, lora: &LoraSpec, params: &[Param], d: &Dims, input_grad: bool) -> Block {
    let shapes = shapes(params);
    let mut saved = adapter_inputs(blk, lora, &shapes, d, input_grad);
    adapter_outputs(&mut saved, &shapes, lora, d);
    let mut out = Block {
        saved,
        fwd_transient: blk.fwd_transient.clone(),
        bwd_transient: blk.bwd_transient.clone(),
        input_saved: blk.input_saved,
        fused_qkv: blk.fused_qkv,
        compiled: blk.compiled,
    };
    out.bwd_transient = released_in_backward(&out.bwd_transient, lora, &shapes, d);
    if lora.quantize != Quantize::None {
        let dq = dequantized(&shapes, lora);
        if dq.bytes() > out.fwd_transient.bytes() {
            out.fwd_transient = dq.clone();
        }
        out.bwd_transient = Layout::concat(&[out.bwd_transient.clone(), dq]);
    }
    out
}

/// The block's saved tensors: those only frozen linears needed are dropped, and each
/// targeted linear's input gains the adapter's copies (dropout's noise and dropped input,
/// the fp32 cast). A targeted linear whose input the block keeps for something else
/// (o_proj reading sdpa's output) gains the same copies.
///
/// Without `input_grad`, autograd records nothing until the first adapter: what comes
/// before it (the norm's upcast, frozen attention, the residual) is not saved, and the
/// first adapters' dropout keeps no noise (its input needs no gradient); `lora_A` still
/// keeps its input for its weight's gradient. The rule needs every targeted linear's place
/// in the list: it is not applied where one has no entry (OLMo 2's projections read the
/// block input itself), except o_proj after targeted attention inputs.
fn adapter_inputs(
    blk: &Block,
    lora: &LoraSpec,
    shapes: &[(&str, u64, u64)],
    d: &Dims,
    input_grad: bool,
) -> Vec<Saved> {
    let mut saved: Vec<Saved> = Vec::with_capacity(blk.saved.len() + 8);
    let targeted = |m: &str| lora.targets.iter().any(|t| t == m);
    let covered = |m: &str| blk.saved.iter().any(|sv| sv.linears.contains(&m));
    let uncovered = |s: &&(&str, u64, u64)| targeted(s.0) && !covered(s.0);
    // Until the first adapter, nothing requires grad; after it, everything downstream.
    let attention_in = ["q_proj", "k_proj", "v_proj", "qkv_proj"]
        .iter()
        .any(|m| targeted(m));
    let unordered = shapes
        .iter()
        .any(|s| uncovered(&s) && (s.0 != "o_proj" || !attention_in));
    let mut before = !input_grad && !unordered;
    let mut seen_target = false;
    let int8 = lora.quantize == Quantize::Int8;
    for sv in &blk.saved {
        if sv.linears.is_empty() {
            before &= !seen_target;
            if !before {
                saved.push(sv.clone());
            }
            continue;
        }
        let n = sv.linears.iter().filter(|m| targeted(m)).count();
        // An int8 base linear keeps its input whether or not it is targeted.
        let base_keeps = int8 && sv.linears != NORM_WEIGHT && sv.linears != EXPERT_WEIGHTS;
        if n == 0 {
            if base_keeps {
                saved.push(sv.clone());
            }
            continue;
        }
        seen_target = true;
        if base_keeps || !copies_input(lora, &sv.layout) {
            saved.push(sv.clone());
        }
        for _ in 0..n {
            adapter_copies(&mut saved, lora, &sv.layout, d, !before);
        }
    }
    for (_, _, cols) in shapes.iter().filter(uncovered) {
        // Kept anyway in the compute dtype; the adapter's copies come on top.
        let x = d.tok(*cols, d.c);
        if copies_input(lora, &x) {
            adapter_copies(&mut saved, lora, &x, d, true);
        }
    }
    saved
}

/// The block's backward transient less what the MLP's backward has freed by its peak.
/// down_proj's `lora_A` holds the last reference to what it kept of its input (the
/// product `act(gate) * up`, or PEFT's fp32 / compute-dtype copy of it); its backward
/// runs first in the MLP's and autograd frees it there, before the gradients of gate and
/// up are formed. Measured in block 2's recomputed backward of the fp32 LoRA run with full
/// checkpointing: gate, act(gate), up and three intermediate-wide gradients are live, the
/// product is not. An 8-bit base linear keeps its input itself, until its own backward.
fn released_in_backward(
    transient: &Layout,
    lora: &LoraSpec,
    shapes: &[(&str, u64, u64)],
    d: &Dims,
) -> Layout {
    let down = shapes.iter().find(|s| s.0 == "down_proj");
    let targeted = lora.targets.iter().any(|t| t == "down_proj");
    match down {
        Some(&(_, _, cols)) if targeted && lora.quantize != Quantize::Int8 => {
            let kept = d.tok(cols, if d.autocast { d.c } else { DType::F32 });
            let left = transient.bytes().0.saturating_sub(kept.bytes().0);
            Layout::new(&[left], DType::U8)
        }
        _ => transient.clone(),
    }
}

/// Whether `lora_A` keeps a new tensor rather than its input `x` itself: dropout's
/// output, PEFT's cast to the fp32 adapter (`x.to(lora_A.weight.dtype)`), or, under
/// autocast, the compute-dtype copy of that fp32 cast.
fn copies_input(lora: &LoraSpec, x: &Layout) -> bool {
    lora.dropout > 0.0 || x.dtype != DType::F32
}

/// What one adapter keeps of its input `x`: dropout's noise, and `lora_A`'s own copy.
/// `noise`: whether dropout keeps its noise (its input requires grad).
fn adapter_copies(saved: &mut Vec<Saved>, lora: &LoraSpec, x: &Layout, d: &Dims, noise: bool) {
    let drop = lora.dropout > 0.0;
    let cast = !d.autocast && x.dtype != DType::F32;
    let shape = &x.shape;
    if drop && noise {
        // On the CPU `dropout` is `x * noise`, the noise a float tensor of x's dtype
        // (fp32 under autocast: dropout runs before lora_A's cast).
        let noise = if d.autocast || cast {
            DType::F32
        } else {
            x.dtype
        };
        push(saved, "lora dropout noise", Layout::new(shape, noise));
    }
    if d.autocast {
        push(
            saved,
            "lora_A input (compute-dtype copy)",
            Layout::new(shape, d.c),
        );
    } else if cast || drop {
        push(saved, "lora_A input (fp32)", Layout::new(shape, DType::F32));
    }
}

/// Each targeted linear's `A x` (kept by `lora_B`), and with DoRA the two outputs its
/// magnitude scaling keeps.
fn adapter_outputs(saved: &mut Vec<Saved>, shapes: &[(&str, u64, u64)], lora: &LoraSpec, d: &Dims) {
    let out_of = |m: &str| shapes.iter().find(|s| s.0 == m).map_or(0, |s| s.1);
    for (m, _, _) in shapes
        .iter()
        .filter(|s| lora.targets.iter().any(|t| t == s.0))
    {
        let ax = if d.autocast { d.c } else { DType::F32 };
        saved.push(Saved {
            name: "lora_A output (kept by lora_B)",
            layout: Layout::new(&[d.b, d.t, lora.rank], ax),
            attention_core: false,
            linears: &[],
        });
        if lora.use_dora {
            // DoRA: the base output and the LoRA output, each kept by the magnitude scaling.
            let w = out_of(m);
            for name in ["DoRA base output", "DoRA lora output"] {
                saved.push(Saved {
                    name,
                    layout: Layout::new(&[d.b, d.t, w], d.c),
                    attention_core: false,
                    linears: &[],
                });
            }
        }
    }
}

fn push(saved: &mut Vec<Saved>, name: &'static str, layout: Layout) {
    saved.push(Saved {
        name,
        layout,
        attention_core: false,
        linears: &[],
    });
}

/// The largest quantized linear's weight, dequantized to the compute dtype.
fn dequantized(shapes: &[(&str, u64, u64)], lora: &LoraSpec) -> Layout {
    let (rows, cols) = shapes
        .iter()
        .map(|s| (s.1, s.2))
        .max_by_key(|(r, c)| r.saturating_mul(*c))
        .unwrap_or((0, 0));
    Layout::new(&[rows, cols], lora.compute_dtype.dtype())
}

/// How the inventory stores parameter `p`: (name suffix, layout) pieces.
pub fn stored(p: &Param, run_dtype: DType, lora: Option<&LoraSpec>) -> Vec<(&'static str, Layout)> {
    if let Some(l) = lora.filter(|l| l.quantized(p) && !p.trainable) {
        return l
            .storage(p.numel())
            .into_iter()
            .map(|(suffix, shape, dt)| (suffix, Layout::new(&shape, dt)))
            .collect();
    }
    vec![("", Layout::new(&p.shape(), p.dtype.unwrap_or(run_dtype)))]
}

/// Whether autocast keeps a compute-dtype copy of `p` (a quantized weight is
/// dequantized for each matmul instead; the 3-D expert stacks go to `grouped_mm`, which
/// autocast does not cast).
pub fn copied(p: &Param, lora: Option<&LoraSpec>) -> bool {
    !p.name.contains("mlp.experts.") && lora.is_none_or(|l| !l.quantized(p) || p.trainable)
}

/// Whether the output layer has a gradient (full fine-tuning, or LoRA with `lm_head`
/// (or, tied, `embed_tokens`) in `modules_to_save`).
pub fn head_trains(params: &[Param], m: &crate::spec::ModelSpec) -> bool {
    use crate::params::Role;
    params.iter().any(|p| {
        p.trainable && (p.role == Role::Head || (m.tie_embeddings && p.role == Role::Embedding))
    })
}
