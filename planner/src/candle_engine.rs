//! The `candle` engine's inventory: what vramplan's own engine (`src/engine`) allocates in
//! one optimizer step on the CPU, in f32, played as a timeline.
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
//! keeps. Calibrated terms: candle keeps every intermediate of a graph alive until the
//! graph is dropped, and its backward allocates a gradient for every input including
//! constants, plus gemm's packing buffers; these working sets are written as linear forms
//! in the step's tensor sizes (`N·C`, `N·H·D`, `N·KV·D`, `N·I`, `B·H·T²`, chunk rows × vocab
//! ...), fitted by least squares (relative error) against the engine's own counting
//! allocator over 300–400 configurations with at least 256 rows (2 cores, candle 0.11.1;
//! `src/engine/tests.rs`, `calibrate`). Where the peak inside a stage moves between two
//! ops (attention's softmax vs its projections, the MLP's wide vs narrow matmuls), the
//! working set is the larger of two planes. Fit quality: the loss stage 0.3 %, a
//! checkpointed half's backward 0.2–0.7 % rms (worst 1.9 %), its forward 0.2–2.7 % rms,
//! the whole graph without checkpointing a few per cent; `tests/train.rs` asserts the
//! step's peak within 2 % over fourteen plans.

use crate::params::{self, Role};
use crate::spec::{Arch, Checkpointing, LossMode, RunSpec};
use crate::timeline::{Component, Step, Timeline};
use crate::units::Bytes;

/// Bytes per element: the engine trains in f32.
const F: f64 = 4.0;

