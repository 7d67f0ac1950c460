//! Hugging Face checkpoints in and out of the engine.
//!
//! In (`train --init DIR`, `sample --init DIR`): `DIR/config.json` gives the model's shape
//! (the planner's reader, [`vramplan_planner::hf_config`]) and its [`Numerics`]
//! (`rms_norm_eps`, `rope_theta` or `rope_parameters.rope_theta`); the weights come from
//! `DIR/model.safetensors` or the shards `DIR/model.safetensors.index.json` lists,
//! memory-mapped, in bf16, f16 or f32, each converted to the engine's master dtype. Names
//! map one to one: the engine's `layers.N.self_attn.q_proj.weight` is transformers'
//! `model.layers.N.self_attn.q_proj.weight`, `lm_head.weight` stays itself and is absent
//! (or ignored) when the head is tied. Read: `model_type` llama (SmolLM2), mistral (its
//! sliding window on every layer, as the engine's mask has it), qwen2, qwen3, and t5
//! (`encoder.block.N.layer.0.SelfAttention.q.weight` is the engine's
//! `layers.N.self_attn.q.weight`, the decoder's blocks numbered after the encoder's; the
//! shared embedding's saved copies are ignored); refused with one line: another
//! activation than SiLU (T5: "relu" or "gated-gelu"), attention or MLP biases beyond
//! Qwen2's, RoPE scaling, T5's untied head or other bucket counts, a tensor the model
//! does not have or of another shape.
//!
//! Out (`vramplan export`): a folder `from_pretrained` loads: `config.json` (the one the
//! run started from, else written from the plan), `model.safetensors` in f32 under
//! transformers' names, and the run's tokenizer files; written into a temporary folder,
//! each file flushed, then renamed into place. A LoRA run's folder holds the merged
//! weights (`W + (alpha/r)·B·A`) and, in `adapter/`, PEFT's `adapter_config.json` and
//! `adapter_model.safetensors`, which `PeftModel.from_pretrained(base, DIR/adapter)` loads.

use crate::engine::model::{Model, Numerics};
use crate::fsutil::{self, sync_dir};
use crate::Error;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use vramplan_planner::{Arch, ModelSpec, RawModel};

type Result<T> = std::result::Result<T, Error>;

pub const CONFIG: &str = "config.json";
pub const WEIGHTS: &str = "model.safetensors";
pub const INDEX: &str = "model.safetensors.index.json";
/// The tokenizer files an export carries over from the run (those that exist).
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// A Hugging Face checkpoint folder, its config read.
#[derive(Debug, Clone)]
pub struct Pretrained {
    pub dir: PathBuf,
    /// `config.json` as read: saved with every checkpoint, written back on export.
    pub config: String,
    pub spec: ModelSpec,
    pub numerics: Numerics,
}

fn name(p: &Path) -> String {
    p.display().to_string()
}

/// Reads `dir/config.json` and checks that the engine computes what transformers does
/// for it.
pub fn read(dir: &Path) -> Result<Pretrained> {
    let path = dir.join(CONFIG);
    let config = std::fs::read_to_string(&path)
        .map_err(|e| Error::bad(&name(&path), format!("cannot read: {e}")))?;
    let mut spec = vramplan_planner::hf_config(&config).map_err(|e| Error::bad(&name(&path), e))?;
    if spec.name.ends_with("(config.json)") {
        // No `_name_or_path`: the folder's name.
        if let Some(f) = dir
            .canonicalize()
            .ok()
            .and_then(|d| d.file_name().map(|f| f.to_string_lossy().to_string()))
        {
            spec.name = f;
        }
    }
    let v: Value = serde_json::from_str(&config).map_err(|e| Error::bad(&name(&path), e))?;
    if let Some(why) = unsupported(&v, &spec) {
        return Err(Error::bad(&name(&path), why));
    }
    Ok(Pretrained {
        dir: dir.to_path_buf(),
        numerics: numerics(&v),
        config,
        spec,
    })
}

