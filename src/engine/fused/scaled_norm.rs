//! **RMSNorm with its weight**, `(x / sqrt(mean(x²) + eps)) · w` over the last dimension,
//! as one node: the normalized rows are rounded to `x`'s dtype and multiplied by `w` in it,
//! as transformers' `LlamaRMSNorm` does (the same values as the chain it replaces: widen,
//! [`super::rms_norm`], narrow, the broadcast product). The node keeps its input and the
//! weight. The chain kept, under 16-bit compute, the widened copy, the f32 normalized rows
//! and their narrowed copy as well; in f32 the normalized rows. Its backward makes `x`'s
//! gradient and, where the weight is trained, the weight's `(C,)` gradient summed over the
//! rows in the same pass: candle's backward of the broadcast product made an `N × C`
//! gradient of the weight's broadcast view, a zero-filled accumulator of that size and
//! their sum before reducing it (at a checkpointed attention half's norm, its backward's
//! largest moment at short sequences).

use super::{contiguous, inv_rms, rows_in_place, Float, Precomputed, Rows, MIN_ROWS};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType,
    D,
};
use rayon::prelude::*;

/// `rms(x)·w` over the last dimension of `x` (any float dtype; the statistics in f32) for
/// a weight `w` `(C,)` in `x`'s dtype: one node, keeping `x` and `w`. `w` gets a gradient
/// where it is tracked (a trained weight), none where it is frozen.
pub fn rms_norm_scaled(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let x = rows_in_place(x)?;
    let w = w.contiguous()?;
    if w.dims() != [x.dim(D::Minus1)?] || w.dtype() != x.dtype() {
        candle_core::bail!(
            "scaled rms norm: a weight {:?} {:?} for rows {:?} {:?}",
            w.dims(),
            w.dtype(),
            x.dims(),
            x.dtype()
        );
    }
    let ready = Precomputed::default();
    if !x.device().is_cpu() {
        ready.put(by_ops(&x.detach(), &w.detach(), eps)?)?;
    }
    x.apply_op2_arc(&w, std::sync::Arc::new(Box::new(ScaledRms { eps, ready })))
}

/// The node's output as tensor ops (off the CPU).
fn by_ops(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    normalized(x, eps)?.0.to_dtype(x.dtype())?.broadcast_mul(w)
}

/// `x / sqrt(mean(x²) + eps)` in f32, and each row's `1/sqrt(mean(x²) + eps)`, as tensor
/// ops.
fn normalized(x: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let xf = x.to_dtype(DType::F32)?;
    let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    Ok((xf.broadcast_mul(&r)?, r))
}

struct ScaledRms {
    eps: f64,
    ready: Precomputed,
}

/// Row `i` of `x` in the arithmetic type `A` in `buf`, and its `1/sqrt(mean(x²) + eps)`.
#[inline(always)]
fn widened<T: WithDType, A: Float>(x: &Rows<T>, i: usize, eps: f64, buf: &mut Vec<A>) -> A {
    buf.clear();
    buf.extend(x.row(i).iter().map(|v| A::from_f64(v.to_f64())));
    inv_rms(buf, eps)
}

/// `round_T(x̂)·w` in `T`, `x̂` computed in `A` (f32, or f64 for f64 rows).
fn forward<T: WithDType, A: Float>(x: &Rows<T>, w: &[T], eps: f64) -> Vec<T> {
    let c = x.width;
    let mut out = vec![T::from_f64(0.0); x.count * c];
    out.par_chunks_mut(c)
        .enumerate()
        .with_min_len(MIN_ROWS)
        .for_each_init(Vec::<A>::new, |buf, (i, y)| {
            let r = widened(x, i, eps, buf);
            for ((y, &v), &w) in y.iter_mut().zip(buf.iter()).zip(w) {
                *y = T::from_f64(T::from_f64((v * r).to_f64()).to_f64() * w.to_f64());
            }
        });
    out
}

