//! `vramplan fit --gpu NAME --model NAME [...]`: the fastest configuration that fits, or,
//! when nothing does, the plans the next levers give (exit 3).

use crate::exit::{bad, DOES_NOT_FIT};
use crate::load::{self, Env};
use crate::render::{self, Format};
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use vramplan::write_atomic;
use vramplan_planner::{
    fit_or_ladder, raw_with, Change, Choice, FitRequest, FitResult, GlobalBatch, Ladder, RawConfig,
    RawHardware, RawTrain, MAX_COUNT, MAX_DIM,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Take the run from a config file in any format `estimate` reads (docs/launchers.md):
    /// its model, sequence length, global batch and settings; the flags below override.
    #[arg(long, value_name = "FILE")]
    pub from: Option<PathBuf>,
    /// GPU preset (see `vramplan gpus`), "auto" (NVML device 0) or "cpu".
    #[arg(long, required_unless_present = "from")]
    pub gpu: Option<String>,
    /// Model preset (see `vramplan models`) or a Hugging Face config.json.
    #[arg(long, required_unless_present = "from")]
    pub model: Option<String>,
    /// Fix the sequence length (otherwise the longest that fits is chosen); a list
    /// (1024,768,512) tries each in order and takes the first that fits.
    #[arg(long, value_delimiter = ',', value_name = "LEN[,LEN...]")]
    pub seq_len: Vec<u64>,
    /// Sequences per optimizer step over all GPUs, kept through accumulation.
    #[arg(long, conflicts_with = "global_batch_tokens")]
    pub global_batch: Option<u64>,
    /// Tokens per optimizer step over all GPUs, kept through accumulation.
    #[arg(long)]
    pub global_batch_tokens: Option<u64>,
    /// Default: bf16-autocast (bf16 with --lora or --qlora: the base weights in bf16; or
    /// the --from file's).
    #[arg(long)]
    pub precision: Option<String>,
    /// Default: adamw (muon for nanochat; adamw-8bit with --qlora).
    #[arg(long)]
    pub optimizer: Option<String>,
    /// Train LoRA adapters of this rank (16 if none is given) on every linear, over a
    /// frozen bf16 base.
    #[arg(long, value_name = "RANK", num_args = 0..=1, default_missing_value = "16", conflicts_with = "qlora")]
    pub lora: Option<u64>,
    /// QLoRA: LoRA (rank 16 if none is given) over NF4 base linears with double
    /// quantization and bf16 compute; 8-bit AdamW unless --optimizer says otherwise.
    #[arg(long, value_name = "RANK", num_args = 0..=1, default_missing_value = "16")]
    pub qlora: Option<u64>,
    /// Offload saved activations to host memory between forward and backward
    /// (`train.offload_activations`).
    #[arg(long)]
    pub offload_activations: bool,
    /// DeepSpeed's ZeRO-Offload: the optimizer state in host memory
    /// (`hardware.offload_optimizer = "cpu"`; with --sharding zero1, zero2 or zero3).
    #[arg(long)]
    pub offload_optimizer: bool,
    /// DeepSpeed's parameter offload to host memory (`hardware.offload_params = "cpu"`;
    /// with --sharding zero3).
    #[arg(long)]
    pub offload_params: bool,
    /// Default: sdpa (or the --from file's).
    #[arg(long)]
    pub attention: Option<String>,
    /// Default: torch (or the --from file's).
    #[arg(long)]
    pub engine: Option<String>,
    /// Default: 1 (or the --from file's).
    #[arg(long)]
    pub gpus: Option<u64>,
    /// Default: ddp (or the --from file's).
    #[arg(long)]
    pub sharding: Option<String>,
    /// Memory to keep free, as a percentage ("5%") or a fraction ("0.05") of the card (docs/model.md, "The margin")
    #[arg(long, default_value = "5%")]
    pub margin: String,
    /// Also consider a fused linear + cross-entropy loss (the training code must provide one).
    #[arg(long)]
    pub allow_fused: bool,
    /// Kinds of change fit must not make: checkpointing, loss (the search), sharding,
    /// optimizer, precision, lora, gpus, offload (the levers tried when nothing fits).
    #[arg(long, value_delimiter = ',', value_name = "KIND[,KIND...]")]
    pub keep: Vec<String>,
    /// Write the chosen plan as a run config that `estimate` and `train` accept.
    #[arg(long, value_name = "PLAN.toml")]
    pub out: Option<PathBuf>,
    /// Print the chosen plan as this launcher's file or command line (over the --from
    /// file's settings when it is in that format) instead of the table.
    #[arg(long, value_name = "FORMAT", value_parser = crate::launch::EMITTED)]
    pub emit: Option<String>,
    /// Draw the device peak against micro-batch for each mode, as SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// How many candidates to show.
    #[arg(long, default_value_t = 12)]
    pub top: usize,
    #[arg(long)]
    pub json: bool,
}

