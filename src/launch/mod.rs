//! Launcher configs: the files people already train with (Hugging Face `TrainingArguments`,
//! accelerate, DeepSpeed, torchtune, torchtitan, axolotl, nanochat's flags), each read by
//! one module into the planner's [`RawConfig`].
//!
//! Every module parses its file into a tree of values, flattens it to dotted keys and runs
//! them through ONE table of [`Row`]s: a key either sets a vramplan setting, is read and has
//! no effect on memory (listed in the warning line), or changes memory in a way vramplan
//! does not model yet (an error naming the key; [`Rule::Waits`] names the vramplan setting
//! it waits for, so enabling it is a one-line change). Keys outside the table are listed
//! in the warning line as unknown. See `docs/launchers.md` for every table.

mod accelerate;
mod args;
mod axolotl;
mod can;
mod deepspeed;
mod detect;
mod emit;
mod hf;
mod nanochat;
#[cfg(test)]
mod read_tests;
mod torchtitan;
mod torchtune;
mod trainer;

pub use can::{adapt, runs};
pub use detect::{detect, Format, EMITTED};
pub use emit::{emit, launch_note, Source};

use serde_json::Value;
use std::path::{Path, PathBuf};
use vramplan_planner::{Presets, RawConfig, RawHardware, RawLora, RawModel, RawTrain};

/// A launcher file read into vramplan's terms.
#[derive(Debug, Clone)]
pub struct Launch {
    pub format: Format,
    /// The run, with `model` empty when the file's reference did not resolve.
    pub raw: RawConfig,
    /// Whether `raw.model` came from the file.
    pub model_resolved: bool,
    /// What the file says the model is, for the error when it does not resolve.
    pub model_ref: Option<String>,
    /// Keys read that do not change memory.
    pub ignored: Vec<String>,
    /// Keys vramplan does not know.
    pub unknown: Vec<String>,
    /// Settings the file leaves out that vramplan assumed.
    pub assumed: Vec<String>,
    /// How the launcher shards when run on several GPUs where that is not in the file
    /// (torchtune's distributed recipes, torchtitan's `data_parallel_shard_degree = -1`).
    pub fsdp: Option<Fsdp>,
}

/// FSDP2 over the GPUs the command line gives (`tune run --nproc_per_node`, `NGPU`).
#[derive(Debug, Clone, PartialEq)]
pub struct Fsdp {
    /// Replicas of the sharded group (torchtitan's `data_parallel_replicate_degree`): the
    /// group is gpus / replicas.
    pub replicas: u64,
    /// The precision on several GPUs, where sharding changes it (torchtitan: FSDP2's
    /// `MixedPrecisionPolicy` instead of autocast).
    pub precision: Option<String>,
    /// The gradient reduction dtype (torchtitan's `mixed_precision_reduce`).
    pub reduce_dtype: Option<String>,
}

impl Launch {
    /// Applies [`Launch::fsdp`] to `raw` once its GPU count is known (the file's, or
    /// `--gpus`): on several GPUs the run is sharded with FSDP2.
    pub fn shard(&self, raw: &mut RawConfig) -> Result<(), String> {
        let gpus = raw.hardware.gpus.unwrap_or(1);
        let Some(f) = self.fsdp.as_ref().filter(|_| gpus > 1) else {
            return Ok(());
        };
        if f.replicas > 1 && !gpus.is_multiple_of(f.replicas) {
            return Err(format!(
                "parallelism.data_parallel_replicate_degree = {}: a divisor of the {gpus} GPUs",
                f.replicas
            ));
        }
        let h = &mut raw.hardware;
        h.sharding = Some("fsdp2".into());
        h.gpus_per_node = (f.replicas > 1).then(|| gpus / f.replicas);
        if let Some(p) = &f.precision {
            raw.train.precision = Some(p.clone());
        }
        // torchtitan's policy reduces in `mixed_precision_reduce` whatever the parameters.
        if f.reduce_dtype.is_some() {
            raw.train.reduce_dtype = f.reduce_dtype.clone();
        }
        Ok(())
    }
}

