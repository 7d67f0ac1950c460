//! **Batched matmuls split over the CPU's threads by matrix or row block.** candle-core 0.11 multiplies
//! a batch one matrix at a time, each gemm call split over all threads; the attention's
//! products are many small matrices (`B·H` of `T × D` by `D × T`), which gemm splits so
//! finely that on 2 threads they ran slower than on one (`docs/performance.md`). Here each
//! rayon task multiplies whole matrices on one thread (or a block of rows of one, where
//! there are fewer matrices than threads), with the same gemm kernels, into an output that
//! is not zeroed first. The backward is the same op on strided views, no copies:
//! `dA = G·Bᵀ`, `dB = Aᵀ·G`. Off the CPU, and in dtypes gemm has no kernel for (bf16),
//! it is candle's matmul.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// Output rows one task multiplies at least, where a matrix is split by rows.
const MIN_ROWS: usize = 32;

/// `a · b` over matching leading (batch) dimensions, `(…, M, K) · (…, K, N)`.
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let cpu = a.device().is_cpu() && matches!(a.dtype(), DType::F16 | DType::F32 | DType::F64);
    if !cpu || Operand::of(a.layout()).is_err() || Operand::of(b.layout()).is_err() {
        return a.matmul(b);
    }
    a.apply_op2_arc(b, std::sync::Arc::new(Box::new(BatchedMatmul)))
}

struct BatchedMatmul;

/// Where a batch of matrices lies in its storage: the first element, the distance between
/// matrices, rows and columns.
#[derive(Clone, Copy, Debug)]
struct Operand {
    start: usize,
    batch: usize,
    rs: isize,
    cs: isize,
}

impl Operand {
    /// A layout whose leading dimensions step as one (as a contiguous tensor's and any
    /// transposed view of its last two do); anything else is refused.
    fn of(l: &Layout) -> Result<Operand> {
        let (dims, st) = (l.dims(), l.stride());
        let r = dims.len();
        if r < 2 {
            candle_core::bail!("matmul: an operand of rank {r}");
        }
        let batch = if r == 2 { 0 } else { st[r - 3] };
        for i in 0..r.saturating_sub(3) {
            if st[i] != st[i + 1] * dims[i + 1] {
                candle_core::bail!("matmul: batch dimensions that do not step as one");
            }
        }
        Ok(Operand {
            start: l.start_offset(),
            batch,
            rs: st[r - 2] as isize,
            cs: st[r - 1] as isize,
        })
    }
}

/// The product's sizes: `n` matrices of `m × k` by `k × p`.
#[derive(Clone, Copy, Debug)]
struct Dims {
    n: usize,
    m: usize,
    k: usize,
    p: usize,
}

fn dims(la: &Layout, lb: &Layout) -> Result<(Dims, Shape)> {
    let (da, db) = (la.dims(), lb.dims());
    let r = da.len();
    if db.len() != r || r < 2 || da[..r - 2] != db[..r - 2] || da[r - 1] != db[r - 2] {
        candle_core::bail!("matmul: shapes {da:?} and {db:?}");
    }
    let mut out = da[..r - 1].to_vec();
    out.push(db[r - 1]);
    let d = Dims {
        n: da[..r - 2].iter().product(),
        m: da[r - 2],
        k: da[r - 1],
        p: db[r - 1],
    };
    Ok((d, Shape::from(out)))
}

/// The rows of one matrix a task multiplies: all of them where the matrices share out
/// evenly over the threads (or are many), else a `1/threads` share of each, of at least
/// [`MIN_ROWS`], so that every thread gets as many rows as the others. For a product with
/// at least one row (empty ones return before they split).
fn rows_per_task(d: Dims, threads: usize) -> usize {
    let threads = threads.max(1);
    if d.n.is_multiple_of(threads) || d.n >= 4 * threads {
        return d.m;
    }
    d.m.div_ceil(threads).max(MIN_ROWS).min(d.m)
}

