//! The head's weight gradient summed over a micro-batch's loss chunks outside candle's
//! gradient store.
//!
//! Through the store, each chunk's gradient of the head (`(V, C)`) was a tensor of its
//! own, added to a zero tensor of the head's size, and that sum added to the running sum
//! of the chunks before it: four head-sized tensors at once. At 256 rows and a vocabulary
//! of 65,536 over width 256 one chunk's logits are the head's size, so those were the
//! loss stage's peak (`docs/performance.md`, "Chunked loss"). Here the loss chunk's
//! backward ([`super::xent`]) hands `dzᵀ·h` to a [`HeadGradSum`]: on the CPU each chunk
//! is multiplied into the sum in place (gemm with `dst += dzᵀ·h`, the first into zeros),
//! so no chunk makes a head-sized tensor beside the sum; elsewhere the first chunk's
//! product becomes the sum.
//! Where the dtypes differ (16-bit compute over f32 master weights) the 16-bit product is
//! added into the sum in place, widened element by element; off the CPU it is cast and
//! added.

use candle_core::{CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Result, Tensor};
use std::sync::{Arc, Mutex};

/// The running sum of the head's gradient, in the master weight's dtype; shared by the
/// loss chunks' graph nodes, which add to it in their backward.
#[derive(Clone)]
pub struct HeadGradSum {
    sum: Arc<Mutex<Option<Tensor>>>,
    dtype: DType,
}

impl HeadGradSum {
    /// A sum that starts at `start` (the gradient earlier micro-steps accumulated), of a
    /// master weight of `dtype`.
    pub fn new(start: Option<Tensor>, dtype: DType) -> HeadGradSum {
        HeadGradSum {
            sum: Arc::new(Mutex::new(start)),
            dtype,
        }
    }

    /// The sum so far (none before the first chunk's backward).
    pub fn take(&self) -> Result<Option<Tensor>> {
        Ok(self.lock()?.take())
    }

    /// Adds `dzᵀ·h` (`dz` `(R, V)`, `h` `(R, C)`, both in the compute dtype). Where gemm
    /// can multiply into the sum, the first chunk's product goes into zeros, as the later
    /// ones do into the sum.
    pub fn add(&self, dz: &Tensor, h: &Tensor) -> Result<()> {
        let mut slot = self.lock()?;
        let sum = match slot.take() {
            Some(sum) => sum,
            None if in_place(self.dtype, dz, h) => {
                Tensor::zeros((dz.dim(1)?, h.dim(1)?), self.dtype, dz.device())?
            }
            None => {
                *slot = Some(dz.t()?.matmul(h)?.to_dtype(self.dtype)?);
                return Ok(());
            }
        };
        *slot = Some(match sum {
            sum if sum.is_contiguous() && in_place(sum.dtype(), dz, h) => {
                sum.inplace_op3(dz, h, &AddTransposedProduct)?;
                sum
            }
            sum if sum.device().is_cpu() && sum.is_contiguous() => {
                sum.inplace_op2(&dz.t()?.matmul(h)?.contiguous()?, &AddWidened)?;
                sum
            }
            sum => (&sum + dz.t()?.matmul(h)?.to_dtype(sum.dtype())?)?,
        });
        Ok(())
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Option<Tensor>>> {
        self.sum
            .lock()
            .map_err(|_| candle_core::Error::Msg("the head's gradient sum was poisoned".into()))
    }
}

/// Whether gemm can multiply `dzᵀ·h` into a contiguous CPU sum of `dtype`: both on the
/// CPU, contiguous, of that dtype, f32 or f64.
fn in_place(dtype: DType, dz: &Tensor, h: &Tensor) -> bool {
    let cpu = [dz, h]
        .iter()
        .all(|t| t.device().is_cpu() && t.is_contiguous());
    cpu && matches!(dtype, DType::F32 | DType::F64) && dz.dtype() == dtype && h.dtype() == dtype
}

/// `sum += dzᵀ·h` on the CPU, in place.
struct AddTransposedProduct;

impl InplaceOp3 for AddTransposedProduct {
    fn name(&self) -> &'static str {
        "head-grad-add"
    }

