//! `vramplan export RUN_DIR|CHECKPOINT --out DIR`: a checkpoint written by `train` (a run
//! folder's newest) as a Hugging Face folder that transformers' `from_pretrained` loads.

use crate::exit::bad;
use crate::load::{self, Env};
use anyhow::Result;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use vramplan::engine::{checkpoint, hf};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A checkpoint folder (ckpt-*) or a training output folder (its newest checkpoint).
    #[arg(value_name = "RUN_DIR|CHECKPOINT")]
    pub from: PathBuf,
    /// The folder to write: new, empty, or an earlier export (replaced).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

pub fn run(env: &Env, a: Args) -> Result<ExitCode> {
    let name = a.from.display().to_string();
    if !a.from.exists() {
        return Err(bad(&name, "no such checkpoint or run folder"));
    }
    let l = checkpoint::latest(&a.from).map_err(|e| bad(&name, format!("{e:#}")))?;
    let plan = format!("{} (plan)", l.dir.display());
    let spec = load::resolve_text(env, &plan, &l.meta.plan, Path::new("."))?.spec;
    let files = hf::export_checkpoint(&spec, &l, &a.out)?;
    println!(
        "exported {} (step {}) to {}: {}",
        l.dir.display(),
        l.meta.step,
        a.out.display(),
        files.join(", ")
    );
    Ok(ExitCode::SUCCESS)
}
