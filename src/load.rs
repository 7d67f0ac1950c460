//! Reads run configs and Hugging Face config.json files, and resolves them with the
//! presets, host memory and NVML: the I/O the planner leaves to its caller.

use crate::exit::bad;
use crate::launch;
use crate::nvml;
use anyhow::Result;
use std::path::{Path, PathBuf};
use vramplan_planner::{Bytes, Context, CpuKernels, Presets, RawConfig, RawModel, RunSpec};

/// The built-in default run: the seed's stable nanochat d16 configuration.
pub const DEFAULT_CONFIG: &str = include_str!("../presets/examples/nanochat-d16-stable.toml");
pub const DEFAULT_NAME: &str = "presets/examples/nanochat-d16-stable.toml";

/// Global options every command shares.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub presets_file: Option<PathBuf>,
}

impl Env {
    pub fn presets(&self) -> Result<Presets> {
        let mut p = Presets::builtin().map_err(|e| anyhow::anyhow!("built-in presets: {e}"))?;
        if let Some(f) = &self.presets_file {
            let name = f.display().to_string();
            let text =
                std::fs::read_to_string(f).map_err(|e| bad(&name, format!("cannot read: {e}")))?;
            p.merge_toml(&text).map_err(|e| bad(&name, e))?;
        }
        Ok(p)
    }
}

/// A run config as read from a file (or the built-in default).
#[derive(Debug, Clone)]
pub struct Loaded {
    pub name: String,
    /// The config as written: `diagnose --out` writes configs derived from it.
    pub raw: RawConfig,
    pub spec: RunSpec,
}

pub fn read_text(path: &Path) -> Result<String> {
    let name = path.display().to_string();
    std::fs::read_to_string(path).map_err(|e| bad(&name, format!("cannot read: {e}")))
}

/// Parses and resolves a config text; `name` is what errors call the file, `dir` where
/// relative `hf_config` paths start.
#[cfg_attr(not(feature = "engine"), allow(dead_code))]
pub fn resolve_text(env: &Env, name: &str, text: &str, dir: &Path) -> Result<Loaded> {
    let raw = RawConfig::from_toml(text).map_err(|e| bad(name, e))?;
    resolve_raw(env, name, raw, dir)
}

pub fn resolve_raw(env: &Env, name: &str, raw: RawConfig, dir: &Path) -> Result<Loaded> {
    let presets = env.presets()?;
    let mut ctx = Context {
        host_memory: host_memory(),
        cpu_kernels: Some(cpu_kernels()),
        ..Context::default()
    };
    if let Some(hf) = &raw.model.hf_config {
        let p = dir.join(hf);
        ctx.hf_model = Some(read_hf(&p)?);
    }
    if raw.hardware.gpu.as_deref() == Some("auto") {
        ctx.detected_gpu = nvml::detect(&presets)
            .ok()
            .and_then(|d| d.into_iter().next())
            .map(|d| d.spec);
    }
    let spec = raw.resolve(&presets, &ctx).map_err(|e| bad(name, e))?;
    Ok(Loaded {
        name: name.to_string(),
        raw,
        spec,
    })
}

pub fn load(env: &Env, path: Option<&Path>) -> Result<Loaded> {
    load_with(env, path, &Overrides::default())
}

/// Flags that replace what a config file says (`--model`, `--gpu`, `--gpus`).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub model: Option<String>,
    pub gpu: Option<String>,
    pub gpus: Option<u64>,
}

/// `--model`, `--gpu` and `--gpus` for commands that read a config file.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct OverrideArgs {
    /// The model, replacing the file's (a preset or a Hugging Face config.json); needed
    /// when a launcher's file names none vramplan knows.
    #[arg(long)]
    pub model: Option<String>,
    /// The GPU (a preset, "auto" or "cpu"), replacing the file's; launchers' files name none.
    #[arg(long)]
    pub gpu: Option<String>,
    /// GPUs, replacing the file's (launchers take it from their command line).
    #[arg(long)]
    pub gpus: Option<u64>,
}

impl OverrideArgs {
    pub fn get(&self) -> Overrides {
        Overrides {
            model: self.model.clone(),
            gpu: self.gpu.clone(),
            gpus: self.gpus,
        }
    }
}

impl Overrides {
    fn apply(&self, raw: &mut RawConfig) {
        if let Some(m) = &self.model {
            raw.model = model_arg(m);
        }
        if let Some(g) = &self.gpu {
            raw.hardware.gpu = Some(g.clone());
            // The file's CPU kernels mean nothing on the GPU named in its place.
            if g != "cpu" {
                raw.hardware.cpu_kernels = None;
            }
        }
        if let Some(n) = self.gpus {
            raw.hardware.gpus = Some(n);
        }
    }
}

