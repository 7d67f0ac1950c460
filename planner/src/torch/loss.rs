//! The output layer and the loss, as tensors over the vocabulary.
//!
//! - `float-cast` (Hugging Face `ForCausalLMLoss`, nanochat's `logits.float()`): the
//!   logits in compute precision, their fp32 copy, and `log_softmax`'s fp32 output saved for
//!   backward; the backward makes the gradient of the log-probabilities and of the logits,
//!   both fp32 (N·V·4 each). nanochat first applies the softcap `15·tanh(x/15)`, whose
//!   output is saved. Megatron's output-layer term `4sbv` is the fp32 logits alone.
//! - `chunked`: rows are processed `loss_chunk` at a time, each chunk's gradient computed
//!   and released before the next: one chunk's logits, fp32 copy and gradient at a time,
//!   plus the gradient of the hidden states.
//! - `fused`: a fused linear + cross-entropy kernel (Liger's chunk heuristic: the next power
//!   of two of N / ⌈V/H⌉ rows) that never materializes the full logits.
//!
//! Per implementation and under `torch.compile` (`[train] implementation`, `compile`):
//! - compiled `float-cast` (transformers' `ForCausalLMLoss`, nanochat's softcap and
//!   `logits.float()`, torchtitan's `cross_entropy_loss`): inductor fuses the cast, the
//!   softcap and `log_softmax` into one reduction; the partitioner keeps the logits as the
//!   head's matmul made them (compute precision) and two fp32 statistics per row (maximum
//!   and log-sum-exp); on the CPU, in forward the upcast logits are written out once as a
//!   temporary (N·V·4, several reductions read them: measured) where the loss is compiled
//!   with the model (transformers, nanochat), not in torchtitan's cross-entropy compiled on
//!   its own (a bare cast, fused into the reductions: measured); backward is one fused
//!   kernel writing the logits' gradient in compute precision. On CUDA the upcast is not
//!   written out: inductor's `StorageBox.should_realize_on_reuse` (torch 2.15
//!   `torch/_inductor/ir.py`) realizes a reused pointwise node on the CPU when its body
//!   holds a heavy op (`exp`, `log`, `tanh`, ...) or many ops, but on a GPU only when it
//!   reads more than `realize_reads_threshold` (4) buffers or has more than 30 ops; the
//!   cast (with nanochat's softcap) reads one buffer in a few ops, so each reduction's
//!   Triton kernel recomputes it from the bf16 logits (unmeasured: no GPU). transformers also keeps its padded labels (B × (T + 1), int64).
//! - torchtune's `chunked` (`CEWithChunkedOutputLoss`, 8 chunks along the sequence): the
//!   output projection runs per chunk and every chunk's logits live until the loss returns;
//!   eager, each chunk's `logits.float()` feeds `cross_entropy`, whose `log_softmax` keeps
//!   its fp32 output, so all chunks' fp32 log-probabilities are saved together (N·V·4);
//!   backward walks the chunks, one chunk's fp32 gradients at a time. Compiled
//!   (`training.compile_loss` compiles the chunk's upcast and cross-entropy), each chunk
//!   keeps its logits in compute precision and its two row statistics.
//! - torchtitan's `chunked` (`ChunkedLossWrapper`, `torchtitan/components/loss.py`, 8
//!   chunks along the sequence): inside the loss call, the final hidden states are split
//!   (a contiguous copy of every chunk at once where the micro-batch has more than one
//!   row), and each chunk runs `lm_head`, the cross-entropy and its own backward before the
//!   next; the chunk's gradient is copied into one fp32 buffer of the hidden states' size,
//!   and `lm_head`'s weight gradient is made by the first chunk and accumulated by the
//!   others ([`HeadGrad`]; under FSDP2 unsynced until the last chunk,
//!   `shard::Reducer::chunk`). The loop's `logits` variable keeps a chunk's logits until the next chunk's
//!   replace them. The buffer, cast to the hidden states' dtype, is what backward then
//!   sends down the decoder.