/// What in a config the engine does not compute as transformers does, if anything.
fn unsupported(v: &Value, spec: &ModelSpec) -> Option<String> {
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    if model_type == "t5" {
        return t5_unsupported(v);
    }
    if !matches!(model_type, "llama" | "mistral" | "qwen2" | "qwen3") {
        return Some(format!(
            "model_type = \"{model_type}\": the engine loads llama, mistral, qwen2, qwen3 and t5"
        ));
    }
    let act = v
        .get("hidden_act")
        .and_then(Value::as_str)
        .unwrap_or("silu");
    if act != "silu" {
        return Some(format!(
            "hidden_act = \"{act}\": the engine's MLP is SiLU-gated"
        ));
    }
    for key in ["attention_bias", "mlp_bias"] {
        if v.get(key).and_then(Value::as_bool) == Some(true) {
            return Some(format!("{key} = true: the engine has no such biases"));
        }
    }
    let scaling = v
        .get("rope_parameters")
        .and_then(|p| p.get("rope_type"))
        .and_then(Value::as_str)
        .or(v
            .get("rope_scaling")
            .and_then(|s| s.get("rope_type").or(s.get("type")))
            .and_then(Value::as_str))
        .unwrap_or("default");
    if scaling != "default" {
        return Some(format!(
            "rope_type = \"{scaling}\": the engine has plain RoPE (rope_type \"default\") only"
        ));
    }
    let f = &spec.features;
    if f.sliding_window > 0 && f.global_every > 0 {
        return Some(format!(
            "layer_types: windowed and global layers mixed; the engine windows every layer ({} tokens) or none",
            f.sliding_window
        ));
    }
    None
}

/// What in a T5 config the engine does not compute as transformers does, if anything:
/// it runs `feed_forward_proj` "relu" or "gated-gelu", the tied head scaled by
/// `d_model^-½`, and the planner's 32 position buckets.
fn t5_unsupported(v: &Value) -> Option<String> {
    let proj = v
        .get("feed_forward_proj")
        .and_then(Value::as_str)
        .unwrap_or("relu");
    if !matches!(proj, "relu" | "gated-gelu") {
        return Some(format!(
            "feed_forward_proj = \"{proj}\": the engine's T5 has \"relu\" and \"gated-gelu\""
        ));
    }
    for key in ["tie_word_embeddings", "scale_decoder_outputs"] {
        if v.get(key).and_then(Value::as_bool) == Some(false) {
            return Some(format!(
                "{key} = false: the engine's T5 ties its head to the shared embedding and scales the decoder's output by d_model^-0.5 (as ChatLM-mini-Chinese)"
            ));
        }
    }
    let buckets = v
        .get("relative_attention_num_buckets")
        .and_then(Value::as_u64)
        .unwrap_or(32);
    if buckets != crate::engine::t5::BUCKETS as u64 {
        return Some(format!(
            "relative_attention_num_buckets = {buckets}: the engine's T5 has {} buckets",
            crate::engine::t5::BUCKETS
        ));
    }
    None
}

/// RMSNorm's epsilon and RoPE's base from a config (transformers' defaults for these
/// families where absent: 1e-6 and 10,000).
pub fn numerics(v: &Value) -> Numerics {
    let d = Numerics::default();
    let theta = v
        .get("rope_theta")
        .or(v.get("rope_parameters").and_then(|p| p.get("rope_theta")));
    let int = |k: &str, or: u64| v.get(k).and_then(Value::as_u64).unwrap_or(or);
    Numerics {
        rms_eps: v
            .get("rms_norm_eps")
            .or(v.get("layer_norm_epsilon"))
            .and_then(Value::as_f64)
            .unwrap_or(d.rms_eps),
        rope_theta: theta.and_then(Value::as_f64).unwrap_or(d.rope_theta),
        rel_buckets: int("relative_attention_num_buckets", d.rel_buckets as u64) as usize,
        rel_max_distance: int("relative_attention_max_distance", d.rel_max_distance as u64)
            as usize,
        decoder_start: v
            .get("decoder_start_token_id")
            .or(v.get("pad_token_id"))
            .and_then(Value::as_u64)
            .unwrap_or(d.decoder_start as u64) as u32,
    }
}

/// The numerics of a run: its config.json's when it started from one, else the defaults.
pub fn numerics_of(config: Option<&str>) -> Numerics {
    config
        .and_then(|c| serde_json::from_str::<Value>(c).ok())
        .map_or_else(Numerics::default, |v| numerics(&v))
}

/// transformers' name of the engine's parameter `n`.
pub fn hf_name(n: &str) -> String {
    if n == "lm_head.weight" {
        n.to_string()
    } else {
        format!("model.{n}")
    }
}

