//! `vramplan models [--json]`

use crate::load::Env;
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
    let models: Vec<_> = presets.models().cloned().collect();
    let text = Format::from_json_flag(a.json).renderer().models(&models)?;
    render::emit(&text)?;
    Ok(ExitCode::SUCCESS)
}
