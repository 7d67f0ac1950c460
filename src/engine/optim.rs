//! AdamW (Loshchilov & Hutter 2019) with fp32 moments keyed by parameter name, decoupled
//! weight decay on matrices only (not on norms, biases or embeddings), global-norm
//! clipping, and a linear-warmup + cosine learning-rate schedule.
//!
//! `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
//! `p ← p − lr·(m̂ / (√v̂ + ε) + λ·p)` with `m̂ = m/(1−β₁ᵗ)`, `v̂ = v/(1−β₂ᵗ)`.
//!
//! On the CPU the update is in place, as PyTorch's fused AdamW: the moments and then the
//! parameter are rewritten by one pass each over their storage ([`Moment`], [`Update`]),
//! split over rayon's threads in blocks of [`PAR_CHUNK`] elements (each element's
//! arithmetic is the same on any number of threads), and the gradient norm is one
//! reduction per gradient ([`SquaredSum`], on one thread, so its sum's order is fixed); nothing of a
//! parameter's size is allocated. Built from tensor ops (on other devices) each parameter
//! makes about four f32 copies of itself in fourteen passes.

use crate::engine::model::Model;
use crate::engine::step::Grads;
use candle_core::{
    CpuStorage, CustomOp1, DType, InplaceOp2, InplaceOp3, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;
use std::collections::BTreeMap;

/// Elements of a moment or parameter one rayon task updates at most.
const PAR_CHUNK: usize = 1 << 15;

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
            let sq = if g.device().is_cpu() {
                g.contiguous()?.apply_op1_no_bwd(&SquaredSum)?
            } else {
                g.sqr()?.sum_all()?
            };
            s += sq.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0];
        }
        Ok(s.sqrt())
    }

    /// One update; consumes the gradients. Returns the gradient norm before clipping.
    pub fn step(&mut self, model: &Model, mut grads: Grads, lr: f64) -> Result<f64> {
        let norm = Self::grad_norm(&grads)?;
        let clip = if norm > CLIP { CLIP / norm } else { 1.0 };
        self.t += 1;
        let t = self.t as i32;
        let (bc1, bc2) = (1.0 - BETA1.powi(t), 1.0 - BETA2.powi(t));
        let sdt = if model.dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        for (name, var) in &model.params {
            let Some(g) = grads.remove(name) else {
                continue;
            };
            let g = g.to_dtype(sdt)?.contiguous()?;
            let (m, v) = match self.state.remove(name) {
                Some(mv) => mv,
                None => (g.zeros_like()?, g.zeros_like()?),
            };
            let u = Update {
                lr,
                decay: if decays(name) { WEIGHT_DECAY } else { 0.0 },
                bc1,
                bc2,
            };
            let (m, v) = if var.device().is_cpu() && var.dtype() == sdt {
                m.inplace_op2(&g, &Moment::first(clip))?;
                v.inplace_op2(&g, &Moment::second(clip))?;
                drop(g);
                var.as_tensor().inplace_op3(&m, &v, &u)?;
                (m, v)
            } else {
                let g = (g * clip)?;
                let m = ((m * BETA1)? + (&g * (1.0 - BETA1))?)?;
                let v = ((v * BETA2)? + (g.sqr()? * (1.0 - BETA2))?)?;
                drop(g);
                let p = var.as_tensor().to_dtype(sdt)?;
                let upd = ((&m / bc1)?.div(&((&v / bc2)?.sqrt()? + EPS)?))?;
                let new = ((p * (1.0 - lr * u.decay))? - (upd * lr)?)?;
                var.set(&new.to_dtype(model.dtype)?)?;
                (m, v)
            };
            self.state.insert(name.clone(), (m, v));
        }
        Ok(norm)
    }
}

/// A contiguous tensor's elements.
fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<Slice<'a>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("adamw: a non-contiguous tensor");
    };
    Ok(match s {
        CpuStorage::F32(v) => Slice::F32(&v[a..b]),
        CpuStorage::F64(v) => Slice::F64(&v[a..b]),
        _ => candle_core::bail!("adamw: a tensor in f32 or f64"),
    })
}

enum Slice<'a> {
    F32(&'a [f32]),
    F64(&'a [f64]),
}

/// `Σ x²` of a contiguous tensor, `(1,)` in its dtype (summed in f64).
struct SquaredSum;

impl CustomOp1 for SquaredSum {
    fn name(&self) -> &'static str {
        "squared-sum"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match slice(s, l)? {
            Slice::F32(x) => CpuStorage::F32(vec![lanes(x, |a| (a * a) as f64) as f32]),
            Slice::F64(x) => CpuStorage::F64(vec![lanes(x, |a| a * a)]),
        };
        Ok((out, Shape::from(1)))
    }
}