fn product<T: WithDType>(d: Dims, a: &[T], oa: Operand, b: &[T], ob: Operand) -> Vec<T> {
    let len = d.n * d.m * d.p;
    let mut out: Vec<T> = Vec::with_capacity(len);
    if len == 0 {
        return out;
    }
    if d.k == 0 {
        out.resize(len, T::zero());
        return out;
    }
    let rows = rows_per_task(d, rayon::current_num_threads());
    let tasks_per_matrix = d.m.div_ceil(rows);
    let spare = &mut out.spare_capacity_mut()[..len];
    // Each task's rows of one output matrix: matrices are `m·p` apart, so no task's
    // chunk spans two of them.
    let chunks: Vec<(usize, &mut [MaybeUninit<T>])> = spare
        .chunks_mut(d.m * d.p)
        .flat_map(|c| c.chunks_mut(rows * d.p))
        .enumerate()
        .collect();
    chunks.into_par_iter().for_each(|(i, dst)| {
        let (matrix, first) = (i / tasks_per_matrix, (i % tasks_per_matrix) * rows);
        let m = dst.len() / d.p;
        let lhs = oa.start + matrix * oa.batch + first * oa.rs as usize;
        let rhs = ob.start + matrix * ob.batch;
        // SAFETY: `dst` is `m` rows of `p` of this task's own output; the operands' offsets
        // and strides come from their layouts (checked against the shapes in `dims`), so
        // rows `first..first + m` of matrix `matrix` of `a`, and all of `b`'s, lie inside
        // the storages. gemm writes every element of `dst` (`read_dst` false).
        unsafe {
            gemm::gemm(
                m,
                d.p,
                d.k,
                dst.as_mut_ptr() as *mut T,
                1,
                d.p as isize,
                false,
                a[lhs..].as_ptr(),
                oa.cs,
                oa.rs,
                b[rhs..].as_ptr(),
                ob.cs,
                ob.rs,
                T::zero(),
                T::one(),
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    });
    // SAFETY: every element of the first `len` was written above.
    unsafe { out.set_len(len) };
    out
}

/// The product of two CPU storages as [`matmul`] multiplies them (the frozen linear's
/// forward calls it on its weight's storage); layouts as [`Operand::of`] takes.
pub fn cpu_product(
    a: &CpuStorage,
    la: &Layout,
    b: &CpuStorage,
    lb: &Layout,
) -> Result<(CpuStorage, Shape)> {
    let (d, shape) = dims(la, lb)?;
    let (oa, ob) = (Operand::of(la)?, Operand::of(lb)?);
    let out = match (a, b) {
        (CpuStorage::F32(a), CpuStorage::F32(b)) => CpuStorage::F32(product(d, a, oa, b, ob)),
        (CpuStorage::F64(a), CpuStorage::F64(b)) => CpuStorage::F64(product(d, a, oa, b, ob)),
        (CpuStorage::F16(a), CpuStorage::F16(b)) => CpuStorage::F16(product(d, a, oa, b, ob)),
        _ => candle_core::bail!("matmul: operands of one dtype, f16, f32 or f64"),
    };
    Ok((out, shape))
}

impl CustomOp2 for BatchedMatmul {
    fn name(&self) -> &'static str {
        "batched-matmul"
    }

    fn cpu_fwd(
        &self,
        a: &CpuStorage,
        la: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        cpu_product(a, la, b, lb)
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.detach().contiguous()?;
        let (a, b) = (a.detach(), b.detach());
        let da = g.apply_op2_no_bwd(&b.t()?, &BatchedMatmul)?;
        let db = a.t()?.apply_op2_no_bwd(&g, &BatchedMatmul)?;
        Ok((Some(da), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
        let (a, b) = (f(a), f(b));
        let scale = b.abs().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
        let d = (a - b).unwrap().abs().unwrap().max(0).unwrap();
        d.to_scalar::<f64>().unwrap() / scale.max(1e-30)
    }

    /// Values and both gradients are candle's matmul's, for 2-D, 3-D and 4-D operands,
    /// contiguous and transposed, fewer and more matrices than threads, one-row matrices.
    /// In f16 to a few units in the last place of the largest element: gemm's f16 kernels
    /// round partial sums, and a split of the rows changes how it blocks them (seen: up
    /// to 2.4e-3 of the largest over 100 runs).
    #[test]
    fn matches_candles_matmul_and_its_gradients() {
        let dev = Device::Cpu;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        let cases: &[(&[usize], usize, usize, usize, bool)] = &[
            (&[], 70, 33, 41, false),
            (&[], 1, 8, 5, true),
            (&[2], 65, 16, 9, false),
            (&[2, 3], 20, 12, 20, true),
            (&[5, 1], 3, 7, 4, false),
        ];
        for (dtype, tol) in [(DType::F32, 1e-6), (DType::F64, 1e-13), (DType::F16, 1e-2)] {
            for &(batch, m, k, n, transposed) in cases {
                let shape = |r: usize, c: usize| [batch, &[r, c]].concat();
                let a = Tensor::randn(0f32, 1., shape(m, k), &dev).unwrap();
                let b = if transposed {
                    let r = batch.len();
                    Tensor::randn(0f32, 1., shape(n, k), &dev)
                        .unwrap()
                        .transpose(r, r + 1)
                        .unwrap()
                } else {
                    Tensor::randn(0f32, 1., shape(k, n), &dev).unwrap()
                };
                let a = Var::from_tensor(&a.to_dtype(dtype).unwrap()).unwrap();
                let b = Var::from_tensor(&b.to_dtype(dtype).unwrap()).unwrap();
                let ours = pool.install(|| matmul(a.as_tensor(), b.as_tensor()).unwrap());
                let plain = a.as_tensor().matmul(b.as_tensor()).unwrap();
                assert!(max_rel(&ours, &plain) <= tol, "{dtype:?} {batch:?} values");
                let g = Tensor::randn(0f32, 1., plain.dims(), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let loss = |y: &Tensor| (y * &g).unwrap().sum_all().unwrap();
                let fs = pool.install(|| loss(&ours).backward().unwrap());
                let ps = loss(&plain).backward().unwrap();
                for v in [&a, &b] {
                    let (x, y) = (
                        fs.get(v.as_tensor()).unwrap(),
                        ps.get(v.as_tensor()).unwrap(),
                    );
                    let e = max_rel(x, y);
                    assert!(e <= tol, "{dtype:?} {batch:?} {m}x{k}x{n} gradient {e:e}");
                }
            }
        }
    }

    /// Whole matrices where they share out evenly or are many, else rows split evenly
    /// over the threads, never below the floor.
    #[test]
    fn tasks_share_rows_evenly_over_the_threads() {
        let d = |n, m| Dims { n, m, k: 8, p: 8 };
        assert_eq!(rows_per_task(d(16, 256), 2), 256);
        assert_eq!(rows_per_task(d(9, 256), 2), 256);
        assert_eq!(rows_per_task(d(1, 1024), 2), 512);
        assert_eq!(rows_per_task(d(3, 1024), 2), 512);
        assert_eq!(rows_per_task(d(3, 1024), 4), 256);
        assert_eq!(rows_per_task(d(1, 40), 4), 32);
        assert_eq!(rows_per_task(d(1, 1), 8), 1);
        assert_eq!(rows_per_task(d(5, 7), 1), 7);
    }

    /// Empty products: no rows or columns is an empty output; no inner dimension, zeros.
    #[test]
    fn empty_products_are_empty_or_zero() {
        let dev = Device::Cpu;
        let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &dev).unwrap();
        assert_eq!(matmul(&z(&[0, 4]), &z(&[4, 3])).unwrap().dims(), &[0, 3]);
        assert_eq!(matmul(&z(&[2, 4]), &z(&[4, 0])).unwrap().dims(), &[2, 0]);
        let ones = Tensor::ones((2, 0), DType::F32, &dev).unwrap();
        let y = matmul(&ones, &Tensor::ones((0, 3), DType::F32, &dev).unwrap()).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![0f32; 3]; 2]);
    }

    /// Leading dimensions that do not step as one (two batch dimensions swapped) are
    /// refused, so [`matmul`] hands the operand to candle; a transposed view is taken.
    #[test]
    fn a_layout_that_does_not_step_as_one_is_refused() {
        let dev = Device::Cpu;
        let t = Tensor::zeros((2, 3, 4, 5), DType::F32, &dev).unwrap();
        assert!(Operand::of(t.transpose(0, 1).unwrap().layout()).is_err());
        assert!(Operand::of(t.transpose(2, 3).unwrap().layout()).is_ok());
    }
}