use crate::spec::{Arch, Implementation, LossMode, ModelSpec, TrainSpec};
use crate::timeline::{Component, Layout, Step, TensorId};
use crate::units::DType;

/// What the loss forward leaves for its backward.
pub struct LossState {
    saved: Vec<TensorId>,
    /// How backward walks the saved tensors.
    plan: Plan,
    /// The gradient of the final hidden states computed in forward (chunked and fused).
    pub grad_hidden: Option<TensorId>,
}

/// The loss code whose backward runs.
#[derive(Clone, Copy, PartialEq)]
enum Plan {
    /// Eager autograd over the whole logits (float-cast), or nothing left (chunked, fused).
    Eager,
    /// Inductor's fused kernel: the saved logits and row statistics give the gradient.
    /// `returned`: the compiled forward also returns the logits (transformers' output
    /// object), and AOTAutograd's backward fills a zero gradient for that unused output.
    Compiled { returned: bool },
    /// torchtune's chunks: `rows` rows each; compiled or eager cross-entropy per chunk.
    OutputChunks { rows: u64, compiled: bool },
}

/// `CEWithChunkedOutputLoss.num_output_chunks`.
const TORCHTUNE_CHUNKS: u64 = 8;

/// The full logits (or a tensor of their size): B × T × V.
fn bv(t: &TrainSpec, v: u64, dtype: DType) -> Layout {
    Layout::new(&[t.micro_batch, t.seq_len, v], dtype)
}

/// One chunk of `rows` rows of the logits.
fn rv(rows: u64, v: u64, dtype: DType) -> Layout {
    Layout::new(&[rows, v], dtype)
}

/// Rows per chunk for the fused kernel.
pub fn fused_rows(m: &ModelSpec, n: u64) -> u64 {
    let inc = m.vocab_size.div_ceil(m.hidden_size.max(1)).max(1);
    n.div_ceil(inc).max(1).next_power_of_two().min(n.max(1))
}

/// Names of the eager cross-entropy's tensors over the whole logits or one chunk.
struct Names {
    upcast: &'static str,
    log_softmax: &'static str,
    grad_log_softmax: &'static str,
    grad_f32: &'static str,
    grad: &'static str,
}

const WHOLE: Names = Names {
    upcast: "logits.float() (fp32 copy)",
    log_softmax: "log_softmax (fp32, saved)",
    grad_log_softmax: "grad of log_softmax (fp32)",
    grad_f32: "grad of logits (fp32)",
    grad: "grad of logits (compute dtype)",
};

const CHUNK: Names = Names {
    upcast: "logits chunk .float()",
    log_softmax: "log_softmax chunk (fp32, saved)",
    grad_log_softmax: "grad of log_softmax chunk (fp32)",
    grad_f32: "grad of logits chunk (fp32)",
    grad: "grad of logits chunk",
};

/// Eager `cross_entropy` over logits of `shape` in `c`: their `.float()` copy where `c` is
/// narrower, freed once `log_softmax` has made its fp32 output, which is kept; returns it.
fn upcast_log_softmax(s: &mut Step, n: &Names, shape: &[u64], c: DType) -> TensorId {
    let copy = (c != DType::F32)
        .then(|| s.alloc(n.upcast, Component::Logits, Layout::new(shape, DType::F32)));
    let lsm = s.alloc(
        n.log_softmax,
        Component::Logits,
        Layout::new(shape, DType::F32),
    );
    copy.into_iter().for_each(|id| s.free(id));
    lsm
}

