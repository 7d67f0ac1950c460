//! `vramplan models [--json]`

use crate::load::Env;
use crate::render;
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
    if a.json {
        println!("{}", serde_json::to_string_pretty(&models)?);
    } else {
        print!("{}", render::table::models(&models));
    }
    Ok(ExitCode::SUCCESS)
}