/// transformers' name of the engine's parameter `n` of a model shaped `spec`: T5's
/// blocks by stack (`layers.L+i` is `decoder.block.i`), else [`hf_name`].
pub fn hf_name_of(spec: &ModelSpec, n: &str) -> String {
    if spec.arch != Arch::T5 {
        return hf_name(n);
    }
    let Some((l, rest)) = n
        .strip_prefix("layers.")
        .and_then(|r| r.split_once('.'))
        .and_then(|(l, rest)| Some((l.parse::<u64>().ok()?, rest)))
    else {
        return n.to_string();
    };
    let enc = l < spec.num_layers;
    let (stack, i, ff) = if enc {
        ("encoder", l, 1)
    } else {
        ("decoder", l - spec.num_layers, 2)
    };
    let (part, leaf) = rest.split_once('.').unwrap_or((rest, ""));
    let inner = match (part, leaf) {
        ("self_attn", "layer_norm.weight") => "layer.0.layer_norm.weight".to_string(),
        ("self_attn", "relative_attention_bias") => {
            "layer.0.SelfAttention.relative_attention_bias.weight".to_string()
        }
        ("self_attn", w) => format!("layer.0.SelfAttention.{w}"),
        ("cross_attn", "layer_norm.weight") => "layer.1.layer_norm.weight".to_string(),
        ("cross_attn", w) => format!("layer.1.EncDecAttention.{w}"),
        ("ffn", "layer_norm.weight") => format!("layer.{ff}.layer_norm.weight"),
        (_, w) => format!("layer.{ff}.DenseReluDense.{w}"),
    };
    format!("{stack}.block.{i}.{inner}")
}

/// The safetensors files of `dir`: the shards its index lists, else `model.safetensors`.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(INDEX);
    if !index.exists() {
        let single = dir.join(WEIGHTS);
        if !single.exists() {
            return Err(Error::bad(
                &name(dir),
                format!("neither {WEIGHTS} nor {INDEX} in it"),
            ));
        }
        return Ok(vec![single]);
    }
    let text = std::fs::read_to_string(&index)
        .map_err(|e| Error::bad(&name(&index), format!("cannot read: {e}")))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::bad(&name(&index), e))?;
    let Some(map) = v.get("weight_map").and_then(Value::as_object) else {
        return Err(Error::bad(&name(&index), "no \"weight_map\" object"));
    };
    let mut files: Vec<PathBuf> = map
        .values()
        .filter_map(Value::as_str)
        .map(|f| dir.join(f))
        .collect();
    files.sort();
    files.dedup();
    Ok(files)
}

/// Tensors a checkpoint may hold that the engine does not use: a tied head's copy, and
/// the rotary frequencies older transformers saved.
fn ignorable(hf: &str, spec: &ModelSpec) -> bool {
    let t5_tied = spec.arch == Arch::T5
        && matches!(
            hf,
            "encoder.embed_tokens.weight"
                | "decoder.embed_tokens.weight"
                | "decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"
        );
    (hf == "lm_head.weight" && spec.tie_embeddings)
        || hf.ends_with("rotary_emb.inv_freq")
        || t5_tied
}

/// Sets every parameter of `model` from the checkpoint in `dir`, memory-mapped; converts
/// each tensor to the model's dtype. Every parameter must be there with its shape, and
/// nothing else may be.
pub fn load_weights(model: &Model, dir: &Path) -> Result<()> {
    let files = weight_files(dir)?;
    let shown = name(&files[0]);
    // SAFETY: the files are mapped read-only and only read while `st` lives; a process
    // that truncates them meanwhile would fault, as with any memory-mapped reader.
    let st = unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| Error::bad(&shown, e))?;
    let mut wanted = std::collections::BTreeSet::new();
    for (n, var) in &model.params {
        let hf = hf_name_of(&model.spec, n);
        let view = st
            .get(&hf)
            .map_err(|_| Error::bad(&shown, format!("no tensor {hf}")))?;
        let want = var.as_tensor().dims().to_vec();
        if view.shape() != want.as_slice() {
            return Err(Error::bad(
                &shown,
                format!(
                    "{hf} has shape {:?}; the config's model needs {want:?}",
                    view.shape()
                ),
            ));
        }
        let t = st
            .load(&hf, &Device::Cpu)
            .and_then(|t| t.to_dtype(model.dtype))
            .and_then(|t| t.to_device(&model.device))
            .map_err(|e| Error::bad(&shown, format!("{hf}: {e}")))?;
        var.set(&t)?;
        wanted.insert(hf);
    }
    let extra = st
        .tensors()
        .into_iter()
        .map(|(n, _)| n)
        .find(|n| !wanted.contains(n) && !ignorable(n, &model.spec));
    if let Some(n) = extra {
        return Err(Error::bad(
            &shown,
            format!(
                "tensor {n} is not a parameter of a {} model as config.json describes it",
                model.spec.arch
            ),
        ));
    }
    Ok(())
}