/// `x`'s gradient: `r·(g·w − x̂·mean(g·w·x̂))` with `x̂ = x·r`, in `A`, returned in `T`.
fn grad_x<T: WithDType, A: Float>(x: &Rows<T>, w: &[T], g: &Rows<T>, eps: f64) -> Vec<T> {
    let c = x.width;
    let mut out = vec![T::from_f64(0.0); x.count * c];
    out.par_chunks_mut(c)
        .enumerate()
        .with_min_len(MIN_ROWS)
        .for_each_init(
            || (Vec::<A>::new(), Vec::<A>::new()),
            |(buf, gw), (i, d)| {
                let r = widened(x, i, eps, buf);
                gw.clear();
                gw.extend(
                    g.row(i)
                        .iter()
                        .zip(w)
                        .map(|(g, w)| A::from_f64(g.to_f64() * w.to_f64())),
                );
                let m: f64 = buf
                    .iter()
                    .zip(gw.iter())
                    .map(|(&v, &gw)| (v * r * gw).to_f64())
                    .sum::<f64>()
                    / c as f64;
                let m = A::from_f64(m);
                for ((d, &v), &gw) in d.iter_mut().zip(buf.iter()).zip(gw.iter()) {
                    *d = T::from_f64((r * (gw - v * r * m)).to_f64());
                }
            },
        );
    out
}

/// The weight's gradient: `Σ_rows g · round_T(x̂)`, summed in f64, returned in `T`.
fn grad_w<T: WithDType, A: Float>(x: &Rows<T>, g: &Rows<T>, eps: f64) -> Vec<T> {
    let c = x.width;
    let sums = (0..x.count)
        .into_par_iter()
        .with_min_len(MIN_ROWS)
        .fold(
            || (vec![0f64; c], Vec::<A>::new()),
            |(mut acc, mut buf), i| {
                let r = widened(x, i, eps, &mut buf);
                for ((a, &v), g) in acc.iter_mut().zip(buf.iter()).zip(g.row(i)) {
                    *a += T::from_f64((v * r).to_f64()).to_f64() * g.to_f64();
                }
                (acc, buf)
            },
        )
        .map(|(acc, _)| acc)
        .reduce(
            || vec![0f64; c],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                a
            },
        );
    sums.into_iter().map(T::from_f64).collect()
}

/// The weight's elements, contiguous.
fn weight<'a, T: WithDType>(w: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    contiguous(w, l, "scaled rms norm: the weight")
}

impl CustomOp2 for ScaledRms {
    fn name(&self) -> &'static str {
        "scaled-rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!(x, w, "scaled rms norm", |T, A| forward::<T, A>(
            &Rows::new(x, lx)?,
            weight(w, lw)?,
            self.eps
        ));
        Ok((out, Shape::from(lx.dims())))
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        self.ready.take_cuda(self.name())
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let trained = w.track_op();
        let (x, w, g) = (x.detach(), w.detach(), g.detach().contiguous()?);
        if !x.device().is_cpu() {
            return self.bwd_by_ops(&x, &w, &g, trained);
        }
        let dx = x.apply_op3_no_bwd(&w, &g, &GradX { eps: self.eps })?;
        let dw = match trained {
            true => Some(x.apply_op2_no_bwd(&g, &GradW { eps: self.eps })?),
            false => None,
        };
        Ok((Some(dx), dw))
    }
}

impl ScaledRms {
    /// The backward as tensor ops (off the CPU).
    fn bwd_by_ops(
        &self,
        x: &Tensor,
        w: &Tensor,
        g: &Tensor,
        trained: bool,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (xh, r) = normalized(x, self.eps)?;
        let gw = g
            .to_dtype(DType::F32)?
            .broadcast_mul(&w.to_dtype(DType::F32)?)?;
        let m = (&gw * &xh)?.mean_keepdim(D::Minus1)?;
        let dx = gw
            .broadcast_sub(&xh.broadcast_mul(&m)?)?
            .broadcast_mul(&r)?
            .to_dtype(x.dtype())?;
        let dw = match trained {
            true => {
                let rows = xh.to_dtype(x.dtype())?.to_dtype(DType::F32)?;
                let flat = (g.to_dtype(DType::F32)? * rows)?.flatten_to(x.rank() - 2)?;
                Some(flat.sum(0)?.to_dtype(w.dtype())?)
            }
            false => None,
        };
        Ok((Some(dx), dw))
    }
}