impl Launch {
    /// The one warning line, or None when every key was modelled.
    pub fn warning(&self, file: &str) -> Option<String> {
        let mut parts = Vec::new();
        if !self.ignored.is_empty() {
            parts.push(format!(
                "not modelled, no effect on GPU memory: {}",
                self.ignored.join(", ")
            ));
        }
        if !self.unknown.is_empty() {
            parts.push(format!(
                "unknown to vramplan, not read: {}",
                self.unknown.join(", ")
            ));
        }
        if !self.assumed.is_empty() {
            parts.push(format!("assumed: {}", self.assumed.join(", ")));
        }
        (!parts.is_empty())
            .then(|| format!("warning: {file} ({}): {}", self.format, parts.join("; ")))
    }
}

/// Where a file is read from: its folder for the files it names, and the presets.
pub struct Ctx<'a> {
    pub dir: &'a Path,
    pub presets: &'a Presets,
}

/// Why a key cannot be planned.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// The value is not one the launcher accepts: what is accepted.
    Bad(String),
    /// Changes memory; waits for this vramplan setting.
    Waits(&'static str),
    /// Changes memory; vramplan has no model for it.
    Unmodelled(String),
}

/// Sets a setting of the draft from one key's value.
pub type Setter = fn(&mut Draft, &Value, &Ctx) -> Result<(), Refusal>;

