//! Checkpoints: `OUT/ckpt-NNNNNNNN/` holding `state.safetensors` (the weights under their
//! names, AdamW's moments as `adam.m.NAME` / `adam.v.NAME`) and `meta.json` (step, RNG
//! state, the plan and its hash, the seed, the validation loss, and a CRC-32 of each
//! file). A checkpoint is written into a hidden temporary folder, each file flushed to the
//! disk, and the folder renamed into place (then the parent flushed), so a crash or a
//! full disk mid-write leaves the previous checkpoints intact and no temporary; loading
//! takes the newest checkpoint that reads back whole and whose checksums match.
//!
//! Under LoRA the trained parameters are the adapters: the state holds them and their
//! moments only, and the base comes back from `meta.init` (or the seed, for a random one).

use crate::engine::model::Model;
use crate::engine::optim::AdamW;
use crate::fsutil::{self, sync_dir};
use crate::Error;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

type Result<T> = std::result::Result<T, Error>;

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
    /// [`plan_hash`] of `plan`: which run the checkpoint belongs to.
    #[serde(default)]
    pub plan_hash: String,
    /// Where the training data came from ("built-in" or a path).
    pub data: String,
    pub total_steps: u64,
    pub learning_rate: f64,
    pub last_loss: f64,
    /// The validation loss at `step`, when it was measured (what `keep_best` ranks by).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// `--train-on` (`response` or `all`); absent in checkpoints written before it was kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_on: Option<String>,
    /// Whether ids come from `OUT/tokenizer.json` rather than bytes.
    #[serde(default)]
    pub tokenizer: bool,
    /// File name → `crc32:` and the eight hex digits of its bytes' CRC-32, checked on load.
    #[serde(default)]
    pub checksums: BTreeMap<String, String>,
    /// The Hugging Face `config.json` the run started from (`train --init`): its RMSNorm
    /// epsilon and RoPE base, and what `export` writes back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hf_config: Option<String>,
    /// The Hugging Face folder the run started from (`--init`, as given): under LoRA the
    /// frozen base, which the checkpoint does not hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init: Option<String>,
}

pub const STATE: &str = "state.safetensors";
pub const META: &str = "meta.json";
/// The tokenizer a run trained with, copied into its output folder.
pub const TOKENIZER: &str = "tokenizer.json";

/// Which checkpoints pruning keeps: the newest `last`, and the `best` with the lowest
/// validation loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keep {
    pub last: usize,
    pub best: usize,
}

fn dir_name(step: u64) -> String {
    format!("ckpt-{step:08}")
}

/// The hash a checkpoint records of its plan: CRC-32 of the TOML, trimmed.
pub fn plan_hash(plan: &str) -> String {
    format!("crc32:{:08x}", crc32fast::hash(plan.trim().as_bytes()))
}

fn checksum(crc: u32) -> String {
    format!("crc32:{crc:08x}")
}

/// How a checkpoint's files reach the disk: the file itself in production, a failing
/// writer in the tests that stand in for a full disk.
pub type Wrap = for<'w> fn(&'w mut dyn Write) -> Box<dyn Write + 'w>;

fn plain<'w>(w: &'w mut dyn Write) -> Box<dyn Write + 'w> {
    Box::new(w)
}

/// Writes a checkpoint for `meta.step` and prunes to `keep`.
pub fn save(out: &Path, model: &Model, opt: &AdamW, meta: &Meta, keep: Keep) -> Result<PathBuf> {
    save_with(out, model, opt, meta, keep, plain)
}

/// [`save`], writing each file through `wrap`. A failure removes the temporary folder and
/// names the file it was writing.
pub fn save_with(
    out: &Path,
    model: &Model,
    opt: &AdamW,
    meta: &Meta,
    keep: Keep,
    wrap: Wrap,
) -> Result<PathBuf> {
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let name = dir_name(meta.step);
    let (tmp, dst) = (out.join(format!(".{name}.tmp")), out.join(&name));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).ok();
    }
    let written = write_folder(&tmp, model, opt, meta, wrap).and_then(|()| {
        if dst.exists() {
            std::fs::remove_dir_all(&dst).map_err(|e| Error::io(&dst, e))?;
        }
        std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
        sync_dir(out).map_err(|e| Error::io(out, e))
    });
    if let Err(e) = written {
        std::fs::remove_dir_all(&tmp).ok();
        return Err(named_in(e, &tmp, &dst));
    }
    prune(out, keep);
    Ok(dst)
}

