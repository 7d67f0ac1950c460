//! `vramplan estimate [run.toml] [--check] [--json]`

use crate::exit::DOES_NOT_FIT;
use crate::load::{self, Env};
use crate::render::{self, Format};
use anyhow::Result;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Run config: vramplan's TOML or a launcher's file (docs/launchers.md). Without one,
    /// the built-in example: nanochat d16 on 2 × RTX 5090D (seed 002).
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub over: load::OverrideArgs,
    /// Print the plan as this launcher's file or command line instead of a table.
    #[arg(long, value_name = "FORMAT", value_parser = crate::launch::EMITTED)]
    pub emit: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Exit with code 3 when the run does not fit.
    #[arg(long)]
    pub check: bool,
    /// Draw one step's memory over time, stacked by component, as SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

pub fn run(env: &Env, a: Args) -> Result<ExitCode> {
    let loaded = load::load_with(env, a.config.as_deref(), &a.over.get())?;
    if let Some(f) = &a.emit {
        render::emit(&load::emit(f, a.config.as_deref(), &loaded.spec)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let report = vramplan_planner::estimate(&loaded.spec);
    if let Some(p) = &a.plot {
        vramplan::write_atomic(p, &render::svg::timeline(&report, &loaded.name))?;
    }
    let text = Format::from_json_flag(a.json)
        .renderer()
        .estimate(&loaded.spec, &report)?;
    render::emit(&text)?;
    Ok(if a.check && !report.fits {
        ExitCode::from(DOES_NOT_FIT)
    } else {
        ExitCode::SUCCESS
    })
}