/// What one key of a launcher's file means to vramplan.
#[derive(Clone, Copy)]
pub enum Rule {
    Set(Setter),
    /// Read, and has no effect on GPU memory (logging, learning rate, seeds, paths).
    Ignore,
    /// Changes memory when on (true, a non-zero number, a non-empty value); waits for the
    /// named vramplan setting.
    Waits(&'static str),
    /// Changes memory when on; not modelled, and no setting is planned for it.
    Unmodelled(&'static str),
}

/// A key (`a.b`, or `a.*` for everything under `a`) and its rule.
pub type Row = (&'static str, Rule);

/// The settings read so far, before the format's own arithmetic (global batch over
/// micro-batch and GPUs) and the model's resolution.
#[derive(Debug, Clone, Default)]
pub struct Draft {
    pub model: Option<RawModel>,
    pub model_ref: Option<String>,
    pub micro_batch: Option<u64>,
    pub seq_len: Option<u64>,
    pub grad_accum: Option<u64>,
    pub precision: Option<String>,
    pub optimizer: Option<String>,
    pub checkpointing: Option<String>,
    pub loss: Option<String>,
    pub attention: Option<String>,
    pub gpu: Option<String>,
    pub gpus: Option<u64>,
    pub sharding: Option<String>,
    pub reshard_after_forward: Option<bool>,
    pub gpus_per_node: Option<u64>,
    /// DeepSpeed's `offload_optimizer.device` / `offload_param.device` ("cpu").
    pub offload_optimizer: Option<String>,
    pub offload_params: Option<String>,
    /// DeepSpeed ZeRO's bucket sizes (`zero_optimization`), in elements.
    pub reduce_bucket_size: Option<u64>,
    pub allgather_bucket_size: Option<u64>,
    pub stage3_prefetch_bucket_size: Option<u64>,
    pub stage3_max_live_parameters: Option<u64>,
    pub stage3_param_persistence_threshold: Option<u64>,
    pub stage3_max_reuse_distance: Option<u64>,
    pub implementation: Option<String>,
    pub compile: Option<bool>,
    pub offload_activations: Option<bool>,
    pub optimizer_in_backward: Option<bool>,
    pub reduce_dtype: Option<String>,
    pub loss_chunk: Option<u64>,
    /// LoRA / QLoRA adapters (None: full fine-tuning).
    pub lora: Option<RawLora>,
    /// Sequences per optimizer step over all GPUs (DeepSpeed's train_batch_size, ...).
    pub global_batch: Option<u64>,
    /// Tokens per optimizer step over all GPUs (nanochat, torchtitan).
    pub global_tokens: Option<u64>,
    /// Format-specific values the finishing step reads (DeepSpeed's torch_adam, ...).
    pub extra: Vec<(String, Value)>,
    pub assumed: Vec<String>,
}

impl Draft {
    pub fn extra(&self, key: &str) -> Option<&Value> {
        self.extra.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The grad accumulation that keeps `global` sequences per step, or why not.
    pub fn accum_for(&self, global: u64, key: &str) -> Result<u64, Refusal> {
        let per_step = self.micro_batch.unwrap_or(1) * self.gpus.unwrap_or(1);
        if global == 0 || !global.is_multiple_of(per_step) {
            return Err(Refusal::Bad(format!(
                "{key} = {global}: a multiple of micro-batch × GPUs = {per_step}"
            )));
        }
        Ok(global / per_step)
    }

    pub fn into_raw(self) -> RawConfig {
        RawConfig {
            model: self.model.unwrap_or_default(),
            train: RawTrain {
                micro_batch: self.micro_batch,
                seq_len: self.seq_len,
                grad_accum: self.grad_accum,
                precision: self.precision,
                optimizer: self.optimizer,
                checkpointing: self.checkpointing,
                loss: self.loss,
                loss_chunk: self.loss_chunk,
                attention: self.attention,
                implementation: self.implementation,
                compile: self.compile,
                offload_activations: self.offload_activations,
                optimizer_in_backward: self.optimizer_in_backward,
                reduce_dtype: self.reduce_dtype,
                ..RawTrain::default()
            },
            hardware: RawHardware {
                gpu: self.gpu,
                gpus: self.gpus,
                sharding: self.sharding,
                reshard_after_forward: self.reshard_after_forward,
                gpus_per_node: self.gpus_per_node,
                offload_optimizer: self.offload_optimizer,
                offload_params: self.offload_params,
                reduce_bucket_size: self.reduce_bucket_size,
                allgather_bucket_size: self.allgather_bucket_size,
                stage3_prefetch_bucket_size: self.stage3_prefetch_bucket_size,
                stage3_max_live_parameters: self.stage3_max_live_parameters,
                stage3_param_persistence_threshold: self.stage3_param_persistence_threshold,
                stage3_max_reuse_distance: self.stage3_max_reuse_distance,
                ..RawHardware::default()
            },
            lora: self.lora,
        }
    }
}

/// Reads `text` as `format` (not [`Format::Vramplan`], which the planner reads itself).
pub fn read(format: Format, text: &str, ctx: &Ctx) -> Result<Launch, String> {
    match format {
        Format::Vramplan => Err("a vramplan run config is read by the planner".into()),
        Format::HfArgs => hf::read(text, ctx),
        Format::Accelerate => accelerate::read(text, ctx),
        Format::DeepSpeed => deepspeed::read(text, ctx),
        Format::Torchtune => torchtune::read(text, ctx),
        Format::Torchtitan => torchtitan::read(text, ctx),
        Format::Axolotl => axolotl::read(text, ctx),
        Format::Nanochat => nanochat::read(text, ctx),
    }
}

/// The rows' outcome over a flattened file.
#[derive(Debug, Default)]
pub struct Applied {
    pub ignored: Vec<String>,
    pub unknown: Vec<String>,
}

/// A launcher's default for a key its file may leave out: (key, value as JSON).
pub type KeyDefault = (&'static str, &'static str);

/// Runs every key through `tables` (the first row that matches, in order), then each of `defaults` the file leaves out (its
/// refusals say the value is the launcher's default). The first bad value is an error;
/// every key that changes memory and is not modelled is named in one error line.
pub fn apply(
    tables: &[&[Row]],
    defaults: &[KeyDefault],
    keys: &[(String, Value)],
    draft: &mut Draft,
    ctx: &Ctx,
) -> Result<Applied, String> {
    let mut out = Applied::default();
    let mut refused = Vec::new();
    let missing = defaults
        .iter()
        .filter(|(k, _)| !keys.iter().any(|(x, _)| x == k))
        .map(|(k, v)| {
            let v = serde_json::from_str(v).unwrap_or(Value::Null);
            (
                format!("{k} (not set: the launcher's default)"),
                k.to_string(),
                v,
            )
        });
    let given = keys.iter().map(|(k, v)| (k.clone(), k.clone(), v.clone()));
    for (shown, key, value) in given.chain(missing) {
        let rows = tables.iter().flat_map(|t| t.iter());
        let Some((pattern, rule)) = rows.clone().find(|(p, _)| matches(p, &key)) else {
            out.unknown.push(key);
            continue;
        };
        let result = match rule {
            Rule::Set(f) => f(draft, &value, ctx),
            Rule::Ignore => {
                let name = pattern.strip_suffix(".*").unwrap_or(&key);
                if !out.ignored.iter().any(|k| k == name) {
                    out.ignored.push(name.to_string());
                }
                Ok(())
            }
            Rule::Waits(setting) if on(&value) => Err(Refusal::Waits(setting)),
            Rule::Unmodelled(why) if on(&value) => Err(Refusal::Unmodelled(why.to_string())),
            Rule::Waits(_) | Rule::Unmodelled(_) => Ok(()),
        };
        match result {
            Ok(()) => {}
            Err(Refusal::Bad(accepted)) => {
                return Err(format!("{shown} = {}: {accepted}", show(&value)))
            }
            Err(r) => refused.push((format!("{shown} = {}", show(&value)), r)),
        }
    }
    if refused.is_empty() {
        Ok(out)
    } else {
        Err(grouped(refused))
    }
}

/// Refusals with the same reason in one clause: "a = 1, b = 2 change memory and are not
/// modelled yet (waits for vramplan's cpu offload)".
fn grouped(refused: Vec<(String, Refusal)>) -> String {
    let mut groups: Vec<(Refusal, Vec<String>)> = Vec::new();
    for (kv, r) in refused {
        match groups.iter_mut().find(|(g, _)| *g == r) {
            Some((_, kvs)) => kvs.push(kv),
            None => groups.push((r, vec![kv])),
        }
    }
    let clause = |(r, kvs): (Refusal, Vec<String>)| {
        let (verb, are) = if kvs.len() == 1 {
            ("changes", "is")
        } else {
            ("change", "are")
        };
        let why = match r {
            Refusal::Waits(s) => format!("{are} not modelled yet (waits for vramplan's {s})"),
            Refusal::Unmodelled(why) => format!("{are} not modelled: {why}"),
            Refusal::Bad(a) => a,
        };
        format!("{} {verb} memory and {why}", kvs.join(", "))
    };
    groups
        .into_iter()
        .map(clause)
        .collect::<Vec<_>>()
        .join("; ")
}

/// "KEY = VALUE changes memory and is not modelled yet (…)".
pub fn refusal_text(key: &str, value: &Value, r: &Refusal) -> String {
    grouped(vec![(format!("{key} = {}", show(value)), r.clone())])
}

fn matches(pattern: &str, key: &str) -> bool {
    match pattern.strip_suffix(".*") {
        Some(prefix) => key == prefix || key.starts_with(&format!("{prefix}.")),
        None => pattern == key,
    }
}

/// Whether a value turns its feature on.
pub fn on(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !matches!(
            s.trim().to_ascii_lowercase().as_str(),
            "" | "false" | "no" | "none" | "null" | "0" | "disabled" | "off"
        ),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// A value as the file wrote it, on one line.
pub fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 40 {
        format!("{}…", s.chars().take(40).collect::<String>())
    } else {
        s
    }
}

/// The value's dotted keys, in the file's order of nesting; lists are single values, and
/// so is a top-level `deepspeed` dict (the Trainer's and axolotl's inline DeepSpeed
/// config, which the DeepSpeed reader reads whole).
pub fn flatten(v: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    fn walk(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
        match v {
            Value::Object(m) if prefix == "deepspeed" && !m.is_empty() => {
                out.push((prefix.to_string(), v.clone()))
            }
            Value::Object(m) if !m.is_empty() || prefix.is_empty() => {
                for (k, x) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, x, out);
                }
            }
            _ => out.push((prefix.to_string(), v.clone())),
        }
    }
    walk("", v, &mut out);
    out
}

/// The setters every format shares: a count into the draft's field.
pub fn set_micro_batch(d: &mut Draft, v: &Value, _: &Ctx) -> Result<(), Refusal> {
    d.micro_batch = Some(count(v)?);
    Ok(())
}

pub fn set_grad_accum(d: &mut Draft, v: &Value, _: &Ctx) -> Result<(), Refusal> {
    d.grad_accum = Some(count(v)?);
    Ok(())
}

pub fn set_seq_len(d: &mut Draft, v: &Value, _: &Ctx) -> Result<(), Refusal> {
    d.seq_len = Some(count(v)?);
    Ok(())
}

/// A whole number (a JSON number, or a string of digits as command lines give).
pub fn count(v: &Value) -> Result<u64, Refusal> {
    let n = match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    match n {
        Some(n) if n > 0 => Ok(n),
        _ => Err(Refusal::Bad("a whole number above 0".into())),
    }
}

/// A signed whole number (torchtitan's -1, nanochat's -1 = automatic).
pub fn int(v: &Value) -> Result<i64, Refusal> {
    let n = match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    n.ok_or_else(|| Refusal::Bad("a whole number".into()))
}

/// A boolean (also "true"/"false" strings and bare command-line flags).
pub fn flag(v: &Value) -> Result<bool, Refusal> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::Null => Ok(false),
        Value::String(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            _ => Err(Refusal::Bad("true or false".into())),
        },
        _ => Err(Refusal::Bad("true or false".into())),
    }
}