/// Checks that the plan's model is the checkpoint's (the name and the position table
/// aside); names the first field that differs.
pub fn check_matches(plan: &ModelSpec, plan_name: &str, ckpt: &Pretrained) -> Result<()> {
    let c = &ckpt.spec;
    let fields: [(&str, String, String); 11] = [
        ("arch", plan.arch.to_string(), c.arch.to_string()),
        (
            "hidden_size",
            plan.hidden_size.to_string(),
            c.hidden_size.to_string(),
        ),
        (
            "num_layers",
            plan.num_layers.to_string(),
            c.num_layers.to_string(),
        ),
        (
            "num_heads",
            plan.num_heads.to_string(),
            c.num_heads.to_string(),
        ),
        (
            "num_kv_heads",
            plan.num_kv_heads.to_string(),
            c.num_kv_heads.to_string(),
        ),
        (
            "head_dim",
            plan.head_dim.to_string(),
            c.head_dim.to_string(),
        ),
        (
            "intermediate_size",
            plan.intermediate_size.to_string(),
            c.intermediate_size.to_string(),
        ),
        (
            "vocab_size",
            plan.vocab_size.to_string(),
            c.vocab_size.to_string(),
        ),
        (
            "tie_embeddings",
            plan.tie_embeddings.to_string(),
            c.tie_embeddings.to_string(),
        ),
        (
            "num_decoder_layers",
            plan.num_decoder_layers.to_string(),
            c.num_decoder_layers.to_string(),
        ),
        (
            "gated_ffn",
            plan.gated_ffn.to_string(),
            c.gated_ffn.to_string(),
        ),
    ];
    let window = (
        "sliding_window",
        plan.features.sliding_window.to_string(),
        c.features.sliding_window.to_string(),
    );
    for (key, p, k) in fields.into_iter().chain([window]) {
        if p != k {
            return Err(Error::bad(
                plan_name,
                format!(
                    "model.{key} = {p}, but {} has {k}: the plan's model must be the checkpoint's (or leave [model] out)",
                    name(&ckpt.dir.join(CONFIG))
                ),
            ));
        }
    }
    Ok(())
}

/// `spec` as a plan's `[model]` table, every field written, so the plan resolves without
/// the checkpoint's folder.
pub fn raw_model(spec: &ModelSpec) -> RawModel {
    let f = &spec.features;
    RawModel {
        name: Some(spec.name.clone()),
        arch: Some(spec.arch.to_string()),
        hidden_size: Some(spec.hidden_size),
        num_layers: Some(spec.num_layers),
        num_heads: Some(spec.num_heads),
        num_kv_heads: Some(spec.num_kv_heads),
        head_dim: Some(spec.head_dim),
        intermediate_size: Some(spec.intermediate_size),
        vocab_size: Some(spec.vocab_size),
        tie_embeddings: Some(spec.tie_embeddings),
        sliding_window: (f.sliding_window > 0).then_some(f.sliding_window),
        num_decoder_layers: (spec.arch == Arch::T5).then_some(spec.num_decoder_layers),
        gated_ffn: (spec.arch == Arch::T5).then_some(spec.gated_ffn),
        ..RawModel::default()
    }
}

/// The exported `config.json`: the run's own (its dtype now f32), or one written from
/// the model for a run that started from random weights. `max_positions` is the
/// position count written for the latter.
pub fn export_config(model: &Model, config: Option<&str>, max_positions: u64) -> Result<String> {
    let s = &model.spec;
    let mut v = match config {
        Some(text) => serde_json::from_str::<Value>(text)
            .map_err(|e| Error::bad("config.json (the run's)", e))?,
        None => written_config(model, max_positions)?,
    };
    let Some(o) = v.as_object_mut() else {
        return Err(Error::bad("config.json (the run's)", "not a JSON object"));
    };
    o.remove("torch_dtype");
    o.insert("dtype".into(), json!("float32"));
    o.insert("tie_word_embeddings".into(), json!(s.tie_embeddings));
    serde_json::to_string_pretty(&v).map_err(|e| Error::bad("config.json", e))
}

