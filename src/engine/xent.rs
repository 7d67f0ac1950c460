//! The loss chunk: the head's matmul and the cross-entropy over the vocabulary as one
//! node of candle's graph. Forward computes the logits and the losses; backward the
//! logits' gradient and from it the hidden states' and the head's. No chunk-sized tensor
//! passes through candle's gradient store (which adds each gradient to a zero tensor of
//! its size), and the head's gradient goes into a running sum outside it
//! ([`super::head_grad`]). The same loss built from candle's tensor ops keeps every
//! intermediate (the logits, `/cap`, `tanh`, `·cap`, the shifted and exponentiated copies)
//! and their gradients, sixteen f32 copies (`docs/performance.md`).
//!
//! The training step takes each chunk's backward right after its forward
//! ([`super::step::loss_stage_weighted`]), so the op keeps the forward's logits for its
//! backward rather than multiply the head again (a backward that finds them taken, a
//! second backward of the same graph, computes them again). On the CPU their gradient is
//! written over them: a chunk holds one f32 copy of its logits, and under 16-bit compute
//! its gradient's 16-bit copy; elsewhere the gradient is a second copy.
//!
//! On the CPU the soft-cap, log-sum-exp and the target's logit are one pass over each
//! row and the gradient one more ([`CrossEntropy`], [`CrossEntropyGrad`]); on other
//! devices the same arithmetic runs as tensor ops outside the graph, whose temporaries
//! are freed within each pass.

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, DType, InplaceOp3, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;
use std::sync::Mutex;

use super::head_grad::HeadGradSum;

/// Where the loss chunk's backward puts the head's gradient.
#[derive(Clone)]
pub enum HeadGrad {
    /// The head is frozen.
    None,
    /// Into candle's gradient store, as `w`'s gradient.
    Store,
    /// Added into a running sum outside the store; `w` gets none.
    Sum(HeadGradSum),
}

/// The cross-entropy of each row of `h·wᵀ` (`h` `(R, C)`, the head `w` `(V, C)`, both in
/// the compute dtype) against `targets` `(R, 1)`, computed in at least f32, `(R, 1)`; with
/// `softcap`, of the logits `cap·tanh(z/cap)`. `head` says where `w`'s gradient goes.
pub fn head_losses(
    h: &Tensor,
    w: &Tensor,
    head: HeadGrad,
    targets: &Tensor,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let targets = targets.to_dtype(DType::U32)?.contiguous()?;
    let z = logits(h, w)?;
    let value = losses(&z, &targets, softcap)?;
    // candle's backward wants a gradient for every node it walks through: a head whose
    // gradient goes into a sum (a 16-bit cast of the master weight, say) stays outside.
    let w = match head {
        HeadGrad::Sum(_) => &w.detach(),
        _ => w,
    };
    let op = HeadLoss {
        targets,
        softcap,
        head,
        dtype: z.dtype(),
        kept: Mutex::new(Some(z)),
    };
    value + h.apply_op2(w, op)?
}

/// `h·wᵀ` outside the graph, in at least f32.
fn logits(h: &Tensor, w: &Tensor) -> Result<Tensor> {
    super::model::wide(&super::matmul::matmul(&h.detach(), &w.detach().t()?)?)
}

/// The per-row losses of the logits `z`.
fn losses(z: &Tensor, targets: &Tensor, softcap: Option<f64>) -> Result<Tensor> {
    if z.device().is_cpu() {
        return z.apply_op2_no_bwd(targets, &CrossEntropy { softcap });
    }
    losses_by_ops(z, targets, softcap)
}

/// [`losses`] as tensor ops.
fn losses_by_ops(z: &Tensor, targets: &Tensor, softcap: Option<f64>) -> Result<Tensor> {
    let (c, _) = capped(z, softcap)?;
    lse(&c)? - c.gather(targets, 1)?
}

