//! The candle engine's T5 step (`src/engine/t5.rs`): an encoder over the prompt, a
//! decoder over the response with cross-attention to the encoder's output, both stacks
//! `seq_len` positions (`engine::sft` pads prompt and response to it), one shared
//! embedding tied to the head.
//!
//! Exact terms: weights, AdamW moments, parameter gradients, the micro-batch's ids, mask and
//! weights, the position-bias tables and masks, each saved block input, the encoder's output
//! and the gradients flowing between blocks (with checkpointing the encoder's gradient,
//! summed over the decoder blocks' cross-attention, lives through the decoder's backward).
//! Fitted terms (`working_sets`, the `[t5]` sections of the data files, from
//! `tools/calibrate_candle.py measure --arch t5`): with checkpointing one block of each
//! stack forward, its recompute and backward, each stack's end; without, the whole graph
//! kept, the forward's and the backward's peaks; the loss chunk; AdamW's update.

use super::working_sets::{T5WorkingSets, F};
use super::{
    bytes, loss_rows, micro_step_and_update, model_state, optimizer_working_set, units,
    whole_graph_step,
};
use crate::params::{self, Role};
use crate::spec::{Checkpointing, Precision, RunSpec};
use crate::timeline::{Component, Name, Step, TensorId, Timeline};
use crate::units::Bytes;

/// What every phase reads.
struct Plan<'a> {
    spec: &'a RunSpec,
    ws: T5WorkingSets,
    /// Activations between stages are in the compute dtype (f32, or 16-bit under autocast).
    half: bool,
    accum: bool,
    /// Each block's parameter bytes (f32), encoder blocks first.
    blocks: Vec<u64>,
    /// The shared embedding's gradient (the tied head's, from the loss).
    shared: u64,
    /// `N·C` (rows × width) and the position biases and masks, in f32 bytes.
    nc: f64,
    tables: f64,
}

impl<'a> Plan<'a> {
    fn act(&self, x: f64) -> Bytes {
        bytes(if self.half { x / 2.0 } else { x })
    }

    fn rows_by_width(&self) -> Bytes {
        self.act(self.nc)
    }

    fn encoders(&self) -> std::ops::Range<u64> {
        0..self.spec.model.num_layers
    }

    fn decoders(&self) -> std::ops::Range<u64> {
        let l = self.spec.model.num_layers;
        l..l + self.spec.model.num_decoder_layers
    }
}

/// Plays one optimizer step of a T5 `spec` on the candle engine.
pub(super) fn play(spec: &RunSpec) -> Timeline {
    let params = params::shared(&spec.model);
    let m = &spec.model;
    let u = units(spec, &params);
    let mut blocks = vec![0u64; (m.num_layers + m.num_decoder_layers) as usize];
    for p in params.iter() {
        if let Some(b) = p.layer.and_then(|l| blocks.get_mut(l as usize)) {
            *b = b.saturating_add(p.numel().saturating_mul(4));
        }
    }
    let mut ws = super::fits(spec).t5_working_sets(&u);
    ws.optimizer = optimizer_working_set(spec, &u, ws.optimizer);
    let plan = Plan {
        spec,
        ws,
        half: spec.train.precision != Precision::Fp32,
        accum: spec.train.grad_accum > 1,
        blocks,
        shared: params
            .iter()
            .filter(|p| p.role == Role::Embedding)
            .map(|p| p.numel() * 4)
            .sum(),
        nc: u.nc,
        tables: u.tab,
    };
    let mut s = Step::with_capacity(params.len() * 3 + plan.blocks.len() * 8 + 64, 64);
    let grads = model_state(&mut s, &params, plan.accum);
    let inputs = micro_batch(&mut s, &plan);
    micro_step_and_update(&mut s, (inputs, grads), plan.ws.optimizer, |s, kept| {
        if spec.train.checkpointing == Checkpointing::Full {
            checkpointed(s, &plan, kept);
        } else {
            whole_graph(s, &plan, kept);
        }
    });
    s.finish()
}

/// The micro-batch: encoder and decoder ids and targets (u32), the encoder's token mask
/// and the label weights (f32), one value per row each.
fn micro_batch(s: &mut Step, plan: &Plan) -> Vec<TensorId> {
    let n = (plan.spec.train.micro_batch * plan.spec.train.seq_len) as f64 * F;
    s.phase("micro-step inputs");
    vec![s.alloc(
        "encoder ids and mask, decoder ids, targets and weights",
        Component::Activations,
        bytes(5.0 * n),
    )]
}

