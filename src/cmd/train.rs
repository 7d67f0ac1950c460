//! `vramplan train [PLAN.toml] [...]`: train with a plan on the candle engine (f32 on the
//! CPU; on CUDA, when built with the `cuda` feature, bf16 compute over f32 master weights
//! or f32), after checking with the planner that the plan fits, and report predicted vs
//! measured memory. Without a plan: a small nanochat GPT on a built-in corpus of known entropy.
//! Byte-level by default; `--tokenizer` takes a Hugging Face tokenizer.json.

use crate::exit::{bad, DOES_NOT_FIT};
use crate::load::{self, Env, Loaded};
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use vramplan::engine::{self, capability, device::Choice};
use vramplan_planner::{Bytes, Engine, FitRequest, GlobalBatch, LossMode};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Run config (TOML) with `engine = "candle"`, arch llama or nanochat. Without one, the
    /// built-in run: a small nanochat GPT on a generated corpus.
    pub plan: Option<PathBuf>,
    /// A model preset (see `vramplan models`) or a Hugging Face config.json, randomly
    /// initialized, in place of the plan's [model].
    #[arg(long, value_name = "NAME|config.json")]
    pub model: Option<String>,
    /// Training text: plain text, JSONL with "text" (or "prompt" and "response"), or Parquet with such string columns (streamed, never loaded whole). Default: the built-in corpus.
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// A Hugging Face tokenizer.json (default: bytes, vocabulary 256); the model's
    /// vocab_size must hold its ids.
    #[arg(long, value_name = "tokenizer.json")]
    pub tokenizer: Option<PathBuf>,
    /// Optimizer steps (default: the plan's `train.steps`, else 1000).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Folder for checkpoints, metrics.jsonl and summary.json.
    #[arg(long, default_value = "train-out", value_name = "DIR")]
    pub out: PathBuf,
    /// Continue from the newest checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// Where to train: auto (CUDA when the plan names a GPU and this binary was built with
    /// the `cuda` feature, else the CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto", value_name = "auto|cpu|cuda[:N]")]
    pub device: String,
    /// Refuse plans the planner says need more than this many GiB.
    #[arg(long, value_name = "GiB")]
    pub memory_limit: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Validation loss every N steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    pub eval_every: u64,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 200)]
    pub save_every: u64,
    /// Checkpoints to keep.
    #[arg(long, default_value_t = 3)]
    pub keep: usize,
    /// Progress line every N steps.
    #[arg(long, default_value_t = 25)]
    pub log_every: u64,
    /// Stop after this step as an interruption would (the schedule still spans --steps).
    #[arg(long, value_name = "STEP", hide = true)]
    pub stop_at: Option<u64>,
    /// Learning rate (default: the plan's `train.learning_rate`, else 1e-3).
    #[arg(long)]
    pub lr: Option<f64>,
}

const DEFAULT_STEPS: u64 = 1000;
const DEFAULT_LR: f64 = 1e-3;

/// Reads the plan and makes it one the engine runs: the model, engine candle, fp32, the
/// memory limit.
pub fn plan(
    env: &Env,
    path: Option<&Path>,
    model: Option<&str>,
    memory_limit: Option<f64>,
    device: Choice,
) -> Result<(Loaded, String, Choice)> {
    let loaded = match path {
        None => load::resolve_text(
            env,
            "built-in train plan",
            engine::DEFAULT_PLAN,
            Path::new("."),
        )?,
        Some(p) => load::load(env, Some(p))?,
    };
    let mut raw = loaded.raw.clone();
    if let Some(m) = model {
        raw.model = load::model_arg(m);
    }
    if loaded.spec.train.engine != Engine::Candle {
        eprintln!(
            "note: {}: engine = \"{}\"; training on the candle engine",
            loaded.name, loaded.spec.train.engine
        );
        raw.train.engine = Some("candle".into());
    }
    let plan_gpu = &loaded.spec.hardware.device;
    let device = device.resolve(plan_gpu.is_cuda());
    let on_gpu = matches!(device, Choice::Cuda(_));
    let runs = capability::resolve(capability::Ask {
        on_gpu,
        plan_gpu: plan_gpu.is_cuda().then(|| plan_gpu.name()),
        precision: loaded.spec.train.precision,
        builtin: path.is_none(),
        cuda_built: engine::device::CUDA_BUILT,
    })?;
    for note in &runs.notes {
        eprintln!("note: {}: {note}", loaded.name);
    }
    if runs.precision != loaded.spec.train.precision {
        raw.train.precision = Some(runs.precision.to_string());
    }
    if on_gpu && !plan_gpu.is_cuda() {
        // The planner checks the plan against the GPU the engine will use.
        raw.hardware.gpu = Some("auto".into());
    }
    if loaded.spec.train.optimizer != vramplan_planner::Optimizer::AdamW {
        eprintln!(
            "note: {}: optimizer = \"{}\"; the candle engine trains with AdamW",
            loaded.name, loaded.spec.train.optimizer
        );
        raw.train.optimizer = Some("adamw".into());
    }
    if let Some(gib) = memory_limit {
        if !(gib.is_finite() && gib > 0.0) {
            return Err(bad(
                "--memory-limit",
                format!("{gib}: a positive number of GiB"),
            ));
        }
        raw.hardware.memory_gib = Some(gib);
    }
    let dir = path
        .and_then(|p| p.parent())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let text = match (path, model) {
        (None, None) if !on_gpu => engine::DEFAULT_PLAN.to_string(),
        _ => raw
            .to_toml()
            .map_err(|e| anyhow::anyhow!("{}: {e}", loaded.name))?,
    };
    let l = load::resolve_raw(env, &loaded.name, raw, &dir)?;
    Ok((l, text, device))
}