pub fn text(v: &Value) -> Result<&str, Refusal> {
    v.as_str().ok_or_else(|| Refusal::Bad("a string".into()))
}

/// One of `choices` (compared without case): the vramplan value it maps to, or a refusal.
pub fn pick<T: Copy>(v: &Value, choices: &[(&str, T)]) -> Result<T, Refusal> {
    let s = match v {
        Value::String(s) => s.trim().to_string(),
        other => other.to_string(),
    };
    choices
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(&s))
        .map(|(_, t)| *t)
        .ok_or_else(|| {
            let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
            Refusal::Bad(format!("one of {}", names.join(" | ")))
        })
}

/// A Hugging Face model reference: a local folder or config.json, or a hub id whose name
/// is a preset (`HuggingFaceTB/SmolLM2-135M` → `smollm2-135m`; an `-Instruct` variant has
/// its base's shape). None when neither resolves.
pub fn hub_model(id: &str, ctx: &Ctx) -> Option<RawModel> {
    let local = ctx.dir.join(id);
    let config = if local.is_dir() {
        local.join("config.json")
    } else {
        local.clone()
    };
    if config.is_file() && config.extension().is_some_and(|e| e == "json") {
        return Some(RawModel {
            hf_config: Some(absolute(&config)),
            ..RawModel::default()
        });
    }
    let last = id
        .trim_end_matches('/')
        .rsplit('/')
        .next()?
        .to_ascii_lowercase();
    let base = last
        .strip_suffix("-instruct")
        .or_else(|| last.strip_suffix("-it"))
        .unwrap_or(&last);
    let found = [last.as_str(), base]
        .into_iter()
        .find(|n| ctx.presets.model(n).is_ok())
        .map(preset);
    found
}

