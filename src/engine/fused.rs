//! Graph nodes of candle's with their backward, each replacing a chain of tensor ops
//! whose every step was one more pass over the activation and one more tensor kept for
//! backward: the attention's softmax, RMSNorm (alone, and with its weight in
//! [`scaled_norm`]), the rotary embedding and nanochat's `relu(x)²` ([`relu_sqr`]).
//!
//! **The attention's softmax**, `softmax(scale·S + causal mask)` over each row of the raw
//! scores `S = q·kᵀ` `(B, H, T, T)`. Built from tensor ops (`* scale`, the mask's add,
//! `candle_nn::ops::softmax`: max, subtract, exp, sum, divide) it kept five score-sized
//! tensors in the graph and its backward made about eight more: at sequence 512 the
//! largest tensors of a step. The node keeps its input and its output. On the CPU forward
//! is one pass over each row's visible columns (key `j` of query `i` for `j ≤ i`, and with
//! a sliding window `i − j < window`): the row's maximum, `exp` (the branch-free f32 one of
//! [`super::xent`]) and the normalization; the masked columns are exact zeros and are never
//! exponentiated (glibc's `expf` took its slow underflow path on every `−1e9` of the
//! additive mask). Backward is `scale·p·(g − Σ g·p)` over the same columns.
//!
//! **RMSNorm**, `x / sqrt(mean(x²) + eps)` over the last dimension: the node keeps its
//! input and output (the chain kept `x²`, the mean, `+eps`, the root and the quotient);
//! backward is `r·(g − y·mean(g·y))` with each row's `r = 1/sqrt(mean(x²) + eps)` computed
//! again from `x`.
//!
//! **RoPE** on `(B, H, T, D)` with the tables `cos`, `sin` `(T, D/2)`: `(x₁·cos ∓ x₂·sin,
//! x₂·cos ± x₁·sin)` in transformers' sense (upper signs) or nanochat's. The node keeps its
//! input, whose rows it reads in place (q and k arrive as transposed views of their
//! projections, with contiguous rows), and its output (the chain kept four half products,
//! two sums and their concatenation); its backward is the rotation the other way.
//!
//! On the CPU the rows are split over rayon's threads. On CUDA each node runs its
//! arithmetic as tensor ops outside the graph (for the softmax candle's fused
//! `softmax_last_dim`), whose temporaries are freed within each pass, and hands the
//! result to the node ([`Precomputed`]): the graph keeps the same two tensors.

use super::xent::{lane_sum, Float};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D,
};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// `f` over two CPU storages of one float dtype, with `T` the element type and `A` the
/// arithmetic type (f32; f64 for f64 storages). Defined before the submodules that use it.
macro_rules! by_dtype {
    ($x:expr, $w:expr, $name:literal, |$t:ident, $a:ident| $body:expr) => {
        match ($x, $w) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32({
                type $t = f32;
                type $a = f32;
                $body
            }),
            (CpuStorage::F16(_), CpuStorage::F16(_)) => CpuStorage::F16({
                type $t = half::f16;
                type $a = f32;
                $body
            }),
            (CpuStorage::BF16(_), CpuStorage::BF16(_)) => CpuStorage::BF16({
                type $t = half::bf16;
                type $a = f32;
                $body
            }),
            (CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64({
                type $t = f64;
                type $a = f64;
                $body
            }),
            _ => candle_core::bail!(concat!($name, ": inputs of one float dtype")),
        }
    };
}

/// The elements of a contiguous tensor's CPU storage; `what` names the tensor in the error.
fn contiguous<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    what: &str,
) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<T>()?[a..b]),
        None => candle_core::bail!("{what}: not contiguous"),
    }
}

mod relu_sqr;
mod scaled_norm;
pub use relu_sqr::relu_sqr;
pub use scaled_norm::rms_norm_scaled;

/// Rows handed to one rayon task at least (a row is a few hundred elements).
const MIN_ROWS: usize = 64;

/// `softmax(scale·s + mask)` over the last dimension of the raw scores `s` `(B, H, T, T)`
/// (f32 or f64), as one node with its backward; `mask` is the additive causal mask
/// `(T, T)` of [`super::model::causal_mask`] with the same `window`, read off the CPU only.
pub fn causal_softmax(s: &Tensor, scale: f64, window: usize, mask: &Tensor) -> Result<Tensor> {
    let s = s.contiguous()?;
    let ready = Precomputed::default();
    if !s.device().is_cpu() {
        ready.put(candle_nn::ops::softmax_last_dim(
            &(s.detach() * scale)?.broadcast_add(mask)?,
        )?)?;
    }
    let op = CausalSoftmax {
        scale,
        window,
        ready,
    };
    s.apply_op1_arc(Arc::new(Box::new(op)))
}