/// Its backward: `nll_loss`'s and `log_softmax`'s fp32 gradients, `lsm` released when
/// the latter's node is done, then the cast back to `c`; returns the logits' gradient.
fn log_softmax_backward(
    s: &mut Step,
    n: &Names,
    shape: &[u64],
    c: DType,
    lsm: Option<TensorId>,
) -> TensorId {
    let g_lp = s.alloc(
        n.grad_log_softmax,
        Component::Logits,
        Layout::new(shape, DType::F32),
    );
    let g32 = s.alloc(
        n.grad_f32,
        Component::Logits,
        Layout::new(shape, DType::F32),
    );
    s.free(g_lp);
    lsm.into_iter().for_each(|id| s.free(id));
    if c == DType::F32 {
        return g32;
    }
    let gc = s.alloc(n.grad, Component::Logits, Layout::new(shape, c));
    s.free(g32);
    gc
}

/// nanochat (15) and Gemma 2 (`final_logit_softcapping`, 30) cap the logits with
/// `cap · tanh(logits / cap)` in the logits' dtype before the loss.
fn softcapped(m: &ModelSpec) -> bool {
    matches!(m.arch, Arch::Nanochat | Arch::Gemma2)
}

/// `float-cast`: the logits, nanochat's softcap, the fp32 copy and log_softmax's output.
fn float_cast(s: &mut Step, m: &ModelSpec, t: &TrainSpec, c: DType) -> LossState {
    let v = m.vocab_size;
    let logits = s.alloc("logits", Component::Logits, bv(t, v, c));
    let mut saved = Vec::new();
    let capped = if softcapped(m) {
        // logits / 15 → tanh (saved) → × 15
        let scaled = s.alloc("logits / softcap", Component::Logits, bv(t, v, c));
        s.free(logits);
        let tanh = s.alloc(
            "tanh(logits / softcap) (saved)",
            Component::Logits,
            bv(t, v, c),
        );
        s.free(scaled);
        saved.push(tanh);
        s.alloc("softcapped logits", Component::Logits, bv(t, v, c))
    } else {
        logits
    };
    saved.push(upcast_log_softmax(
        s,
        &WHOLE,
        &[t.micro_batch, t.seq_len, v],
        c,
    ));
    s.free(capped);
    LossState {
        saved,
        plan: Plan::Eager,
        grad_hidden: None,
    }
}

/// Whether the loss makes the head's weight gradient itself, inside the forward's loss
/// call (torchtitan's `ChunkedLossWrapper`): [`forward`] then calls its `head_grad` twice a
/// chunk ([`HeadGrad`]).
pub fn grads_head(t: &TrainSpec) -> bool {
    t.implementation == Implementation::Torchtitan && t.loss == LossMode::Chunked
}

/// Where in one chunk's backward [`forward`] calls `head_grad` (torchtitan's chunked loss).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeadGrad {
    /// lm_head's matmul backward makes the weight gradient; the chunk's logits gradient
    /// is still live.
    Made,
    /// The gradient's accumulation, after the matmul's backward has released the logits
    /// gradient; `first` and `last` name the loop's first and last chunks.
    Accumulated { first: bool, last: bool },
}

/// Plays the loss forward. `c` is the logits' dtype; `head_grad` makes (or accumulates)
/// the head's weight gradient where [`grads_head`].
pub fn forward(
    s: &mut Step,
    m: &ModelSpec,
    t: &TrainSpec,
    c: DType,
    cuda: bool,
    head_grad: &mut dyn FnMut(&mut Step, HeadGrad),
) -> LossState {
    let n = t.tokens_per_micro_batch();
    let v = m.vocab_size;
    s.phase("loss");
    if t.implementation == Implementation::Torchtune && t.loss == LossMode::Chunked {
        return output_chunks(s, m, t, c);
    }
    if grads_head(t) {
        return wrapper_chunks(s, m, t, c, head_grad);
    }
    if t.compile && t.loss == LossMode::FloatCast {
        return compiled(s, m, t, c, cuda);
    }
    match t.loss {
        LossMode::FloatCast => float_cast(s, m, t, c),
        LossMode::Chunked | LossMode::Fused => {
            let rows = match t.loss {
                LossMode::Chunked => t.loss_chunk.min(n).max(1),
                _ => fused_rows(m, n),
            };
            let gh = s.alloc(
                "grad of final hidden states (fp32)",
                Component::Logits,
                Layout::new(&[t.micro_batch, t.seq_len, m.hidden_size], DType::F32),
            );
            let what = if t.loss == LossMode::Chunked {
                "chunk"
            } else {
                "fused block"
            };
            let a = s.alloc(
                format!("logits {what} ({rows} rows)"),
                Component::Logits,
                rv(rows, v, c),
            );
            let b = (c != DType::F32).then(|| {
                s.alloc(
                    format!("logits {what} fp32"),
                    Component::Logits,
                    rv(rows, v, DType::F32),
                )
            });
            s.transient(
                format!("logits {what} gradient"),
                Component::Logits,
                rv(rows, v, DType::F32),
            );
            if let Some(b) = b {
                s.free(b);
            }
            s.free(a);
            LossState {
                saved: vec![],
                plan: Plan::Eager,
                grad_hidden: Some(gh),
            }
        }
    }
}

