//! CPU benchmark of the engine's matmul (`vramplan::engine::matmul`) against candle's
//! `Tensor::matmul`, side by side in one run, on the products of one step of the speed
//! benchmark's width-256 and width-512 models (`tools/bench_engine_vs_torch.py`): the
//! linears' rows by a transposed weight, the attention's batched `q·kᵀ` and `p·v`, the
//! head. Both run on a rayon pool of candle's thread count (`RAYON_NUM_THREADS`, else a
//! thread per core), as `vramplan train` runs its step, so candle's gemm calls are split
//! over as many threads as the engine's tasks.
//!
//! `RAYON_NUM_THREADS=N taskset -c 0..N-1 cargo bench --bench matmul`, nothing else on
//! those cores.

use candle_core::{DType, Device, Tensor};
use std::time::Instant;

/// Which operand of a product is a transposed view of a row-major matrix.
#[derive(Clone, Copy, PartialEq)]
enum Views {
    /// Both row-major (the attention's).
    Plain,
    /// Rows by a weight `n × k` transposed (a linear's forward).
    Right,
    /// A gradient `k × m` transposed by rows (a weight's gradient).
    Left,
}

/// A product `(batch…, m, k) · (batch…, k, n)`.
struct Case {
    name: &'static str,
    batch: &'static [usize],
    m: usize,
    k: usize,
    n: usize,
    views: Views,
}

const CASES: &[Case] = &[
    Case {
        name: "w256 q/k/v/o: rows · Wᵀ",
        batch: &[],
        m: 1024,
        k: 256,
        n: 256,
        views: Views::Right,
    },
    Case {
        name: "w256 MLP in: rows · Wᵀ",
        batch: &[],
        m: 1024,
        k: 256,
        n: 1024,
        views: Views::Right,
    },
    Case {
        name: "w256 MLP out: rows · Wᵀ",
        batch: &[],
        m: 1024,
        k: 1024,
        n: 256,
        views: Views::Right,
    },
    Case {
        name: "w256 q·kᵀ",
        batch: &[4, 4],
        m: 256,
        k: 64,
        n: 256,
        views: Views::Plain,
    },
    Case {
        name: "w256 p·v",
        batch: &[4, 4],
        m: 256,
        k: 256,
        n: 64,
        views: Views::Plain,
    },
    Case {
        name: "w256 head: rows · Wᵀ",
        batch: &[],
        m: 1024,
        k: 256,
        n: 4096,
        views: Views::Right,
    },
    Case {
        name: "w256 MLP in, its weight's gradient: rowsᵀ · g",
        batch: &[],
        m: 256,
        k: 1024,
        n: 1024,
        views: Views::Left,
    },
    Case {
        name: "w512 q/k/v/o: rows · Wᵀ",
        batch: &[],
        m: 1024,
        k: 512,
        n: 512,
        views: Views::Right,
    },
    Case {
        name: "w512 q·kᵀ",
        batch: &[2, 8],
        m: 512,
        k: 64,
        n: 512,
        views: Views::Plain,
    },
    Case {
        name: "w512 p·v",
        batch: &[2, 8],
        m: 512,
        k: 512,
        n: 64,
        views: Views::Plain,
    },
];

fn operands(c: &Case) -> candle_core::Result<(Tensor, Tensor)> {
    let dev = Device::Cpu;
    let dims = |r: usize, col: usize| [c.batch, &[r, col]].concat();
    let a = if c.views == Views::Left {
        Tensor::randn(0f32, 1., dims(c.k, c.m), &dev)?.t()?
    } else {
        Tensor::randn(0f32, 1., dims(c.m, c.k), &dev)?
    };
    let b = if c.views == Views::Right {
        Tensor::randn(0f32, 1., dims(c.n, c.k), &dev)?.t()?
    } else {
        Tensor::randn(0f32, 1., dims(c.k, c.n), &dev)?
    };
    Ok((a, b))
}

/// Median seconds of one call over `reps` calls (after three warm-up calls).
fn seconds(reps: usize, f: &dyn Fn() -> candle_core::Result<Tensor>) -> candle_core::Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        f()?;
        t.push(start.elapsed().as_secs_f64());
    }
    t.sort_by(f64::total_cmp);
    Ok(t[reps / 2])
}

fn main() -> candle_core::Result<()> {
    let n = candle_core::utils::get_num_threads();
    println!("f32 matmuls, candle's `Tensor::matmul` against `engine::matmul`, median of 41 calls");
    println!("| product | threads | candle GFLOP/s | engine GFLOP/s | engine / candle |");
    println!("|---|---:|---:|---:|---:|");
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .map_err(|e| candle_core::Error::msg(e.to_string()))?;
    for c in CASES {
        let (a, b) = operands(c)?;
        let ours = pool.install(|| vramplan::engine::matmul::matmul(&a, &b))?;
        let diff = (ours - a.matmul(&b)?)?.abs()?.flatten_all()?.max(0)?;
        assert!(diff.to_dtype(DType::F64)?.to_scalar::<f64>()? < 1e-3);
        let flops = 2.0 * (c.batch.iter().product::<usize>() * c.m * c.k * c.n) as f64;
        let theirs = pool.install(|| seconds(41, &|| a.matmul(&b)))?;
        let ours = pool.install(|| seconds(41, &|| vramplan::engine::matmul::matmul(&a, &b)))?;
        println!(
            "| {} | {n} | {:.0} | {:.0} | {:.2} |",
            c.name,
            flops / theirs / 1e9,
            flops / ours / 1e9,
            theirs / ours
        );
    }
    Ok(())
}