/// Searches for a configuration of the same model that fits (the planner's `fit`, keeping
/// the sequence length and the global batch) and writes it as `OUT/plan.fit.toml`.
fn suggest(loaded: &Loaded, a: &Args) {
    let spec = &loaded.spec;
    let req = FitRequest {
        base: spec.clone(),
        seq_len: Some(spec.train.seq_len),
        global: GlobalBatch::Sequences(spec.global_batch()),
        margin: 0.0,
        allow_fused: false,
    };
    match vramplan_planner::fit(&req) {
        Ok(r) => {
            let t = &r.best.spec.train;
            let path = a.out.join("plan.fit.toml");
            let written = loaded
                .raw
                .with_spec(&r.best.spec)
                .to_toml()
                .map_err(anyhow::Error::from)
                .and_then(|text| {
                    std::fs::create_dir_all(&a.out)?;
                    Ok(vramplan::write_atomic(&path, &text)?)
                });
            println!(
                "a plan that fits: micro-batch {} × accumulation {}, checkpointing {}, loss {}{} ({} at the peak){}",
                t.micro_batch,
                t.grad_accum,
                t.checkpointing,
                t.loss,
                if t.loss == LossMode::Chunked {
                    format!(" in chunks of {} rows", t.loss_chunk)
                } else {
                    String::new()
                },
                Bytes(r.best.report.device_bytes),
                match written {
                    Ok(()) => format!("; written to {}: vramplan train {}", path.display(), path.display()),
                    Err(e) => format!("; not written: {e:#}"),
                }
            );
        }
        Err(e) => println!("no configuration of this model fits: {e}"),
    }
    if a.memory_limit.is_none() {
        let model = loaded
            .raw
            .model
            .preset
            .clone()
            .unwrap_or_else(|| "MODEL".into());
        println!(
            "to compare the candidates: vramplan fit --gpu {} --model {model} --engine candle --precision fp32 --seq-len {} --global-batch {}",
            if spec.hardware.device.is_cuda() { spec.hardware.device.name() } else { "cpu" },
            spec.train.seq_len,
            spec.global_batch()
        );
    }
}

/// Says why the plan does not fit, what is live at its peak, and a plan that fits.
fn refuse(e: &vramplan::Error, report: &vramplan_planner::Report, loaded: &Loaded, a: &Args) {
    println!("{e}.");
    println!("at the peak ({}):", report.peak_phase);
    for (k, v) in &report.components {
        if *v > 0 {
            println!("  {k:<14} {}", Bytes(*v));
        }
    }
    suggest(loaded, a);
}