/// Plays the loss backward down to the gradient of the logits in compute precision;
/// returns it (None for chunked and fused, which did their work in forward).
pub fn backward(
    s: &mut Step,
    m: &ModelSpec,
    t: &TrainSpec,
    c: DType,
    st: LossState,
) -> Option<TensorId> {
    let v = m.vocab_size;
    s.phase("backward: loss");
    match st.plan {
        Plan::Compiled { returned } => {
            return Some(compiled_backward(s, t, v, c, returned, st.saved))
        }
        Plan::OutputChunks { rows, compiled } => {
            let head = Layout::new(&[3, v, m.hidden_size], c);
            return Some(chunks_backward(s, rows, v, c, compiled, head, st.saved));
        }
        Plan::Eager if t.loss != LossMode::FloatCast => return None,
        Plan::Eager => {}
    }
    let mut saved = st.saved.into_iter();
    let lsm = saved.next_back();
    let mut g = log_softmax_backward(s, &WHOLE, &[t.micro_batch, t.seq_len, v], c, lsm);
    if softcapped(m) {
        // × 15, tanh', / 15: each a new tensor from the previous one.
        for step in [
            "grad through softcap ×15",
            "grad through tanh",
            "grad through /15",
        ] {
            let next = s.alloc(step, Component::Logits, bv(t, v, c));
            s.free(g);
            g = next;
        }
        for id in saved {
            s.free(id);
        }
    }
    Some(g)
}

/// Compiled float-cast: the logits in compute precision and two row statistics.
fn compiled(s: &mut Step, m: &ModelSpec, t: &TrainSpec, c: DType, cuda: bool) -> LossState {
    let n = t.tokens_per_micro_batch();
    let mut saved = vec![s.alloc(
        "logits (saved by the compiled loss)",
        Component::Logits,
        bv(t, m.vocab_size, c),
    )];
    if m.arch != Arch::Nanochat {
        saved.push(s.alloc(
            "padded labels",
            Component::Logits,
            Layout::new(&[t.micro_batch, t.seq_len.saturating_add(1)], DType::I64),
        ));
    }
    if c != DType::F32 && !cuda && t.implementation != Implementation::Torchtitan {
        // The upcast logits are read by several reductions (row max, sum of exponentials,
        // the target's logit): inductor's C++ backend writes them out once instead of
        // fusing (its heavy-op heuristic, CPU only; see the module doc).
        s.transient(
            "logits upcast (fp32, read by the loss's reductions)",
            Component::Logits,
            bv(t, m.vocab_size, DType::F32),
        );
    }
    saved.push(s.alloc(
        "row max and log-sum-exp (fp32)",
        Component::Logits,
        Layout::new(&[2, n], DType::F32),
    ));
    LossState {
        saved,
        plan: Plan::Compiled {
            returned: m.arch != Arch::Nanochat && t.implementation == Implementation::Hf,
        },
        grad_hidden: None,
    }
}

