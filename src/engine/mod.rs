//! vramplan's own training engine on candle (f32 on the CPU; bf16 compute over f32 master
//! weights on CUDA): the models, the step with chunked fp32 logits and block
//! checkpointing, AdamW, checkpoints, and a memory meter that measures the step against
//! the planner's `candle` inventory.
//!
//! What is measured: the high-water mark of live bytes during one optimizer step (all
//! micro-steps and the update) minus the live bytes just before the model was built
//! (after the data was loaded), from the counting allocator on the CPU and from the CUDA
//! memory pool on a GPU ([`device::Meter`]). So it holds the weights, AdamW's moments, the
//! gradients and everything the step allocates: exactly what
//! `planner/src/candle_engine/` plays. The first step of a process is a warm-up (it
//! creates the optimizer state) and is not counted.

pub mod alloc;
pub mod calibrate;
pub mod capability;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod eval;
pub mod fused;
pub mod head_grad;
pub mod hf;
pub mod lora;
pub mod matmul;
pub mod model;
pub mod optim;
pub mod overrides;
pub mod parquet;
pub mod probe;
pub mod rng;
pub mod rundir;
pub mod sft;
pub mod step;
pub mod t5;
mod trainer;
pub mod xent;

pub use trainer::{train, Opts, Summary};

#[global_allocator]
static COUNTING: alloc::Counting = alloc::Counting;

use crate::Error;

/// The engine's results: typed errors ([`Error`]) that the binary maps to exit codes.
pub type Result<T, E = Error> = std::result::Result<T, E>;
use candle_core::{DType, Device};
use std::time::Instant;
use vramplan_planner::{Bytes, Checkpointing, LossMode, Report, RunSpec};

/// The run `vramplan train` does without a plan: a small nanochat GPT on the built-in corpus.
pub const DEFAULT_PLAN: &str = r#"# vramplan train's built-in run: a small nanochat GPT, byte-level, on the CPU.
[model]
name = "nanochat-tiny"
arch = "nanochat"
hidden_size = 64
num_layers = 2
num_heads = 2
num_kv_heads = 2
head_dim = 32
intermediate_size = 256
vocab_size = 256
tie_embeddings = false

[train]
micro_batch = 16
seq_len = 64
grad_accum = 1
precision = "fp32"
checkpointing = "full"
loss = "chunked"
loss_chunk = 256
optimizer = "adamw"
engine = "candle"
steps = 600
learning_rate = 0.003

[hardware]
gpu = "cpu"
"#;

/// A bad-input error for `file` (a path or a flag).
pub(crate) fn bad(file: &str, what: impl std::fmt::Display) -> Error {
    Error::bad(file, what)
}

/// Refuses a plan the planner says does not fit the device it runs on.
pub fn check_fits(name: &str, report: &Report) -> Result<(), Error> {
    if report.fits {
        return Ok(());
    }
    Err(Error::DoesNotFit {
        name: name.to_string(),
        needs: Bytes(report.device_bytes),
        device: report.device.clone(),
        capacity: Bytes(report.capacity_bytes),
    })
}

/// Step options from the plan.
pub fn step_opts(spec: &RunSpec) -> step::Opts {
    let t = &spec.train;
    let n = t.tokens_per_micro_batch() as usize;
    step::Opts {
        chunk: if t.loss == LossMode::Chunked {
            t.loss_chunk as usize
        } else {
            n
        },
        checkpoint: t.checkpointing == Checkpointing::Full,
        scale: 1.0 / (n as f64 * t.grad_accum as f64),
    }
}

/// Reads a tokenizer.json and checks that its ids fit the model's vocabulary.
pub fn load_tokenizer(path: &std::path::Path, spec: &RunSpec) -> Result<tokenizers::Tokenizer> {
    let name = path.display().to_string();
    let t = tokenizers::Tokenizer::from_file(path)
        .map_err(|e| bad(&name, format!("not a tokenizer.json: {e}")))?;
    let n = t.get_vocab_size(true) as u64;
    if n > spec.model.vocab_size {
        return Err(bad(
            &name,
            format!(
                "{n} tokens, more than the model's vocab_size {}",
                spec.model.vocab_size
            ),
        ));
    }
    Ok(t)
}