/// A config file in any format (`docs/launchers.md`), with `ov` applied: its name, the
/// run as written, and the folder its relative paths start from.
pub fn load_raw(env: &Env, path: &Path, ov: &Overrides) -> Result<(String, RawConfig, PathBuf)> {
    let text = read_text(path)?;
    let name = path.display().to_string();
    let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    let format = launch::detect(&name, &text).map_err(|e| bad(&name, e))?;
    if format == launch::Format::Vramplan {
        let mut raw = RawConfig::from_toml(&text).map_err(|e| bad(&name, e))?;
        ov.apply(&mut raw);
        return Ok((name, raw, dir));
    }
    let presets = env.presets()?;
    let ctx = launch::Ctx {
        dir: &dir,
        presets: &presets,
    };
    let l = launch::read(format, &text, &ctx).map_err(|e| bad(&name, e))?;
    if let Some(w) = l.warning(&name) {
        eprintln!("{w}");
    }
    let mut raw = l.raw.clone();
    ov.apply(&mut raw);
    l.shard(&mut raw).map_err(|e| bad(&name, e))?;
    check_launch(&name, &l, &raw, ov)?;
    Ok((name, raw, dir))
}

/// `--emit FORMAT`: the plan `spec` in that format, over `input` where it is in it.
pub fn emit(format: &str, input: Option<&Path>, spec: &RunSpec) -> Result<String> {
    let f = launch::Format::parse(format).ok_or_else(|| {
        bad(
            "--emit",
            format!("\"{format}\": one of {}", launch::EMITTED.join(" | ")),
        )
    })?;
    let text = match input {
        Some(p) => Some(read_text(p)?),
        None => None,
    };
    let source = input.zip(text.as_deref()).and_then(|(p, t)| {
        let format = launch::detect(&p.display().to_string(), t).ok()?;
        Some(launch::Source { format, text: t })
    });
    let text =
        launch::emit(f, source.as_ref(), spec).map_err(|e| bad(&format!("--emit {format}"), e))?;
    if let Some(note) = launch::launch_note(f, spec) {
        eprintln!("{note}");
    }
    Ok(text)
}

/// `fit --emit FORMAT`: the fastest fitting candidate the launcher can run (its row of
/// `launch::can`: fit may prefer a loss or checkpointing it has no setting for) and the
/// planner accepts, in its format; the first refusal when none can run.
pub fn emit_fit(
    format: &str,
    input: Option<&Path>,
    r: &vramplan_planner::FitResult,
) -> Result<String> {
    let target = launch::Format::parse(format);
    let mut first = None;
    for (i, c) in r.candidates.iter().filter(|c| c.fits).enumerate() {
        let valid = vramplan_planner::check_run(&c.spec).map_err(|e| bad("--emit", e));
        let runs = target.is_none_or(|f| launch::runs(f, &c.spec));
        let result = match valid {
            Ok(()) if runs || first.is_none() => emit(format, input, &c.spec),
            Ok(()) => continue,
            Err(e) => Err(e),
        };
        match result {
            Ok(text) => {
                if i > 0 {
                    let why = first
                        .map(|e: anyhow::Error| e.to_string())
                        .unwrap_or_default();
                    eprintln!("note: fit's fastest plan cannot be written ({why}); this is the fastest {format} runs");
                }
                return Ok(text);
            }
            Err(e) => {
                first.get_or_insert(e);
            }
        }
    }
    Err(match first {
        Some(e) => {
            let head = format!("--emit {format}: ");
            let e = e.to_string();
            let why = e.strip_prefix(&head).unwrap_or(&e);
            bad(
                &format!("--emit {format}"),
                format!("no plan that fits is one {format} runs (the fastest: {why})"),
            )
        }
        None => bad("--emit", "no candidate fits the GPU"),
    })
}