pub fn preset(name: &str) -> RawModel {
    RawModel {
        preset: Some(name.to_string()),
        ..RawModel::default()
    }
}

fn absolute(p: &Path) -> String {
    std::fs::canonicalize(p)
        .unwrap_or_else(|_| PathBuf::from(p))
        .display()
        .to_string()
}

/// Sets the model from a Hugging Face reference, keeping the reference for the error
/// when it does not resolve.
pub fn set_hub_model(d: &mut Draft, key: &str, v: &Value, ctx: &Ctx) -> Result<(), Refusal> {
    let id = text(v)?;
    d.model_ref = Some(format!("{key} = \"{id}\""));
    d.model = hub_model(id, ctx);
    Ok(())
}

/// An optimizer key the file leaves out whose launcher default is the fused AdamW
/// (transformers 5's `adamw_torch_fused`, axolotl's, torchtitan's `implementation =
/// "fused"`): planned as `adamw-fused`, and said.
pub fn default_fused(d: &mut Draft, keys: &[(String, Value)], key: &str, launcher: &str) {
    if d.optimizer.is_none() && !keys.iter().any(|(k, _)| k == key) {
        d.optimizer = Some("adamw-fused".into());
        d.assumed.push(format!(
            "optimizer adamw-fused ({key} is not set: {launcher}'s default, the fused AdamW)"
        ));
    }
}