/// Without a tokenizer the engine is byte-level: the vocabulary must hold 256 ids.
pub fn check_vocab(spec: &RunSpec) -> Result<()> {
    if spec.model.vocab_size < 256 {
        return Err(bad(
            "model.vocab_size",
            format!(
                "{}: the engine's tokenizer is byte-level and needs a vocabulary of at least 256",
                spec.model.vocab_size
            ),
        ));
    }
    Ok(())
}

/// The stack of the step's thread and of its helpers: candle walks the backward graph
/// recursively, and a deep model's graph needs more than a spawned thread's default 2 MiB
/// (the main thread has 8).
const STEP_STACK: usize = 64 << 20;

/// Keeps candle's elementwise ops on the thread that runs them unless `CANDLE_NUM_THREADS`
/// says otherwise. candle-core 0.11 splits binary ops over a pool of its own (its
/// `BarrierPool`, `CANDLE_NUM_THREADS − 1` workers, by default as many as gemm's threads
/// less one) whose workers spin for up to 25,000 rounds after each op, on the cores gemm's
/// threads use; on 2 cores the step ran faster without it (`docs/performance.md`).
/// Measured on 2 cores only. The variable is read once, when candle first splits an op:
/// call this first thing in `main`, before any thread starts.
pub fn keep_elementwise_on_one_thread() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// Runs `f`, the CPU steps of a training run or a calibration, on a thread of a rayon
/// pool of its own, as many threads as candle gives gemm (`RAYON_NUM_THREADS`, else
/// candle's default: a thread per physical core), pinned as candle pins its own pool's.
/// The step's thread then works on its matmuls with the pool's other workers instead of
/// handing them over and sleeping while they run: with
/// [`keep_elementwise_on_one_thread`], measured side by side on 2 cores, 1.18–1.40 × the
/// tokens/s of the same build without either (`docs/performance.md`).
pub fn on_step_pool<R: Send>(f: impl FnOnce() -> R + Send) -> Result<R> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(candle_core::utils::get_num_threads())
        .stack_size(STEP_STACK)
        .thread_name(|i| format!("vramplan-step-{i}"))
        .start_handler(|_| candle_core::utils::set_thread_affinity())
        .build()
        .map_err(|e| candle_core::Error::msg(format!("starting the CPU threads: {e}")))?;
    Ok(pool.install(f))
}

/// Runs a few matmuls on the calling thread and on every thread of the pool, so that the
/// pool and gemm's per-thread packing buffers (one L2-sized slab per thread, made on a
/// thread's first matmul) exist before the baseline is taken: they are the process's, not
/// the step's. Running them only from the calling thread leaves it to the scheduler which
/// workers take part, and a worker that first multiplies during the step adds its slab to
/// the measured peak.
pub fn warm_up(compute: DType) -> Result<()> {
    alloc::keep_freed_pages();
    let matmuls = || -> candle_core::Result<()> {
        let dtypes: &[DType] = if compute == DType::F32 {
            &[DType::F32]
        } else {
            &[DType::F32, compute]
        };
        for &dtype in dtypes {
            for n in [64usize, 512] {
                let a = candle_core::Tensor::ones((n, n), dtype, &Device::Cpu)?;
                a.matmul(&a)?.matmul(&a.t()?)?;
            }
        }
        Ok(())
    };
    matmuls()?;
    for r in rayon::broadcast(|_| matmuls()) {
        r?;
    }
    Ok(())
}

/// The measured matmul rate on `device` in `dtype`, FLOP/s: the best of eight products
/// of `n × n` matrices (512 on the CPU, 4,096 on a GPU). On the CPU, MFU is the model's
/// FLOP/s against it, since a CPU has no rated peak to compare with.
pub(crate) fn matmul_rate(device: &Device, dtype: DType) -> Result<f64> {
    let n = if device.is_cpu() { 512usize } else { 4096 };
    let a = candle_core::Tensor::ones((n, n), dtype, device)?;
    device.synchronize()?;
    let mut best = f64::INFINITY;
    for _ in 0..8 {
        let t0 = Instant::now();
        let p = a.matmul(&a)?;
        device.synchronize()?;
        best = best.min(t0.elapsed().as_secs_f64());
        drop(p);
    }
    Ok(2.0 * (n * n * n) as f64 / best.max(1e-9))
}

/// `cpu`, or `cuda:N`.
pub fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        candle_core::DeviceLocation::Cpu => "cpu".into(),
    }
}

#[cfg(test)]
mod sft_tests;
#[cfg(test)]
mod tests;