/// The fused backward kernel: the logits' gradient in compute precision.
fn compiled_backward(
    s: &mut Step,
    t: &TrainSpec,
    v: u64,
    c: DType,
    returned: bool,
    saved: Vec<TensorId>,
) -> TensorId {
    let zeros = returned.then(|| {
        s.alloc(
            "zero gradient of the returned logits",
            Component::Logits,
            bv(t, v, c),
        )
    });
    let g = s.alloc("grad of logits (fused)", Component::Logits, bv(t, v, c));
    saved.into_iter().chain(zeros).for_each(|id| s.free(id));
    g
}

/// `ChunkedLossWrapper.num_chunks` in torchtitan's training configs.
const TORCHTITAN_CHUNKS: u64 = 8;

/// torchtitan's `ChunkedLossWrapper`: every chunk's forward and backward inside the loss
/// call; returns the accumulated gradient of the hidden states for the decoder's backward.
fn wrapper_chunks(
    s: &mut Step,
    m: &ModelSpec,
    t: &TrainSpec,
    c: DType,
    head_grad: &mut dyn FnMut(&mut Step, HeadGrad),
) -> LossState {
    let (b, h, v) = (t.micro_batch, m.hidden_size, m.vocab_size);
    let rows = b.saturating_mul(t.seq_len.div_ceil(TORCHTITAN_CHUNKS));
    // `torch.split` along the sequence, then `.contiguous()`: copies unless B = 1.
    let copies: Vec<TensorId> = (b > 1)
        .then(|| {
            let hidden = Layout::new(&[b, t.seq_len, h], c);
            let labels = Layout::new(&[b, t.seq_len], DType::I64);
            [
                ("hidden-state chunks (copies)", hidden),
                ("label chunks", labels),
            ]
            .map(|(name, l)| s.alloc(name, Component::Logits, l))
        })
        .into_iter()
        .flatten()
        .collect();
    let buffer = s.alloc(
        "grad of final hidden states (fp32 accumulator)",
        Component::Logits,
        Layout::new(&[b, t.seq_len, h], DType::F32),
    );
    let mut kept = None;
    let chunks = TORCHTITAN_CHUNKS.min(t.seq_len.max(1));
    for k in 0..chunks {
        let logits = s.alloc("logits chunk", Component::Logits, rv(rows, v, c));
        if let Some(prev) = kept.replace(logits) {
            s.free(prev);
        }
        let g = chunk_cross_entropy(s, rows, v, c, t.compile);
        // lm_head's backward: the chunk's input gradient and the weight gradient together.
        let gh = s.alloc(
            "grad of a hidden-state chunk",
            Component::Logits,
            Layout::new(&[rows, h], c),
        );
        head_grad(s, HeadGrad::Made);
        s.free(g);
        let (first, last) = (k == 0, k + 1 == chunks);
        head_grad(s, HeadGrad::Accumulated { first, last });
        s.free(gh);
    }
    let grad = if c != DType::F32 {
        let cast = s.alloc(
            "grad of final hidden states (cast)",
            Component::Logits,
            Layout::new(&[b, t.seq_len, h], c),
        );
        s.free(buffer);
        cast
    } else {
        buffer
    };
    kept.into_iter().chain(copies).for_each(|id| s.free(id));
    LossState {
        saved: vec![],
        plan: Plan::Eager,
        grad_hidden: Some(grad),
    }
}

/// One chunk's cross-entropy forward and backward, down to the gradient of its logits in
/// compute precision: eager (`.float()`, `log_softmax` and their backward) or compiled
/// (the fused reductions and the fused gradient kernel).
fn chunk_cross_entropy(s: &mut Step, rows: u64, v: u64, c: DType, compiled: bool) -> TensorId {
    if compiled {
        let stats = s.alloc(
            "chunk row max and log-sum-exp (fp32)",
            Component::Logits,
            Layout::new(&[2, rows], DType::F32),
        );
        let g = s.alloc(
            "grad of logits chunk (fused)",
            Component::Logits,
            rv(rows, v, c),
        );
        s.free(stats);
        return g;
    }
    let lsm = upcast_log_softmax(s, &CHUNK, &[rows, v], c);
    log_softmax_backward(s, &CHUNK, &[rows, v], c, Some(lsm))
}