fn parse_margin(s: &str) -> Result<f64> {
    let t = s.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|x| x / 100.0),
        None => t.parse::<f64>(),
    };
    match v {
        Ok(x) if (0.0..0.9).contains(&x) => Ok(x),
        _ => Err(bad(
            "--margin",
            format!("\"{s}\": a percentage from 0% to 90% (e.g. 10%) or a fraction (0.1)"),
        )),
    }
}

/// A count flag: 0 and values past the planner's bounds are bad input, named by the flag.
fn count_flag(flag: &str, v: Option<u64>, max: u64) -> Result<Option<u64>> {
    match v {
        Some(n) if n == 0 || n > max => {
            Err(bad(flag, format!("{n}: a whole number from 1 to {max}")))
        }
        v => Ok(v),
    }
}

/// The largest global batch in tokens: the most sequences of the longest length.
const MAX_TOKENS: u64 = MAX_COUNT * MAX_DIM;

pub fn run(env: &Env, a: Args) -> Result<ExitCode> {
    let margin = parse_margin(&a.margin)?;
    for &s in &a.seq_len {
        count_flag("--seq-len", Some(s), MAX_DIM)?;
    }
    count_flag("--global-batch", a.global_batch, MAX_COUNT)?;
    count_flag("--global-batch-tokens", a.global_batch_tokens, MAX_TOKENS)?;
    count_flag("--gpus", a.gpus, 1024)?;
    let (name, raw, dir) = base_run(env, &a)?;
    let loaded = load::resolve_raw(env, &name, raw.clone(), &dir)?;
    let t = &loaded.spec.train;
    let from_file = (
        t.micro_batch * t.grad_accum * loaded.spec.hardware.gpus,
        t.seq_len,
    );
    let global = match (a.global_batch, a.global_batch_tokens, &a.from) {
        (Some(g), _, _) => GlobalBatch::Sequences(g),
        (None, Some(t), _) => GlobalBatch::Tokens(t),
        (None, None, Some(_)) => GlobalBatch::Sequences(from_file.0),
        (None, None, None) => GlobalBatch::Free,
    };
    let seq_len = a
        .seq_len
        .first()
        .copied()
        .or(a.from.as_ref().map(|_| from_file.1));
    let req = FitRequest {
        base: loaded.spec,
        seq_len,
        global,
        margin,
        allow_fused: a.allow_fused,
        keep: a
            .keep
            .iter()
            .map(|k| Change::parse("--keep", k))
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| bad("command line", e))?,
    };
    let lengths = if a.seq_len.len() > 1 {
        &a.seq_len[..]
    } else {
        &[]
    };
    let result = match fit_or_ladder(&req, lengths).map_err(|e| bad(&name, e))? {
        Ok(r) => r,
        Err(ladder) => return nothing_fits(env, &a, (&raw, &dir), &req, &ladder),
    };
    let plan = plan_toml(&result, &raw.with_spec(&result.best.spec), None)?;
    if let Some(out) = &a.out {
        write_atomic(out, &plan)?;
    }
    if let Some(p) = &a.plot {
        write_atomic(p, &render::svg::fit(&result))?;
    }
    if let Some(f) = &a.emit {
        render::emit(&load::emit_fit(f, a.from.as_deref(), &result)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let text =
        Format::from_json_flag(a.json)
            .renderer()
            .fit(&result, &plan, a.top, a.out.as_deref())?;
    render::emit(&text)?;
    Ok(ExitCode::SUCCESS)
}

/// Nothing fits the run as asked: the ladder of levers (or, with --emit, the nearest plan
/// the launcher runs; with --out, the nearest plan), and exit 3.
fn nothing_fits(
    env: &Env,
    a: &Args,
    (raw, dir): (&RawConfig, &Path),
    req: &FitRequest,
    ladder: &Ladder,
) -> Result<ExitCode> {
    let nearest = ladder
        .nearest()
        .find_map(|alt| Some((alt, alt.result.as_ref()?)));
    if let (Some(out), Some((alt, r))) = (&a.out, nearest) {
        let lever = render::prose::lever_flags(&alt.levers);
        let written = raw_with(raw, &alt.levers, &r.best.spec);
        write_atomic(out, &plan_toml(r, &written, Some(&lever))?)?;
    }
    if let Some(f) = &a.emit {
        match load::emit_nearest(env, f, a.from.as_deref(), (raw, dir), req, ladder) {
            Ok((text, lever)) => {
                eprintln!(
                    "fit: nothing fits as asked; the nearest plan {f} runs: {}",
                    render::prose::lever_flags(&lever)
                );
                render::emit(&text)?;
            }
            Err(why) => eprintln!(
                "fit: nothing fits as asked, and no plan that fits can be written as {f}: {why}"
            ),
        }
        return Ok(ExitCode::from(DOES_NOT_FIT));
    }
    let text = Format::from_json_flag(a.json)
        .renderer()
        .ladder(&req.base, ladder)?;
    render::emit(&text)?;
    if let (Some(out), Some((alt, _))) = (&a.out, nearest) {
        eprintln!(
            "fit: nothing fits as asked; the nearest plan ({}) written to {}",
            render::prose::lever_flags(&alt.levers),
            out.display()
        );
    }
    Ok(ExitCode::from(DOES_NOT_FIT))
}

/// The run the flags alone describe, before the search's defaults.
fn flags_run(a: &Args) -> RawConfig {
    RawConfig {
        model: load::model_arg(a.model.as_deref().unwrap_or_default()),
        train: RawTrain {
            seq_len: a.seq_len.first().copied().or(Some(1024)),
            ..RawTrain::default()
        },
        hardware: RawHardware {
            gpu: a.gpu.clone(),
            gpus: Some(a.gpus.unwrap_or(1)),
            ..RawHardware::default()
        },
        lora: None,
    }
}

/// The run before the search: the --from file's with the flags over it, or the flags
/// alone; its name for errors and the folder its relative paths start from.
fn base_run(env: &Env, a: &Args) -> Result<(String, RawConfig, PathBuf)> {
    let over = load::Overrides {
        model: a.model.clone(),
        gpu: a.gpu.clone(),
        gpus: a.gpus,
    };
    let (name, mut raw, dir) = match &a.from {
        Some(f) => load::load_raw(env, f, &over)?,
        None => ("command line".to_string(), flags_run(a), PathBuf::from(".")),
    };
    let flag = |v: &Option<String>, d: &str, file: &Option<String>| match (v, &a.from) {
        (Some(v), _) => Some(v.clone()),
        (None, Some(_)) => file.clone(),
        (None, None) => Some(d.to_string()),
    };
    let lora = a
        .lora
        .map(|r| (r, false))
        .or(a.qlora.map(|r| (r, true)))
        .map(|(r, q)| vramplan_planner::adapters(r, q));
    if lora.is_some() {
        raw.lora = lora;
    }
    // DeepSpeed's bf16 (the mode its offload runs in) is bf16 weights over fp32 masters.
    let precision = if raw.lora.is_some() {
        "bf16"
    } else if a.offload_optimizer || a.offload_params {
        "bf16-mixed"
    } else {
        "bf16-autocast"
    };
    let t = &mut raw.train;
    t.precision = flag(&a.precision, precision, &t.precision);
    t.attention = flag(&a.attention, "sdpa", &t.attention);
    t.engine = flag(&a.engine, "torch", &t.engine);
    t.optimizer = a
        .optimizer
        .clone()
        .or(t.optimizer.take())
        .or(a.qlora.map(|_| "adamw-8bit".to_string()));
    if let Some(&s) = a.seq_len.first() {
        t.seq_len = Some(s);
    }
    if a.offload_activations {
        t.offload_activations = Some(true);
    }
    let h = &mut raw.hardware;
    h.sharding = flag(&a.sharding, "ddp", &h.sharding);
    if a.offload_optimizer {
        h.offload_optimizer = Some("cpu".into());
    }
    if a.offload_params {
        h.offload_params = Some("cpu".into());
    }
    if let Some(f) = a.emit.as_deref().and_then(crate::launch::Format::parse) {
        let changed = crate::launch::adapt(f, &mut raw);
        if !changed.is_empty() {
            eprintln!(
                "note: --emit {f}: searched as {f} runs it: {}",
                changed.join(", ")
            );
        }
    }
    Ok((name, raw, dir))
}

/// The plan's TOML with a header; `lever` names the change when nothing fit as asked.
fn plan_toml(r: &FitResult, written: &RawConfig, lever: Option<&str>) -> Result<String> {
    let nearest = lever
        .map(|l| format!("# Nothing fit as asked; this is the nearest plan: {l}.\n"))
        .unwrap_or_default();
    Ok(format!(
        "# Plan chosen by `vramplan fit`: fits with a {:.0} % margin ({} of {}).\n{nearest}{}",
        r.margin * 100.0,
        vramplan_planner::Bytes(r.best.report.device_bytes),
        vramplan_planner::Bytes(r.best.report.capacity_bytes),
        written.to_toml()?
    ))
}