/// Sizes of the step, in bytes of f32 tensors.
struct Units {
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
fn lin(terms: &[(f64, f64)], constant: f64) -> u64 {
    let v: f64 = terms.iter().map(|(c, u)| c * u).sum::<f64>() + constant;
    v.max(0.0).round() as u64
}

/// With checkpointing each block runs as two halves, `x + attn(norm(x))` and
/// `h + mlp(norm(h))`, each built and dropped on its own; these are the working sets of
/// their forwards and of their recompute-and-backward, above the live bytes before them.
struct Halves {
    fwd_attn: u64,
    fwd_mlp: u64,
    bwd_mlp: u64,
    bwd_attn: u64,
}

fn halves(arch: Arch, u: &Units) -> Halves {
    match arch {
        Arch::Nanochat => Halves {
            fwd_attn: lin(
                &[
                    (3.255, u.nc),
                    (18.131, u.nq),
                    (6.014, u.s),
                    (-24.957, u.n),
                    (37.52, u.bht),
                    (-3.212, u.td),
                    (0.955, u.cq),
                ],
                122.0,
            ),
            fwd_mlp: lin(&[(3.011, u.nc), (3.002, u.ni), (0.007, u.ci)], 124.0)
                .max(lin(&[(2.005, u.nc), (3.002, u.ni), (1.0, u.ci)], 0.0)),
            bwd_mlp: lin(&[(20.069, u.nc), (3.995, u.ni), (2.131, u.ci)], 3.0)
                .max(lin(&[(10.146, u.nc), (12.262, u.ni), (0.95, u.ci)], 43.0)),
            bwd_attn: lin(
                &[
                    (23.796, u.nc),
                    (36.955, u.nq),
                    (6.987, u.s),
                    (41.322, u.bht),
                    (4.829, u.cq),
                ],
                -3.0,
            )
            .max(lin(
                &[
                    (12.649, u.nc),
                    (19.983, u.nq),
                    (16.996, u.s),
                    (30.571, u.bht),
                    (5.684, u.cq),
                ],
                0.0,
            )),
        },
        _ => Halves {
            fwd_attn: lin(
                &[
                    (4.017, u.nc),
                    (10.323, u.nq),
                    (4.075, u.nkv),
                    (6.007, u.s),
                    (-11.22, u.n),
                    (19.792, u.bht),
                    (-2.327, u.td),
                    (1.207, u.cq),
                    (0.152, u.ckv),
                ],
                116.0,
            ),
            fwd_mlp: lin(&[(4.012, u.nc), (4.003, u.ni), (0.013, u.ci)], 108.0)
                .max(lin(&[(3.015, u.nc), (4.005, u.ni), (0.994, u.ci)], 0.0)),
            bwd_mlp: lin(&[(17.116, u.nc), (15.616, u.ni), (4.097, u.ci)], 0.0)
                .max(lin(&[(14.133, u.nc), (19.022, u.ni), (1.975, u.ci)], 29.0)),
            bwd_attn: lin(
                &[
                    (23.718, u.nc),
                    (19.03, u.nq),
                    (13.788, u.nkv),
                    (6.897, u.s),
                    (34.844, u.bht),
                    (3.066, u.cq),
                    (3.306, u.ckv),
                ],
                12.0,
            )
            .max(lin(
                &[
                    (13.755, u.nc),
                    (11.471, u.nq),
                    (5.339, u.nkv),
                    (17.041, u.s),
                    (7.859, u.bht),
                    (1.486, u.cq),
                    (2.064, u.ckv),
                ],
                -3.0,
            )),
        },
    }
}

/// A whole block's recompute-and-backward working set (both halves in one graph), the
/// larger of two planes, one where the MLP's backward peaks and one where attention's does:
/// the unit in which the backward without checkpointing is written.
fn block_backward(arch: Arch, u: &Units) -> u64 {
    match arch {
        Arch::Nanochat => lin(
            &[(22.587, u.nc), (25.879, u.nq), (10.504, u.ni), (5.178, u.s)],
            47.0,
        )
        .max(lin(
            &[(22.704, u.nc), (30.872, u.nq), (3.676, u.ni), (14.27, u.s)],
            5.0,
        )),
        _ => lin(
            &[
                (20.976, u.nc),
                (13.002, u.nq),
                (5.802, u.nkv),
                (18.78, u.ni),
                (5.213, u.s),
            ],
            4.0,
        )
        .max(lin(
            &[
                (21.482, u.nc),
                (12.301, u.nq),
                (7.797, u.nkv),
                (3.926, u.ni),
                (16.501, u.s),
            ],
            1.0,
        )),
    }
}

/// Without checkpointing: the forward graph kept for backward, the forward's peak above
/// the step's start, and the backward's peak above the end of the loss (written with one
/// checkpointed block's backward, `bb`, and the blocks before the last).
fn whole_graph(arch: Arch, u: &Units, layers: f64) -> (u64, u64, u64) {
    let l = layers;
    let l1 = (layers - 1.0).max(0.0);
    let bb = block_backward(arch, u) as f64;
    match arch {
        Arch::Nanochat => (
            lin(
                &[
                    (7.678 * l, u.nc),
                    (19.644 * l, u.nq),
                    (2.968 * l, u.ni),
                    (6.106 * l, u.s),
                    (3.435, u.nc),
                ],
                7.0,
            ),
            lin(
                &[
                    (7.658 * l, u.nc),
                    (19.664 * l, u.nq),
                    (2.971 * l, u.ni),
                    (6.105 * l, u.s),
                    (3.446, u.nc),
                ],
                7.0,
            ),
            lin(
                &[
                    (1.116, bb),
                    (-16.347, u.nc),
                    (-26.939, u.nq),
                    (-3.098, u.ni),
                    (-5.799, u.s),
                    (4.785 * l1, u.nc),
                    (18.782 * l1, u.nq),
                    (-0.165 * l1, u.ni),
                    (-0.237 * l1, u.s),
                ],
                -14.0,
            ),
        ),
        _ => (
            lin(
                &[
                    (9.839 * l, u.nc),
                    (11.408 * l, u.nq),
                    (3.048 * l, u.nkv),
                    (4.029 * l, u.ni),
                    (6.037 * l, u.s),
                    (1.209, u.nc),
                ],
                4.0,
            ),
            lin(
                &[
                    (9.845 * l, u.nc),
                    (11.524 * l, u.nq),
                    (2.746 * l, u.nkv),
                    (4.069 * l, u.ni),
                    (6.013 * l, u.s),
                    (1.254, u.nc),
                ],
                3.0,
            ),
            lin(
                &[
                    (0.858, bb),
                    (-6.173, u.nc),
                    (-4.792, u.nq),
                    (-9.106, u.nkv),
                    (-1.369, u.ni),
                    (-5.097, u.s),
                    (-0.472 * l1, u.nc),
                    (4.724 * l1, u.nq),
                    (12.442 * l1, u.nkv),
                    (0.665 * l1, u.ni),
                    (1.145 * l1, u.s),
                ],
                16.0,
            ),
        ),
    }
}

/// The chunked loss's working set: the larger of the chunk's logits graph (about 16 f32
/// copies of the chunk's logits for nanochat's soft-capped head, 10 for llama) and the
/// head-gradient accumulation.
fn loss_stage(arch: Arch, u: &Units) -> u64 {
    let common = [(u.multi, u.vc), (1.0, u.nc), (2.0, u.n)];
    let plane = |rv: f64, rc: f64, vc: f64, c: f64| {
        let mut t = vec![(rv, u.rv), (rc, u.rc), (vc, u.vc)];
        t.extend(common.iter().map(|(a, b)| (*a, *b)));
        lin(&t, c)
    };
    match arch {
        Arch::Nanochat => plane(8.0, 5.0, 5.0, 12_026.0).max(plane(16.0, 2.08, 0.0, 12_613.0)),
        _ => plane(5.0, 6.0, 5.0, 12_066.0).max(plane(10.0, 3.2, 0.0, 24_512.0)),
    }
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
    let layers = m.num_layers;
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
        bytes((seq * d + seq * seq) * F),
    );
    let ckpt = t.checkpointing == Checkpointing::Full;
    let mut kept = Vec::new();
    if ckpt {
        s.phase("forward: embedding");
        let hv = halves(arch, &u);
        let mut inputs = vec![s.alloc("embedding output", Component::Activations, bytes(u.nc))];
        let mut mids = Vec::new();
        for l in 0..layers {
            s.phase(format!("forward: block {l}"));
            s.transient(
                format!("block {l} attention half graph (dropped after it)"),
                Component::Activations,
                Bytes(hv.fwd_attn),
            );
            mids.push(s.alloc(
                format!("block {l} attention half output (saved)"),
                Component::Activations,
                bytes(u.nc),
            ));
            s.transient(
                format!("block {l} MLP half graph (dropped after it)"),
                Component::Activations,
                Bytes(hv.fwd_mlp),
            );
            inputs.push(s.alloc(
                format!("block {l} output (saved)"),
                Component::Activations,
                bytes(u.nc),
            ));
        }
        let last = inputs.pop();
        s.phase(if rows < n {
            format!("loss (fp32 logits in chunks of {rows} rows)")
        } else {
            "loss (the whole fp32 logits at once)".to_string()
        });
        s.transient(
            "loss chunk graph: logits (f32), log-sum-exp, their gradients",
            Component::Logits,
            Bytes(loss_stage(arch, &u)),
        );
        if !accum {
            kept.push(s.alloc("grad of head", Component::Gradients, Bytes(head_bytes)));
        }
        let mut g = s.alloc(
            "grad of last hidden states",
            Component::Activations,
            bytes(u.nc),
        );
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
                ("MLP", hv.bwd_mlp, mids.pop(), mlp_bytes(l)),
                (
                    "attention",
                    hv.bwd_attn,
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
                    bytes(u.nc),
                );
                s.free(g);
                g = gi;
                if let Some(x) = saved {
                    s.free(x);
                }
            }
        }
        s.phase("backward: embedding");
        let emb_ws = match arch {
            Arch::Nanochat => 2.0 * u.vc + 15.0 * u.nc + 4.0 * u.n + 6_413.0,
            _ => 2.0 * u.vc + 6.0 * u.nc + 2_621.0,
        };
        s.transient(
            "embedding graph and backward",
            Component::Temporaries,
            bytes(emb_ws),
        );
        if !accum && !m.tie_embeddings {
            kept.push(s.alloc("grad of embedding", Component::Gradients, emb_bytes));
        }
        s.free(g);
    } else {
        let (graph, fwd_peak, bwd_peak) = whole_graph(arch, &u, layers as f64);
        s.phase("forward (graph kept for backward)");
        let gr = s.alloc("forward graph", Component::Activations, Bytes(graph));
        s.transient(
            "forward temporaries",
            Component::Temporaries,
            Bytes(fwd_peak.saturating_sub(graph)),
        );
        s.phase("loss (fp32 logits)");
        s.transient(
            "loss chunk graph: logits (f32), log-sum-exp, their gradients",
            Component::Logits,
            Bytes(loss_stage(arch, &u)),
        );
        if !accum {
            kept.push(s.alloc("grad of head", Component::Gradients, Bytes(head_bytes)));
        }
        let g = s.alloc(
            "grad of last hidden states",
            Component::Activations,
            bytes(u.nc),
        );
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
    let w: u64 = params.iter().map(|p| p.numel() * 4).sum();
    let pmax = params.iter().map(|p| p.numel() * 4).max().unwrap_or(0) as f64;
    let opt = match arch {
        Arch::Nanochat => lin(&[(-0.247, w as f64), (3.424, pmax)], 43_961.0),
        _ => lin(&[(-0.011, w as f64), (4.041, pmax)], -6_305.0),
    };
    s.transient(
        "AdamW update temporaries",
        Component::Temporaries,
        Bytes(opt),
    );
    for id in kept.into_iter().chain(grads) {
        s.free(id);
    }
    s.finish()
}