    fn cpu_fwd(
        &self,
        sum: &mut CpuStorage,
        ls: &Layout,
        dz: &CpuStorage,
        lz: &Layout,
        h: &CpuStorage,
        lh: &Layout,
    ) -> Result<()> {
        let (v, c) = ls.shape().dims2()?;
        let (r, vz) = lz.shape().dims2()?;
        let (rh, ch) = lh.shape().dims2()?;
        if (vz, rh, ch) != (v, r, c) {
            candle_core::bail!("head-grad-add: shapes ({v}, {c}) += ({r}, {vz})ᵀ·({rh}, {ch})");
        }
        let dims = Dims { v, c, r };
        match (sum, dz, h) {
            (CpuStorage::F32(s), CpuStorage::F32(z), CpuStorage::F32(x)) => {
                add_product(dims, part_mut(s, ls)?, part(z, lz)?, part(x, lh)?, 1.0)
            }
            (CpuStorage::F64(s), CpuStorage::F64(z), CpuStorage::F64(x)) => {
                add_product(dims, part_mut(s, ls)?, part(z, lz)?, part(x, lh)?, 1.0)
            }
            _ => candle_core::bail!("head-grad-add: f32 or f64, one dtype"),
        }
    }
}

/// `sum += p` on the CPU, in place, `p` widened to the sum's dtype element by element.
struct AddWidened;

impl InplaceOp2 for AddWidened {
    fn name(&self) -> &'static str {
        "head-grad-add-widened"
    }

    fn cpu_fwd(
        &self,
        sum: &mut CpuStorage,
        ls: &Layout,
        p: &CpuStorage,
        lp: &Layout,
    ) -> Result<()> {
        if ls.shape() != lp.shape() {
            candle_core::bail!("head-grad-add: shapes {:?} += {:?}", ls.shape(), lp.shape());
        }
        match (sum, p) {
            (CpuStorage::F32(s), CpuStorage::F16(p)) => {
                add_widened(part_mut(s, ls)?, part(p, lp)?, |x| x.to_f32())
            }
            (CpuStorage::F32(s), CpuStorage::BF16(p)) => {
                add_widened(part_mut(s, ls)?, part(p, lp)?, |x| x.to_f32())
            }
            (CpuStorage::F32(s), CpuStorage::F32(p)) => {
                add_widened(part_mut(s, ls)?, part(p, lp)?, |x| x)
            }
            (CpuStorage::F64(s), CpuStorage::F64(p)) => {
                add_widened(part_mut(s, ls)?, part(p, lp)?, |x| x)
            }
            _ => candle_core::bail!(
                "head-grad-add: a sum in f32 or f64 of a product in it or 16 bits"
            ),
        }
        Ok(())
    }
}

fn add_widened<S: std::ops::AddAssign, P: Copy>(sum: &mut [S], p: &[P], widen: impl Fn(P) -> S) {
    for (s, &x) in sum.iter_mut().zip(p) {
        *s += widen(x);
    }
}

/// Rows of a chunk, and vocabulary entries, one gemm call multiplies into the sum. Where
/// the width is above twice its kernels' rows (32 with AVX2, 128 with AVX-512), gemm
/// packs the block of `dz` it is given into scratch: at most `ROWS × VOCAB` elements
/// (2 MiB in f32), where all of a chunk's `dz` would be another copy of its logits.
/// The planner counts that block (`hpack`) from the same constants.
const ROWS: usize = vramplan_planner::HEAD_GRAD_ROWS;
const VOCAB: usize = vramplan_planner::HEAD_GRAD_VOCAB;

#[derive(Clone, Copy)]
struct Dims {
    v: usize,
    c: usize,
    r: usize,
}

fn part<'a, T>(s: &'a [T], l: &Layout) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s[a..b]),
        None => candle_core::bail!("head-grad-add: a non-contiguous tensor"),
    }
}

fn part_mut<'a, T>(s: &'a mut [T], l: &Layout) -> Result<&'a mut [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&mut s[a..b]),
        None => candle_core::bail!("head-grad-add: a non-contiguous tensor"),
    }
}

