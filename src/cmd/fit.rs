//! `vramplan fit --gpu NAME --model NAME [...]`: the fastest configuration that fits.

use crate::exit::bad;
use crate::load::{self, Env};
use crate::render::{self, Format};
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use vramplan::write_atomic;
use vramplan_planner::{
    fit, FitRequest, GlobalBatch, RawConfig, RawHardware, RawTrain, MAX_COUNT, MAX_DIM,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// GPU preset (see `vramplan gpus`), "auto" (NVML device 0) or "cpu".
    #[arg(long)]
    pub gpu: String,
    /// Model preset (see `vramplan models`) or a Hugging Face config.json.
    #[arg(long)]
    pub model: String,
    /// Fix the sequence length (otherwise the longest that fits is chosen).
    #[arg(long)]
    pub seq_len: Option<u64>,
    /// Sequences per optimizer step over all GPUs, kept through accumulation.
    #[arg(long, conflicts_with = "global_batch_tokens")]
    pub global_batch: Option<u64>,
    /// Tokens per optimizer step over all GPUs, kept through accumulation.
    #[arg(long)]
    pub global_batch_tokens: Option<u64>,
    #[arg(long, default_value = "bf16-autocast")]
    pub precision: String,
    /// Default: adamw (muon for nanochat).
    #[arg(long)]
    pub optimizer: Option<String>,
    #[arg(long, default_value = "sdpa")]
    pub attention: String,
    #[arg(long, default_value = "torch")]
    pub engine: String,
    #[arg(long, default_value_t = 1)]
    pub gpus: u64,
    #[arg(long, default_value = "ddp")]
    pub sharding: String,
    /// Memory to keep free, as a percentage ("10%") or a fraction ("0.1").
    #[arg(long, default_value = "10%")]
    pub margin: String,
    /// Also consider a fused linear + cross-entropy loss (the training code must provide one).
    #[arg(long)]
    pub allow_fused: bool,
    /// Write the chosen plan as a run config that `estimate` and `train` accept.
    #[arg(long, value_name = "PLAN.toml")]
    pub out: Option<PathBuf>,
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
    count_flag("--seq-len", a.seq_len, MAX_DIM)?;
    count_flag("--global-batch", a.global_batch, MAX_COUNT)?;
    count_flag("--global-batch-tokens", a.global_batch_tokens, MAX_TOKENS)?;
    count_flag("--gpus", Some(a.gpus), 1024)?;
    let model = load::model_arg(&a.model);
    let raw = RawConfig {
        model,
        train: RawTrain {
            seq_len: a.seq_len.or(Some(1024)),
            precision: Some(a.precision.clone()),
            optimizer: a.optimizer.clone(),
            attention: Some(a.attention.clone()),
            engine: Some(a.engine.clone()),
            ..RawTrain::default()
        },
        hardware: RawHardware {
            gpu: Some(a.gpu.clone()),
            gpus: Some(a.gpus),
            sharding: Some(a.sharding.clone()),
            ..RawHardware::default()
        },
    };
    let loaded = load::resolve_raw(env, "command line", raw.clone(), Path::new("."))?;
    let global = match (a.global_batch, a.global_batch_tokens) {
        (Some(g), _) => GlobalBatch::Sequences(g),
        (None, Some(t)) => GlobalBatch::Tokens(t),
        (None, None) => GlobalBatch::Free,
    };
    let req = FitRequest {
        base: loaded.spec,
        seq_len: a.seq_len,
        global,
        margin,
        allow_fused: a.allow_fused,
    };
    let result = fit(&req).map_err(|e| match e {
        vramplan_planner::PlanError::NoSolution(m) => anyhow::anyhow!("fit: {m}"),
        e => bad("command line", e),
    })?;
    let plan = plan_toml(&result, &raw)?;
    if let Some(out) = &a.out {
        write_atomic(out, &plan)?;
    }
    if let Some(p) = &a.plot {
        write_atomic(p, &render::svg::fit(&result))?;
    }
    let text =
        Format::from_json_flag(a.json)
            .renderer()
            .fit(&result, &plan, a.top, a.out.as_deref())?;
    render::emit(&text)?;
    Ok(ExitCode::SUCCESS)
}

fn plan_toml(r: &vramplan_planner::FitResult, raw: &RawConfig) -> Result<String> {
    Ok(format!(
        "# Plan chosen by `vramplan fit`: fits with a {:.0} % margin ({} of {}).\n{}",
        r.margin * 100.0,
        vramplan_planner::Bytes(r.best.report.device_bytes),
        vramplan_planner::Bytes(r.best.report.capacity_bytes),
        raw.with_spec(&r.best.spec).to_toml()?
    ))
}