/// The logits' gradient `g·(softmax(c) − onehot(target))·c'(z)` for the per-row loss
/// gradients `g` `(R, 1)`. On the CPU it is written over `z` (whose only handle the
/// caller gives up), so the chunk holds one copy of its logits, not two.
fn logits_grad(z: Tensor, targets: &Tensor, g: &Tensor, softcap: Option<f64>) -> Result<Tensor> {
    let g = g.to_dtype(z.dtype())?.contiguous()?;
    if z.device().is_cpu() {
        z.inplace_op3(targets, &g, &CrossEntropyGrad { softcap })?;
        return Ok(z);
    }
    logits_grad_by_ops(&z, targets, &g, softcap)
}

/// [`logits_grad`] as tensor ops.
fn logits_grad_by_ops(
    z: &Tensor,
    targets: &Tensor,
    g: &Tensor,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (c, d) = capped(z, softcap)?;
    let p = c.broadcast_sub(&lse(&c)?)?.exp()?;
    drop(c);
    let ones = Tensor::ones(targets.shape(), p.dtype(), p.device())?;
    let p = p.scatter_add(targets, &ones.neg()?, 1)?;
    let p = match d {
        Some(d) => (p * d)?,
        None => p,
    };
    p.broadcast_mul(g)
}

/// `cap·tanh(z/cap)` and its derivative `1 − tanh²`, or `z` and none.
fn capped(z: &Tensor, softcap: Option<f64>) -> Result<(Tensor, Option<Tensor>)> {
    match softcap {
        Some(c) => {
            let t = (z / c)?.tanh()?;
            let d = t.sqr()?.affine(-1.0, 1.0)?;
            Ok(((t * c)?, Some(d)))
        }
        None => Ok((z.clone(), None)),
    }
}

/// The logits `cap·tanh(z/cap)` of the raw logits `z`, or `z`.
pub(crate) fn softcapped(z: &Tensor, softcap: Option<f64>) -> Result<Tensor> {
    match softcap {
        Some(c) => (z / c)?.tanh()? * c,
        None => Ok(z.clone()),
    }
}

/// log Σ exp over each row of `c`, `(R, 1)`.
fn lse(c: &Tensor) -> Result<Tensor> {
    let m = c.max_keepdim(1)?;
    c.broadcast_sub(&m)?.exp()?.sum_keepdim(1)?.log()? + m
}

/// Zero in forward, of the losses' dtype; in backward the gradients of `h` and `w` from
/// the logits' gradient, taken of the logits the forward kept (on the CPU their storage
/// becomes the gradient), or of the logits computed again where they were taken already.
struct HeadLoss {
    targets: Tensor,
    softcap: Option<f64>,
    head: HeadGrad,
    dtype: DType,
    kept: Mutex<Option<Tensor>>,
}

impl HeadLoss {
    fn zeros<S>(&self, s: &S, l: &Layout) -> Result<(S, Shape)>
    where
        S: BackendStorage,
        S::Device: BackendDevice<Storage = S>,
    {
        let shape = Shape::from((l.shape().dims2()?.0, 1));
        Ok((s.device().zeros_impl(&shape, self.dtype)?, shape))
    }
}

impl CustomOp2 for HeadLoss {
    fn name(&self) -> &'static str {
        "head-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        h: &CpuStorage,
        l: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.zeros(h, l)
    }

    fn cuda_fwd(
        &self,
        h: &CudaStorage,
        l: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.zeros(h, l)
    }

    fn bwd(
        &self,
        h: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let kept = self.kept.lock().ok().and_then(|mut k| k.take());
        let z = match kept {
            Some(z) => z,
            None => logits(h, w)?,
        };
        let dz = logits_grad(z, &self.targets, &g.detach(), self.softcap)?;
        let dz = dz.to_dtype(h.dtype())?;
        let (h, w) = (h.detach(), w.detach());
        let dh = super::matmul::matmul(&dz, &w)?;
        let dw = match &self.head {
            HeadGrad::None => None,
            HeadGrad::Store => Some(super::matmul::matmul(&dz.t()?, &h)?),
            HeadGrad::Sum(sum) => {
                sum.add(&dz, &h)?;
                None
            }
        };
        Ok((Some(dh), dw))
    }
}

/// Forward of the CPU's losses: one pass over each row of the logits.
struct CrossEntropy {
    softcap: Option<f64>,
}

