//! `vramplan calibrate-candle CONFIGS --out FILE` (hidden): the engine's stage-by-stage
//! memory for each configuration line of CONFIGS, one measurement line each, as
//! `tools/calibrate_candle.py measure` reads them (format: `vramplan::engine::calibrate`).

use crate::exit::bad;
use anyhow::Result;
use std::path::PathBuf;
use std::process::ExitCode;
use vramplan::engine::calibrate::{self, Config};
use vramplan::engine::probe::Recorder;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// One configuration a line: arch ckpt L C H KV D I V B T chunk.
    pub configs: PathBuf,
    /// Where the measurement lines go.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// The forward's dtype (the weights stay f32).
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16"])]
    pub dtype: String,
    /// Count tensors alone (no matmul scratch), as on a GPU.
    #[arg(long)]
    pub tensors: bool,
}

pub fn run(a: Args) -> Result<ExitCode> {
    let name = a.configs.display().to_string();
    let text =
        std::fs::read_to_string(&a.configs).map_err(|e| bad(&name, format!("cannot read: {e}")))?;
    let configs = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| Config::parse(&name, i + 1, l))
        .collect::<Result<Vec<_>>>()?;
    let compute = match a.dtype.as_str() {
        "f16" => candle_core::DType::F16,
        _ => candle_core::DType::F32,
    };
    // On the threads `train` runs its steps on.
    let out = vramplan::engine::on_step_pool(|| -> Result<String> {
        let recorder = Recorder::new(a.tensors);
        let mut out = String::new();
        for c in &configs {
            out += &calibrate::measure(c, compute, &recorder)?;
            out.push('\n');
        }
        Ok(out)
    })??;
    vramplan::write_atomic(&a.out, &out)?;
    eprintln!(
        "{} configurations measured into {}",
        configs.len(),
        a.out.display()
    );
    Ok(ExitCode::SUCCESS)
}