/// The CPU's gradient of the rows.
struct GradX {
    eps: f64,
}

impl CustomOp3 for GradX {
    fn name(&self) -> &'static str {
        "scaled-rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!(x, w, "scaled rms norm", |T, A| grad_x::<T, A>(
            &Rows::new(x, lx)?,
            weight(w, lw)?,
            &Rows::new(g, lg)?,
            self.eps
        ));
        Ok((out, Shape::from(lx.dims())))
    }
}

/// The CPU's gradient of the weight, `(C,)`.
struct GradW {
    eps: f64,
}

impl CustomOp2 for GradW {
    fn name(&self) -> &'static str {
        "scaled-rms-norm-weight-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!(x, g, "scaled rms norm", |T, A| grad_w::<T, A>(
            &Rows::new(x, lx)?,
            &Rows::new(g, lg)?,
            self.eps
        ));
        let c = lx.dims().last().copied().unwrap_or(0);
        Ok((out, Shape::from(c)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::max_diff as diff;
    use super::*;
    use candle_core::{Device, Var};

    /// The chain the node replaces: widen, normalize, narrow, the broadcast product.
    fn chain(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
        let y = super::super::rms_norm(&x.to_dtype(DType::F32).unwrap(), eps).unwrap();
        y.to_dtype(x.dtype()).unwrap().broadcast_mul(w).unwrap()
    }

    /// Values and both gradients match the chain's, in f32 (to rounding) and in f16 (the
    /// same values: one rounding to f16 before the product, as the chain), on rows read in
    /// place from a transposed view; a frozen weight gets no gradient.
    #[test]
    fn matches_the_chain_it_replaces() {
        let dev = Device::Cpu;
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F16, 2e-2)] {
            let base = Tensor::randn(0f32, 1., (2, 5, 3, 16), &dev).unwrap();
            let x = Var::from_tensor(&base.to_dtype(dtype).unwrap()).unwrap();
            let w = Var::from_tensor(
                &(Tensor::randn(0f32, 1., 16, &dev).unwrap() + 1.0)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap(),
            )
            .unwrap();
            let g = Tensor::randn(0f32, 1., (2, 3, 5, 16), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let xt = x.as_tensor().transpose(1, 2).unwrap();
            let fused = rms_norm_scaled(&xt, w.as_tensor(), 1e-6).unwrap();
            let plain = chain(&xt, w.as_tensor(), 1e-6);
            assert!(diff(&fused, &plain) <= tol, "{dtype:?} values");
            let loss = |y: &Tensor| {
                (y * &g)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            let (fs, ps) = (
                loss(&fused).backward().unwrap(),
                loss(&plain).backward().unwrap(),
            );
            for v in [&x, &w] {
                let (a, b) = (
                    fs.get(v.as_tensor()).unwrap(),
                    ps.get(v.as_tensor()).unwrap(),
                );
                let scale = diff(b, &b.zeros_like().unwrap());
                assert!(
                    diff(a, b) <= tol * scale.max(1.0) * 4.0,
                    "{dtype:?} gradient"
                );
            }
            let frozen = w.as_tensor().detach();
            let y = rms_norm_scaled(&xt, &frozen, 1e-6).unwrap();
            let store = loss(&y).backward().unwrap();
            assert!(
                store.get(&frozen).is_none(),
                "{dtype:?}: a frozen weight's gradient"
            );
            assert!(store.get(x.as_tensor()).is_some());
        }
    }
}
