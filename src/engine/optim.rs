//! AdamW (Loshchilov & Hutter 2019) with fp32 moments keyed by parameter name, decoupled
//! weight decay on matrices only (not on norms, biases or embeddings), global-norm
//! clipping, and a linear-warmup + cosine learning-rate schedule.
//!
//! `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
//! `p ← p − lr·(m̂ / (√v̂ + ε) + λ·p)` with `m̂ = m/(1−β₁ᵗ)`, `v̂ = v/(1−β₂ᵗ)`.

use crate::engine::model::Model;
use crate::engine::step::Grads;
use candle_core::{DType, Result, Tensor};
use std::collections::BTreeMap;

pub const BETA1: f64 = 0.9;
pub const BETA2: f64 = 0.95;
pub const EPS: f64 = 1e-8;
pub const WEIGHT_DECAY: f64 = 0.1;
pub const CLIP: f64 = 1.0;

pub struct AdamW {
    /// `(m, v)` per parameter, f32 (f64 for an f64 model).
    pub state: BTreeMap<String, (Tensor, Tensor)>,
    pub t: u64,
}

/// Weight decay applies to 2-D weights inside blocks and to an untied head.
pub fn decays(name: &str) -> bool {
    name.starts_with("layers.") && name.ends_with(".weight") && !name.contains("norm")
        || name == "lm_head.weight"
}

/// Linear warmup over `warmup` steps, then cosine decay to 10 % of `lr` at `total`.
pub fn schedule(step: u64, total: u64, lr: f64) -> f64 {
    let warmup = (total / 20).clamp(1, 100);
    if step < warmup {
        return lr * (step + 1) as f64 / warmup as f64;
    }
    let p = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    let p = p.min(1.0);
    lr * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()))
}

impl Default for AdamW {
    fn default() -> AdamW {
        AdamW::new()
    }
}

impl AdamW {
    pub fn new() -> AdamW {
        AdamW {
            state: BTreeMap::new(),
            t: 0,
        }
    }

    /// Global L2 norm of all gradients.
    pub fn grad_norm(grads: &Grads) -> Result<f64> {
        let mut s = 0.0;
        for g in grads.values() {
            s += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        Ok(s.sqrt())
    }

    /// One update; consumes the gradients. Returns the gradient norm before clipping.
    pub fn step(&mut self, model: &Model, mut grads: Grads, lr: f64) -> Result<f64> {
        let norm = Self::grad_norm(&grads)?;
        let clip = if norm > CLIP { CLIP / norm } else { 1.0 };
        self.t += 1;
        let t = self.t as i32;
        let bc1 = 1.0 - BETA1.powi(t);
        let bc2 = 1.0 - BETA2.powi(t);
        let sdt = if model.dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        for (name, var) in &model.params {
            let Some(g) = grads.remove(name) else {
                continue;
            };
            let g = (g.to_dtype(sdt)? * clip)?;
            let (m, v) = match self.state.remove(name) {
                Some(mv) => mv,
                None => (g.zeros_like()?, g.zeros_like()?),
            };
            let m = ((m * BETA1)? + (&g * (1.0 - BETA1))?)?;
            let v = ((v * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
            drop(g);
            let p = var.as_tensor().to_dtype(sdt)?;
            let upd = ((&m / bc1)?.div(&((&v / bc2)?.sqrt()? + EPS)?))?;
            let wd = if decays(name) { WEIGHT_DECAY } else { 0.0 };
            let new = ((p * (1.0 - lr * wd))? - (upd * lr)?)?;
            var.set(&new.to_dtype(model.dtype)?)?;
            self.state.insert(name.clone(), (m, v));
        }
        Ok(norm)
    }
}