/// `x / sqrt(mean(x²) + eps)` over the last dimension of `x` (f32 or f64), as one node
/// with its backward.
pub fn rms_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    let x = rows_in_place(x)?;
    let ready = Precomputed::default();
    if !x.device().is_cpu() {
        let d = x.detach();
        ready.put(d.broadcast_div(&(d.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?)?)?;
    }
    x.apply_op1_arc(Arc::new(Box::new(RmsNorm { eps, ready })))
}

/// Off the CPU, a node's output computed by tensor ops before the node runs; the node's
/// `cuda_fwd` takes it (one copy into the node's own storage, then it is freed).
#[derive(Default)]
struct Precomputed(Mutex<Option<Tensor>>);

impl Precomputed {
    fn put(&self, t: Tensor) -> Result<()> {
        *self.0.lock().map_err(|_| poisoned())? = Some(t);
        Ok(())
    }

    fn take_cuda(&self, name: &str) -> Result<(CudaStorage, Shape)> {
        let Some(t) = self.0.lock().map_err(|_| poisoned())?.take() else {
            candle_core::bail!("{name}: no output computed for this device");
        };
        let (storage, l) = t.storage_and_layout();
        match &*storage {
            candle_core::Storage::Cuda(c) => Ok((c.try_clone(l)?, l.shape().clone())),
            _ => candle_core::bail!("{name}: the output is on another device"),
        }
    }
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("fused op: a poisoned lock".into())
}

struct CausalSoftmax {
    scale: f64,
    window: usize,
    ready: Precomputed,
}

struct RmsNorm {
    eps: f64,
    ready: Precomputed,
}

/// Key columns `[lo, hi)` that query row `i` sees.
#[inline(always)]
fn visible(i: usize, window: usize) -> (usize, usize) {
    let lo = if window > 0 {
        (i + 1).saturating_sub(window)
    } else {
        0
    };
    (lo, i + 1)
}

/// A contiguous `(B, H, T, T)` slice and `T`.
fn scores<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> Result<(&'a [T], usize)> {
    let (_, _, t, t2) = l.shape().dims4()?;
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("causal softmax: non-contiguous scores");
    };
    if t != t2 {
        candle_core::bail!("causal softmax: scores of {t} queries by {t2} keys");
    }
    Ok((&s.as_slice::<T>()?[a..b], t))
}

/// The rows (the last dimension) of a tensor whose last dimension is contiguous in
/// memory, the rows themselves at any strides (a transposed view of a projection's heads):
/// read in place, without a contiguous copy.
struct Rows<'a, T> {
    data: &'a [T],
    width: usize,
    count: usize,
    /// The leading dimensions and their strides, innermost last.
    lead: Vec<(usize, usize)>,
    offset: usize,
}

impl<'a, T: candle_core::WithDType> Rows<'a, T> {
    fn new(s: &'a CpuStorage, l: &Layout) -> Result<Rows<'a, T>> {
        let (dims, strides) = (l.dims(), l.stride());
        let Some((&width, lead)) = dims.split_last() else {
            candle_core::bail!("fused op: a scalar input");
        };
        if width > 1 && strides.last() != Some(&1) {
            candle_core::bail!("fused op: rows not contiguous in memory");
        }
        Ok(Rows {
            data: s.as_slice::<T>()?,
            width,
            count: lead.iter().product(),
            lead: lead.iter().copied().zip(strides.iter().copied()).collect(),
            offset: l.start_offset(),
        })
    }

    /// Row `r` in row-major order of the leading dimensions.
    #[inline(always)]
    fn row(&self, mut r: usize) -> &'a [T] {
        let mut at = self.offset;
        for &(dim, stride) in self.lead.iter().rev() {
            at += (r % dim) * stride;
            r /= dim;
        }
        &self.data[at..at + self.width]
    }
}

/// `x` itself where its last dimension is contiguous in memory, else a contiguous copy.
fn rows_in_place(x: &Tensor) -> Result<Tensor> {
    match x.stride().last() {
        Some(1) => Ok(x.clone()),
        _ => x.contiguous(),
    }
}

