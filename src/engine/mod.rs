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
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod model;
pub mod optim;
pub mod parquet;
pub mod rng;
pub mod step;

#[global_allocator]
static COUNTING: alloc::Counting = alloc::Counting;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use checkpoint::Meta;
use data::Corpus;
use model::Model;
use optim::AdamW;
use rng::Rng;
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;
use vramplan_planner::{Checkpointing, LossMode, RunSpec};

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

pub struct Opts {
    pub steps: u64,
    pub lr: f64,
    pub seed: u64,
    pub eval_every: u64,
    pub save_every: u64,
    pub log_every: u64,
    pub keep: usize,
    pub out: PathBuf,
    pub resume: bool,
    /// Stop after this step (as an interruption would), saving a checkpoint.
    pub stop_at: Option<u64>,
    pub data: Option<PathBuf>,
    /// A Hugging Face tokenizer.json (default: bytes).
    pub tokenizer: Option<PathBuf>,
    /// The plan's TOML, saved with every checkpoint.
    pub plan_toml: String,
    /// The planner's predicted peak for one step, bytes.
    pub predicted_peak: u64,
    /// Where to train, and the forward's dtype there (f32, or bf16 over f32 master weights).
    pub device: Device,
    pub compute: DType,
    /// Rated dense bf16 FLOP/s of the plan's GPU, for MFU on CUDA.
    pub rated_flops: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub steps: u64,
    pub final_loss: f64,
    pub val_loss: f64,
    pub val_bits_per_byte: f64,
    pub tokens_per_second: f64,
    /// Model FLOPs (no recomputation) per second over `matmul_flops_per_second`.
    pub mfu: f64,
    /// What MFU divides by: the GPU's rated dense bf16 rate, or on the CPU this machine's
    /// measured matmul rate in the compute dtype on the engine's threads.
    pub matmul_flops_per_second: f64,
    /// `cpu` or `cuda:N`, and the forward's dtype (`f32`, `bf16`).
    pub device: String,
    pub compute_dtype: String,
    pub predicted_peak_bytes: u64,
    pub measured_peak_bytes: u64,
    /// What `measured_peak_bytes` counts.
    pub measured_by: String,
    /// The same for tensors alone: on the CPU without gemm's packing scratch, which a
    /// GPU's matmul does not allocate; on CUDA equal to `measured_peak_bytes`.
    pub measured_tensor_peak_bytes: u64,
    /// (predicted − measured) / measured, against `measured_peak_bytes` in f32 (the f32
    /// inventory is the CPU's whole heap) and against `measured_tensor_peak_bytes` with
    /// 16-bit compute (that inventory is the tensors', as on a GPU).
    pub peak_error: f64,
    /// The whole process's heap high-water mark over the run: the data as loaded, the
    /// model and every step (streamed Parquet data keeps it far below the file's size).
    pub process_peak_bytes: u64,
    pub params: u64,
    pub data: String,
    pub entropy_nats_per_byte: Option<f64>,
    pub entropy_bits_per_byte: Option<f64>,
    /// Validation loss minus the corpus's entropy rate (the lowest achievable loss), nats.
    pub excess_over_entropy_nats: Option<f64>,
    pub seconds: f64,
}

