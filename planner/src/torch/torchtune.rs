//! torchtune 0.6.1's Llama: `TransformerDecoder` of `TransformerSelfAttentionLayer`
//! (`torchtune/modules/transformer.py`), `MultiHeadAttention` (`attention.py`),
//! `FeedForward` (`feed_forward.py`), `RMSNorm` (`rms_norm.py`),
//! `RotaryPositionalEmbeddings` (`position_embeddings.py`), with the output projection
//! applied per chunk for `CEWithChunkedOutputLoss` (`loss/ce_chunked_output_loss.py`).
//!
//! Eager, a layer saves what transformers' Llama layer saves (`block::llama`: the same
//! norm, projections, RoPE by multiplication with a cache that needs no gradient, SiLU-gated
//! MLP) with one difference: for grouped-query attention torchtune expands k and v to all
//! heads with `unsqueeze(2).expand(...).flatten(1, 2)`, a copy, before
//! `scaled_dot_product_attention`, and the attention saves the expanded copies (N·Q wide,
//! not N·K as transformers' `enable_gqa` path). Compiled (`training.compile_model`: each
//! layer its own graph) a layer is `compiled::llama` with the expanded k and v; the final
//! norm and the output projection stay eager. The loss is in `loss.rs`
//! (`loss = "chunked"`: the chunked-output loss with its 8 chunks).

use super::block::{self, Dims};
use super::compiled;
use super::recipe::{Implementation, Recipe};
use crate::spec::{ModelSpec, TrainSpec};

pub struct Torchtune;

impl Implementation for Torchtune {
    fn recipe(&self, m: &ModelSpec, t: &TrainSpec) -> Recipe {
        let d = Dims::new(m, t);
        let eager = block::Transformers.recipe(m, t);
        let encoder = if t.compile {
            compiled::llama(&d, d.q)
        } else {
            // The expanded k and v are as wide as q; no further repeat_kv copy is made.
            block::llama(&Dims { k: d.q, ..d }, t.attention, false)
        };
        Recipe {
            encoder,
            head: None,
            ..eager
        }
    }
}