/// Hugging Face's `optim` names (transformers' `OptimizerNames`, which axolotl's
/// `optimizer` takes too) and the vramplan optimizer each is; the first name of a
/// vramplan optimizer is the one `--emit` writes.
pub const HF_OPTIM: &[(&str, &str)] = &[
    ("adamw_torch", "adamw"),
    ("adamw_hf", "adamw"),
    ("adamw_torch_fused", "adamw-fused"),
    ("adamw_bnb_8bit", "adamw-8bit"),
    ("adamw_8bit", "adamw-8bit"),
    ("paged_adamw_8bit", "paged-adamw-8bit"),
    ("paged_adamw_32bit", "paged-adamw"),
    ("adamw_torch_8bit", "torchao-adamw-8bit"),
    ("adamw_torch_4bit", "torchao-adamw-4bit"),
    ("adafactor", "adafactor"),
    ("sgd", "sgd"),
];

/// `optim` (Hugging Face) / `optimizer` (axolotl).
pub fn set_hf_optim(d: &mut Draft, v: &Value, _: &Ctx) -> Result<(), Refusal> {
    d.optimizer = Some(pick(v, HF_OPTIM)?.into());
    Ok(())
}

/// The Hugging Face `optim` name of a vramplan optimizer.
pub fn hf_optim_name(optimizer: &str) -> Option<&'static str> {
    HF_OPTIM
        .iter()
        .find(|(_, o)| *o == optimizer)
        .map(|(n, _)| *n)
}

/// Keeps a key's value for the finishing step (LoRA's keys, read together).
pub fn keep(d: &mut Draft, key: &str, v: &Value) -> Result<(), Refusal> {
    d.extra.push((key.to_string(), v.clone()));
    Ok(())
}

/// A boolean key into one of the draft's switches.
pub fn switch(v: &Value, field: &mut Option<bool>) -> Result<(), Refusal> {
    *field = Some(flag(v)?);
    Ok(())
}

/// A probability (LoRA dropout), a positive number (alpha) or a count (rank), as a
/// launcher writes it (a number, or a command line's string).
pub fn number(v: &Value) -> Result<f64, Refusal> {
    let n = match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    n.filter(|x| x.is_finite() && *x >= 0.0)
        .ok_or_else(|| Refusal::Bad("a number of 0 or more".into()))
}