/// The CPU's logits' gradient: one more pass over each row.
struct CrossEntropyGrad {
    softcap: Option<f64>,
}

/// A row-major `(R, V)` slice and its shape.
fn rows<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> Result<(&'a [T], usize, usize)> {
    let (r, v) = l.shape().dims2()?;
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("cross-entropy: a non-contiguous input");
    };
    Ok((&s.as_slice::<T>()?[a..b], r, v))
}

/// The element type the op runs in, f32 or f64, with its own exp and tanh: f32 logits are
/// computed in f32 with [`exp_f32`] (glibc's f64 `exp` and `tanh` were a quarter of a
/// small model's step, its scalar `expf` still an eighth), f64 ones with the standard
/// library's; row sums go through [`lane_sum`].
pub(crate) trait Float: candle_core::WithDType + Send + Sync + PartialOrd {
    fn exp(self) -> Self;
    fn tanh(self) -> Self;
}

impl Float for f32 {
    #[inline(always)]
    fn exp(self) -> f32 {
        exp_f32(self)
    }
    #[inline(always)]
    fn tanh(self) -> f32 {
        // 1 − 2/(e^{2x} + 1): absolute error about 1e-7 (the logits' own f32 rounding at
        // the soft-cap's scale), exact limits ±1.
        1.0 - 2.0 / (exp_f32(2.0 * self) + 1.0)
    }
}

impl Float for f64 {
    fn exp(self) -> f64 {
        f64::exp(self)
    }
    fn tanh(self) -> f64 {
        f64::tanh(self)
    }
}

/// `e^x` in f32 without branches, so that loops over rows vectorize: `x = k·ln 2 + r`
/// (`k` rounded to nearest by adding 1.5·2²³, `ln 2` in two parts), `e^r` by Cephes'
/// degree-6 polynomial on `|r| ≤ ln 2 / 2` (within 2 ulp of `f32::exp` there), and `2^k`
/// put into the exponent bits. `x` is clamped to [−87, 88], where `e^x` is a normal f32:
/// a loss row's exponentials are relative to its largest logit, so none is below e^−87
/// that matters.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0; // 1.5·2²³
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + SHIFT;
    let k = t - SHIFT;
    let r = x - k * 0.693_359_4 + k * 2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let bits = ((t.to_bits() as i32 - SHIFT.to_bits() as i32 + 127) << 23) as u32;
    er * f32::from_bits(bits)
}

/// `Σ f(x)` over `row` in eight independent lanes (the loop vectorizes), the lanes and
/// the tail added in f64.
#[inline(always)]
pub(crate) fn lane_sum<T: Float>(row: &[T], f: impl Fn(T) -> T) -> f64 {
    let mut acc = [T::from_f64(0.0); 8];
    let chunks = row.chunks_exact(8);
    let tail: f64 = chunks.remainder().iter().map(|&z| f(z).to_f64()).sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += f(c[i]);
        }
    }
    acc.iter().map(|a| a.to_f64()).sum::<f64>() + tail
}

/// The soft-cap of a row in `T`: `cap·tanh(z/cap)`, with `tanh(z/cap)` returned so that
/// its derivative `1 − tanh²` needs no second `tanh`.
struct Cap<T> {
    cap: T,
    inv: T,
}

impl<T: Float> Cap<T> {
    fn new(softcap: Option<f64>) -> Option<Cap<T>> {
        softcap.map(|c| Cap {
            cap: T::from_f64(c),
            inv: T::from_f64(1.0 / c),
        })
    }

    fn tanh(&self, z: T) -> T {
        (z * self.inv).tanh()
    }
}

/// The largest capped logit of a row: the cap is increasing, so the cap of the largest.
/// The largest is taken in eight lanes (the loop vectorizes), then over the lanes and the
/// tail.
fn row_max<T: Float>(row: &[T], cap: &Option<Cap<T>>) -> T {
    let mut acc = [row[0]; 8];
    let chunks = row.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = acc[0];
    for &z in acc[1..].iter().chain(tail) {
        if z > m {
            m = z;
        }
    }
    match cap {
        Some(c) => c.cap * c.tanh(m),
        None => m,
    }
}