/// `fit --emit FORMAT` when nothing fits as asked: the nearest alternative of the ladder
/// (its order) that the launcher can run, in its format, with its lever; the first refusal
/// when none can. LoRA and QLoRA plans are passed over: the files vramplan writes have no
/// adapter settings, so they would launch full fine-tuning.
pub fn emit_nearest(
    env: &Env,
    format: &str,
    input: Option<&Path>,
    base: (&RawConfig, &Path),
    req: &vramplan_planner::FitRequest,
    ladder: &vramplan_planner::Ladder,
) -> std::result::Result<(String, Vec<vramplan_planner::Lever>), String> {
    let mut first = None;
    for alt in ladder.nearest() {
        let Some(r) = &alt.result else { continue };
        match refit_as(env, format, base, req, &alt.levers, &r.best.spec)
            .and_then(|r| emit_fit(format, input, &r))
        {
            Ok(text) => return Ok((text, alt.levers.clone())),
            Err(e) => {
                first.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    Err(first.unwrap_or_else(|| "no lever fits".to_string()))
}

/// A lever's plan as the launcher runs it (its default optimizer, what its bf16 means once
/// sharded: `launch::adapt`), searched again: a lever that adds ZeRO to a bf16-autocast run
/// is, under accelerate or DeepSpeed, a bf16-mixed run with its own fitting candidates.
fn refit_as(
    env: &Env,
    format: &str,
    (raw, dir): (&RawConfig, &Path),
    req: &vramplan_planner::FitRequest,
    levers: &[vramplan_planner::Lever],
    spec: &RunSpec,
) -> Result<vramplan_planner::FitResult> {
    let mut raw = vramplan_planner::raw_with(raw, levers, spec);
    if let Some(f) = launch::Format::parse(format) {
        launch::adapt(f, &mut raw);
    }
    let base = resolve_raw(env, &format!("--emit {format}"), raw, dir)?.spec;
    let req = vramplan_planner::FitRequest {
        base,
        ..req.clone()
    };
    vramplan_planner::fit(&req).map_err(|e| bad(&format!("--emit {format}"), e))
}

/// What a launcher's file cannot say for itself: the model when its reference does not
/// resolve, and the GPU.
fn check_launch(name: &str, l: &launch::Launch, raw: &RawConfig, ov: &Overrides) -> Result<()> {
    let pass = "pass --model PRESET (see `vramplan models`) or --model path/to/config.json";
    if !l.model_resolved && ov.model.is_none() {
        return Err(bad(
            name,
            match &l.model_ref {
                Some(r) => {
                    format!("{r}: no vramplan preset or local config.json of that name; {pass}")
                }
                None => format!("the {} config names no model; {pass}", l.format),
            },
        ));
    }
    if raw.hardware.gpu.is_none() {
        return Err(bad(
            name,
            format!("the {} config names no GPU; pass --gpu PRESET (see `vramplan gpus`), --gpu auto or --gpu cpu", l.format),
        ));
    }
    Ok(())
}

pub fn load_with(env: &Env, path: Option<&Path>, ov: &Overrides) -> Result<Loaded> {
    match path {
        None => {
            let mut raw = RawConfig::from_toml(DEFAULT_CONFIG).map_err(|e| bad(DEFAULT_NAME, e))?;
            ov.apply(&mut raw);
            resolve_raw(env, DEFAULT_NAME, raw, Path::new("."))
        }
        Some(p) => {
            let (name, raw, dir) = load_raw(env, p, ov)?;
            resolve_raw(env, &name, raw, &dir)
        }
    }
}

/// `--model`: a preset name, or a Hugging Face config.json, kept by its absolute path so
/// that a plan written elsewhere still finds it.
pub fn model_arg(arg: &str) -> RawModel {
    let p = Path::new(arg);
    if arg.ends_with(".json") || p.is_file() {
        RawModel {
            hf_config: Some(
                std::fs::canonicalize(p)
                    .unwrap_or_else(|_| p.to_path_buf())
                    .display()
                    .to_string(),
            ),
            ..RawModel::default()
        }
    } else {
        RawModel {
            preset: Some(arg.to_string()),
            ..RawModel::default()
        }
    }
}

/// A Hugging Face config.json.
pub fn read_hf(path: &Path) -> Result<vramplan_planner::ModelSpec> {
    let name = path.display().to_string();
    let text = read_text(path)?;
    vramplan_planner::hf_config(&text).map_err(|e| bad(&name, e))
}

/// The matmul kernels the candle engine runs on this machine: gemm's AVX-512 kernels
/// where the CPU has avx512f and the engine was built with them (feature `avx512`; a
/// binary without the engine plans for the default build), else its AVX2/FMA kernels.
/// Off x86-64 (NEON on ARM) neither fit was measured; the AVX2 one, whose scratch is the
/// larger, is taken.
pub fn cpu_kernels() -> CpuKernels {
    #[cfg(target_arch = "x86_64")]
    {
        let built = cfg!(feature = "avx512") || !cfg!(feature = "engine");
        if built && std::arch::is_x86_feature_detected!("avx512f") {
            return CpuKernels::Avx512;
        }
    }
    CpuKernels::Avx2
}

/// Total host memory from /proc/meminfo (Linux); None elsewhere.
pub fn host_memory() -> Option<Bytes> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(Bytes(kib * 1024))
}