fn forward<T: Float>(s: &[T], t: usize, scale: f64, window: usize) -> Vec<T> {
    let scale = T::from_f64(scale);
    let mut out = vec![T::from_f64(0.0); s.len()];
    out.par_chunks_mut(t)
        .zip(s.par_chunks(t))
        .enumerate()
        .with_min_len(MIN_ROWS)
        .for_each(|(r, (p, row))| {
            let (lo, hi) = visible(r % t, window);
            let (p, row) = (&mut p[lo..hi], &row[lo..hi]);
            let mut m = row[0];
            for &z in &row[1..] {
                if z > m {
                    m = z;
                }
            }
            // `scale` is positive: the largest scaled score is the scaled largest.
            let m = m * scale;
            for (e, &z) in p.iter_mut().zip(row) {
                *e = (z * scale - m).exp();
            }
            let inv = T::from_f64(1.0 / lane_sum(p, |e| e));
            p.iter_mut().for_each(|e| *e *= inv);
        });
    out
}

/// `Σ p·g` over a row in eight lanes, added in f64.
#[inline(always)]
fn dot<T: Float>(p: &[T], g: &[T]) -> f64 {
    let mut acc = [T::from_f64(0.0); 8];
    let (pc, gc) = (p.chunks_exact(8), g.chunks_exact(8));
    let tail: f64 = pc
        .remainder()
        .iter()
        .zip(gc.remainder())
        .map(|(&a, &b)| (a * b).to_f64())
        .sum();
    for (a, b) in pc.zip(gc) {
        for i in 0..8 {
            acc[i] += a[i] * b[i];
        }
    }
    acc.iter().map(|a| a.to_f64()).sum::<f64>() + tail
}

fn backward<T: Float>(p: &[T], g: &[T], t: usize, scale: f64, window: usize) -> Vec<T> {
    let mut out = vec![T::from_f64(0.0); p.len()];
    out.par_chunks_mut(t)
        .zip(p.par_chunks(t).zip(g.par_chunks(t)))
        .enumerate()
        .with_min_len(MIN_ROWS)
        .for_each(|(r, (d, (p, g)))| {
            let (lo, hi) = visible(r % t, window);
            let (d, p, g) = (&mut d[lo..hi], &p[lo..hi], &g[lo..hi]);
            let pg = T::from_f64(dot(p, g));
            let scale = T::from_f64(scale);
            for ((d, &p), &g) in d.iter_mut().zip(p).zip(g) {
                *d = scale * p * (g - pg);
            }
        });
    out
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => {
                let (s, t) = scores::<f32>(s, l)?;
                CpuStorage::F32(forward(s, t, self.scale, self.window))
            }
            CpuStorage::F64(_) => {
                let (s, t) = scores::<f64>(s, l)?;
                CpuStorage::F64(forward(s, t, self.scale, self.window))
            }
            _ => candle_core::bail!("causal softmax: scores in f32 or f64"),
        };
        Ok((out, l.shape().clone()))
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.ready.take_cuda(self.name())
    }

    fn bwd(&self, _s: &Tensor, p: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (p, g) = (p.detach(), g.detach().contiguous()?);
        if !p.device().is_cpu() {
            let pg = (&g * &p)?.sum_keepdim(D::Minus1)?;
            return Ok(Some(((g.broadcast_sub(&pg)? * p)? * self.scale)?));
        }
        let grad = SoftmaxGrad {
            scale: self.scale,
            window: self.window,
        };
        Ok(Some(p.apply_op2_no_bwd(&g, &grad)?))
    }
}

/// The CPU's backward: `scale·p·(g − Σ g·p)` over each row's visible columns.
struct SoftmaxGrad {
    scale: f64,
    window: usize,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "causal-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        p: &CpuStorage,
        lp: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match p {
            CpuStorage::F32(_) => {
                let ((p, t), (g, _)) = (scores::<f32>(p, lp)?, scores::<f32>(g, lg)?);
                CpuStorage::F32(backward(p, g, t, self.scale, self.window))
            }
            CpuStorage::F64(_) => {
                let ((p, t), (g, _)) = (scores::<f64>(p, lp)?, scores::<f64>(g, lg)?);
                CpuStorage::F64(backward(p, g, t, self.scale, self.window))
            }
            _ => candle_core::bail!("causal softmax: scores in f32 or f64"),
        };
        Ok((out, lp.shape().clone()))
    }
}

/// Each row's `1/sqrt(mean(x²) + eps)`.
#[inline(always)]
fn inv_rms<T: Float>(row: &[T], eps: f64) -> T {
    T::from_f64(1.0 / (lane_sum(row, |x| x * x) / row.len() as f64 + eps).sqrt())
}

