//! Reads run configs and Hugging Face config.json files, and resolves them with the
//! presets, host memory and NVML: the I/O the planner leaves to its caller.

use crate::exit::bad;
use crate::nvml;
use anyhow::Result;
use std::path::{Path, PathBuf};
use vramplan_planner::{Bytes, Context, Presets, RawConfig, RawModel, RunSpec};

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
pub fn resolve_text(env: &Env, name: &str, text: &str, dir: &Path) -> Result<Loaded> {
    let raw = RawConfig::from_toml(text).map_err(|e| bad(name, e))?;
    resolve_raw(env, name, raw, dir)
}

pub fn resolve_raw(env: &Env, name: &str, raw: RawConfig, dir: &Path) -> Result<Loaded> {
    let presets = env.presets()?;
    let mut ctx = Context {
        host_memory: host_memory(),
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
    match path {
        None => resolve_text(env, DEFAULT_NAME, DEFAULT_CONFIG, Path::new(".")),
        Some(p) => {
            let text = read_text(p)?;
            let dir = p.parent().unwrap_or(Path::new("."));
            resolve_text(env, &p.display().to_string(), &text, dir)
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

/// Total host memory from /proc/meminfo (Linux); None elsewhere.
pub fn host_memory() -> Option<Bytes> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(Bytes(kib * 1024))
}
