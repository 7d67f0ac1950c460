//! torchtitan 0.3.0's Llama 3 (`torchtitan/models/llama3/model.py` on
//! `torchtitan/models/common/decoder.py`, `attention.py`, `feed_forward.py`, `rope.py`),
//! compiled as its training configs run it (`compile.enable`, components model and loss).
//!
//! A block is `x + attention(attention_norm(x))`, then `h + feed_forward(ffn_norm(h))`:
//! RMSNorm, one fused `wqkv` projection, complex RoPE, flex attention (the only language
//! model attention torchtitan 0.3.0 accepts besides varlen; `enable_gqa`, so k and v reach
//! the kernel at their own N·K width, and its block mask is a few index tensors, not a
//! T × T matrix), `wo`, and the SiLU-gated `w1`/`w3`/`w2` MLP. Under compile the
//! partitioner keeps what it keeps for transformers' Llama (`compiled::llama`), with k and
//! v at N·K; the loss (`components/loss.py`, `cross_entropy_loss`: `pred.float()` then a
//! sum-reduced cross-entropy) compiles to the fused loss of `loss.rs`.
//!
//! Unmeasured: torchtitan 0.3.0's Llama needs a flex-attention block mask built by its
//! trainer, which the CPU measurement does not run; this profile follows the source.

use super::block::{self, Dims};
use super::compiled;
use super::recipe::{Implementation, Recipe};
use crate::spec::{ModelSpec, TrainSpec};

pub struct Torchtitan;

impl Implementation for Torchtitan {
    fn recipe(&self, m: &ModelSpec, t: &TrainSpec) -> Recipe {
        let d = Dims::new(m, t);
        let eager = block::Transformers.recipe(m, t);
        Recipe {
            encoder: compiled::llama(&d, d.k),
            head: Some(compiled::head(&d)),
            ..eager
        }
    }
}