fn rms_forward<T: Float>(x: &Rows<T>, eps: f64) -> Vec<T> {
    let c = x.width;
    let mut out = vec![T::from_f64(0.0); x.count * c];
    out.par_chunks_mut(c)
        .enumerate()
        .with_min_len(MIN_ROWS)
        .for_each(|(i, y)| {
            let row = x.row(i);
            let r = inv_rms(row, eps);
            for (y, &x) in y.iter_mut().zip(row) {
                *y = x * r;
            }
        });
    out
}

fn rms_backward<T: Float>(x: &Rows<T>, y: &Rows<T>, g: &Rows<T>, eps: f64) -> Vec<T> {
    let c = x.width;
    let mut out = vec![T::from_f64(0.0); x.count * c];
    out.par_chunks_mut(c)
        .enumerate()
        .with_min_len(MIN_ROWS)
        .for_each(|(i, d)| {
            let (x, y, g) = (x.row(i), y.row(i), g.row(i));
            let r = inv_rms(x, eps);
            let m = T::from_f64(dot(g, y) / c as f64);
            for ((d, &y), &g) in d.iter_mut().zip(y).zip(g) {
                *d = r * (g - y * m);
            }
        });
    out
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = match x {
            CpuStorage::F32(_) => CpuStorage::F32(rms_forward(&Rows::<f32>::new(x, l)?, self.eps)),
            CpuStorage::F64(_) => CpuStorage::F64(rms_forward(&Rows::<f64>::new(x, l)?, self.eps)),
            _ => candle_core::bail!("rms norm: an input in f32 or f64"),
        };
        Ok((out, Shape::from(l.dims())))
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.ready.take_cuda(self.name())
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (x, y, g) = (x.detach(), y.detach(), g.detach().contiguous()?);
        if !x.device().is_cpu() {
            let r = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
                .sqrt()?
                .recip()?;
            let m = (&g * &y)?.mean_keepdim(D::Minus1)?;
            return Ok(Some(
                g.broadcast_sub(&y.broadcast_mul(&m)?)?.broadcast_mul(&r)?,
            ));
        }
        Ok(Some(x.apply_op3_no_bwd(
            &y,
            &g,
            &RmsNormGrad { eps: self.eps },
        )?))
    }
}

/// The CPU's backward of [`RmsNorm`] from its input, output and the output's gradient.
struct RmsNormGrad {
    eps: f64,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        y: &CpuStorage,
        ly: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = match x {
            CpuStorage::F32(_) => {
                let (x, y, g) = (Rows::new(x, lx)?, Rows::new(y, ly)?, Rows::new(g, lg)?);
                CpuStorage::F32(rms_backward::<f32>(&x, &y, &g, self.eps))
            }
            CpuStorage::F64(_) => {
                let (x, y, g) = (Rows::new(x, lx)?, Rows::new(y, ly)?, Rows::new(g, lg)?);
                CpuStorage::F64(rms_backward::<f64>(&x, &y, &g, self.eps))
            }
            _ => candle_core::bail!("rms norm: an input in f32 or f64"),
        };
        Ok((out, Shape::from(lx.dims())))
    }
}

/// RoPE on `x` `(B, H, T, D)` (any float dtype, any layout) with the tables `cos`, `sin`
/// `(T, D/2)` of `x`'s dtype: transformers' sense (`hf`) or nanochat's, as one node with
/// its backward.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, hf: bool) -> Result<Tensor> {
    let x = rows_in_place(x)?;
    let (_, _, t, d) = x.dims4()?;
    if d % 2 != 0 || cos.dims2()? != (t, d / 2) || sin.dims2()? != (t, d / 2) {
        candle_core::bail!(
            "rope: tables {:?} and {:?} for rows of {d} at {t} positions",
            cos.dims(),
            sin.dims()
        );
    }
    let sense = if hf { 1.0 } else { -1.0 };
    let ready = Precomputed::default();
    if !x.device().is_cpu() {
        ready.put(rotate_by_ops(&x.detach(), cos, sin, sense)?)?;
    }
    let op = Rope {
        cos: cos.clone(),
        sin: sin.clone(),
        sense,
        ready,
    };
    x.apply_op1_arc(Arc::new(Box::new(op)))
}

