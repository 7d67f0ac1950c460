//! `vramplan sample`: being built (see the open issue); reports that instead of pretending.

use crate::load::Env;
use anyhow::{bail, Result};
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub rest: Vec<String>,
}

pub fn run(_env: &Env, _a: Args) -> Result<ExitCode> {
    bail!("`vramplan sample` is not available in this build")
}