/// `(max, Σ exp(c_j − max))` over a row's capped logits, the sum in f64.
fn row_exp_sum<T: Float>(row: &[T], cap: &Option<Cap<T>>) -> (T, f64) {
    let m = row_max(row, cap);
    let s = match cap {
        Some(c) => lane_sum(row, |z| (c.cap * c.tanh(z) - m).exp()),
        None => lane_sum(row, |z| (z - m).exp()),
    };
    (m, s)
}

/// The capped logit of `z`.
fn capped_one<T: Float>(z: T, cap: &Option<Cap<T>>) -> T {
    match cap {
        Some(c) => c.cap * c.tanh(z),
        None => z,
    }
}

fn target(t: u32, v: usize) -> Result<usize> {
    let t = t as usize;
    if t >= v {
        candle_core::bail!("cross-entropy: target {t} outside the vocabulary of {v}");
    }
    Ok(t)
}

fn row_losses<T: Float>(
    z: &[T],
    targets: &[u32],
    v: usize,
    softcap: Option<f64>,
) -> Result<Vec<T>> {
    let cap = Cap::new(softcap);
    z.par_chunks(v)
        .zip(targets.par_iter())
        .map(|(row, &t)| {
            let t = target(t, v)?;
            let (m, s) = row_exp_sum(row, &cap);
            let picked = capped_one(row[t], &cap).to_f64();
            Ok(T::from_f64(m.to_f64() + s.ln() - picked))
        })
        .collect()
}

/// Each row's gradient `g·(softmax(c) − onehot(t))·c'(z)`, written over the row's
/// logits: without a cap the row's exponentials are written and scaled; with one, the
/// row's `tanh` is written while the sum is taken, then turned into the gradient (one
/// `tanh` and two `exp` an element). The target's `c'(z_t)` is taken before the row is
/// overwritten.
fn gradient_in_place<T: Float>(
    z: &mut [T],
    targets: &[u32],
    g: &[T],
    v: usize,
    softcap: Option<f64>,
) -> Result<()> {
    let cap = Cap::new(softcap);
    z.par_chunks_mut(v)
        .zip(targets.par_iter().zip(g.par_iter()))
        .try_for_each(|(row, (&t, &g))| {
            let t = target(t, v)?;
            let m = row_max(row, &cap);
            let one = T::from_f64(1.0);
            let dc = match &cap {
                Some(c) => {
                    let th = c.tanh(row[t]);
                    one - th * th
                }
                None => one,
            };
            match &cap {
                None => {
                    row.iter_mut().for_each(|z| *z = (*z - m).exp());
                    let scale = T::from_f64(g.to_f64() / lane_sum(row, |e| e));
                    row.iter_mut().for_each(|d| *d *= scale);
                }
                Some(c) => {
                    row.iter_mut().for_each(|z| *z = c.tanh(*z));
                    let s = lane_sum(row, |th| (c.cap * th - m).exp());
                    let scale = T::from_f64(g.to_f64() / s);
                    for d in row.iter_mut() {
                        let th = *d;
                        *d = (c.cap * th - m).exp() * scale * (one - th * th);
                    }
                }
            }
            // The target's `− g·c'(z_t)`.
            row[t] -= g * dc;
            Ok::<(), candle_core::Error>(())
        })
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy"
    }

    fn cpu_fwd(
        &self,
        z: &CpuStorage,
        lz: &Layout,
        t: &CpuStorage,
        lt: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (targets, r, _) = rows::<u32>(t, lt)?;
        let out = match z {
            CpuStorage::F32(_) => {
                let (z, _, v) = rows::<f32>(z, lz)?;
                CpuStorage::F32(row_losses(z, targets, v, self.softcap)?)
            }
            CpuStorage::F64(_) => {
                let (z, _, v) = rows::<f64>(z, lz)?;
                CpuStorage::F64(row_losses(z, targets, v, self.softcap)?)
            }
            _ => candle_core::bail!("cross-entropy: logits in f32 or f64"),
        };
        Ok((out, Shape::from((r, 1))))
    }
}

