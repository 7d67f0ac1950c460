//! The `torch` engine: one steady-state training step of PyTorch eager, as people run
//! the Hugging Face implementations (and nanochat's GPT), played as a timeline.
//!
//! Order of the step (what the measurement script runs, `tools/measure_torch.py`):
//! `loss = model(x, labels=x).loss` (under autocast when asked; the output object, and
//! with it the logits, is dropped at once), `loss.backward()`, `opt.step()`,
//! `opt.zero_grad(set_to_none=True)`. With accumulation the modelled micro-step is a later
//! one, when the gradients already exist. Weights, optimizer state and (DDP) gradient
//! buckets exist before the step.

mod block;
mod loss;
mod optim;

use crate::params::{self, Param, Role};
use crate::spec::{Arch, Checkpointing, RunSpec};
use crate::timeline::{Component, Step, TensorId, Timeline};
use crate::units::Bytes;

/// Plays one step of `spec` on the torch engine.
pub fn play(spec: &RunSpec) -> Timeline {
    let m = &spec.model;
    let t = &spec.train;
    let hw = &spec.hardware;
    let cuda = hw.device.is_cuda();
    let stage = if hw.gpus > 1 { hw.sharding.stage() } else { 0 };
    let n_shards = hw.gpus.max(1);
    let params = params::parameters(m);
    let pb = t.precision.param_bytes();
    let d = block::Dims::new(m, t);
    let mut s = Step::new();

    // Before the step: weights, optimizer state, DDP's gradient buckets.
    let shard = |b: Bytes, on: bool| if on { Bytes(b.0.div_ceil(n_shards)) } else { b };
    for p in &params {
        s.persistent(
            p.name.clone(),
            Component::Weights,
            shard(Bytes::of(p.numel(), pb), stage >= 3),
        );
    }
    optim::states(&mut s, &params, t, if stage >= 1 { n_shards } else { 1 });
    let all_grads = Bytes::of(params::count(m), pb);
    if hw.gpus > 1 && stage <= 1 {
        s.persistent("DDP gradient buckets", Component::Gradients, all_grads);
    }
    // With accumulation, earlier micro-steps already made the gradients.
    let mut grads = Grads::new(&params, pb, stage >= 2, n_shards);
    if t.grad_accum > 1 {
        grads.all_persistent(&mut s);
    }

    // Forward.
    s.phase("forward: embedding");
    let ids = s.alloc("input_ids", Component::Activations, Bytes::of(d.n, 8));
    let labels = s.alloc("labels", Component::Activations, Bytes::of(d.n, 8));
    let head_dim = m.head_dim;
    let rope = matches!(m.arch, Arch::Llama | Arch::Qwen2 | Arch::Nanochat).then(|| {
        s.alloc(
            "rotary cos/sin",
            Component::Activations,
            Bytes::of(d.t.saturating_mul(head_dim), 8),
        )
    });
    let mut x = s.alloc("embedding output", Component::Activations, d.tok(d.h, d.r));
    let mut pre = Vec::new();
    if m.arch == Arch::Nanochat {
        pre.push(x);
        x = s.alloc("norm(embedding)", Component::Activations, d.tok(d.h, d.r));
    }
    let (enc_blk, dec_blk) = match m.arch {
        Arch::T5 => {
            let (e, dd) = block::t5_blocks(m, t);
            (e, Some(dd))
        }
        _ => (block::block(m, t), None),
    };
    let layers = m.num_layers.saturating_add(m.num_decoder_layers);
    let block_params: Vec<Vec<&Param>> = (0..layers)
        .map(|l| params.iter().filter(|p| p.layer == Some(l)).collect())
        .collect();
    let mut frames = Vec::with_capacity(layers as usize);
    for l in 0..layers {
        let blk = if l >= m.num_layers {
            dec_blk.as_ref().unwrap_or(&enc_blk)
        } else {
            &enc_blk
        };
        s.phase(format!("forward: block {l}"));
        let copies = weight_copies(
            &mut s,
            &d,
            &block_params[l as usize],
            stage,
            n_shards,
            pb,
            l,
        );
        let saved: Vec<TensorId> = match t.checkpointing {
            Checkpointing::Full => {
                let tmp: Vec<TensorId> = blk
                    .saved
                    .iter()
                    .map(|sv| {
                        s.alloc(
                            format!("block {l} {}", sv.name),
                            Component::Activations,
                            sv.bytes,
                        )
                    })
                    .collect();
                tmp.into_iter().for_each(|id| s.free(id));
                vec![]
            }
            _ => blk
                .saved
                .iter()
                .filter(|sv| !(t.checkpointing == Checkpointing::Selective && sv.attention_core))
                .map(|sv| {
                    s.alloc(
                        format!("block {l} {}", sv.name),
                        Component::Activations,
                        sv.bytes,
                    )
                })
                .collect(),
        };
        s.transient(
            format!("block {l} forward temporaries"),
            Component::Temporaries,
            blk.fwd_transient,
        );
        let out = s.alloc(
            format!("block {l} output"),
            Component::Activations,
            d.tok(d.h, d.r),
        );
        // ZeRO-3 and checkpointing drop the weight copies once the block's forward is done.
        let copies = if stage >= 3 || t.checkpointing == Checkpointing::Full {
            copies.into_iter().for_each(|c| s.free(c));
            vec![]
        } else {
            copies
        };
        frames.push(Frame {
            input: x,
            saved,
            copies,
        });
        x = out;
    }
    s.phase("forward: final norm and head");
    let norm_saved = vec![
        s.alloc(
            "final norm normalized",
            Component::Activations,
            d.tok(d.h, d.r),
        ),
        s.alloc(
            if d.autocast {
                "lm_head input (bf16 copy)"
            } else {
                "final norm output"
            },
            Component::Activations,
            d.tok(d.h, if d.autocast { 2 } else { d.r }),
        ),
    ];
    let head_copy = d.autocast.then(|| {
        s.alloc(
            "lm_head weight (bf16 copy)",
            Component::WeightCopies,
            Bytes::of(m.vocab_size.saturating_mul(m.hidden_size), 2),
        )
    });
    let loss_state = loss::forward(&mut s, m, t, d.c);
    let grad_hidden_fwd = loss_state.grad_hidden;
    if t.checkpointing == Checkpointing::Full && d.autocast {
        // Leaving autocast clears its cache (the forward's weight copies) before backward.
        s.phase("leaving autocast");
    }

    // Backward.
    let g_logits = loss::backward(&mut s, m, t, d.c, loss_state);
    s.phase("backward: head");
    let head = params.iter().find(|p| p.role == Role::Head);
    let mut g = match g_logits {
        Some(gl) => {
            let gh = s.alloc(
                "grad of final hidden states",
                Component::Activations,
                d.tok(d.h, d.c),
            );
            grads.for_params(
                &mut s,
                head.into_iter().chain(tied_embedding(&params, m)),
                d.autocast,
            );
            s.free(gl);
            gh
        }
        None => {
            grads.for_params(
                &mut s,
                head.into_iter().chain(tied_embedding(&params, m)),
                d.autocast,
            );
            grad_hidden_fwd.unwrap_or_else(|| {
                s.alloc(
                    "grad of final hidden states",
                    Component::Activations,
                    d.tok(d.h, d.c),
                )
            })
        }
    };
    if let Some(c) = head_copy {
        s.free(c);
    }
    let gn = s.alloc(
        "grad through final norm",
        Component::Activations,
        d.tok(d.h, d.r),
    );
    s.free(g);
    g = gn;
    norm_saved.into_iter().for_each(|id| s.free(id));
    s.free(x);
    for l in (0..layers).rev() {
        let blk = if l >= m.num_layers {
            dec_blk.as_ref().unwrap_or(&enc_blk)
        } else {
            &enc_blk
        };
        let frame = frames.pop().expect("one frame per block");
        s.phase(format!("backward: block {l}"));
        let mut recomputed = Vec::new();
        let mut copies = frame.copies;
        if t.checkpointing == Checkpointing::Full || stage >= 3 {
            copies.extend(weight_copies(
                &mut s,
                &d,
                &block_params[l as usize],
                stage,
                n_shards,
                pb,
                l,
            ));
        }
        match t.checkpointing {
            Checkpointing::Full => {
                for sv in &blk.saved {
                    recomputed.push(s.alloc(
                        format!("block {l} {} (recomputed)", sv.name),
                        Component::Activations,
                        sv.bytes,
                    ));
                }
            }
            Checkpointing::Selective => {
                for sv in blk.saved.iter().filter(|sv| sv.attention_core) {
                    recomputed.push(s.alloc(
                        format!("block {l} {} (recomputed)", sv.name),
                        Component::Activations,
                        sv.bytes,
                    ));
                }
            }
            Checkpointing::None => {}
        }
        s.transient(
            format!("block {l} backward temporaries"),
            Component::Temporaries,
            blk.bwd_transient,
        );
        grads.for_params(&mut s, block_params[l as usize].iter().copied(), d.autocast);
        frame
            .saved
            .into_iter()
            .chain(recomputed)
            .for_each(|id| s.free(id));
        copies.into_iter().for_each(|id| s.free(id));
        let gi = s.alloc(
            format!("grad of block {l} input"),
            Component::Activations,
            d.tok(d.h, d.r),
        );
        s.free(g);
        g = gi;
        s.free(frame.input);
    }
    s.phase("backward: embedding");
    let emb: Vec<&Param> = params
        .iter()
        .filter(|p| p.role == Role::Embedding || (p.layer.is_none() && p.role == Role::Vector))
        .collect();
    grads.for_params(&mut s, emb.into_iter(), false);
    s.free(g);
    pre.into_iter().for_each(|id| s.free(id));
    for id in [Some(ids), Some(labels), rope].into_iter().flatten() {
        s.free(id);
    }

    // Optimizer step, then zero_grad(set_to_none=True).
    s.phase("optimizer step");
    optim::step(
        &mut s,
        &params,
        t,
        cuda,
        if stage >= 1 { n_shards } else { 1 },
    );
    grads.free_all(&mut s);
    s.finish()
}