/// A transformers config for a model the engine built from a plan.
fn written_config(model: &Model, max_positions: u64) -> Result<Value> {
    let s = &model.spec;
    if s.arch == Arch::T5 {
        return Ok(t5_config(model));
    }
    let window = s.features.sliding_window;
    let (model_type, class) = match s.arch {
        Arch::Llama if window > 0 => ("mistral", "MistralForCausalLM"),
        Arch::Llama => ("llama", "LlamaForCausalLM"),
        Arch::Qwen2 => ("qwen2", "Qwen2ForCausalLM"),
        Arch::Qwen3 => ("qwen3", "Qwen3ForCausalLM"),
        a => {
            return Err(Error::bad(
                "vramplan export",
                format!(
                "arch {a} has no transformers model to load it; export llama, qwen2 or qwen3 runs"
            ),
            ))
        }
    };
    let n = model.numerics;
    let mut v = json!({
        "architectures": [class],
        "model_type": model_type,
        "hidden_size": s.hidden_size,
        "intermediate_size": s.intermediate_size,
        "num_hidden_layers": s.num_layers,
        "num_attention_heads": s.num_heads,
        "num_key_value_heads": s.num_kv_heads,
        "head_dim": s.head_dim,
        "vocab_size": s.vocab_size,
        "hidden_act": "silu",
        "rms_norm_eps": n.rms_eps,
        "rope_theta": n.rope_theta,
        "max_position_embeddings": max_positions,
        "attention_bias": false,
    });
    if window > 0 {
        v["sliding_window"] = json!(window);
    }
    Ok(v)
}

/// A transformers `T5Config` for a T5 the engine built from a plan.
fn t5_config(model: &Model) -> Value {
    let (s, n) = (&model.spec, model.numerics);
    json!({
        "architectures": ["T5ForConditionalGeneration"],
        "model_type": "t5",
        "d_model": s.hidden_size,
        "d_kv": s.head_dim,
        "d_ff": s.intermediate_size,
        "num_layers": s.num_layers,
        "num_decoder_layers": s.num_decoder_layers,
        "num_heads": s.num_heads,
        "vocab_size": s.vocab_size,
        "feed_forward_proj": if s.gated_ffn { "gated-gelu" } else { "relu" },
        "relative_attention_num_buckets": n.rel_buckets,
        "relative_attention_max_distance": n.rel_max_distance,
        "layer_norm_epsilon": n.rms_eps,
        "dropout_rate": 0.0,
        "is_encoder_decoder": true,
        "decoder_start_token_id": n.decoder_start,
        "pad_token_id": 0,
        "eos_token_id": 1,
    })
}

/// The LoRA adapters an export writes beside the merged weights, in `OUT/adapter/`: the
/// adapted model and its base's folder (PEFT's `base_model_name_or_path`).
pub struct AdapterOut<'a> {
    pub model: &'a Model,
    pub base: Option<&'a str>,
}

/// The folder of an export that holds PEFT's adapter files. Not the export's own folder:
/// transformers' `from_pretrained` on a folder with an `adapter_config.json` would load
/// the base again and apply the adapters on top of the merged weights.
pub const ADAPTER_DIR: &str = "adapter";