/// `target_modules` as PEFT takes it: a list of module names, a command line's words, or
/// "all-linear".
pub fn targets(v: &Value) -> Result<vramplan_planner::Targets, Refusal> {
    use vramplan_planner::Targets;
    match v {
        Value::String(s) if s.trim().eq_ignore_ascii_case("all-linear") => {
            Ok(Targets::All("all-linear".into()))
        }
        Value::String(s) => Ok(Targets::Names(
            s.split([',', ' '])
                .filter(|x| !x.is_empty())
                .map(String::from)
                .collect(),
        )),
        Value::Array(a) => a
            .iter()
            .map(|x| x.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .map(Targets::Names)
            .ok_or_else(|| Refusal::Bad("a list of module names, or \"all-linear\"".into())),
        _ => Err(Refusal::Bad(
            "a list of module names, or \"all-linear\"".into(),
        )),
    }
}

/// The LoRA keys every PEFT-based launcher writes (TRL's `ModelConfig`, axolotl), each
/// checked and kept under one name for [`peft_lora`].
pub fn lora_row(d: &mut Draft, name: &str, v: &Value) -> Result<(), Refusal> {
    match name {
        "rank" => {
            count(v)?;
        }
        "targets" => {
            targets(v)?;
        }
        "save" | "dora" | "on" => {}
        _ => {
            number(v)?;
        }
    }
    keep(d, &format!("lora.{name}"), v)
}

/// PEFT's `LoraConfig` from the kept LoRA keys, over a launcher's defaults of rank, alpha
/// and dropout (None: PEFT's own, r 8, alpha = r, dropout 0).
pub fn peft_lora(d: &Draft, defaults: (Option<u64>, Option<f64>, Option<f64>)) -> RawLora {
    let get = |k: &str| d.extra(&format!("lora.{k}"));
    let save = get("save").and_then(|v| match v {
        Value::Array(a) => Some(
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect(),
        ),
        Value::String(s) => Some(
            s.split([',', ' '])
                .filter(|x| !x.is_empty())
                .map(String::from)
                .collect(),
        ),
        _ => None,
    });
    RawLora {
        rank: get("rank").and_then(|v| count(v).ok()).or(defaults.0),
        alpha: get("alpha").and_then(|v| number(v).ok()).or(defaults.1),
        dropout: get("dropout").and_then(|v| number(v).ok()).or(defaults.2),
        target_modules: get("targets").and_then(|v| targets(v).ok()),
        modules_to_save: save.filter(|s: &Vec<String>| !s.is_empty()),
        use_dora: get("dora").map(on).filter(|b| *b),
        ..RawLora::default()
    }
}

pub fn finish(format: Format, d: Draft, applied: Applied) -> Launch {
    let model_resolved = d.model.is_some();
    let model_ref = d.model_ref.clone();
    let assumed = d.assumed.clone();
    Launch {
        format,
        raw: d.into_raw(),
        model_resolved,
        model_ref,
        ignored: applied.ignored,
        unknown: applied.unknown,
        assumed,
        fsdp: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn on_reads_what_turns_a_feature_on() {
        for v in [json!(true), json!(1), json!("cpu"), json!(["q_proj"])] {
            assert!(on(&v), "{v}");
        }
        for v in [
            json!(false),
            json!(0),
            json!(null),
            json!("none"),
            json!(""),
        ] {
            assert!(!on(&v), "{v}");
        }
    }

    #[test]
    fn flatten_keeps_lists_whole_and_nests_with_dots() {
        let v = json!({"a": {"b": 1, "c": [1, 2]}, "d": {}, "deepspeed": {"zero_optimization": {"stage": 3}}, "e": {"deepspeed": {"f": 1}}});
        let keys: Vec<String> = flatten(&v).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["a.b", "a.c", "d", "deepspeed", "e.deepspeed.f"]);
    }

    /// A row after a wildcard that covers it would never be read.
    #[test]
    fn no_row_is_shadowed_by_an_earlier_one() {
        let joined = |a: &[Row], b: &[Row]| -> Vec<Row> { a.iter().chain(b).copied().collect() };
        let tables: [(&str, Vec<Row>); 7] = [
            ("hf", joined(hf::TABLE, trainer::TABLE)),
            ("accelerate", accelerate::TABLE.to_vec()),
            ("deepspeed", deepspeed::TABLE.to_vec()),
            ("torchtune", torchtune::TABLE.to_vec()),
            ("torchtitan", torchtitan::TABLE.to_vec()),
            ("axolotl", joined(axolotl::TABLE, trainer::TABLE)),
            ("nanochat", nanochat::TABLE.to_vec()),
        ];
        for (name, table) in tables {
            for (i, (key, _)) in table.iter().enumerate() {
                let probe = key.strip_suffix(".*").unwrap_or(key);
                if let Some((earlier, _)) = table[..i].iter().find(|(p, _)| matches(p, probe)) {
                    panic!("{name}: {key} is shadowed by {earlier}");
                }
            }
        }
    }

    #[test]
    fn patterns_match_the_key_and_what_is_under_it() {
        assert!(matches("profiler.*", "profiler.enabled"));
        assert!(matches("profiler.*", "profiler"));
        assert!(!matches("profiler.*", "profilers.x"));
        assert!(matches("batch_size", "batch_size"));
    }
}