struct Frame {
    input: TensorId,
    saved: Vec<TensorId>,
    copies: Vec<TensorId>,
}

/// Under tied embeddings the head's gradient lands on the embedding weight.
fn tied_embedding<'a>(params: &'a [Param], m: &crate::spec::ModelSpec) -> Option<&'a Param> {
    m.tie_embeddings
        .then(|| params.iter().find(|p| p.role == Role::Embedding))
        .flatten()
}

/// The block's weights as its matmuls use them: autocast's bf16 copies (saved for
/// backward), and under ZeRO-3 the gathered full weights.
fn weight_copies(
    s: &mut Step,
    d: &block::Dims,
    ps: &[&Param],
    stage: u8,
    shards: u64,
    pb: u64,
    l: u64,
) -> Vec<TensorId> {
    let mut out = Vec::new();
    let matrices: u64 = ps
        .iter()
        .filter(|p| p.role == Role::Matrix)
        .map(|p| p.numel())
        .fold(0, u64::saturating_add);
    if stage >= 3 && shards > 1 {
        let all: u64 = ps.iter().map(|p| p.numel()).fold(0, u64::saturating_add);
        out.push(s.alloc(
            format!("block {l} gathered weights (ZeRO-3)"),
            Component::WeightCopies,
            Bytes::of(all, pb),
        ));
    }
    if d.autocast && matrices > 0 {
        out.push(s.alloc(
            format!("block {l} weights (bf16 copies)"),
            Component::WeightCopies,
            Bytes::of(matrices, 2),
        ));
    }
    out
}

