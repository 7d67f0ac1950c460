//! Command-line options and dispatch.

use crate::cmd;
use crate::load::Env;
use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "vramplan",
    version,
    about = "Predict, fit and explain the GPU memory of LLM training runs, and train with the plan"
)]
pub struct Cli {
    /// A TOML file of extra or replacement presets ([gpus.NAME] and [models.NAME] tables).
    #[arg(long, global = true, value_name = "FILE")]
    pub presets: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// How much memory a run takes, where the peak is, and whether it fits.
    Estimate(cmd::estimate::Args),
    /// The fastest configuration that fits a GPU, keeping the global batch.
    Fit(cmd::fit::Args),
    /// Why one configuration runs out of memory and another does not.
    Compare(cmd::compare::Args),
    /// From an out-of-memory message to its cause and a fix.
    Diagnose(cmd::diagnose::Args),
    /// Train with a plan on vramplan's candle engine and measure its memory.
    #[cfg(feature = "engine")]
    Train(cmd::train::Args),
    /// The validation loss of several checkpoints written by `train`.
    #[cfg(feature = "engine")]
    Eval(cmd::eval::Args),
    /// Generate text from a checkpoint written by `train`, or from a Hugging Face folder.
    #[cfg(feature = "engine")]
    Sample(cmd::sample::Args),
    /// A checkpoint written by `train` as a Hugging Face folder (`from_pretrained` loads it).
    #[cfg(feature = "engine")]
    Export(cmd::export::Args),
    /// GPU presets, and the GPUs NVML detects.
    Gpus(cmd::gpus::Args),
    /// Model presets.
    Models(cmd::models::Args),
    /// Stage-by-stage memory of the engine's step, for tools/calibrate_candle.py.
    #[cfg(feature = "engine")]
    #[command(hide = true)]
    CalibrateCandle(cmd::calibrate::Args),
}

pub fn run() -> Result<ExitCode> {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            // A bad flag value is bad input: one line, naming the flag and the value.
            if matches!(
                e.kind(),
                clap::error::ErrorKind::InvalidValue | clap::error::ErrorKind::ValueValidation
            ) {
                let text = e.render().to_string();
                eprintln!("{}", text.lines().next().unwrap_or_default());
            } else {
                let _ = e.print();
            }
            return Ok(ExitCode::from(code));
        }
    };
    crate::render::table::fit_output();
    let env = Env {
        presets_file: cli.presets,
    };
    match cli.command {
        Command::Estimate(a) => cmd::estimate::run(&env, a),
        Command::Fit(a) => cmd::fit::run(&env, a),
        Command::Compare(a) => cmd::compare::run(&env, a),
        Command::Diagnose(a) => cmd::diagnose::run(&env, a),
        #[cfg(feature = "engine")]
        Command::Train(a) => cmd::train::run(&env, a),
        #[cfg(feature = "engine")]
        Command::Eval(a) => cmd::eval::run(&env, a),
        #[cfg(feature = "engine")]
        Command::Sample(a) => cmd::sample::run(&env, a),
        #[cfg(feature = "engine")]
        Command::Export(a) => cmd::export::run(&env, a),
        Command::Gpus(a) => cmd::gpus::run(&env, a),
        Command::Models(a) => cmd::models::run(&env, a),
        #[cfg(feature = "engine")]
        Command::CalibrateCandle(a) => cmd::calibrate::run(a),
    }
}