impl InplaceOp3 for CrossEntropyGrad {
    fn name(&self) -> &'static str {
        "cross-entropy-grad"
    }

    fn cpu_fwd(
        &self,
        z: &mut CpuStorage,
        lz: &Layout,
        t: &CpuStorage,
        lt: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<()> {
        let (targets, _, _) = rows::<u32>(t, lt)?;
        let (v, (a, b)) = match (lz.shape().dims2(), lz.contiguous_offsets()) {
            (Ok((_, v)), Some(ab)) => (v, ab),
            _ => candle_core::bail!("cross-entropy: non-contiguous (R, V) logits"),
        };
        match (z, g) {
            (CpuStorage::F32(z), CpuStorage::F32(_)) => {
                let (g, _, _) = rows::<f32>(g, lg)?;
                gradient_in_place(&mut z[a..b], targets, g, v, self.softcap)
            }
            (CpuStorage::F64(z), CpuStorage::F64(_)) => {
                let (g, _, _) = rows::<f64>(g, lg)?;
                gradient_in_place(&mut z[a..b], targets, g, v, self.softcap)
            }
            _ => candle_core::bail!("cross-entropy: logits in f32 or f64"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The same loss as candle's tensor ops and their backward.
    fn composed(h: &Tensor, w: &Tensor, t: &Tensor, softcap: Option<f64>) -> Result<Tensor> {
        let z = h.matmul(&w.t()?)?;
        let (z, _) = capped(&z, softcap)?;
        let m = z.max_keepdim(1)?.detach();
        let lse = (z.broadcast_sub(&m)?.exp()?.sum_keepdim(1)?.log()? + m)?;
        lse - z.gather(t, 1)?
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64))
            .and_then(|d| d.to_scalar::<f64>())
            .unwrap()
    }

    /// [`head_losses`]' losses and gradients of `h` and `w` equal the composed ones', with
    /// the head's gradient in candle's store or added into a running sum.
    fn check(dtype: DType, softcap: Option<f64>, tol: f64) {
        let dev = Device::Cpu;
        let r = |shape: (usize, usize)| {
            Tensor::randn(0f32, 1.0, shape, &dev)
                .and_then(|x| x.to_dtype(dtype))
                .unwrap()
        };
        let (h, w) = (r((5, 6)), (r((37, 6)) * 2.0).unwrap());
        let t = Tensor::new(&[[0u32], [36], [7], [7], [20]], &dev).unwrap();
        let g = Tensor::new(&[[1f32], [0.5], [-2.0], [0.0], [3.0]], &dev)
            .and_then(|g| g.to_dtype(dtype))
            .unwrap();
        // The fused node with the head's gradient in the store, or in a running sum that
        // starts at `start`, or the composed loss.
        let start = r((37, 6));
        let run = |head: Option<HeadGrad>| {
            let (vh, vw) = (Var::from_tensor(&h).unwrap(), Var::from_tensor(&w).unwrap());
            let (h, w) = (vh.as_tensor(), vw.as_tensor());
            let l = match &head {
                Some(head) => head_losses(h, w, head.clone(), &t, softcap).unwrap(),
                None => composed(h, w, &t, softcap).unwrap(),
            };
            let grads = (&l * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let dw = match head {
                Some(HeadGrad::Sum(s)) => (s.take().unwrap().unwrap() - &start).unwrap(),
                _ => grads.get(w).unwrap().clone(),
            };
            (l, grads.get(h).unwrap().clone(), dw)
        };
        let sum = HeadGradSum::new(Some(start.copy().unwrap()), dtype);
        let composed = run(None);
        for head in [HeadGrad::Store, HeadGrad::Sum(sum)] {
            let (l1, h1, w1) = run(Some(head));
            let (l2, h2, w2) = composed.clone();
            for (what, a, b) in [("losses", l1, l2), ("dh", h1, h2), ("dw", w1, w2)] {
                assert!(
                    max_diff(&a, &b) < tol,
                    "{what} differ by {}",
                    max_diff(&a, &b)
                );
            }
        }
    }

    #[test]
    fn the_fused_loss_and_its_gradients_equal_the_composed_ones() {
        check(DType::F32, None, 1e-5);
        check(DType::F32, Some(15.0), 1e-5);
        check(DType::F64, None, 1e-12);
        check(DType::F64, Some(15.0), 1e-12);
    }

    /// The first backward takes the logits the forward kept; a second backward of the same
    /// graph finds them gone, computes them again and gives the same gradients.
    #[test]
    fn a_second_backward_computes_the_logits_again() {
        let dev = Device::Cpu;
        let h = Var::from_tensor(&Tensor::randn(0f64, 1.0, (3, 4), &dev).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(0f64, 2.0, (11, 4), &dev).unwrap()).unwrap();
        let t = Tensor::new(&[[0u32], [10], [4]], &dev).unwrap();
        let l = head_losses(
            h.as_tensor(),
            w.as_tensor(),
            HeadGrad::Store,
            &t,
            Some(15.0),
        )
        .and_then(|l| l.sum_all())
        .unwrap();
        let (a, b) = (l.backward().unwrap(), l.backward().unwrap());
        for v in [&h, &w] {
            let (ga, gb) = (a.get(v.as_tensor()).unwrap(), b.get(v.as_tensor()).unwrap());
            assert!(max_diff(ga, gb) < 1e-12, "{}", max_diff(ga, gb));
        }
    }

    /// The row's largest logit over the lanes and the tail, wherever it lies.
    #[test]
    fn row_max_finds_the_largest_in_any_lane_or_the_tail() {
        for len in [1, 7, 8, 9, 16, 23] {
            for at in 0..len {
                let mut row = vec![-1.0f32; len];
                row[at] = 2.5;
                assert_eq!(row_max(&row, &None), 2.5, "len {len}, at {at}");
            }
        }
    }

    /// The tensor-op path other devices take gives the CPU kernels' losses and gradient.
    #[test]
    fn the_tensor_op_path_equals_the_cpu_kernels() {
        let dev = Device::Cpu;
        let z = (Tensor::randn(0f64, 3.0, (4, 29), &dev).unwrap() * 5.0).unwrap();
        let t = Tensor::new(&[[0u32], [28], [3], [3]], &dev).unwrap();
        let g = Tensor::new(&[[1f64], [-0.5], [2.0], [0.25]], &dev).unwrap();
        for cap in [None, Some(15.0)] {
            let (k, o) = (losses(&z, &t, cap), losses_by_ops(&z, &t, cap));
            assert!(max_diff(&k.unwrap(), &o.unwrap()) < 1e-12);
            let k = logits_grad(z.copy().unwrap(), &t, &g, cap).unwrap();
            let o = logits_grad_by_ops(&z, &t, &g, cap).unwrap();
            assert!(max_diff(&k, &o) < 1e-12);
        }
    }

    /// The branch-free f32 `exp` within 3 ulp of the standard library's over [−87, 88],
    /// and `tanh` from it within 2e-7 absolute.
    #[test]
    fn the_f32_exp_and_tanh_are_the_standard_ones() {
        let mut worst: f32 = 0.0;
        for i in 0..=350_000 {
            let x = -87.0 + i as f32 * 175.0 / 350_000.0;
            let (got, want) = (exp_f32(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            let th = <f32 as Float>::tanh(x / 8.0);
            assert!(
                (th - (x / 8.0).tanh()).abs() < 2e-7,
                "tanh({}) = {th}",
                x / 8.0
            );
        }
        assert!(
            worst < 3.0 * f32::EPSILON,
            "exp: worst relative error {worst}"
        );
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1e9) > 0.0 && exp_f32(-1e9) < 1e-37);
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_an_error() {
        let dev = Device::Cpu;
        let h = Tensor::zeros((1, 2), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((4, 2), DType::F32, &dev).unwrap();
        let t = Tensor::new(&[[4u32]], &dev).unwrap();
        assert!(head_losses(&h, &w, HeadGrad::Store, &t, None).is_err());
    }
}
