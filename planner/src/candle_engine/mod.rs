//! The `candle` engine's inventory: what vramplan's own engine (`src/engine`) allocates in
//! one optimizer step (f32, or 16-bit compute over f32 master weights), played as a timeline.
//!
//! The step (`src/engine/step.rs`): token ids and targets, rotary tables and the causal
//! mask; the blocks forward (with full checkpointing on detached inputs, keeping only each
//! block's input; without, keeping the whole graph); the loss in row chunks, each chunk's
//! graph built and released before the next; the blocks backward (with checkpointing one
//! block recomputed at a time from its saved input, backpropagating `sum(out · grad)`);
//! the embedding; then AdamW, whose fp32 moments exist before the step. With
//! checkpointing each block runs as two halves (attention, MLP), saving each half's input
//! and recomputing one half at a time in backward.
//!
//! Exact terms: weights, AdamW moments, parameter gradients, ids, targets, rotary tables,
//! mask, block inputs, the gradient flowing between blocks, and the gradients the loss
//! keeps; AdamW's update is computed from the parameters' sizes in update order. Calibrated
//! terms: candle keeps every intermediate of a graph alive until the graph is dropped, and
//! its backward allocates a gradient for every input including constants, plus gemm's
//! packing buffers on the CPU; these working sets are linear forms in the step's tensor
//! sizes (`N·C`, `N·H·D`, `N·KV·D`, `N·I`, `B·H·T²`, chunk rows × vocab ...), the largest of
//! two or three where a stage's peak moves between ops, fitted by least squares (relative
//! error) against the engine's own counting allocator over 700 configurations with at
//! least 256 rows (2 cores, candle 0.11.1; `tools/calibrate_candle.py`, data in
//! `docs/data/`). One set per compute precision: `f32` (the CPU's whole heap) and `half`
//! (16-bit compute over f32 masters; tensors alone, as a GPU allocates them). Over the
//! calibration set the step's peak is within 2 % for every checkpointed configuration and
//! for 97–98 % of the others; `tests/train.rs` asserts 2 % over fourteen plans in each.

mod f32;
mod half;

use crate::params::{self, Role};
use crate::spec::{Checkpointing, LossMode, Precision, RunSpec};
use crate::timeline::{Component, Step, TensorId, Timeline};
use crate::units::Bytes;

/// Bytes per element of the units (f32), whatever the compute dtype.
const F: f64 = 4.0;

/// Sizes of the step, in bytes of f32 tensors.
pub(super) struct Units {
    /// rows × width
    nc: f64,
    /// rows × query width
    nq: f64,
    /// rows × key/value width
    nkv: f64,
    /// rows × MLP width
    ni: f64,
    /// attention scores `B·H·T·T`
    s: f64,
    /// loss chunk rows × vocab, rows × width
    rv: f64,
    rc: f64,
    /// head (or embedding) matrix
    vc: f64,
    /// 1 when the loss runs in more than one chunk
    multi: f64,
    /// rows (u32 ids; also one f32 per row)
    n: f64,
    /// softmax rows `B·H·T`, rotary tables `T·D`, block weights `C·H·D`, `C·KV·D`, `C·I`
    bht: f64,
    td: f64,
    cq: f64,
    ckv: f64,
    ci: f64,
}

/// `c · u` over the units a fit uses.
pub(super) fn lin(terms: &[(f64, f64)], constant: f64) -> u64 {
    let v: f64 = terms.iter().map(|(c, u)| c * u).sum::<f64>() + constant;
    v.max(0.0).round() as u64
}

/// The calibrated working sets of one step, each above the live bytes before its stage.
pub(super) struct WorkingSets {
    /// With checkpointing: each half's forward, and its recompute-and-backward.
    pub fwd_attn: u64,
    pub fwd_mlp: u64,
    pub bwd_mlp: u64,
    pub bwd_attn: u64,
    /// Without: the forward graph kept for backward, the forward's peak above the step's
    /// start, and the backward's peak above the end of the loss.
    pub graph: u64,
    pub fwd_peak: u64,
    pub bwd_peak: u64,
    /// One loss chunk's graph and the head-gradient accumulation.
    pub loss: u64,
    /// The embedding's graph and backward (with checkpointing).
    pub embedding: u64,
    /// AdamW's update temporaries.
    pub optimizer: u64,
}