/// `sum (V, C) += dz (R, V)ᵀ · h (R, C)`, all row-major, by gemm on candle's threads;
/// `one` is 1 in `T`.
fn add_product<T: 'static + Copy>(d: Dims, sum: &mut [T], dz: &[T], h: &[T], one: T) -> Result<()> {
    if sum.len() != d.v * d.c || dz.len() != d.r * d.v || h.len() != d.r * d.c {
        candle_core::bail!("head-grad-add: a tensor of the wrong size");
    }
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    for start in (0..d.r).step_by(ROWS) {
        let k = ROWS.min(d.r - start);
        for first in (0..d.v).step_by(VOCAB) {
            let m = VOCAB.min(d.v - first);
            let sum = &mut sum[first * d.c..];
            let (dz, h) = (&dz[start * d.v + first..], &h[start * d.c..]);
            // SAFETY: from `first` on, `sum` holds at least `m` rows of `C`; from `start`
            // on, `dz` holds `k` rows of `V` (less `first`, the block's first column) and
            // `h` `k` rows of `C` (sizes checked above). The strides address row-major
            // `(m, C)` in `sum`, `dzᵀ` as `(m, k)` with rows 1 apart and columns `V`
            // apart, and `(k, C)`; `sum` is borrowed mutably, so it does not overlap the
            // inputs.
            unsafe {
                gemm::gemm(
                    m,
                    d.c,
                    k,
                    sum.as_mut_ptr(),
                    1,
                    d.c as isize,
                    true,
                    dz.as_ptr(),
                    d.v as isize,
                    1,
                    h.as_ptr(),
                    1,
                    d.c as isize,
                    one,
                    one,
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64))
            .and_then(|d| d.to_scalar::<f64>())
            .unwrap()
    }

    /// Three chunks' products summed in place equal their sum by tensor ops, in f32 and
    /// f64 and from a starting gradient; a 16-bit product is widened into an f32 sum.
    #[test]
    fn the_sum_equals_the_chunks_products_added() {
        let dev = Device::Cpu;
        for dtype in [DType::F32, DType::F64, DType::F16] {
            let r = |shape: (usize, usize)| {
                Tensor::randn(0f32, 1.0, shape, &dev)
                    .and_then(|t| t.to_dtype(dtype))
                    .unwrap()
            };
            let master = if dtype == DType::F16 {
                DType::F32
            } else {
                dtype
            };
            let start = r((13, 5)).to_dtype(master).unwrap();
            let sum = HeadGradSum::new(Some(start.copy().unwrap()), master);
            let mut expected = start;
            for rows in [4, 7, 1] {
                let (dz, h) = (r((rows, 13)), r((rows, 5)));
                sum.add(&dz, &h).unwrap();
                let p = dz
                    .t()
                    .unwrap()
                    .matmul(&h)
                    .unwrap()
                    .to_dtype(master)
                    .unwrap();
                expected = (expected + p).unwrap();
            }
            let got = sum.take().unwrap().unwrap();
            assert_eq!(got.dtype(), master);
            let tol = if master == DType::F64 { 1e-12 } else { 1e-4 };
            assert!(
                max_diff(&got, &expected) < tol,
                "{dtype:?}: {}",
                max_diff(&got, &expected)
            );
            assert!(sum.take().unwrap().is_none());
        }
    }

    /// A chunk of more rows than one gemm call takes, over a vocabulary of more entries
    /// than one call takes (neither a multiple of its block), is summed whole.
    #[test]
    fn the_blocks_cover_every_row_and_vocabulary_entry() {
        let dev = Device::Cpu;
        let (rows, vocab, width) = (ROWS * 2 + 3, VOCAB * 2 + 5, 3);
        let dz = Tensor::randn(0f32, 1.0, (rows, vocab), &dev).unwrap();
        let h = Tensor::randn(0f32, 1.0, (rows, width), &dev).unwrap();
        let sum = HeadGradSum::new(
            Some(Tensor::zeros((vocab, width), DType::F32, &dev).unwrap()),
            DType::F32,
        );
        sum.add(&dz, &h).unwrap();
        let expected = dz.t().unwrap().matmul(&h).unwrap();
        assert!(max_diff(&sum.take().unwrap().unwrap(), &expected) < 1e-3);
    }

    /// Without a starting gradient the first product is the sum, in the master's dtype.
    #[test]
    fn the_first_product_starts_the_sum() {
        let dev = Device::Cpu;
        let dz = Tensor::randn(0f32, 1.0, (3, 4), &dev).unwrap();
        let h = Tensor::randn(0f32, 1.0, (3, 2), &dev).unwrap();
        let sum = HeadGradSum::new(None, DType::F32);
        sum.add(&dz, &h).unwrap();
        let expected = dz.t().unwrap().matmul(&h).unwrap();
        assert!(max_diff(&sum.take().unwrap().unwrap(), &expected) < 1e-6);
    }
}