/// `Σ f(x)` in eight lanes (the loop vectorizes).
fn lanes<T: Copy>(x: &[T], f: impl Fn(T) -> f64) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = x.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&a| f(a)).sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += f(c[i]);
        }
    }
    acc.iter().sum::<f64>() + tail
}

/// A moment updated in place from the gradient: `m ← β·m + (1−β)·(clip·g)`, or with
/// `square` `v ← β·v + (1−β)·(clip·g)²`.
struct Moment {
    beta: f64,
    clip: f64,
    square: bool,
}

impl Moment {
    fn first(clip: f64) -> Moment {
        Moment {
            beta: BETA1,
            clip,
            square: false,
        }
    }

    fn second(clip: f64) -> Moment {
        Moment {
            beta: BETA2,
            clip,
            square: true,
        }
    }

    fn apply<T: candle_core::WithDType + Send + Sync>(&self, m: &mut [T], g: &[T]) {
        let (b, c, one) = (
            T::from_f64(self.beta),
            T::from_f64(self.clip),
            T::from_f64(1.0 - self.beta),
        );
        m.par_chunks_mut(PAR_CHUNK)
            .zip(g.par_chunks(PAR_CHUNK))
            .for_each(|(m, g)| {
                for (m, &g) in m.iter_mut().zip(g) {
                    let g = g * c;
                    *m = b * *m + one * if self.square { g * g } else { g };
                }
            });
    }
}

/// A tensor's elements, mutable.
fn slice_mut<'a>(s: &'a mut CpuStorage, l: &Layout) -> Result<SliceMut<'a>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("adamw: a non-contiguous tensor");
    };
    Ok(match s {
        CpuStorage::F32(v) => SliceMut::F32(&mut v[a..b]),
        CpuStorage::F64(v) => SliceMut::F64(&mut v[a..b]),
        _ => candle_core::bail!("adamw: a tensor in f32 or f64"),
    })
}

enum SliceMut<'a> {
    F32(&'a mut [f32]),
    F64(&'a mut [f64]),
}

fn mismatch() -> candle_core::Error {
    candle_core::Error::Msg("adamw: a moment in another dtype than its gradient".into())
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(&self, m: &mut CpuStorage, lm: &Layout, g: &CpuStorage, lg: &Layout) -> Result<()> {
        match (slice_mut(m, lm)?, slice(g, lg)?) {
            (SliceMut::F32(m), Slice::F32(g)) => self.apply(m, g),
            (SliceMut::F64(m), Slice::F64(g)) => self.apply(m, g),
            _ => return Err(mismatch()),
        }
        Ok(())
    }
}

/// The parameter updated in place from its moments:
/// `p ← p·(1 − lr·λ) − lr·(m/bc₁) / (√(v/bc₂) + ε)`.
struct Update {
    lr: f64,
    decay: f64,
    bc1: f64,
    bc2: f64,
}

impl Update {
    fn apply<T: candle_core::WithDType + num_like::Sqrt + Send + Sync>(
        &self,
        p: &mut [T],
        m: &[T],
        v: &[T],
    ) {
        let keep = T::from_f64(1.0 - self.lr * self.decay);
        let (lr1, ibc2, eps) = (
            T::from_f64(self.lr / self.bc1),
            T::from_f64(1.0 / self.bc2),
            T::from_f64(EPS),
        );
        p.par_chunks_mut(PAR_CHUNK)
            .zip(m.par_chunks(PAR_CHUNK).zip(v.par_chunks(PAR_CHUNK)))
            .for_each(|(p, (m, v))| {
                for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                    *p = *p * keep - lr1 * m / ((v * ibc2).sqrt() + eps);
                }
            });
    }
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        p: &mut CpuStorage,
        lp: &Layout,
        m: &CpuStorage,
        lm: &Layout,
        v: &CpuStorage,
        lv: &Layout,
    ) -> Result<()> {
        match (slice_mut(p, lp)?, slice(m, lm)?, slice(v, lv)?) {
            (SliceMut::F32(p), Slice::F32(m), Slice::F32(v)) => self.apply(p, m, v),
            (SliceMut::F64(p), Slice::F64(m), Slice::F64(v)) => self.apply(p, m, v),
            _ => return Err(mismatch()),
        }
        Ok(())
    }
}

/// The square root of the two float types the update runs in.
mod num_like {
    pub trait Sqrt {
        fn sqrt(self) -> Self;
    }

    impl Sqrt for f32 {
        fn sqrt(self) -> f32 {
            f32::sqrt(self)
        }
    }

    impl Sqrt for f64 {
        fn sqrt(self) -> f64 {
            f64::sqrt(self)
        }
    }
}