#[derive(Serialize)]
struct MetricLine {
    step: u64,
    loss: f64,
    lr: f64,
    grad_norm: f64,
    tokens_per_second: f64,
    peak_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    val_loss: Option<f64>,
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

/// Mean validation loss over up to `VAL_WINDOWS` fixed windows.
fn validate(model: &Model, corpus: &Corpus, spec: &RunSpec) -> Result<f64> {
    let t = spec.train.seq_len as usize;
    let b = spec.train.micro_batch as usize;
    let offs = data::val_windows(&corpus.val, t, data::VAL_WINDOWS);
    if offs.is_empty() {
        bail!("the validation split is shorter than one sequence");
    }
    let mut total = 0.0;
    let mut count = 0;
    for w in offs.chunks(b.max(1)) {
        let (x, y) = data::windows_batch(&corpus.val, w, t)?;
        total += step::eval_loss(model, &x, &y, w.len(), step_opts(spec).chunk)? * w.len() as f64;
        count += w.len();
    }
    Ok(total / count as f64)
}

/// Reads a tokenizer.json and checks that its ids fit the model's vocabulary.
pub fn load_tokenizer(path: &std::path::Path, spec: &RunSpec) -> Result<tokenizers::Tokenizer> {
    let name = path.display().to_string();
    let t = tokenizers::Tokenizer::from_file(path)
        .map_err(|e| crate::exit::bad(&name, format!("not a tokenizer.json: {e}")))?;
    let n = t.get_vocab_size(true) as u64;
    if n > spec.model.vocab_size {
        return Err(crate::exit::bad(
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
        return Err(crate::exit::bad(
            "model.vocab_size",
            format!(
                "{}: the engine's tokenizer is byte-level and needs a vocabulary of at least 256",
                spec.model.vocab_size
            ),
        ));
    }
    Ok(())
}

/// Runs a few matmuls on the calling thread and on every thread of the pool, so that the
/// pool and gemm's per-thread packing buffers (one L2-sized slab per thread, made on a
/// thread's first matmul) exist before the baseline is taken: they are the process's, not
/// the step's. Running them only from the calling thread leaves it to the scheduler which
/// workers take part, and a worker that first multiplies during the step adds its slab to
/// the measured peak.
pub(crate) fn warm_up(compute: DType) -> Result<()> {
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
fn matmul_rate(device: &Device, dtype: DType) -> Result<f64> {
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

/// Drops the metrics of steps after `step` (a run that went on past its last checkpoint),
/// so a resumed run's log reads as one run.
fn truncate_metrics(path: &std::path::Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    crate::cmd::fit::write_atomic(path, &kept)
}

/// Trains `spec` and writes `OUT/metrics.jsonl`, checkpoints and `OUT/summary.json`.
pub fn train(spec: &RunSpec, o: &Opts) -> Result<Summary> {
    let (b, t) = (spec.train.micro_batch as usize, spec.train.seq_len as usize);
    let hf = match &o.tokenizer {
        Some(p) => Some(load_tokenizer(p, spec)?),
        None => {
            check_vocab(spec)?;
            None
        }
    };
    let tok = match &hf {
        Some(h) => data::Tokens::Hf(h),
        None => data::Tokens::Bytes,
    };
    let mut corpus = match &o.data {
        Some(p) => data::load(p, t + 1, tok)?,
        None => data::builtin(&tok)?,
    };
    if matches!(&corpus.train, data::Train::Tokens(v) if v.len() < t + 2) {
        return Err(crate::exit::bad(
            &corpus.name,
            "the training split is shorter than one sequence",
        ));
    }
    std::fs::create_dir_all(&o.out).with_context(|| format!("creating {}", o.out.display()))?;
    if let Some(p) = &o.tokenizer {
        let dst = o.out.join(checkpoint::TOKENIZER);
        if std::fs::canonicalize(p).ok() != std::fs::canonicalize(&dst).ok() {
            std::fs::copy(p, &dst).with_context(|| format!("copying {}", p.display()))?;
        }
    }
    let mut process_peak = alloc::peak();
    let before_warm = alloc::current();
    if o.device.is_cpu() {
        warm_up(o.compute)?;
    }
    let matmul_flops = match o.rated_flops {
        Some(f) if !o.device.is_cpu() => f,
        _ => matmul_rate(&o.device, o.compute)?,
    };
    let flops_per_token = vramplan_planner::model_flops_per_token(spec);
    let mfu = |tokens_per_second: f64| flops_per_token * tokens_per_second / matmul_flops;
    let meter = device::Meter::new(&o.device)?;
    let baseline = meter.current()?;
    let tensors_baseline = meter.tensors_current()?;
    if std::env::var_os("VRAMPLAN_MEM_DEBUG").is_some() {
        eprintln!("mem: before warm-up {before_warm}, baseline {baseline}");
    }
    let model = Model::new(
        &spec.model,
        DType::F32,
        o.compute,
        &o.device,
        &mut Rng::new(o.seed),
    )?;
    let mut opt = AdamW::new();
    let mut data_rng = Rng::new(o.seed.wrapping_add(1));
    let mut start = 0;
    if o.resume {
        let l = checkpoint::latest(&o.out)
            .map_err(|e| crate::exit::bad("--resume", format!("{e:#}")))?;
        checkpoint::restore(&l, &model, Some(&mut opt))?;
        data_rng = Rng(l.meta.data_rng);
        corpus.train.seek(l.meta.data_position)?;
        start = l.meta.step;
        if l.meta.plan.trim() != o.plan_toml.trim() {
            eprintln!(
                "warning: {} was written with a different plan; continuing with this one",
                l.dir.display()
            );
        }
        truncate_metrics(&o.out.join("metrics.jsonl"), start)?;
        println!("resumed from {} (step {start})", l.dir.display());
    }
    let params = vramplan_planner::param_count(&spec.model);
    println!(
        "training {} ({:.2} M parameters) on {}: {} steps of {} × {} tokens × {} accumulation",
        spec.model.name,
        params as f64 / 1e6,
        corpus.name,
        o.steps,
        b,
        t,
        spec.train.grad_accum
    );
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(o.out.join("metrics.jsonl"))
        .with_context(|| format!("opening {}", o.out.join("metrics.jsonl").display()))?;
    let sopts = step_opts(spec);
    let bits_per_byte =
        |nats_per_token: f64| nats_per_token / corpus.bytes_per_token / std::f64::consts::LN_2;
    let mut measured = 0u64;
    let mut measured_tensors = 0u64;
    let mut last_loss = f64::NAN;
    let mut val_loss = f64::NAN;
    let mut tokens = 0u64;
    let mut train_secs = 0.0;
    let began = Instant::now();
    let meta = |step: u64, rng: &Rng, train: &data::Train, opt: &AdamW, loss: f64| Meta {
        step,
        data_rng: rng.0,
        data_position: train.position(),
        adam_t: opt.t,
        seed: o.seed,
        plan: o.plan_toml.clone(),
        data: o
            .data
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "built-in".into()),
        total_steps: o.steps,
        learning_rate: o.lr,
        last_loss: loss,
        tokenizer: o.tokenizer.is_some(),
    };
    let end = o.stop_at.unwrap_or(o.steps).min(o.steps);
    for s in start..end {
        let t0 = Instant::now();
        let debug = std::env::var_os("VRAMPLAN_MEM_DEBUG").is_some() && s == start + 1;
        if debug {
            step::PROBES.lock().map(|mut v| v.clear()).ok();
            step::PROBING.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        process_peak = process_peak.max(alloc::peak());
        meter.reset_peak()?;
        let mut grads = step::Grads::new();
        let mut loss = 0.0;
        for _ in 0..spec.train.grad_accum {
            let (x, y) = corpus.train.batch(b, t, &mut data_rng)?;
            loss += step::forward_backward(&model, &x, &y, b, sopts, &mut grads)?;
        }
        loss /= (b * t) as f64 * spec.train.grad_accum as f64;
        if !loss.is_finite() {
            drop(grads);
            let m = meta(s, &data_rng, &corpus.train, &opt, loss);
            let dir = checkpoint::save(&o.out, &model, &opt, &m, o.keep.max(1) + 1)?;
            bail!(
                "the loss became {loss} at step {}: stopped; the weights before this step are saved in {} (lower the learning rate and --resume)",
                s + 1,
                dir.display()
            );
        }
        let lr = optim::schedule(s, o.steps, o.lr);
        let gnorm = opt.step(&model, grads, lr)?;
        step::probe("opt");
        let peak = meter.peak()?.saturating_sub(baseline);
        if debug {
            step::PROBING.store(false, std::sync::atomic::Ordering::Relaxed);
            for (l, cur, pk) in step::PROBES.lock().map(|v| v.clone()).unwrap_or_default() {
                eprintln!(
                    "mem: {l:>8}: live {} peak {}",
                    cur - baseline,
                    pk - baseline
                );
            }
        }
        if s > start {
            measured = measured.max(peak);
            measured_tensors =
                measured_tensors.max(meter.tensors_peak()?.saturating_sub(tensors_baseline));
        }
        let dt = t0.elapsed().as_secs_f64();
        train_secs += dt;
        tokens += (b * t) as u64 * spec.train.grad_accum;
        last_loss = loss;
        let step_no = s + 1;
        let mut line = MetricLine {
            step: step_no,
            loss,
            lr,
            grad_norm: gnorm,
            tokens_per_second: (b * t) as f64 * spec.train.grad_accum as f64 / dt,
            peak_bytes: peak,
            val_loss: None,
        };
        if o.eval_every > 0 && (step_no % o.eval_every == 0 || step_no == o.steps) {
            val_loss = validate(&model, &corpus, spec)?;
            line.val_loss = Some(val_loss);
        }
        writeln!(metrics, "{}", serde_json::to_string(&line)?)?;
        if step_no % o.log_every.max(1) == 0 || step_no == o.steps || s == start {
            let rate = tokens as f64 / train_secs.max(1e-9);
            println!(
                "step {step_no:>6}/{}  loss {loss:.4}{}  {rate:>8.0} tok/s  MFU {:>4.1} %  peak {:.1} MiB",
                o.steps,
                line.val_loss
                    .map(|v| format!("  val {v:.4} ({:.3} bits/byte)", bits_per_byte(v)))
                    .unwrap_or_default(),
                100.0 * mfu(rate),
                peak as f64 / (1 << 20) as f64
            );
        }
        if (o.save_every > 0 && step_no % o.save_every == 0) || step_no == end {
            checkpoint::save(
                &o.out,
                &model,
                &opt,
                &meta(step_no, &data_rng, &corpus.train, &opt, loss),
                o.keep,
            )?;
        }
    }
    if val_loss.is_nan() {
        val_loss = validate(&model, &corpus, spec)?;
    }
    let against = if o.compute == DType::F32 {
        measured
    } else {
        measured_tensors
    };
    let error = if against > 0 {
        (o.predicted_peak as f64 - against as f64) / against as f64
    } else {
        0.0
    };
    let tokens_per_second = if train_secs > 0.0 {
        tokens as f64 / train_secs
    } else {
        0.0
    };
    let summary = Summary {
        steps: end,
        final_loss: last_loss,
        val_loss,
        val_bits_per_byte: bits_per_byte(val_loss),
        tokens_per_second,
        mfu: mfu(tokens_per_second),
        matmul_flops_per_second: matmul_flops,
        device: device_name(&o.device),
        compute_dtype: o.compute.as_str().to_string(),
        predicted_peak_bytes: o.predicted_peak,
        measured_peak_bytes: measured,
        measured_by: meter.what().to_string(),
        measured_tensor_peak_bytes: measured_tensors,
        process_peak_bytes: process_peak.max(alloc::peak()),
        peak_error: error,
        params,
        data: corpus.name.clone(),
        entropy_nats_per_byte: corpus.entropy.map(|e| e.rate),
        entropy_bits_per_byte: corpus.entropy.map(|e| e.rate / std::f64::consts::LN_2),
        excess_over_entropy_nats: corpus
            .entropy
            .map(|e| val_loss / corpus.bytes_per_token - e.rate),
        seconds: began.elapsed().as_secs_f64(),
    };
    crate::cmd::fit::write_atomic(
        &o.out.join("summary.json"),
        &serde_json::to_string_pretty(&summary)?,
    )?;
    Ok(summary)
}

#[cfg(test)]
mod tests;
