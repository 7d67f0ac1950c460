//! Built-in GPU and model presets, embedded from `presets/` at compile time, and
//! user overrides merged over them.
//!
//! An override file is TOML with `[gpus.NAME]` tables (the keys of `presets/gpus.toml`)
//! and `[models.NAME]` tables (the keys of a `[model]` section).

use crate::config::{PresetSource, RawModel};
use crate::error::{PlanError, Result};
use crate::spec::{GpuSpec, ModelSpec};
use crate::units::{Bytes, MIB};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::LazyLock;

pub const GPUS_TOML: &str = include_str!("../../presets/gpus.toml");

/// Model presets: (name, TOML text with a `[model]` section).
pub const MODEL_FILES: &[(&str, &str)] = &[
    (
        "nanochat-d4",
        include_str!("../../presets/models/nanochat-d4.toml"),
    ),
    (
        "nanochat-d12",
        include_str!("../../presets/models/nanochat-d12.toml"),
    ),
    (
        "nanochat-d16",
        include_str!("../../presets/models/nanochat-d16.toml"),
    ),
    (
        "nanochat-d20",
        include_str!("../../presets/models/nanochat-d20.toml"),
    ),
    (
        "nanochat-d26",
        include_str!("../../presets/models/nanochat-d26.toml"),
    ),
    (
        "nanochat-d32",
        include_str!("../../presets/models/nanochat-d32.toml"),
    ),
    (
        "smollm2-135m",
        include_str!("../../presets/models/smollm2-135m.toml"),
    ),
    (
        "smollm2-360m",
        include_str!("../../presets/models/smollm2-360m.toml"),
    ),
    (
        "smollm2-1.7b",
        include_str!("../../presets/models/smollm2-1.7b.toml"),
    ),
    (
        "qwen2.5-0.5b",
        include_str!("../../presets/models/qwen2.5-0.5b.toml"),
    ),
    (
        "llama-3.2-1b",
        include_str!("../../presets/models/llama-3.2-1b.toml"),
    ),
    (
        "qwen3-0.6b",
        include_str!("../../presets/models/qwen3-0.6b.toml"),
    ),
    (
        "qwen3-1.7b",
        include_str!("../../presets/models/qwen3-1.7b.toml"),
    ),
    (
        "qwen3-4b",
        include_str!("../../presets/models/qwen3-4b.toml"),
    ),
    (
        "qwen3-8b",
        include_str!("../../presets/models/qwen3-8b.toml"),
    ),
    (
        "qwen3-14b",
        include_str!("../../presets/models/qwen3-14b.toml"),
    ),
    (
        "qwen2.5-1.5b",
        include_str!("../../presets/models/qwen2.5-1.5b.toml"),
    ),
    (
        "qwen2.5-3b",
        include_str!("../../presets/models/qwen2.5-3b.toml"),
    ),
    (
        "qwen2.5-7b",
        include_str!("../../presets/models/qwen2.5-7b.toml"),
    ),
    (
        "qwen2.5-14b",
        include_str!("../../presets/models/qwen2.5-14b.toml"),
    ),
    (
        "llama-3.1-8b",
        include_str!("../../presets/models/llama-3.1-8b.toml"),
    ),
    (
        "llama-3.2-3b",
        include_str!("../../presets/models/llama-3.2-3b.toml"),
    ),
    (
        "mistral-7b",
        include_str!("../../presets/models/mistral-7b.toml"),
    ),
    (
        "gemma-2-2b",
        include_str!("../../presets/models/gemma-2-2b.toml"),
    ),
    (
        "gemma-2-9b",
        include_str!("../../presets/models/gemma-2-9b.toml"),
    ),
    (
        "gemma-3-1b",
        include_str!("../../presets/models/gemma-3-1b.toml"),
    ),
    (
        "gemma-3-4b",
        include_str!("../../presets/models/gemma-3-4b.toml"),
    ),
    (
        "phi-3.5-mini",
        include_str!("../../presets/models/phi-3.5-mini.toml"),
    ),
    (
        "smollm3-3b",
        include_str!("../../presets/models/smollm3-3b.toml"),
    ),
    (
        "olmo-2-1b",
        include_str!("../../presets/models/olmo-2-1b.toml"),
    ),
    (
        "mixtral-8x7b",
        include_str!("../../presets/models/mixtral-8x7b.toml"),
    ),
    (
        "qwen3-30b-a3b",
        include_str!("../../presets/models/qwen3-30b-a3b.toml"),
    ),
    ("gpt2", include_str!("../../presets/models/gpt2.toml")),
    (
        "gpt2-medium",
        include_str!("../../presets/models/gpt2-medium.toml"),
    ),
    (
        "chatlm-mini-chinese",
        include_str!("../../presets/models/chatlm-mini-chinese.toml"),
    ),
];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGpu {
    display: String,
    memory_mib: u64,
    context_mib: u64,
    bf16_tflops: f64,
    bandwidth_gbs: f64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    model: RawModel,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct OverrideFile {
    #[serde(default)]
    gpus: BTreeMap<String, RawGpu>,
    #[serde(default)]
    models: BTreeMap<String, RawModel>,
}

/// All known GPUs and models.
#[derive(Debug, Clone)]
pub struct Presets {
    gpus: BTreeMap<String, GpuSpec>,
    models: BTreeMap<String, ModelSpec>,
}

fn gpu_from_raw(name: &str, r: RawGpu) -> Result<GpuSpec> {
    let key = |k: &str| format!("gpus.{name}.{k}");
    if r.memory_mib == 0 || r.memory_mib > 1 << 24 {
        return Err(PlanError::invalid(
            &key("memory_mib"),
            r.memory_mib,
            "MiB from 1 to 16777216",
        ));
    }
    if r.context_mib >= r.memory_mib {
        return Err(PlanError::invalid(
            &key("context_mib"),
            r.context_mib,
            "less than memory_mib",
        ));
    }
    for (k, v) in [
        ("bf16_tflops", r.bf16_tflops),
        ("bandwidth_gbs", r.bandwidth_gbs),
    ] {
        if !(v.is_finite() && v > 0.0) {
            return Err(PlanError::invalid(&key(k), v, "a positive number"));
        }
    }
    Ok(GpuSpec {
        name: name.to_string(),
        display: r.display,
        capacity: Bytes(r.memory_mib * MIB),
        context: Bytes(r.context_mib * MIB),
        bf16_tflops: r.bf16_tflops,
        bandwidth_gbs: r.bandwidth_gbs,
    })
}

/// The embedded presets, parsed and validated once per process.
static BUILTIN: LazyLock<Result<Presets>> = LazyLock::new(parse_builtin);

fn parse_builtin() -> Result<Presets> {
    let mut p = Presets {
        gpus: BTreeMap::new(),
        models: BTreeMap::new(),
    };
    let gpus: BTreeMap<String, RawGpu> =
        toml::from_str(GPUS_TOML).map_err(|e| PlanError::from_toml(GPUS_TOML, &e))?;
    for (name, raw) in gpus {
        p.gpus.insert(name.clone(), gpu_from_raw(&name, raw)?);
    }
    for (name, text) in MODEL_FILES {
        let f: ModelFile = toml::from_str(text).map_err(|e| PlanError::from_toml(text, &e))?;
        p.add_model(name, f.model)?;
    }
    Ok(p)
}

impl Presets {
    /// The embedded presets. They are tested to parse, so failure here is a build defect.
    pub fn builtin() -> Result<Presets> {
        BUILTIN.clone()
    }

    /// Merges a user's override file over these presets.
    pub fn merge_toml(&mut self, src: &str) -> Result<()> {
        let f: OverrideFile = toml::from_str(src).map_err(|e| PlanError::from_toml(src, &e))?;
        for (name, raw) in f.gpus {
            let g = gpu_from_raw(&name, raw)?;
            self.gpus.insert(name, g);
        }
        for (name, raw) in f.models {
            self.add_model(&name, raw)?;
        }
        Ok(())
    }

    /// Resolves a model section (over the preset it names, if any) and stores it as `name`.
    fn add_model(&mut self, name: &str, mut raw: RawModel) -> Result<()> {
        raw.name.get_or_insert_with(|| name.to_string());
        let base = match &raw.preset {
            Some(p) => Some(self.model(p)?),
            None => None,
        };
        let spec = raw.resolve(base)?;
        self.models.insert(name.to_string(), spec);
        Ok(())
    }

    pub fn gpu(&self, name: &str) -> Result<&GpuSpec> {
        self.gpus.get(name).ok_or_else(|| {
            // The two names that are not presets first, so a cut list still shows them.
            let mut known = vec!["auto", "cpu"];
            known.extend(self.gpus.keys().map(String::as_str));
            PlanError::unknown_preset("hardware.gpu", name, &known, "`vramplan gpus`")
        })
    }

    pub fn model(&self, name: &str) -> Result<&ModelSpec> {
        self.models.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.models.keys().map(String::as_str).collect();
            PlanError::unknown_preset("model.preset", name, &known, "`vramplan models`")
        })
    }

    pub fn gpus(&self) -> impl Iterator<Item = &GpuSpec> {
        self.gpus.values()
    }

    pub fn models(&self) -> impl Iterator<Item = &ModelSpec> {
        self.models.values()
    }
}

