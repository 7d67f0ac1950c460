//! `vramplan compare A B [--json]`: either file in any format `estimate` reads.

use crate::load::{self, Env};
use crate::render::{self, Format};
use anyhow::Result;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The first run config (e.g. the one that failed).
    pub a: PathBuf,
    /// The second run config (e.g. the stable one).
    pub b: PathBuf,
    #[command(flatten)]
    pub over: load::OverrideArgs,
    #[arg(long)]
    pub json: bool,
    /// Draw both steps' memory over time on one scale, as SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

pub fn run(env: &Env, a: Args) -> Result<ExitCode> {
    let over = a.over.get();
    let la = load::load_with(env, Some(&a.a), &over)?;
    let lb = load::load_with(env, Some(&a.b), &over)?;
    let ra = vramplan_planner::estimate(&la.spec);
    let rb = vramplan_planner::estimate(&lb.spec);
    let cmp = vramplan_planner::compare(&la.spec, &ra, &lb.spec, &rb);
    if let Some(p) = &a.plot {
        vramplan::write_atomic(p, &render::svg::compare(&ra, &la.name, &rb, &lb.name))?;
    }
    let text = Format::from_json_flag(a.json)
        .renderer()
        .compare(&la.name, &ra, &lb.name, &rb, &cmp)?;
    render::emit(&text)?;
    Ok(ExitCode::SUCCESS)
}