/// The rotation as tensor ops: `(x₁·cos − s·x₂·sin, x₂·cos + s·x₁·sin)` for the sense `s`.
fn rotate_by_ops(x: &Tensor, cos: &Tensor, sin: &Tensor, sense: f64) -> Result<Tensor> {
    let d = x.dim(3)?;
    let (x1, x2) = (x.narrow(3, 0, d / 2)?, x.narrow(3, d / 2, d / 2)?);
    let y1 = (x1.broadcast_mul(cos)? - (x2.broadcast_mul(sin)? * sense)?)?;
    let y2 = (x2.broadcast_mul(cos)? + (x1.broadcast_mul(sin)? * sense)?)?;
    Tensor::cat(&[y1, y2], 3)
}

struct Rope {
    cos: Tensor,
    sin: Tensor,
    /// +1 in transformers' sense, −1 in nanochat's.
    sense: f64,
    ready: Precomputed,
}

/// Each row `(D)` of a `(B, H, T, D)` rotated by its position's angles (`cos`, `sin`:
/// `(T, D/2)`, checked by [`rope`]).
fn rotate<T: candle_core::WithDType>(
    x: &Rows<T>,
    cos: &[T],
    sin: &[T],
    t: usize,
    sense: f64,
) -> Vec<T> {
    let half = cos.len() / t.max(1);
    let s = T::from_f64(sense);
    let mut out = vec![T::from_f64(0.0); x.count * x.width];
    out.par_chunks_mut(2 * half)
        .enumerate()
        .with_min_len(MIN_ROWS)
        .for_each(|(r, y)| {
            let pos = (r % t) * half;
            let (c, sn) = (&cos[pos..pos + half], &sin[pos..pos + half]);
            let (x1, x2) = x.row(r).split_at(half);
            let (y1, y2) = y.split_at_mut(half);
            for i in 0..half {
                y1[i] = x1[i] * c[i] - s * x2[i] * sn[i];
                y2[i] = x2[i] * c[i] + s * x1[i] * sn[i];
            }
        });
    out
}

/// A contiguous table's elements in `T`.
fn table<T: candle_core::WithDType>(t: &Tensor) -> Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

impl Rope {
    /// The rotation of a `(B, H, T, D)` storage on the CPU by `sense`, its rows read in place.
    fn cpu(&self, x: &CpuStorage, l: &Layout, sense: f64) -> Result<CpuStorage> {
        let (_, _, t, _) = l.shape().dims4()?;
        macro_rules! rotated {
            ($variant:ident, $ty:ty) => {{
                let (c, s) = (table::<$ty>(&self.cos)?, table::<$ty>(&self.sin)?);
                CpuStorage::$variant(rotate(&Rows::<$ty>::new(x, l)?, &c, &s, t, sense))
            }};
        }
        Ok(match x {
            CpuStorage::F32(_) => rotated!(F32, f32),
            CpuStorage::F64(_) => rotated!(F64, f64),
            CpuStorage::F16(_) => rotated!(F16, half::f16),
            CpuStorage::BF16(_) => rotated!(BF16, half::bf16),
            _ => candle_core::bail!("rope: a float input"),
        })
    }
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((self.cpu(x, l, self.sense)?, Shape::from(l.dims())))
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.ready.take_cuda(self.name())
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let g = g.detach().contiguous()?;
        if !g.device().is_cpu() {
            return Ok(Some(rotate_by_ops(&g, &self.cos, &self.sin, -self.sense)?));
        }
        let back = RopeGrad(self);
        Ok(Some(g.apply_op1_no_bwd(&back)?))
    }
}

/// The CPU's backward of [`Rope`]: the rotation the other way.
struct RopeGrad<'a>(&'a Rope);