/// The state and the meta (with the state's checksum) in `tmp`, each flushed, then `tmp`.
fn write_folder(tmp: &Path, model: &Model, opt: &AdamW, meta: &Meta, wrap: Wrap) -> Result<()> {
    std::fs::create_dir_all(tmp).map_err(|e| Error::io(tmp, e))?;
    let mut tensors: BTreeMap<String, &Tensor> = BTreeMap::new();
    for (n, v) in &model.params {
        tensors.insert(n.clone(), v.as_tensor());
    }
    for (n, (m, v)) in &opt.state {
        tensors.insert(format!("adam.m.{n}"), m);
        tensors.insert(format!("adam.v.{n}"), v);
    }
    let crc = fsutil::write_synced(&tmp.join(STATE), |w| {
        write_safetensors(&mut wrap(w), &tensors, None)
    })?;
    let mut meta = meta.clone();
    meta.checksums.insert(STATE.to_string(), checksum(crc));
    let text = serde_json::to_string_pretty(&meta).map_err(|e| Error::checkpoint(tmp, e))?;
    fsutil::write_synced(&tmp.join(META), |w| wrap(w).write_all(text.as_bytes()))?;
    sync_dir(tmp).map_err(|e| Error::io(tmp, e))
}

/// An error on a file of the temporary folder, said of the checkpoint's file.
fn named_in(e: Error, tmp: &Path, dst: &Path) -> Error {
    let rename = |p: String| p.replace(&tmp.display().to_string(), &dst.display().to_string());
    match e {
        Error::Io { path, error } => Error::Io {
            path: rename(path),
            error,
        },
        Error::BadInput { file, what } => Error::BadInput {
            file: rename(file),
            what,
        },
        e => e,
    }
}

/// The safetensors format (a little-endian u64 header length, the JSON header, padded
/// with spaces to 8 bytes, then each tensor's bytes in the header's order), streamed to
/// `w` one tensor at a time; returns the CRC-32 of everything written. Tensors are
/// stored in f32 (the engine's master weights and moments), f64 kept as f64; `metadata`
/// is the header's `__metadata__`.
pub(crate) fn write_safetensors(
    w: &mut dyn Write,
    tensors: &BTreeMap<String, &Tensor>,
    metadata: Option<&BTreeMap<String, String>>,
) -> std::io::Result<u32> {
    let stored = |t: &Tensor| {
        if t.dtype() == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    };
    let mut header = serde_json::Map::new();
    if let Some(m) = metadata {
        header.insert("__metadata__".into(), serde_json::json!(m));
    }
    let mut offset = 0usize;
    for (n, t) in tensors {
        let len = t.elem_count() * stored(t).size_in_bytes();
        let dtype = if stored(t) == DType::F64 {
            "F64"
        } else {
            "F32"
        };
        header.insert(
            n.clone(),
            serde_json::json!({"dtype": dtype, "shape": t.dims(), "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let mut text = serde_json::to_vec(&header)?;
    text.resize(text.len().div_ceil(8) * 8, b' ');
    let mut w = Hashing {
        inner: w,
        crc: crc32fast::Hasher::new(),
    };
    w.write_all(&(text.len() as u64).to_le_bytes())?;
    w.write_all(&text)?;
    for t in tensors.values() {
        write_tensor(&mut w, t, stored(t))?;
    }
    w.flush()?;
    Ok(w.crc.finalize())
}

/// A tensor's values in `dtype` (f32 or f64), little-endian, a slab at a time.
fn write_tensor(w: &mut dyn Write, t: &Tensor, dtype: DType) -> std::io::Result<()> {
    let tensor = std::io::Error::other;
    let flat = t
        .to_dtype(dtype)
        .and_then(|t| t.flatten_all())
        .map_err(tensor)?;
    if dtype == DType::F64 {
        write_le(w, &flat.to_vec1::<f64>().map_err(tensor)?, f64::to_le_bytes)
    } else {
        write_le(w, &flat.to_vec1::<f32>().map_err(tensor)?, f32::to_le_bytes)
    }
}

fn write_le<T: Copy, const N: usize>(
    w: &mut dyn Write,
    values: &[T],
    bytes: fn(T) -> [u8; N],
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1 << 16);
    for chunk in values.chunks((1 << 16) / N) {
        buf.clear();
        buf.extend(chunk.iter().flat_map(|&v| bytes(v)));
        w.write_all(&buf)?;
    }
    Ok(())
}

/// A writer that hashes what passes through it.
struct Hashing<'w> {
    inner: &'w mut dyn Write,
    crc: crc32fast::Hasher,
}

impl Write for Hashing<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Removes the checkpoints `keep` does not hold: all but the newest `keep.last` and the
/// `keep.best` with the lowest validation loss (checkpoints without one are not ranked).
fn prune(out: &Path, keep: Keep) {
    let all = list(out);
    let mut kept: Vec<&PathBuf> = all.iter().rev().take(keep.last.max(1)).collect();
    let mut ranked: Vec<(f64, &PathBuf)> = all
        .iter()
        .filter_map(|d| Some((read_meta(d).ok()?.val_loss?, d)))
        .filter(|(v, _)| v.is_finite())
        .collect();
    ranked.sort_by(|a, b| a.0.total_cmp(&b.0));
    kept.extend(ranked.iter().take(keep.best).map(|(_, d)| *d));
    for d in &all {
        if !kept.contains(&d) {
            std::fs::remove_dir_all(d).ok();
        }
    }
}

/// Checkpoint folders under `out`, oldest first.
pub fn list(out: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| is_checkpoint_name(p) && p.is_dir())
        .collect();
    v.sort();
    v
}

fn is_checkpoint_name(p: &Path) -> bool {
    p.file_name()
        .and_then(|f| f.to_str())
        .is_some_and(|f| f.starts_with("ckpt-"))
}

pub struct Loaded {
    pub dir: PathBuf,
    pub meta: Meta,
    pub tensors: HashMap<String, Tensor>,
}

/// A checkpoint folder's `meta.json`.
pub fn read_meta(dir: &Path) -> Result<Meta> {
    let path = dir.join(META);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::checkpoint(dir, format!("cannot read {META}: {e}")))?;
    serde_json::from_str(&text).map_err(|e| Error::checkpoint(dir, format!("{META}: {e}")))
}