/// AdamW's update (`src/engine/optim.rs`) runs over the parameters in name order, making
/// about four f32 copies of each while the gradients of those before it are already freed:
/// its peak above the live bytes before it is the largest `4·bytes(p) − bytes(gradients
/// before p)`.
fn adam_peak(params: &[params::Param]) -> f64 {
    let mut sorted: Vec<(&str, f64)> = params
        .iter()
        .map(|p| (p.name.as_str(), p.numel() as f64 * F))
        .collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut done = 0.0;
    let mut peak = f64::NEG_INFINITY;
    for (_, bytes) in sorted {
        peak = peak.max(4.0 * bytes - done);
        done += bytes;
    }
    peak.max(0.0)
}

/// Plays one optimizer step of `spec` on the candle engine.
pub fn play(spec: &RunSpec) -> Timeline {
    let m = &spec.model;
    let t = &spec.train;
    let arch = m.arch;
    let params = params::parameters(m);
    let (b, seq) = (t.micro_batch as f64, t.seq_len as f64);
    let n = b * seq;
    let (c, h, kv, d, i, v) = (
        m.hidden_size as f64,
        m.num_heads as f64,
        m.num_kv_heads as f64,
        m.head_dim as f64,
        m.intermediate_size as f64,
        m.vocab_size as f64,
    );
    let rows = match t.loss {
        LossMode::Chunked => (t.loss_chunk as f64).min(n).max(1.0),
        _ => n,
    };
    let u = Units {
        nc: n * c * F,
        nq: n * h * d * F,
        nkv: n * kv * d * F,
        ni: n * i * F,
        s: b * h * seq * seq * F,
        rv: rows * v * F,
        rc: rows * c * F,
        vc: v * c * F,
        multi: if rows < n { 1.0 } else { 0.0 },
        n: n * F,
        bht: b * h * seq * F,
        td: seq * d * F,
        cq: c * h * d * F,
        ckv: c * kv * d * F,
        ci: c * i * F,
    };
    let bytes = |x: f64| Bytes(x.max(0.0).round() as u64);
    // Activations the step keeps between stages are in the compute dtype: f32, or 16-bit
    // under autocast (the master weights, moments and gradients stay f32).
    let half = t.precision != Precision::Fp32;
    let act = |x: f64| bytes(if half { x / 2.0 } else { x });
    let layers = m.num_layers;
    let working_sets = if half {
        half::working_sets
    } else {
        f32::working_sets
    };
    let ws = working_sets(arch, &u, layers as f64, adam_peak(&params));
    let mut s = Step::new();

    // Before the step: weights and AdamW's fp32 moments.
    for p in &params {
        s.persistent(p.name.clone(), Component::Weights, Bytes::of(p.numel(), 4));
    }
    for p in &params {
        s.persistent(
            format!("AdamW m, v of {}", p.name),
            Component::Optimizer,
            Bytes::of(p.numel(), 8),
        );
    }
    // With accumulation the modelled micro-step is a later one: the gradients exist.
    let accum = t.grad_accum > 1;
    let mut grads = Vec::new();
    if accum {
        for p in &params {
            grads.push(s.persistent(
                format!("grad of {}", p.name),
                Component::Gradients,
                Bytes::of(p.numel(), 4),
            ));
        }
    }
    let block_bytes = |l: u64| -> u64 {
        params
            .iter()
            .filter(|p| p.layer == Some(l))
            .map(|p| p.numel() * 4)
            .sum()
    };
    let head_bytes: u64 = params
        .iter()
        .filter(|p| p.role == Role::Head || (m.tie_embeddings && p.role == Role::Embedding))
        .chain(params.iter().filter(|p| p.name == "norm.weight"))
        .map(|p| p.numel() * 4)
        .sum();
    let emb_bytes = Bytes(m.vocab_size * m.hidden_size * 4);

    s.phase("micro-step inputs");
    let ids = s.alloc("input ids (u32)", Component::Activations, bytes(u.n));
    let targets = s.alloc("targets (u32)", Component::Activations, bytes(u.n));
    let tables = s.alloc(
        "rotary cos/sin, causal mask",
        Component::Activations,
        act(seq * d * F) + bytes(seq * seq * F),
    );
    let ckpt = t.checkpointing == Checkpointing::Full;
    let mut kept = Vec::new();
    // The loss stage: one chunk's graph at a time, then the head's gradient (kept, unless
    // accumulating) and the gradient of the last hidden states, which it returns.
    let loss = |s: &mut Step, kept: &mut Vec<TensorId>| {
        s.phase(if rows < n {
            format!("loss (fp32 logits in chunks of {rows} rows)")
        } else {
            "loss (the whole fp32 logits at once)".to_string()
        });
        s.transient(
            "loss chunk graph: logits (f32), log-sum-exp, their gradients",
            Component::Logits,
            Bytes(ws.loss),
        );
        if !accum {
            kept.push(s.alloc("grad of head", Component::Gradients, Bytes(head_bytes)));
        }
        s.alloc(
            "grad of last hidden states",
            Component::Activations,
            act(u.nc),
        )
    };
    if ckpt {
        s.phase("forward: embedding");
        let mut inputs = vec![s.alloc("embedding output", Component::Activations, act(u.nc))];
        let mut mids = Vec::new();
        for l in 0..layers {
            s.phase(format!("forward: block {l}"));
            s.transient(
                format!("block {l} attention half graph (dropped after it)"),
                Component::Activations,
                Bytes(ws.fwd_attn),
            );
            mids.push(s.alloc(
                format!("block {l} attention half output (saved)"),
                Component::Activations,
                act(u.nc),
            ));
            s.transient(
                format!("block {l} MLP half graph (dropped after it)"),
                Component::Activations,
                Bytes(ws.fwd_mlp),
            );
            inputs.push(s.alloc(
                format!("block {l} output (saved)"),
                Component::Activations,
                act(u.nc),
            ));
        }
        let last = inputs.pop();
        let mut g = loss(&mut s, &mut kept);
        if let Some(x) = last {
            s.free(x);
        }
        let mlp_bytes = |l: u64| -> u64 {
            params
                .iter()
                .filter(|p| {
                    p.layer == Some(l)
                        && !(p.name.contains("attn") || p.name.contains("input_layernorm"))
                })
                .map(|p| p.numel() * 4)
                .sum()
        };
        for l in (0..layers).rev() {
            for (half, ws, saved, grads_bytes) in [
                ("MLP", ws.bwd_mlp, mids.pop(), mlp_bytes(l)),
                (
                    "attention",
                    ws.bwd_attn,
                    inputs.pop(),
                    block_bytes(l) - mlp_bytes(l),
                ),
            ] {
                s.phase(format!("backward: block {l} {half} half (recomputed)"));
                s.transient(
                    format!("block {l} {half} half recomputed and its backward"),
                    Component::Temporaries,
                    Bytes(ws),
                );
                if accum {
                    s.transient(
                        format!("block {l} {half} gradients (to accumulate)"),
                        Component::Temporaries,
                        Bytes(grads_bytes),
                    );
                } else {
                    kept.push(s.alloc(
                        format!("grads of block {l} {half} half"),
                        Component::Gradients,
                        Bytes(grads_bytes),
                    ));
                }
                let gi = s.alloc(
                    format!("grad of block {l} {half} half input"),
                    Component::Activations,
                    act(u.nc),
                );
                s.free(g);
                g = gi;
                if let Some(x) = saved {
                    s.free(x);
                }
            }
        }
        s.phase("backward: embedding");
        s.transient(
            "embedding graph and backward",
            Component::Temporaries,
            Bytes(ws.embedding),
        );
        if !accum && !m.tie_embeddings {
            kept.push(s.alloc("grad of embedding", Component::Gradients, emb_bytes));
        }
        s.free(g);
    } else {
        let (graph, fwd_peak, bwd_peak) = (ws.graph, ws.fwd_peak, ws.bwd_peak);
        s.phase("forward (graph kept for backward)");
        let gr = s.alloc("forward graph", Component::Activations, Bytes(graph));
        s.transient(
            "forward temporaries",
            Component::Temporaries,
            Bytes(fwd_peak.saturating_sub(graph)),
        );
        let g = loss(&mut s, &mut kept);
        s.phase("backward");
        s.transient(
            "backward working set",
            Component::Temporaries,
            Bytes(bwd_peak),
        );
        if !accum {
            let rest: u64 = (0..layers).map(block_bytes).sum::<u64>()
                + if m.tie_embeddings { 0 } else { emb_bytes.0 };
            kept.push(s.alloc(
                "grads of blocks and embedding",
                Component::Gradients,
                Bytes(rest),
            ));
        }
        s.free(g);
        s.free(gr);
    }
    for id in [ids, targets, tables] {
        s.free(id);
    }

    s.phase("optimizer step");
    s.transient(
        "AdamW update temporaries",
        Component::Temporaries,
        Bytes(ws.optimizer),
    );
    for id in kept.into_iter().chain(grads) {
        s.free(id);
    }
    s.finish()
}