/// Parameter gradients: allocated when backward first reaches a parameter, accumulated in
/// place afterwards; with ZeRO-2/3 reduced to this rank's shard right away.
struct Grads {
    ids: Vec<Option<TensorId>>,
    names: Vec<String>,
    numel: Vec<u64>,
    pb: u64,
    sharded: bool,
    shards: u64,
}

impl Grads {
    fn new(params: &[Param], pb: u64, sharded: bool, shards: u64) -> Grads {
        Grads {
            ids: vec![None; params.len()],
            names: params.iter().map(|p| p.name.clone()).collect(),
            numel: params.iter().map(|p| p.numel()).collect(),
            pb,
            sharded,
            shards: shards.max(1),
        }
    }

    fn size(&self, i: usize) -> Bytes {
        let b = Bytes::of(self.numel[i], self.pb);
        if self.sharded {
            Bytes(b.0.div_ceil(self.shards))
        } else {
            b
        }
    }

    fn all_persistent(&mut self, s: &mut Step) {
        for i in 0..self.ids.len() {
            self.ids[i] = Some(s.persistent(
                format!("grad of {}", self.names[i]),
                Component::Gradients,
                self.size(i),
            ));
        }
    }

    fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    fn for_params<'a>(
        &mut self,
        s: &mut Step,
        ps: impl Iterator<Item = &'a Param>,
        autocast: bool,
    ) {
        for p in ps {
            let Some(i) = self.index(&p.name) else {
                continue;
            };
            let full = Bytes::of(self.numel[i], self.pb);
            if autocast && p.role != Role::Vector && p.role != Role::Embedding {
                // The matmul's gradient is bf16; `to` backward casts it to the fp32 parameter.
                s.transient(
                    format!("grad of {} (bf16)", p.name),
                    Component::Temporaries,
                    Bytes::of(self.numel[i], 2),
                );
            }
            match self.ids[i] {
                Some(_) => s.transient(
                    format!("grad of {} (to accumulate)", p.name),
                    Component::Temporaries,
                    full,
                ),
                None => {
                    if self.sharded {
                        s.transient(
                            format!("grad of {} (before reduce-scatter)", p.name),
                            Component::Temporaries,
                            full,
                        );
                    }
                    self.ids[i] = Some(s.alloc(
                        format!("grad of {}", p.name),
                        Component::Gradients,
                        self.size(i),
                    ));
                }
            }
        }
    }

    fn free_all(&mut self, s: &mut Step) {
        for id in self.ids.iter_mut().filter_map(Option::take) {
            s.free(id);
        }
    }
}
