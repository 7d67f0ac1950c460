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

use crate::spec::{Arch, LossMode, ModelSpec, TrainSpec};
use crate::timeline::{Component, Layout, Step, TensorId};
use crate::units::DType;

/// What the loss forward leaves for its backward.
pub struct LossState {
    saved: Vec<TensorId>,
    /// The gradient of the final hidden states computed in forward (chunked and fused).
    pub grad_hidden: Option<TensorId>,
}

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
    let f32_copy = (c != DType::F32).then(|| {
        s.alloc(
            "logits.float() (fp32 copy)",
            Component::Logits,
            bv(t, v, DType::F32),
        )
    });
    let lsm = s.alloc(
        "log_softmax (fp32, saved)",
        Component::Logits,
        bv(t, v, DType::F32),
    );
    saved.push(lsm);
    if let Some(f) = f32_copy {
        s.free(f);
    }
    s.free(capped);
    LossState {
        saved,
        grad_hidden: None,
    }
}

/// Plays the loss forward. `c` is the logits' dtype.
pub fn forward(s: &mut Step, m: &ModelSpec, t: &TrainSpec, c: DType) -> LossState {
    let n = t.tokens_per_micro_batch();
    let v = m.vocab_size;
    s.phase("loss");
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
    if t.loss != LossMode::FloatCast {
        return None;
    }
    let g_lp = s.alloc(
        "grad of log_softmax (fp32)",
        Component::Logits,
        bv(t, v, DType::F32),
    );
    let g32 = s.alloc(
        "grad of logits (fp32)",
        Component::Logits,
        bv(t, v, DType::F32),
    );
    s.free(g_lp);
    let mut saved = st.saved.into_iter();
    if let Some(lsm) = saved.next_back() {
        s.free(lsm);
    }
    let mut g = g32;
    if c != DType::F32 {
        let gc = s.alloc(
            "grad of logits (compute dtype)",
            Component::Logits,
            bv(t, v, c),
        );
        s.free(g);
        g = gc;
    }
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