impl CustomOp1 for RopeGrad<'_> {
    fn name(&self) -> &'static str {
        "rope-grad"
    }

    fn cpu_fwd(&self, g: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        Ok((self.0.cpu(g, l, -self.0.sense)?, Shape::from(l.dims())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::model::causal_mask;
    use candle_core::{DType, Device, Var, D};

    /// The composed softmax the node replaces.
    fn composed(s: &Tensor, scale: f64, mask: &Tensor) -> Result<Tensor> {
        candle_nn::ops::softmax(&(s * scale)?.broadcast_add(mask)?, D::Minus1)
    }

    pub(super) fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    fn check(dtype: DType, window: usize, tol: f64) {
        let dev = Device::Cpu;
        let (t, scale) = (13, 0.35);
        let mask = causal_mask(t, window, dtype, &dev).unwrap();
        let s0 = (Tensor::randn(0f32, 3.0, (2, 3, t, t), &dev).unwrap())
            .to_dtype(dtype)
            .unwrap();
        let w = Tensor::randn(0f32, 1.0, (2, 3, t, t), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let (a, b) = (
            Var::from_tensor(&s0).unwrap(),
            Var::from_tensor(&s0).unwrap(),
        );
        let pa = causal_softmax(a.as_tensor(), scale, window, &mask).unwrap();
        let pb = composed(b.as_tensor(), scale, &mask).unwrap();
        assert!(max_diff(&pa, &pb) < tol, "forward");
        let ga = (pa * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (pb * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let (da, db) = (
            ga.get(a.as_tensor()).unwrap(),
            gb.get(b.as_tensor()).unwrap(),
        );
        assert!(max_diff(da, db) < tol, "backward");
    }

    #[test]
    fn the_fused_softmax_and_its_gradient_equal_the_composed_ones() {
        for window in [0, 4] {
            check(DType::F32, window, 1e-6);
            check(DType::F64, window, 1e-12);
        }
    }

    #[test]
    fn the_fused_rms_norm_and_its_gradient_equal_the_composed_ones() {
        let dev = Device::Cpu;
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
            let x0 = Tensor::randn(0f32, 2.0, (3, 5, 24), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let w = Tensor::randn(0f32, 1.0, (3, 5, 24), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let (a, b) = (
                Var::from_tensor(&x0).unwrap(),
                Var::from_tensor(&x0).unwrap(),
            );
            // A transposed view: the node reads its rows in place.
            let ya = rms_norm(&a.as_tensor().transpose(0, 1).unwrap(), 1e-6)
                .unwrap()
                .transpose(0, 1)
                .unwrap();
            let xb = b.as_tensor();
            let ms = xb.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
            let yb = xb
                .broadcast_div(&(ms + 1e-6).unwrap().sqrt().unwrap())
                .unwrap();
            assert!(max_diff(&ya, &yb) < tol, "forward");
            let ga = (ya * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (yb * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let (da, db) = (
                ga.get(a.as_tensor()).unwrap(),
                gb.get(b.as_tensor()).unwrap(),
            );
            assert!(max_diff(da, db) < tol, "backward");
        }
    }

    #[test]
    fn the_fused_rope_and_its_gradient_equal_the_composed_ones() {
        let dev = Device::Cpu;
        let (t, half) = (7, 4);
        let angles: Vec<f64> = (0..t * half).map(|i| 0.3 * i as f64).collect();
        let mk = |f: fn(f64) -> f64| {
            Tensor::from_vec(
                angles.iter().map(|&a| f(a)).collect::<Vec<_>>(),
                (t, half),
                &dev,
            )
        };
        let (cos, sin) = (mk(f64::cos).unwrap(), mk(f64::sin).unwrap());
        let x0 = Tensor::randn(0f64, 1.0, (2, t, 3, 2 * half), &dev).unwrap();
        let w = Tensor::randn(0f64, 1.0, (2, 3, t, 2 * half), &dev).unwrap();
        for hf in [true, false] {
            let (a, b) = (
                Var::from_tensor(&x0).unwrap(),
                Var::from_tensor(&x0).unwrap(),
            );
            // Transposed views, as q and k arrive.
            let ya = rope(&a.as_tensor().transpose(1, 2).unwrap(), &cos, &sin, hf).unwrap();
            let sense = if hf { 1.0 } else { -1.0 };
            let yb =
                rotate_by_ops(&b.as_tensor().transpose(1, 2).unwrap(), &cos, &sin, sense).unwrap();
            assert!(max_diff(&ya, &yb) < 1e-12, "forward");
            let ga = (ya * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = (yb * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let (da, db) = (
                ga.get(a.as_tensor()).unwrap(),
                gb.get(b.as_tensor()).unwrap(),
            );
            assert!(max_diff(da, db) < 1e-12, "backward");
        }
    }

    #[test]
    fn masked_columns_are_exact_zeros() {
        let dev = Device::Cpu;
        let s = Tensor::randn(0f32, 1.0, (1, 1, 6, 6), &dev).unwrap();
        let mask = causal_mask(6, 2, DType::F32, &dev).unwrap();
        let p = causal_softmax(&s, 1.0, 2, &mask).unwrap();
        let p = p.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for i in 0..6 {
            for j in 0..6 {
                let seen = j <= i && i - j < 2;
                assert_eq!(p[i * 6 + j] == 0.0, !seen, "({i}, {j})");
            }
        }
    }
}
