//! **nanochat's MLP activation**, `relu(x)²`, as one node. The chain it replaces
//! (`relu`, then `sqr`) kept `relu(x)` for `sqr`'s backward as well as `x` and the
//! output, and its backward made five `N × I` tensors beside the accumulators (`sqr`'s
//! `2·r·g` in two passes, `relu`'s mask, its cast, their product). The node keeps its
//! input; its backward is `2·relu(x)·g`, one pass. Both directions give the chain's values
//! to the bit in every float dtype: each product is formed in `A` and rounded to the
//! dtype as the chain's ops round it, and the backward rounds `relu(x)·g` before it
//! doubles it, as the chain does (doubling first differs where the product is
//! subnormal in the dtype).

use super::{Float, Precomputed};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Elements handed to one rayon task at least.
const MIN_ELEMENTS: usize = 16 * 1024;

/// `max(x, 0)²` elementwise (any float dtype), as one node with its backward.
pub fn relu_sqr(x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let ready = Precomputed::default();
    if !x.device().is_cpu() {
        ready.put(x.detach().relu()?.sqr()?)?;
    }
    x.apply_op1_arc(std::sync::Arc::new(Box::new(ReluSqr { ready })))
}

struct ReluSqr {
    ready: Precomputed,
}

/// The elements of a contiguous tensor's storage.
fn elements<'a, T: candle_core::WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    super::contiguous(s, l, "relu squared: an input")
}

/// `relu(x)` in `A`.
#[inline(always)]
fn relu<T: candle_core::WithDType, A: Float>(x: T) -> A {
    let x = A::from_f64(x.to_f64());
    if x > A::from_f64(0.0) {
        x
    } else {
        A::from_f64(0.0)
    }
}

/// Written into a fresh vector without zeroing it first (rayon's indexed collect).
fn forward<T: candle_core::WithDType, A: Float>(x: &[T]) -> Vec<T> {
    x.par_iter()
        .with_min_len(MIN_ELEMENTS)
        .map(|&x| {
            let r = relu::<T, A>(x);
            T::from_f64((r * r).to_f64())
        })
        .collect()
}

fn backward<T: candle_core::WithDType, A: Float>(x: &[T], g: &[T]) -> Vec<T> {
    x.par_iter()
        .zip(g.par_iter())
        .with_min_len(MIN_ELEMENTS)
        .map(|(&x, &g)| {
            let r = relu::<T, A>(x);
            let rg = T::from_f64((r * A::from_f64(g.to_f64())).to_f64());
            T::from_f64((A::from_f64(rg.to_f64()) * A::from_f64(2.0)).to_f64())
        })
        .collect()
}

impl CustomOp1 for ReluSqr {
    fn name(&self) -> &'static str {
        "relu-sqr"
    }

    fn cpu_fwd(&self, x: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = by_dtype!(x, x, "relu squared", |T, A| forward::<T, A>(elements(
            x, l
        )?));
        Ok((out, Shape::from(l.dims())))
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        self.ready.take_cuda(self.name())
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let (x, g) = (x.detach(), g.detach().contiguous()?);
        if !x.device().is_cpu() {
            return Ok(Some((x.relu()? * g)?.affine(2.0, 0.0)?));
        }
        Ok(Some(x.apply_op2_no_bwd(&g, &ReluSqrGrad)?))
    }
}

/// The CPU's backward of [`ReluSqr`] from its input and the output's gradient.
struct ReluSqrGrad;

impl CustomOp2 for ReluSqrGrad {
    fn name(&self) -> &'static str {
        "relu-sqr-grad"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if lx.dims() != lg.dims() {
            candle_core::bail!("relu squared: a gradient of another shape");
        }
        let out = by_dtype!(x, g, "relu squared", |T, A| backward::<T, A>(
            elements(x, lx)?,
            elements(g, lg)?
        ));
        Ok((out, Shape::from(lx.dims())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    /// Values and the input's gradient are the chain's to the bit, in every float dtype,
    /// with zeros and negative inputs among them, and with gradients small enough that
    /// `relu(x)·g` is subnormal in f16.
    #[test]
    fn matches_the_chain_it_replaces_to_the_bit() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F16, DType::BF16, DType::F64] {
            let base = Tensor::randn(0f32, 1., (3, 7, 40), &dev).unwrap();
            let zeros = base.zeros_like().unwrap().narrow(2, 0, 5).unwrap();
            let base = Tensor::cat(&[&zeros, &base.narrow(2, 5, 35).unwrap()], 2).unwrap();
            let x = Var::from_tensor(&base.to_dtype(dtype).unwrap()).unwrap();
            let g = Tensor::randn(0f32, 1., (3, 7, 40), &dev).unwrap();
            let tiny = g.narrow(0, 0, 1).unwrap().affine(1e-5, 0.0).unwrap();
            let g = Tensor::cat(&[&tiny, &g.narrow(0, 1, 2).unwrap()], 0).unwrap();
            let g = g.to_dtype(dtype).unwrap();
            let fused = relu_sqr(x.as_tensor()).unwrap();
            let plain = x.as_tensor().relu().unwrap().sqr().unwrap();
            let bits = |t: &Tensor| t.to_dtype(DType::F64).unwrap().to_vec3::<f64>().unwrap();
            assert_eq!(bits(&fused), bits(&plain), "{dtype:?} values");
            let loss = |y: &Tensor| (y * &g).unwrap().sum_all().unwrap();
            let (fs, ps) = (
                loss(&fused).backward().unwrap(),
                loss(&plain).backward().unwrap(),
            );
            let (a, b) = (
                fs.get(x.as_tensor()).unwrap(),
                ps.get(x.as_tensor()).unwrap(),
            );
            assert_eq!(bits(a), bits(b), "{dtype:?} gradient");
        }
    }
}