/// Writes `model` as a Hugging Face folder `out` (replacing an earlier export there):
/// `config` (the exported config.json text), the weights, copies of `files`, and PEFT's
/// adapter files in `OUT/adapter/` when `adapter` is given.
pub fn export(
    model: &Model,
    config: &str,
    files: &[PathBuf],
    adapter: Option<AdapterOut>,
    out: &Path,
) -> Result<()> {
    check_out(out)?;
    let folder = fsutil::folder(out);
    let base = out
        .file_name()
        .map(|f| f.to_string_lossy().to_string())
        .unwrap_or_else(|| "export".into());
    let tmp = folder.join(format!(".{base}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).ok();
    }
    let written = write_folder(model, config, files, &tmp).and_then(|()| {
        if let Some(a) = &adapter {
            let dir = tmp.join(ADAPTER_DIR);
            std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
            crate::engine::lora::write_peft(a.model, a.base, &dir)?;
        }
        if out.exists() {
            std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
        }
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
        sync_dir(folder).map_err(|e| Error::io(out, e))
    });
    if written.is_err() {
        std::fs::remove_dir_all(&tmp).ok();
    }
    written
}

/// `out` may be new, empty, or an earlier export (only the files an export writes).
fn check_out(out: &Path) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    let entries = std::fs::read_dir(out).map_err(|e| Error::io(out, e))?;
    for e in entries.flatten() {
        let f = e.file_name().to_string_lossy().to_string();
        if f != CONFIG && f != WEIGHTS && f != ADAPTER_DIR && !TOKENIZER_FILES.contains(&f.as_str())
        {
            return Err(Error::bad(
                &name(out),
                format!(
                    "holds {f}, which an export does not write: export into a new or empty folder"
                ),
            ));
        }
    }
    Ok(())
}

fn write_folder(model: &Model, config: &str, files: &[PathBuf], tmp: &Path) -> Result<()> {
    std::fs::create_dir_all(tmp).map_err(|e| Error::io(tmp, e))?;
    let tensors: BTreeMap<String, &Tensor> = model
        .params
        .iter()
        .map(|(n, v)| (hf_name_of(&model.spec, n), v.as_tensor()))
        .collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    fsutil::write_synced(&tmp.join(WEIGHTS), |w| {
        crate::engine::checkpoint::write_safetensors(w, &tensors, Some(&meta))
    })?;
    fsutil::write_synced(&tmp.join(CONFIG), |w| w.write_all(config.as_bytes()))?;
    for src in files {
        let bytes = std::fs::read(src).map_err(|e| Error::io(src, e))?;
        let dst = tmp.join(src.file_name().unwrap_or_default());
        fsutil::write_synced(&dst, |w| w.write_all(&bytes))?;
    }
    sync_dir(tmp).map_err(|e| Error::io(tmp, e))
}

/// Exports checkpoint `l` (whose plan resolves to `spec`) to `out`, with the tokenizer
/// files of its run folder; returns the names of the files written.
pub fn export_checkpoint(
    spec: &vramplan_planner::RunSpec,
    l: &crate::engine::checkpoint::Loaded,
    out: &Path,
) -> Result<Vec<String>> {
    let adapted = crate::engine::eval::restored(spec, l)?;
    // Under LoRA the folder holds the merged weights, the adapters beside them.
    let merged = match &adapted.lora {
        Some(_) => Some(crate::engine::lora::merged(&adapted)?),
        None => None,
    };
    let model = merged.as_ref().unwrap_or(&adapted);
    let config = export_config(model, l.meta.hf_config.as_deref(), spec.train.seq_len)?;
    let run = l.dir.parent().unwrap_or(Path::new("."));
    let files: Vec<PathBuf> = TOKENIZER_FILES
        .iter()
        .map(|f| run.join(f))
        .filter(|p| p.is_file())
        .collect();
    let adapter = spec.lora.as_ref().map(|_| AdapterOut {
        model: &adapted,
        base: l.meta.init.as_deref(),
    });
    export(model, &config, &files, adapter, out)?;
    let mut names = vec![CONFIG.to_string(), format!("{WEIGHTS} (f32)")];
    if spec.lora.is_some() {
        names[1] = format!("{WEIGHTS} (f32, adapters merged)");
        names.push(format!(
            "{ADAPTER_DIR}/{} and {ADAPTER_DIR}/{} (PEFT)",
            crate::engine::lora::ADAPTER_CONFIG,
            crate::engine::lora::ADAPTER_WEIGHTS
        ));
    }
    names.extend(
        files
            .iter()
            .filter_map(|p| Some(p.file_name()?.to_string_lossy().to_string())),
    );
    Ok(names)
}

/// The model of the checkpoint in `dir`, in f32 on the CPU, its weights loaded.
pub fn load_model(dir: &Path) -> Result<(Pretrained, Model)> {
    let p = read(dir)?;
    let mut model = Model::new(
        &p.spec,
        candle_core::DType::F32,
        candle_core::DType::F32,
        &Device::Cpu,
        &mut crate::engine::rng::Rng::new(0),
    )?;
    model.numerics = p.numerics;
    load_weights(&model, dir)?;
    Ok((p, model))
}
