//! Checkpoints: `OUT/ckpt-NNNNNNNN/` holding `state.safetensors` (the weights under their
//! names, AdamW's moments as `adam.m.NAME` / `adam.v.NAME`) and `meta.json` (step, RNG
//! state, the plan). A checkpoint is written into a hidden temporary folder and renamed
//! into place, so a crash mid-write leaves only a stray temporary and the previous
//! checkpoints intact; loading takes the newest checkpoint that reads back whole.

use crate::engine::model::Model;
use crate::engine::optim::AdamW;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    /// Optimizer steps done.
    pub step: u64,
    /// The batch sampler's RNG state after `step` steps: the data position.
    pub data_rng: u64,
    /// Where a streamed (Parquet) training split stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_position: Option<crate::engine::parquet::Position>,
    pub adam_t: u64,
    pub seed: u64,
    /// The run config (TOML) the model was built from.
    pub plan: String,
    /// Where the training data came from ("built-in" or a path).
    pub data: String,
    pub total_steps: u64,
    pub learning_rate: f64,
    pub last_loss: f64,
    /// Whether ids come from `OUT/tokenizer.json` rather than bytes.
    #[serde(default)]
    pub tokenizer: bool,
}

pub const STATE: &str = "state.safetensors";
pub const META: &str = "meta.json";
/// The tokenizer a run trained with, copied into its output folder.
pub const TOKENIZER: &str = "tokenizer.json";

fn dir_name(step: u64) -> String {
    format!("ckpt-{step:08}")
}

/// Writes a checkpoint for `meta.step` and keeps the newest `keep`.
pub fn save(out: &Path, model: &Model, opt: &AdamW, meta: &Meta, keep: usize) -> Result<PathBuf> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let name = dir_name(meta.step);
    let tmp = out.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).ok();
    }
    std::fs::create_dir_all(&tmp)?;
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    for (n, v) in &model.params {
        tensors.insert(n.clone(), v.as_tensor().clone());
    }
    for (n, (m, v)) in &opt.state {
        tensors.insert(format!("adam.m.{n}"), m.clone());
        tensors.insert(format!("adam.v.{n}"), v.clone());
    }
    candle_core::safetensors::save(&tensors, tmp.join(STATE))
        .with_context(|| format!("writing {}", tmp.join(STATE).display()))?;
    std::fs::write(tmp.join(META), serde_json::to_string_pretty(meta)?)?;
    let dst = out.join(&name);
    if dst.exists() {
        std::fs::remove_dir_all(&dst)?;
    }
    std::fs::rename(&tmp, &dst).with_context(|| format!("renaming into {}", dst.display()))?;
    let mut all = list(out);
    while all.len() > keep.max(1) {
        let old = all.remove(0);
        std::fs::remove_dir_all(old).ok();
    }
    Ok(dst)
}

/// Checkpoint folders under `out`, oldest first.
pub fn list(out: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .and_then(|f| f.to_str())
                    .is_some_and(|f| f.starts_with("ckpt-"))
        })
        .collect();
    v.sort();
    v
}

pub struct Loaded {
    pub dir: PathBuf,
    pub meta: Meta,
    pub tensors: HashMap<String, Tensor>,
}

/// Reads one checkpoint folder.
pub fn read(dir: &Path) -> Result<Loaded> {
    let meta_text = std::fs::read_to_string(dir.join(META))
        .with_context(|| format!("reading {}", dir.join(META).display()))?;
    let meta: Meta = serde_json::from_str(&meta_text)
        .with_context(|| format!("parsing {}", dir.join(META).display()))?;
    let tensors = candle_core::safetensors::load(dir.join(STATE), &Device::Cpu)
        .with_context(|| format!("reading {}", dir.join(STATE).display()))?;
    Ok(Loaded {
        dir: dir.to_path_buf(),
        meta,
        tensors,
    })
}

/// The newest checkpoint under `path` that reads back whole (or `path` itself when it is
/// a checkpoint folder); damaged ones are reported and skipped.
pub fn latest(path: &Path) -> Result<Loaded> {
    if path.join(META).exists() {
        return read(path);
    }
    let all = list(path);
    if all.is_empty() {
        bail!("no checkpoint (ckpt-*) in {}", path.display());
    }
    let mut last_err = None;
    for dir in all.iter().rev() {
        match read(dir) {
            Ok(l) => return Ok(l),
            Err(e) => {
                eprintln!(
                    "warning: skipping damaged checkpoint {}: {e:#}",
                    dir.display()
                );
                last_err = Some(e);
            }
        }
    }
    Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no readable checkpoint")))
}

/// Copies weights (and optimizer state into `opt`) from a loaded checkpoint.
pub fn restore(l: &Loaded, model: &Model, opt: Option<&mut AdamW>) -> Result<()> {
    for (n, v) in &model.params {
        let t = l
            .tensors
            .get(n)
            .with_context(|| format!("{}: no tensor {n}", l.dir.display()))?;
        v.set(&t.to_dtype(model.dtype)?.to_device(&model.device)?)
            .with_context(|| format!("{}: tensor {n}", l.dir.display()))?;
    }
    if let Some(opt) = opt {
        opt.state.clear();
        for n in model.params.keys() {
            if let (Some(m), Some(v)) = (
                l.tensors.get(&format!("adam.m.{n}")),
                l.tensors.get(&format!("adam.v.{n}")),
            ) {
                opt.state.insert(
                    n.clone(),
                    (m.to_device(&model.device)?, v.to_device(&model.device)?),
                );
            }
        }
        opt.t = l.meta.adam_t;
    }
    Ok(())
}
