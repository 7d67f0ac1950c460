//! `vramplan gpus [--json]`: presets, and what NVML detects.

use crate::load::Env;
use crate::nvml;
use crate::render::{self, Format};
use anyhow::Result;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long)]
    pub json: bool,
}

pub fn run(env: &Env, a: Args) -> Result<ExitCode> {
    let presets = env.presets()?;
    let gpus: Vec<_> = presets.gpus().cloned().collect();
    let detected = nvml::detect(&presets);
    let text = Format::from_json_flag(a.json)
        .renderer()
        .gpus(&gpus, &detected)?;
    render::emit(&text)?;
    Ok(ExitCode::SUCCESS)
}