pub fn run(env: &Env, a: Args) -> Result<ExitCode> {
    let choice = Choice::parse(&a.device).ok_or_else(|| {
        bad(
            "--device",
            format!("{:?}: one of auto, cpu, cuda, cuda:N", a.device),
        )
    })?;
    let (loaded, plan_toml, choice) = plan(
        env,
        a.plan.as_deref(),
        a.model.as_deref(),
        a.memory_limit,
        choice,
    )?;
    let spec = &loaded.spec;
    match &a.tokenizer {
        Some(p) => drop(engine::load_tokenizer(p, spec)?),
        None => engine::check_vocab(spec)?,
    }
    let report = vramplan_planner::estimate(spec);
    if let Err(e) = engine::check_fits(&loaded.name, &report) {
        refuse(&e, &report, &loaded, &a);
        return Ok(ExitCode::from(DOES_NOT_FIT));
    }
    let steps = a.steps.or(loaded.raw.train.steps).unwrap_or(DEFAULT_STEPS);
    if steps == 0 {
        return Err(bad("--steps", "0: at least one step"));
    }
    let lr =
        a.lr.or(loaded.raw.train.learning_rate)
            .unwrap_or(DEFAULT_LR);
    if !(lr.is_finite() && lr > 0.0) {
        return Err(bad(
            "train.learning_rate",
            format!("{lr}: a positive number"),
        ));
    }
    let device = engine::device::open(choice).map_err(|e| bad("--device", format!("{e:#}")))?;
    let compute = capability::compute(spec.train.precision);
    let rated_flops = match &spec.hardware.device {
        vramplan_planner::Device::Gpu(g) => Some(g.bf16_tflops * 1e12),
        _ => None,
    };
    let opts = engine::Opts {
        steps,
        lr,
        seed: a.seed,
        eval_every: a.eval_every,
        save_every: a.save_every,
        log_every: a.log_every,
        keep: a.keep.max(1),
        out: a.out.clone(),
        resume: a.resume,
        stop_at: a.stop_at,
        data: a.data.clone(),
        tokenizer: a.tokenizer.clone(),
        plan_toml,
        predicted_peak: report.peak_allocated_bytes,
        device,
        compute,
        rated_flops,
    };
    let s = engine::train(spec, &opts)?;
    print!("{}", render_summary(&s, &a.out));
    Ok(ExitCode::SUCCESS)
}

/// The closing lines of a run: losses against the corpus's entropy, speed, and the
/// measured peak against the prediction.
fn render_summary(s: &engine::Summary, out: &Path) -> String {
    let mut text = String::from("\n");
    let mut line = |l: String| {
        text += &l;
        text.push('\n');
    };
    line(format!(
        "done: {} steps, final loss {:.4}, validation loss {:.4} nats/token ({:.3} bits/byte)",
        s.steps, s.final_loss, s.val_loss, s.val_bits_per_byte
    ));
    if let (Some(h), Some(excess)) = (s.entropy_nats_per_byte, s.excess_over_entropy_nats) {
        line(format!(
            "corpus entropy rate {h:.4} nats/byte ({:.3} bits/byte), the lowest achievable loss: validation is {excess:.4} nats/byte ({:.3} bits/byte, {:.1} %) above it",
            h / std::f64::consts::LN_2,
            excess / std::f64::consts::LN_2,
            100.0 * excess / h
        ));
    }
    line(format!(
        "throughput {:.0} tokens/s, MFU {:.1} % of {} ({:.1} GFLOP/s)",
        s.tokens_per_second,
        100.0 * s.mfu,
        if s.device == "cpu" {
            format!("this machine's measured {} matmul rate", s.compute_dtype)
        } else {
            "the GPU's rated dense bf16 rate".to_string()
        },
        s.matmul_flops_per_second / 1e9
    ));
    let tensors = if s.measured_tensor_peak_bytes != s.measured_peak_bytes {
        format!(
            ", tensors alone {} ({} B)",
            Bytes(s.measured_tensor_peak_bytes),
            s.measured_tensor_peak_bytes
        )
    } else {
        String::new()
    };
    line(format!(
        "peak memory of a step on {} ({}): predicted {} ({} B), measured {} ({} B, {}){tensors}; error {:+.2} % against {}",
        s.device,
        s.compute_dtype,
        Bytes(s.predicted_peak_bytes),
        s.predicted_peak_bytes,
        Bytes(s.measured_peak_bytes),
        s.measured_peak_bytes,
        s.measured_by,
        100.0 * s.peak_error,
        if s.compute_dtype == "f32" { "the measured peak" } else { "the tensors (the 16-bit inventory leaves out the CPU's matmul scratch, as a GPU has none)" }
    ));
    line(format!(
        "summary written to {}",
        out.join("summary.json").display()
    ));
    text
}
