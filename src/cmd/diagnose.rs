//! `vramplan diagnose [LOG | -] [--config run.toml] [--out fixed.toml] [--json]`: reads
//! the CUDA out-of-memory reports of a training log, says why each happened and ranks
//! fixes; with the run's config the fixes are re-planned and their peaks predicted.

use crate::exit::bad;
use crate::load::{self, Env};
use crate::render::{self, Format};
use anyhow::Result;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use vramplan::write_atomic;
use vramplan_planner::{best_fix, diagnose_log, parse_log, FixPlan};

/// Reports diagnosed and shown in full; the rest of a log are only counted by cause.
const SHOWN: usize = 1000;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The training log; "-" or nothing reads standard input.
    pub log: Option<PathBuf>,
    /// The run config of the failed run: fixes are then predicted by the planner.
    #[arg(long, value_name = "RUN.toml")]
    pub config: Option<PathBuf>,
    /// Write the best fix as a run config (needs --config).
    #[arg(long, value_name = "FIXED.toml", requires = "config")]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(env: &Env, a: Args) -> Result<ExitCode> {
    let bytes = match a.log.as_deref() {
        None => read_stdin()?,
        Some(p) if p == Path::new("-") => read_stdin()?,
        Some(p) => std::fs::read(p)
            .map_err(|e| bad(&p.display().to_string(), format!("cannot read: {e}")))?,
    };
    let text = String::from_utf8_lossy(&bytes);
    let loaded = match &a.config {
        Some(p) => Some(load::load(env, Some(p))?),
        None => None,
    };
    // Planned once for the config, reused by every report of the log.
    let plan = loaded.as_ref().map(|l| FixPlan::new(&l.spec));
    let log = diagnose_log(parse_log(&text), plan.as_ref(), SHOWN);
    let mut written = None;
    if let (Some(out), Some(l), Some(spec)) = (&a.out, &loaded, best_fix(&log.diagnoses)) {
        write_atomic(out, &l.raw.with_spec(spec).to_toml()?)?;
        written = Some(out.as_path());
    }
    let text = Format::from_json_flag(a.json)
        .renderer()
        .diagnose(&log, written)?;
    render::emit(&text)?;
    Ok(ExitCode::SUCCESS)
}

fn read_stdin() -> Result<Vec<u8>> {
    let mut v = Vec::new();
    std::io::stdin()
        .read_to_end(&mut v)
        .map_err(|e| bad("standard input", format!("cannot read: {e}")))?;
    Ok(v)
}