/// torchtune's chunked-output loss forward: every chunk's logits, and per chunk what its
/// cross-entropy keeps.
fn output_chunks(s: &mut Step, m: &ModelSpec, t: &TrainSpec, c: DType) -> LossState {
    let v = m.vocab_size;
    // `torch.chunk` along the sequence: ⌈T / 8⌉ positions a chunk.
    let per = t.seq_len.div_ceil(TORCHTUNE_CHUNKS).max(1);
    let chunks = t.seq_len.div_ceil(per);
    let rows = t.micro_batch.saturating_mul(per);
    let logits: Vec<TensorId> = (0..chunks)
        .map(|_| s.alloc("logits chunk", Component::Logits, rv(rows, v, c)))
        .collect();
    let mut saved = Vec::with_capacity(chunks as usize * 2);
    if t.compile {
        // Each chunk's compiled cross-entropy keeps its input and two row statistics.
        for l in logits {
            saved.push(l);
            saved.push(s.alloc(
                "chunk row max and log-sum-exp (fp32)",
                Component::Logits,
                Layout::new(&[2, rows], DType::F32),
            ));
        }
    } else {
        for _ in 0..chunks {
            saved.push(upcast_log_softmax(s, &CHUNK, &[rows, v], c));
        }
        // The list of logits is dropped when the loss returns.
        logits.into_iter().for_each(|id| s.free(id));
    }
    LossState {
        saved,
        plan: Plan::OutputChunks {
            rows,
            compiled: t.compile,
        },
        grad_hidden: None,
    }
}

/// Backward chunk by chunk, last first; returns the last chunk's gradient of its logits.
fn chunks_backward(
    s: &mut Step,
    rows: u64,
    v: u64,
    c: DType,
    compiled: bool,
    head: Layout,
    saved: Vec<TensorId>,
) -> TensorId {
    let per_chunk = if compiled { 2 } else { 1 };
    let mut saved = saved;
    // Every chunk's cross-entropy ran after every chunk's output projection, so autograd
    // (by sequence number) takes all the cross-entropies' backward first, last chunk
    // first: each chunk's logits gradient in compute precision, its saved tensors freed.
    let mut grads = Vec::with_capacity(saved.len() / per_chunk + 1);
    while !saved.is_empty() {
        let mut chunk: Vec<TensorId> = saved.split_off(saved.len().saturating_sub(per_chunk));
        grads.push(if compiled {
            s.alloc(
                "grad of logits chunk (fused)",
                Component::Logits,
                rv(rows, v, c),
            )
        } else {
            log_softmax_backward(s, &CHUNK, &[rows, v], c, chunk.pop())
        });
        chunk.into_iter().for_each(|id| s.free(id));
    }
    // Then the projections' backward, one chunk at a time: each `mm` backward releases its
    // chunk's gradient once it has made the weight's; the weight is used once per chunk,
    // and from the second chunk on autograd sums its gradients in the engine's input
    // buffer, out of place (the sum so far, this chunk's, and the new sum at once). The
    // last chunk's gradient goes to the head's backward (`head_backward`).
    let last = grads.pop();
    for (k, g) in grads.into_iter().enumerate() {
        s.free(g);
        if k > 0 {
            s.transient(
                "lm_head weight gradient sum (autograd input buffer)",
                Component::Temporaries,
                head.clone(),
            );
        }
    }
    last.unwrap_or_else(|| s.alloc("grad of logits chunk", Component::Logits, rv(rows, v, c)))
}