/// The position biases and masks both stacks add to their scores, built once, in f32
/// bytes: each stack's bias `(1, H, T, T)` gathered from its table by bucket indices
/// `(T²,)` (u32), and with more than one head its transposed copy (the gather's output
/// stays in the graph); the decoder's causal mask `(T, T)` and the encoder's key mask
/// `(B, T)`. `b` sequences of `t`, `h` heads.
pub(super) fn tables(b: f64, t: f64, h: f64) -> f64 {
    let bias = t * t * (1.0 + h + if h > 1.0 { h } else { 0.0 });
    (2.0 * bias + t * t + b * t) * F
}

/// The loss over the decoder's output (one chunk's graph at a time), the tied head's
/// gradient (kept unless accumulating) and the gradient of the decoder's output.
fn loss(s: &mut Step, plan: &Plan, kept: &mut Vec<TensorId>) -> TensorId {
    let rows = loss_rows(plan.spec);
    s.phase(format!("loss (fp32 logits in chunks of {rows} rows)"));
    s.transient(
        "loss chunk graph: logits (f32), log-sum-exp, their gradients",
        Component::Logits,
        Bytes(plan.ws.loss),
    );
    if !plan.accum {
        kept.push(s.alloc(
            "grad of shared embedding (tied head)",
            Component::Gradients,
            Bytes(plan.shared),
        ));
    }
    s.alloc(
        "grad of decoder output",
        Component::Activations,
        plan.rows_by_width(),
    )
}

/// A block's parameter gradients: kept, or with accumulation added to the earlier
/// micro-steps' (a transient sum).
fn block_grads(s: &mut Step, plan: &Plan, kept: &mut Vec<TensorId>, l: u64) {
    let b = Bytes(plan.blocks[l as usize]);
    if plan.accum {
        s.transient(
            Name::block("block ", l, [" gradients (to accumulate)", "", ""]),
            Component::Temporaries,
            b,
        );
    } else {
        kept.push(s.alloc(
            Name::block("grads of block ", l, ["", "", ""]),
            Component::Gradients,
            b,
        ));
    }
}

/// The forward of one stack with checkpointing: each block's graph dropped after it, its
/// output saved; returns the saved inputs and the last output.
fn forward_stack(
    s: &mut Step,
    plan: &Plan,
    blocks: std::ops::Range<u64>,
    ws: u64,
    first: TensorId,
) -> Vec<TensorId> {
    let mut saved = vec![first];
    for l in blocks {
        s.phase(Name::block("forward: block ", l, ["", "", ""]));
        s.transient(
            Name::block("block ", l, [" graph (dropped after it)", "", ""]),
            Component::Activations,
            Bytes(ws),
        );
        saved.push(s.alloc(
            Name::block("block ", l, [" output (saved)", "", ""]),
            Component::Activations,
            plan.rows_by_width(),
        ));
    }
    saved
}

/// One block recomputed from its saved input and backpropagated: its gradients, and the
/// gradient of its input replacing `g`.
fn backward_block(
    s: &mut Step,
    plan: &Plan,
    kept: &mut Vec<TensorId>,
    (l, ws): (u64, u64),
    g: TensorId,
) -> TensorId {
    s.phase(Name::block(
        "backward: block ",
        l,
        [" (recomputed)", "", ""],
    ));
    s.transient(
        Name::block("block ", l, [" recomputed and its backward", "", ""]),
        Component::Temporaries,
        Bytes(ws),
    );
    block_grads(s, plan, kept, l);
    let gi = s.alloc(
        Name::block("grad of block ", l, [" input", "", ""]),
        Component::Activations,
        plan.rows_by_width(),
    );
    s.free(g);
    gi
}

/// A stage played as its fitted working set alone (a stack's end, the embedding's
/// backward): a phase and one transient.
fn stage(s: &mut Step, phase: &'static str, ws: u64) {
    s.phase(phase);
    s.transient(phase, Component::Temporaries, Bytes(ws));
}

