//! `vramplan estimate [run.toml] [--check] [--json]`

use crate::exit::{bad, DOES_NOT_FIT};
use crate::load::{self, Env};
use crate::render::{self, Format};
use anyhow::Result;
use std::path::PathBuf;
use std::process::ExitCode;
use vramplan_planner::{
    host_memory, host_ram, training_time, Choice, DataSize, HostOptions, Load, Reader, RunSpec,
    TrainingTime, Utilization, MIB,
};

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
    /// Exit with code 3 when the run does not fit the GPU (the host RAM check is printed only).
    #[arg(long)]
    pub check: bool,
    /// Draw one step's memory over time, stacked by component, as SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    #[command(flatten)]
    pub host: HostArgs,
}

/// The host side of the run: RAM, data loading, and the data set's size.
#[derive(Debug, clap::Args)]
pub struct HostArgs {
    /// The machine's RAM in GiB, for the host-memory check (default: hardware.host_ram_gib,
    /// else this machine's MemTotal).
    #[arg(long, value_name = "GIB")]
    pub host_ram: Option<f64>,
    /// Data-loader worker processes per training process (DataLoader num_workers).
    #[arg(long, default_value_t = 0)]
    pub workers: u64,
    /// Batches each worker prefetches (DataLoader prefetch_factor).
    #[arg(long, default_value_t = 2)]
    pub prefetch: u64,
    /// The loader copies batches into pinned memory (DataLoader pin_memory).
    #[arg(long)]
    pub pin_memory: bool,
    /// How the weights reach host memory: init (built from the config), mmap
    /// (from_pretrained of safetensors) or copy (a file read whole).
    #[arg(long, value_name = "HOW")]
    pub weights: Option<String>,
    /// How training data is read from Parquet: none, row-group, whole or pages.
    #[arg(long, value_name = "HOW", default_value = "none")]
    pub reader: String,
    /// Decompressed size of one Parquet row group, MiB (default: pyarrow's row count
    /// times seq_len × 4 bytes of text).
    #[arg(long, value_name = "MIB")]
    pub row_group_mib: Option<f64>,
    /// Samples in the data set: gives steps and time per epoch.
    #[arg(long, conflicts_with = "dataset_tokens")]
    pub samples: Option<u64>,
    /// Tokens in the data set (packed sequences): gives steps and time per epoch.
    #[arg(long, value_name = "N")]
    pub dataset_tokens: Option<u64>,
    /// Passes over the data set.
    #[arg(long, default_value_t = 1.0)]
    pub epochs: f64,
    /// Model FLOPs utilization the time is estimated at: U or LOW-HIGH.
    #[arg(long, value_name = "U", default_value = vramplan_planner::DEFAULT_UTILIZATION)]
    pub utilization: String,
}

impl HostArgs {
    /// The host options for `loaded`, with the RAM to check against and where it came from.
    fn options(&self, loaded: &load::Loaded) -> Result<(HostOptions, &'static str)> {
        let flag = |e: vramplan_planner::PlanError| bad("command line", e);
        let mut o = HostOptions::for_run(&loaded.spec);
        o.workers = self.workers;
        o.prefetch = self.prefetch;
        o.pin_memory = self.pin_memory;
        if let Some(w) = &self.weights {
            o.load = Load::parse("--weights", w).map_err(flag)?;
        }
        o.reader = Reader::parse("--reader", &self.reader).map_err(flag)?;
        o.row_group_bytes = match self.row_group_mib {
            Some(m) if m.is_finite() && m > 0.0 && m < 1.0e9 => Some((m * MIB as f64) as u64),
            Some(m) => {
                return Err(bad(
                    "command line",
                    format!("--row-group-mib = {m}: a positive number of MiB"),
                ))
            }
            None => None,
        };
        o.samples = self.samples;
        let config = loaded
            .raw
            .hardware
            .host_ram()
            .map_err(|e| bad(&loaded.name, e))?;
        let (capacity, source) = match (self.host_ram, config) {
            (Some(g), _) => (Some(host_ram("--host-ram", g).map_err(flag)?), "--host-ram"),
            (None, Some(c)) => (Some(c), "hardware.host_ram_gib"),
            (None, None) => (load::host_memory(), "this machine's /proc/meminfo"),
        };
        o.capacity = capacity;
        Ok((o, source))
    }

    /// Steps and time per epoch, when the data set's size is given.
    fn time(&self, spec: &RunSpec) -> Result<Option<TrainingTime>> {
        let data = match (self.samples, self.dataset_tokens) {
            (Some(n), _) => DataSize::Samples(n),
            (None, Some(n)) => DataSize::Tokens(n),
            (None, None) => return Ok(None),
        };
        let epochs = vramplan_planner::epochs("--epochs", self.epochs)
            .map_err(|e| bad("command line", e))?;
        let u = Utilization::parse("--utilization", &self.utilization)
            .map_err(|e| bad("command line", e))?;
        Ok(Some(training_time(spec, data, epochs, u)))
    }
}

pub fn run(env: &Env, a: Args) -> Result<ExitCode> {
    let loaded = load::load_with(env, a.config.as_deref(), &a.over.get())?;
    if let Some(f) = &a.emit {
        render::emit(&load::emit(f, a.config.as_deref(), &loaded.spec)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    let (options, source) = a.host.options(&loaded)?;
    let mut report = vramplan_planner::estimate(&loaded.spec);
    report.time = a.host.time(&loaded.spec)?;
    let mut host = host_memory(&loaded.spec, report.host_bytes, &options);
    host.capacity_source = options.capacity.map(|_| source.to_string());
    report.host = Some(host);
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
