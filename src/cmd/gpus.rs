//! `vramplan gpus [--json]`: presets, and what NVML detects.

use crate::load::Env;
use crate::nvml;
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
    let gpus: Vec<_> = presets.gpus().cloned().collect();
    let detected = nvml::detect(&presets);
    if a.json {
        let det = match &detected {
            Ok(d) => serde_json::json!(d
                .iter()
                .map(|d| serde_json::json!({"index": d.index, "name": d.spec.display, "total_bytes": d.spec.capacity.0,
                    "used_bytes": d.used.0, "free_bytes": d.free.0, "nearest_preset": d.preset}))
                .collect::<Vec<_>>()),
            Err(e) => serde_json::json!({"error": format!("{e:#}")}),
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"presets": gpus, "detected": det}))?
        );
    } else {
        print!("{}", render::table::gpus(&gpus));
        match detected {
            Ok(d) if d.is_empty() => println!("\nNVML found no GPU."),
            Ok(d) => {
                println!("\nDetected through NVML (use gpu = \"auto\" for device 0):");
                for g in d {
                    println!(
                        "  {}: {}: {} total, {} used, {} free (nearest preset: {})",
                        g.index,
                        g.spec.display,
                        g.spec.capacity,
                        g.used,
                        g.free,
                        g.preset.unwrap_or_else(|| "none".into())
                    );
                }
            }
            Err(e) => println!(
                "\nNo GPU detected through NVML ({}). Name a preset, or gpu = \"cpu\".",
                e.root_cause()
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}