/// With full checkpointing: every block on a detached input, its input saved; the
/// backward recomputes one block at a time, the decoder's first.
fn checkpointed(s: &mut Step, plan: &Plan, kept: &mut Vec<TensorId>) {
    let ws = &plan.ws;
    s.phase("position biases, masks, encoder embedding");
    let tabs = s.alloc(
        "position biases and masks",
        Component::Activations,
        bytes(plan.tables),
    );
    let emb = s.alloc(
        "encoder embedding output",
        Component::Activations,
        plan.rows_by_width(),
    );
    let mut xs = forward_stack(s, plan, plan.encoders(), ws.fwd_enc, emb);
    let enc_last = xs.pop().expect("the embedding's output");
    stage(s, "encoder final norm, decoder embedding", ws.enc_out);
    let nc = plan.rows_by_width();
    let enc = s.alloc("encoder output", Component::Activations, nc);
    let dec_emb = s.alloc("decoder embedding output", Component::Activations, nc);
    let mut ys = forward_stack(s, plan, plan.decoders(), ws.fwd_dec, dec_emb);
    let dec_last = ys.pop().expect("the embedding's output");
    stage(s, "decoder final norm and scale", ws.dec_out);
    let last = s.alloc("decoder output (scaled)", Component::Activations, nc);
    let g = loss(s, plan, kept);
    s.free(last);
    stage(s, "backward: decoder final norm", ws.bwd_dec_out);
    final_norm_grad(s, plan, kept);
    let mut g = replace(s, g, "grad of last decoder block output", nc);
    s.free(dec_last);
    let mut g_enc = s.alloc(
        "grad of encoder output (summed)",
        Component::Activations,
        nc,
    );
    for l in plan.decoders().rev() {
        g = backward_block(s, plan, kept, (l, ws.bwd_dec), g);
        g_enc = replace(s, g_enc, "grad of encoder output (summed)", nc);
        if let Some(y) = ys.pop() {
            s.free(y);
        }
    }
    let g_dec = g;
    stage(s, "backward: encoder final norm", ws.bwd_enc_out);
    final_norm_grad(s, plan, kept);
    let mut g = s.alloc(
        "grad of last encoder block output",
        Component::Activations,
        nc,
    );
    s.free(g_enc);
    s.free(enc_last);
    for l in plan.encoders().rev() {
        g = backward_block(s, plan, kept, (l, ws.bwd_enc), g);
        if let Some(x) = xs.pop() {
            s.free(x);
        }
    }
    stage(s, "backward: shared embedding", ws.embedding);
    for id in [g, g_dec, enc, tabs] {
        s.free(id);
    }
}

/// A stack's final-norm gradient (`hidden_size` f32), kept unless accumulating.
fn final_norm_grad(s: &mut Step, plan: &Plan, kept: &mut Vec<TensorId>) {
    if !plan.accum {
        kept.push(s.alloc(
            "grad of final norm",
            Component::Gradients,
            Bytes(plan.spec.model.hidden_size * 4),
        ));
    }
}

/// A new tensor of `bytes` in place of `old` (allocated before `old` is freed).
fn replace(s: &mut Step, old: TensorId, name: &'static str, bytes: Bytes) -> TensorId {
    let new = s.alloc(name, Component::Activations, bytes);
    s.free(old);
    new
}

/// Without checkpointing: the whole forward graph of both stacks kept for one backward.
/// Its working set is the larger of the fitted peak and the backward's end, the graph
/// still held: every block's gradient made (also when accumulating: the micro-step's
/// own, before they are added to the sums) and the shared embedding's two, one per
/// stack's lookup. Over the calibration sizes the fitted peak is the larger; at full
/// size, where vocabulary × width dwarfs the activations, the end is (ChatLM-mini-Chinese,
/// docs/sft.md).
fn whole_graph(s: &mut Step, plan: &Plan, kept: &mut Vec<TensorId>) {
    let ws = &plan.ws;
    let grads = plan.blocks.iter().sum::<u64>() + 2 * plan.spec.model.hidden_size * 4;
    whole_graph_step(
        s,
        (
            ws.graph,
            ws.fwd_peak,
            ws.bwd_peak.max(grads + 2 * plan.shared),
        ),
        (
            "grads of blocks and final norms",
            (!plan.accum).then_some(grads),
        ),
        kept,
        |s, kept| loss(s, plan, kept),
    );
}