impl PresetSource for Presets {
    fn model(&self, name: &str) -> Result<&ModelSpec> {
        Presets::model(self, name)
    }

    fn gpu(&self, name: &str) -> Result<&GpuSpec> {
        Presets::gpu(self, name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `.toml` file names in a folder of the repository, without the extension.
    fn preset_files(dir: &str) -> Vec<String> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../presets")
            .join(dir);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn every_model_file_is_embedded_and_every_embedded_one_exists() {
        let files = preset_files("models");
        let mut embedded: Vec<String> = MODEL_FILES.iter().map(|(n, _)| n.to_string()).collect();
        embedded.sort();
        assert_eq!(embedded, files, "presets/models/*.toml vs MODEL_FILES");
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../presets/models");
        for (name, text) in MODEL_FILES {
            let on_disk = std::fs::read_to_string(dir.join(format!("{name}.toml"))).unwrap();
            assert_eq!(
                *text, on_disk,
                "{name}: embedded text differs from the file"
            );
        }
        let p = Presets::builtin().unwrap();
        let mut resolved: Vec<String> = p.models.keys().cloned().collect();
        resolved.sort();
        assert_eq!(resolved, files);
    }

    #[test]
    fn every_gpu_in_gpus_toml_is_a_preset() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../presets/gpus.toml");
        let on_disk = std::fs::read_to_string(path).unwrap();
        assert_eq!(GPUS_TOML, on_disk);
        // The tables of the file, counted from its text rather than from the parsed map.
        let tables: Vec<&str> = on_disk
            .lines()
            .filter_map(|l| l.trim().strip_prefix('[')?.strip_suffix(']'))
            .collect();
        let p = Presets::builtin().unwrap();
        assert_eq!(p.gpus().count(), tables.len());
        for t in tables {
            assert!(p.gpu(t.trim_matches('"')).is_ok(), "{t}");
        }
        // vllm-project/vllm#27508: an H100 80 GB's "total capacity of 79.11 GiB" (PyTorch's
        // cudaMemGetInfo total, not nvidia-smi's 81,559 MiB).
        assert_eq!(p.gpu("h100-80gb").unwrap().capacity, Bytes(81_009 * MIB));
        // The example: a 24 GB RTX 4090 reports about 23.6 GiB.
        let gib = p.gpu("rtx4090-24gb").unwrap().capacity.gib();
        assert!((gib - 23.64).abs() < 0.005, "{gib}");
    }

    #[test]
    fn overrides_add_and_replace() {
        let mut p = Presets::builtin().unwrap();
        p.merge_toml(
            "[gpus.my-card]\ndisplay = \"Mine\"\nmemory_mib = 1000\ncontext_mib = 100\nbf16_tflops = 1.0\nbandwidth_gbs = 1.0\n\
             [models.tiny]\narch = \"llama\"\nhidden_size = 64\nnum_layers = 2\nnum_heads = 4\nintermediate_size = 128\nvocab_size = 256\n",
        )
        .unwrap();
        assert_eq!(p.gpu("my-card").unwrap().capacity, Bytes(1000 * MIB));
        assert_eq!(p.model("tiny").unwrap().head_dim, 16);
        let err = p.merge_toml("[gpus.bad]\ndisplay = \"x\"\nmemory_mib = 0\ncontext_mib = 0\nbf16_tflops = 1.0\nbandwidth_gbs = 1.0\n");
        assert!(err
            .unwrap_err()
            .to_string()
            .starts_with("gpus.bad.memory_mib = 0"));
    }
}
