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
use vramplan::engine::{self, capability, checkpoint::Keep, device::Choice, hf, overrides};
use vramplan_planner::{Bytes, Engine, FitRequest, GlobalBatch, LossMode, Report};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Run config (TOML) with `engine = "candle"` (arch llama, qwen2, qwen3, nanochat or
    /// t5). Without one, the built-in run: a small nanochat GPT on a generated corpus.
    pub plan: Option<PathBuf>,
    /// A model preset (see `vramplan models`) or a Hugging Face config.json, randomly
    /// initialized, in place of the plan's [model].
    #[arg(long, value_name = "NAME|config.json")]
    pub model: Option<String>,
    /// Start from a Hugging Face checkpoint folder (config.json, and model.safetensors or
    /// the shards of model.safetensors.index.json): llama / SmolLM2, mistral, qwen2, qwen3, t5.
    /// Without a plan the model is its config's; with one, the plan's model must be it.
    /// Its tokenizer.json is the default --tokenizer.
    #[arg(long, value_name = "DIR", conflicts_with = "model")]
    pub init: Option<PathBuf>,
    /// Training text: plain text, JSONL with "text" (or "prompt" and "response"), or Parquet with such string columns (streamed, never loaded whole). Prompt/response rows are SFT examples (see --train-on). Default: the built-in corpus.
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// A Hugging Face tokenizer.json (default: bytes, vocabulary 256); the model's
    /// vocab_size must hold its ids.
    #[arg(long, value_name = "tokenizer.json")]
    pub tokenizer: Option<PathBuf>,
    /// What prompt/response data trains on: `response` (SFT: one example a row, the loss
    /// on the response's tokens only; with the tokenizer's chat template when its
    /// tokenizer_config.json has one) or `all` (each row a text document, every token).
    /// Default: `response`, or on `--resume` what the run was started with.
    #[arg(long, value_name = "response|all")]
    pub train_on: Option<String>,
    /// Optimizer steps (default: the plan's `train.steps`, else 1000).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Folder for checkpoints, metrics.jsonl and summary.json.
    #[arg(long, default_value = "train-out", value_name = "DIR")]
    pub out: PathBuf,
    /// Continue from the newest checkpoint in --out written by this run (the plan, seed,
    /// learning rate and steps default to the checkpoint's).
    #[arg(long, conflicts_with = "force")]
    pub resume: bool,
    /// Start over in an --out that holds another run, moving that run to OUT.old-N.
    #[arg(long)]
    pub force: bool,
    /// Override a plan value: `--set train.micro_batch=4` (repeatable; dotted keys of the
    /// plan's [model], [train] and [hardware] tables), also with --resume.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Where to train: auto (CUDA when the plan names a GPU and this binary was built with
    /// the `cuda` feature, else the CPU), cpu, cuda, cuda:N.
    #[arg(long, default_value = "auto", value_name = "auto|cpu|cuda[:N]")]
    pub device: String,
    /// Refuse plans the planner says need more than this many GiB.
    #[arg(long, value_name = "GiB")]
    pub memory_limit: Option<f64>,
    /// Seed of the weights and the data order (default 0, or the checkpoint's on --resume).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Validation loss every N steps (0: only at the end).
    #[arg(long, default_value_t = 100)]
    pub eval_every: u64,
    /// Checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 200)]
    pub save_every: u64,
    /// The newest checkpoints to keep.
    #[arg(long, default_value_t = 3)]
    pub keep: usize,
    /// Also keep the N checkpoints with the lowest validation loss (measured at each
    /// checkpoint when N > 0).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub keep_best: usize,
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

/// The plan a run trains with.
pub struct Planned {
    pub loaded: Loaded,
    /// The plan's TOML, saved with every checkpoint.
    pub text: String,
    pub device: Choice,
    /// The plan as written, when it was for the torch engine and has been translated.
    pub torch: Option<Loaded>,
    /// The checkpoint `--init` names.
    pub init: Option<hf::Pretrained>,
}

/// Reads the plan (the file, the checkpoint's on `--resume` without one, or the built-in
/// run), applies `--model` and `--set`, and makes it one the engine runs: engine candle,
/// the precision and optimizer the engine has, the memory limit.
pub fn plan(env: &Env, a: &Args, prior: Option<&str>, device: Choice) -> Result<Planned> {
    let (loaded, source) = match (a.plan.as_deref(), prior) {
        (Some(p), _) => (load::load(env, Some(p))?, load::read_text(p)?),
        (None, Some(text)) if a.model.is_none() => {
            let name = format!("{} (the checkpoint's plan)", a.out.display());
            (
                load::resolve_text(env, &name, text, Path::new("."))?,
                text.to_string(),
            )
        }
        (None, _) => {
            let text = engine::DEFAULT_PLAN;
            let l = load::resolve_text(env, "built-in train plan", text, Path::new("."))?;
            (l, text.to_string())
        }
    };
    let dir = a
        .plan
        .as_deref()
        .and_then(|p| p.parent())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let init = a.init.as_deref().map(hf::read).transpose()?;
    let mut raw = loaded.raw.clone();
    if let Some(m) = &a.model {
        raw.model = load::model_arg(m);
    } else if let (Some(p), None, None) = (&init, &a.plan, prior) {
        raw.model = hf::raw_model(&p.spec);
    }
    let mut raw = overrides::apply(&raw, &a.set)?;
    if let Some(gib) = a.memory_limit {
        if !(gib.is_finite() && gib > 0.0) {
            return Err(bad(
                "--memory-limit",
                format!("{gib}: a positive number of GiB"),
            ));
        }
        raw.hardware.memory_gib = Some(gib);
    }
    let name = if a.set.is_empty() {
        loaded.name.clone()
    } else {
        format!("{} with --set {}", loaded.name, a.set.join(" --set "))
    };
    let source_raw = loaded.raw.clone();
    let written = if raw == loaded.raw {
        loaded
    } else {
        load::resolve_raw(env, &name, raw, &dir)?
    };
    let (raw, device) = runnable(&written, a, device, prior.is_some())?;
    // The plan as it was read, unless something here changed it.
    let text = if raw == source_raw {
        source
    } else {
        raw.to_toml()
            .map_err(|e| anyhow::anyhow!("{}: {e}", written.name))?
    };
    let l = load::resolve_raw(env, &written.name, raw, &dir)?;
    if let Some(p) = &init {
        hf::check_matches(&l.spec.model, &l.name, p)?;
    }
    let torch = (written.spec.train.engine != Engine::Candle).then_some(written);
    Ok(Planned {
        loaded: l,
        text,
        device,
        torch,
        init,
    })
}

/// The plan as the candle engine runs it: engine candle, the precision the device has,
/// AdamW, the GPU it runs on.
fn runnable(
    loaded: &Loaded,
    a: &Args,
    device: Choice,
    resumed: bool,
) -> Result<(vramplan_planner::RawConfig, Choice)> {
    let mut raw = loaded.raw.clone();
    if loaded.spec.train.engine != Engine::Candle {
        raw.train.engine = Some("candle".into());
    }
    let plan_gpu = &loaded.spec.hardware.device;
    let device = device.resolve(plan_gpu.is_cuda());
    let on_gpu = matches!(device, Choice::Cuda(_));
    let runs = capability::resolve(capability::Ask {
        on_gpu,
        plan_gpu: plan_gpu.is_cuda().then(|| plan_gpu.name()),
        precision: loaded.spec.train.precision,
        builtin: a.plan.is_none() && !resumed,
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
    // The run is planned with the CPU kernels this binary runs, whatever the plan names.
    if let Some(named) = raw.hardware.cpu_kernels.take() {
        let here = load::cpu_kernels();
        if !on_gpu && !named.eq_ignore_ascii_case(&here.to_string()) {
            eprintln!(
                "note: {}: cpu_kernels = \"{named}\", but this binary runs gemm's {here} kernels; planned with them",
                loaded.name
            );
        }
    }
    if loaded.spec.train.optimizer != vramplan_planner::Optimizer::AdamW {
        eprintln!(
            "note: {}: optimizer = \"{}\"; the candle engine trains with AdamW",
            loaded.name, loaded.spec.train.optimizer
        );
        raw.train.optimizer = Some("adamw".into());
    }
    Ok((raw, device))
}

/// The planner's search for a configuration of `spec`'s model that fits its device,
/// keeping the sequence length and the global batch.
fn fitting(
    spec: &vramplan_planner::RunSpec,
) -> vramplan_planner::Result<vramplan_planner::FitResult> {
    vramplan_planner::fit(&FitRequest {
        base: spec.clone(),
        seq_len: Some(spec.train.seq_len),
        global: GlobalBatch::Sequences(spec.global_batch()),
        margin: 0.0,
        allow_fused: false,
        keep: Vec::new(),
    })
}

/// A plan written for the torch engine, made one the candle engine runs on the same
/// device: as written when it fits there, else the planner's fitting configuration (the
/// same model, sequence length and global batch). Says both predictions and what changed.
/// `None` when the torch plan itself does not fit, or no configuration does on candle.
fn translate(env: &Env, p: &Planned, report: &Report) -> Result<Option<(Loaded, String)>> {
    let Some(torch) = &p.torch else {
        return Ok(None);
    };
    let before = vramplan_planner::estimate(&torch.spec);
    let mut l = p.loaded.clone();
    let mut text = p.text.clone();
    let mut candle = report.clone();
    if !report.fits {
        if !before.fits {
            return Ok(None);
        }
        let Ok(found) = fitting(&p.loaded.spec) else {
            return Ok(None);
        };
        let raw = l.raw.with_spec(&found.best.spec);
        text = raw
            .to_toml()
            .map_err(|e| anyhow::anyhow!("{}: {e}", l.name))?;
        l = load::resolve_raw(env, &l.name, raw, Path::new("."))?;
        candle = found.best.report;
    }
    // Both plans written out in full, so that only what differs shows.
    let full = |l: &Loaded| l.raw.with_spec(&l.spec).to_toml().unwrap_or_default();
    let changes = engine::rundir::plan_changes(&full(torch), &full(&l));
    eprintln!(
        "note: {}: written for the torch engine, which needs {} on {}; the candle engine needs {} as written{}; training on candle with {} (needs {})",
        torch.name,
        Bytes(before.device_bytes),
        before.device,
        Bytes(report.device_bytes),
        if report.fits { "" } else { ", which does not fit" },
        changes.join(", "),
        Bytes(candle.device_bytes)
    );
    Ok(Some((l, text)))
}

/// Searches for a configuration of the same model that fits (the planner's `fit`, keeping
/// the sequence length and the global batch) and writes it as `OUT/plan.fit.toml`.
fn suggest(loaded: &Loaded, a: &Args) {
    let spec = &loaded.spec;
    match fitting(spec) {
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
    // On --resume the checkpoint's plan, seed, learning rate and steps are the defaults.
    let prior = if a.resume {
        engine::checkpoint::newest_meta(&a.out)
    } else {
        None
    };
    let planned = plan(env, &a, prior.as_ref().map(|m| m.plan.as_str()), choice)?;
    let report = vramplan_planner::estimate(&planned.loaded.spec);
    let (loaded, plan_toml, report) = match translate(env, &planned, &report)? {
        Some((l, text)) => {
            let r = vramplan_planner::estimate(&l.spec);
            (l, text, r)
        }
        None => (planned.loaded, planned.text, report),
    };
    let spec = &loaded.spec;
    let tokenizer = tokenizer(&a, planned.init.as_ref(), spec)?;
    if let Err(e) = engine::check_fits(&loaded.name, &report) {
        refuse(&e, &report, &loaded, &a);
        return Ok(ExitCode::from(DOES_NOT_FIT));
    }
    let (steps, lr, seed) = settings(&a, &loaded, prior.as_ref())?;
    let device =
        engine::device::open(planned.device).map_err(|e| bad("--device", format!("{e:#}")))?;
    let compute = capability::compute(spec.train.precision);
    let rated_flops = match &spec.hardware.device {
        vramplan_planner::Device::Gpu(g) => Some(g.bf16_tflops * 1e12),
        _ => None,
    };
    let opts = engine::Opts {
        steps,
        lr,
        seed,
        eval_every: a.eval_every,
        save_every: a.save_every,
        log_every: a.log_every,
        keep: Keep {
            last: a.keep.max(1),
            best: a.keep_best,
        },
        out: a.out.clone(),
        resume: a.resume,
        force: a.force,
        stop_at: a.stop_at,
        data: a.data.clone(),
        tokenizer,
        train_on: train_on(a.train_on.as_deref(), prior.as_ref())?,
        hf_config: planned
            .init
            .as_ref()
            .map(|p| p.config.clone())
            .or(prior.as_ref().and_then(|m| m.hf_config.clone())),
        init: init_dir(planned.init.as_ref(), prior.as_ref(), spec),
        plan_toml,
        predicted_peak: report.peak_allocated_bytes,
        device,
        compute,
        rated_flops,
    };
    match engine::train(spec, &opts)? {
        Some(s) => print!("{}", render_summary(&s, &a.out)),
        None => println!("{}", finished(&a, prior.as_ref(), steps)),
    }
    Ok(ExitCode::SUCCESS)
}

/// The folder the run's weights start from: `--init`'s, or under LoRA (whose checkpoints
/// hold the adapters only) on `--resume` the one the run started from.
fn init_dir(
    init: Option<&hf::Pretrained>,
    prior: Option<&engine::checkpoint::Meta>,
    spec: &vramplan_planner::RunSpec,
) -> Option<PathBuf> {
    init.map(|p| p.dir.clone()).or(prior
        .filter(|_| spec.lora.is_some())
        .and_then(|m| m.init.as_ref().map(PathBuf::from)))
}

/// `--train-on`'s value, else on `--resume` the checkpoint's, else `response`.
fn train_on(
    flag: Option<&str>,
    prior: Option<&engine::checkpoint::Meta>,
) -> Result<engine::sft::TrainOn> {
    let v = flag
        .or(prior.and_then(|m| m.train_on.as_deref()))
        .unwrap_or("response");
    match v {
        "response" => Ok(engine::sft::TrainOn::Response),
        "all" => Ok(engine::sft::TrainOn::All),
        _ => Err(bad(
            "--train-on",
            format!("{v:?}: expected response or all"),
        )),
    }
}

/// The run's tokenizer.json (`--tokenizer`, else `--init`'s, else none: bytes), checked
/// against the model's vocabulary.
fn tokenizer(
    a: &Args,
    init: Option<&hf::Pretrained>,
    spec: &vramplan_planner::RunSpec,
) -> Result<Option<PathBuf>> {
    let tokenizer = a.tokenizer.clone().or(init_tokenizer(init));
    match &tokenizer {
        Some(p) => drop(engine::load_tokenizer(p, spec)?),
        None => engine::check_vocab(spec)?,
    }
    Ok(tokenizer)
}

/// The tokenizer.json of the `--init` checkpoint, if it has one.
fn init_tokenizer(init: Option<&hf::Pretrained>) -> Option<PathBuf> {
    init.map(|p| p.dir.join(engine::checkpoint::TOKENIZER))
        .filter(|p| p.is_file())
}

/// What a resumed run that had no step left says.
fn finished(a: &Args, prior: Option<&engine::checkpoint::Meta>, steps: u64) -> String {
    let summary = if a.out.join(engine::rundir::SUMMARY).exists() {
        "summary.json is kept".to_string()
    } else {
        format!(
            "it stopped before writing summary.json: vramplan eval --checkpoints {} gives its validation loss",
            a.out.display()
        )
    };
    format!(
        "{}: the run is already at step {} of {steps}; nothing to train ({summary}; a larger --steps trains on)",
        a.out.display(),
        prior.map_or(steps, |m| m.step)
    )
}

/// The run's steps, learning rate and seed: the flag's (or `--set`'s), else on
/// `--resume` the checkpoint's, else the plan's, else the defaults.
fn settings(
    a: &Args,
    loaded: &Loaded,
    prior: Option<&engine::checkpoint::Meta>,
) -> Result<(u64, f64, u64)> {
    let train = &loaded.raw.train;
    let steps = a
        .steps
        .or(set_value(a, "train.steps").and(train.steps))
        .or(prior.map(|m| m.total_steps))
        .or(train.steps)
        .unwrap_or(DEFAULT_STEPS);
    if steps == 0 {
        return Err(bad("--steps", "0: at least one step"));
    }
    let lr =
        a.lr.or(set_value(a, "train.learning_rate").and(train.learning_rate))
            .or(prior.map(|m| m.learning_rate))
            .or(train.learning_rate)
            .unwrap_or(DEFAULT_LR);
    if !(lr.is_finite() && lr > 0.0) {
        return Err(bad(
            "train.learning_rate",
            format!("{lr}: a positive number"),
        ));
    }
    let seed = a.seed.or(prior.map(|m| m.seed)).unwrap_or(0);
    Ok((steps, lr, seed))
}

/// Whether `--set` gave `key`.
fn set_value(a: &Args, key: &str) -> Option<()> {
    a.set
        .iter()
        .any(|s| s.split_once('=').is_some_and(|(k, _)| k.trim() == key))
        .then_some(())
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
    let measured = match s.peak_error {
        Some(error) => format!(
            "measured {} ({} B, {}){tensors}; error {:+.2} % against {}",
            Bytes(s.measured_peak_bytes),
            s.measured_peak_bytes,
            s.measured_by,
            100.0 * error,
            if s.compute_dtype == "f32" {
                "the measured peak"
            } else {
                "the tensors (the 16-bit inventory leaves out the CPU's matmul scratch, as a GPU has none)"
            }
        ),
        None => "not measured (the first step, which creates the optimizer state, is not counted: run 2 or more steps)".to_string(),
    };
    line(format!(
        "peak memory of a step on {} ({}): predicted {} ({} B), {measured}",
        s.device,
        s.compute_dtype,
        Bytes(s.predicted_peak_bytes),
        s.predicted_peak_bytes,
    ));
    line(format!(
        "summary written to {}",
        out.join("summary.json").display()
    ));
    text
}