/// The meta of the newest checkpoint under `out` whose meta reads (`None` without one):
/// the settings a resumed run starts from.
pub fn newest_meta(out: &Path) -> Option<Meta> {
    list(out).iter().rev().find_map(|d| read_meta(d).ok())
}

/// Reads one checkpoint folder, checking each file against its recorded checksum.
pub fn read(dir: &Path) -> Result<Loaded> {
    let meta = read_meta(dir)?;
    let bytes = std::fs::read(dir.join(STATE))
        .map_err(|e| Error::checkpoint(dir, format!("cannot read {STATE}: {e}")))?;
    if let Some(want) = meta.checksums.get(STATE) {
        let got = checksum(crc32fast::hash(&bytes));
        if &got != want {
            return Err(Error::checkpoint(
                dir,
                format!("{STATE}: checksum {got}, but {META} records {want}: the file is damaged"),
            ));
        }
    }
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| Error::checkpoint(dir, format!("{STATE}: {e}")))?;
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
        return Err(Error::checkpoint(path, "no checkpoint (ckpt-*) in it"));
    }
    let mut last_err = None;
    for dir in all.iter().rev() {
        match read(dir) {
            Ok(l) => return Ok(l),
            Err(e) => {
                eprintln!("warning: skipping damaged checkpoint {e}");
                last_err = Some(e);
            }
        }
    }
    Err(last_err.unwrap_or_else(|| Error::checkpoint(path, "no readable checkpoint")))
}

/// Copies weights (and optimizer state into `opt`) from a loaded checkpoint.
pub fn restore(l: &Loaded, model: &Model, opt: Option<&mut AdamW>) -> Result<()> {
    for (n, v) in &model.params {
        let t = l
            .tensors
            .get(n)
            .ok_or_else(|| Error::checkpoint(&l.dir, format!("no tensor {n}")))?;
        v.set(&t.to_dtype(model.dtype)?.to_device(&model.device)?)
            .map_err(|e| Error::checkpoint(&l.dir, format!("tensor {n}: {e}")))?;
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

#[cfg(test)]
#[path = "checkpoint_tests.rs"]
mod tests;
