//! A plan written back in a launcher's format (`estimate --emit`, `fit --emit`): the input
//! file's tree (when it is in that format) with the keys vramplan planned replaced, so
//! every other setting stays; for several GPUs, the command that launches it. A setting
//! the launcher cannot express is refused, naming it.

use super::args;
use super::*;
use vramplan_planner::{Checkpointing, Optimizer, Precision, RunSpec, Sharding};

/// Puts one planned value at a key; None removes the key.
type Put = fn(&RunSpec) -> Result<Option<Value>, String>;

fn cannot(format: &str, what: impl std::fmt::Display) -> String {
    format!("the plan's {what} has no {format} setting")
}

fn ckpt_flag(s: &RunSpec, format: &str) -> Result<Option<Value>, String> {
    match s.train.checkpointing {
        Checkpointing::None => Ok(Some(false.into())),
        Checkpointing::Full => Ok(Some(true.into())),
        c => Err(cannot(format, format!("checkpointing = \"{c}\""))),
    }
}

fn hf_optim(s: &RunSpec, format: &str) -> Result<Option<Value>, String> {
    let o = match s.train.optimizer {
        Optimizer::AdamW => "adamw_torch",
        Optimizer::AdamW8bit => "adamw_bnb_8bit",
        Optimizer::Adafactor => "adafactor",
        Optimizer::Sgd => "sgd",
        o => return Err(cannot(format, format!("optimizer = \"{o}\""))),
    };
    Ok(Some(o.into()))
}

fn n(v: u64) -> Result<Option<Value>, String> {
    Ok(Some(v.into()))
}

const HF: &[(&str, Put)] = &[
    ("per_device_train_batch_size", |s| n(s.train.micro_batch)),
    ("gradient_accumulation_steps", |s| n(s.train.grad_accum)),
    ("max_length", |s| n(s.train.seq_len)),
    ("bf16", |s| {
        Ok(Some(
            matches!(s.train.precision, Precision::Bf16Autocast | Precision::Bf16).into(),
        ))
    }),
    ("fp16", |s| {
        Ok(Some((s.train.precision == Precision::Fp16Autocast).into()))
    }),
    ("torch_dtype", |s| {
        Ok((s.train.precision == Precision::Bf16).then(|| "bfloat16".into()))
    }),
    ("gradient_checkpointing", |s| ckpt_flag(s, "hf-args")),
    ("optim", |s| hf_optim(s, "hf-args")),
    ("deepspeed", |s| {
        Ok((s.hardware.sharding != Sharding::Ddp).then(|| deepspeed_dict(s)))
    }),
];

fn deepspeed_dict(s: &RunSpec) -> Value {
    serde_json::json!({
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": s.hardware.sharding.stage()},
    })
}

const DEEPSPEED: &[(&str, Put)] = &[
    ("train_micro_batch_size_per_gpu", |s| n(s.train.micro_batch)),
    ("gradient_accumulation_steps", |s| n(s.train.grad_accum)),
    ("train_batch_size", |s| {
        n(s.train.micro_batch * s.train.grad_accum * s.hardware.gpus)
    }),
    ("zero_optimization.stage", |s| {
        n(u64::from(s.hardware.sharding.stage()))
    }),
    ("fp16.enabled", |s| match s.train.precision {
        Precision::Fp32 => Ok(Some(false.into())),
        p => Err(cannot(
            "deepspeed",
            format!("precision = \"{p}\" (DeepSpeed's 16-bit modes keep 16-bit weights)"),
        )),
    }),
    ("bf16.enabled", |_| Ok(Some(false.into()))),
    ("optimizer.type", |s| match s.train.optimizer {
        Optimizer::AdamW => Ok(Some("AdamW".into())),
        o => Err(cannot("deepspeed", format!("optimizer = \"{o}\""))),
    }),
    ("optimizer.params.torch_adam", |_| Ok(Some(true.into()))),
];

const ACCELERATE: &[(&str, Put)] = &[
    ("distributed_type", |s| {
        Ok(Some(
            match (s.hardware.sharding, s.hardware.gpus) {
                (Sharding::Ddp, 1) => "NO",
                (Sharding::Ddp, _) => "MULTI_GPU",
                _ => "DEEPSPEED",
            }
            .into(),
        ))
    }),
    ("num_processes", |s| n(s.hardware.gpus)),
    ("mixed_precision", |s| match s.train.precision {
        Precision::Fp32 => Ok(Some("no".into())),
        Precision::Bf16Autocast if s.hardware.sharding == Sharding::Ddp => Ok(Some("bf16".into())),
        Precision::Fp16Autocast if s.hardware.sharding == Sharding::Ddp => Ok(Some("fp16".into())),
        p => Err(cannot(
            "accelerate",
            format!("precision = \"{p}\" with {}", s.hardware.sharding),
        )),
    }),
    ("deepspeed_config", |s| {
        Ok((s.hardware.sharding != Sharding::Ddp).then(|| {
            serde_json::json!({
                "zero_stage": s.hardware.sharding.stage(),
                "gradient_accumulation_steps": s.train.grad_accum,
                "offload_optimizer_device": "none",
                "offload_param_device": "none",
            })
        }))
    }),
];

const TORCHTUNE: &[(&str, Put)] = &[
    ("batch_size", |s| n(s.train.micro_batch)),
    ("gradient_accumulation_steps", |s| n(s.train.grad_accum)),
    ("tokenizer.max_seq_len", |s| n(s.train.seq_len)),
    ("dtype", |s| match s.train.precision {
        Precision::Bf16 => Ok(Some("bf16".into())),
        Precision::Fp32 => Ok(Some("fp32".into())),
        p => Err(cannot("torchtune", format!("precision = \"{p}\""))),
    }),
    ("enable_activation_checkpointing", |s| {
        ckpt_flag(s, "torchtune")
    }),
    ("optimizer._component_", |s| match s.train.optimizer {
        Optimizer::AdamW => Ok(Some("torch.optim.AdamW".into())),
        Optimizer::AdamW8bit => Ok(Some("bitsandbytes.optim.AdamW8bit".into())),
        Optimizer::Sgd => Ok(Some("torch.optim.SGD".into())),
        o => Err(cannot("torchtune", format!("optimizer = \"{o}\""))),
    }),
    ("optimizer.fused", |_| Ok(None)),
    ("loss._component_", |_| {
        Ok(Some("torch.nn.CrossEntropyLoss".into()))
    }),
];

const TORCHTITAN: &[(&str, Put)] = &[
    ("training.local_batch_size", |s| n(s.train.micro_batch)),
    ("training.seq_len", |s| n(s.train.seq_len)),
    ("training.global_batch_size", |s| {
        n(s.train.micro_batch * s.train.grad_accum * s.hardware.gpus)
    }),
    ("training.mixed_precision_param", |s| {
        match s.train.precision {
            Precision::Bf16Autocast => Ok(Some("bfloat16".into())),
            Precision::Fp32 => Ok(Some("float32".into())),
            p => Err(cannot("torchtitan", format!("precision = \"{p}\""))),
        }
    }),
    ("activation_checkpoint.mode", |s| {
        match s.train.checkpointing {
            Checkpointing::None => Ok(Some("none".into())),
            Checkpointing::Full => Ok(Some("full".into())),
            c => Err(cannot("torchtitan", format!("checkpointing = \"{c}\""))),
        }
    }),
    ("activation_checkpoint.selective_ac_option", |_| Ok(None)),
    ("optimizer.name", |s| match s.train.optimizer {
        Optimizer::AdamW => Ok(Some("AdamW".into())),
        o => Err(cannot("torchtitan", format!("optimizer = \"{o}\""))),
    }),
    ("optimizer.implementation", |_| Ok(Some("foreach".into()))),
    // Plain data parallelism: replicas, no FSDP shards.
    ("parallelism.data_parallel_shard_degree", |_| n(1)),
    ("parallelism.data_parallel_replicate_degree", |s| {
        n(s.hardware.gpus)
    }),
];

const AXOLOTL: &[(&str, Put)] = &[
    ("micro_batch_size", |s| n(s.train.micro_batch)),
    ("gradient_accumulation_steps", |s| n(s.train.grad_accum)),
    ("sequence_len", |s| n(s.train.seq_len)),
    ("bf16", |s| match s.train.precision {
        Precision::Bf16 => Ok(Some(true.into())),
        Precision::Fp32 => Ok(Some(false.into())),
        p => Err(cannot(
            "axolotl",
            format!("precision = \"{p}\" (axolotl loads bf16 runs in bf16)"),
        )),
    }),
    ("gradient_checkpointing", |s| ckpt_flag(s, "axolotl")),
    ("optimizer", |s| hf_optim(s, "axolotl")),
    ("deepspeed", |s| {
        Ok((s.hardware.sharding != Sharding::Ddp).then(|| deepspeed_dict(s)))
    }),
];

const NANOCHAT: &[(&str, Put)] = &[
    ("device_batch_size", |s| n(s.train.micro_batch)),
    ("max_seq_len", |s| n(s.train.seq_len)),
    ("total_batch_size", |s| {
        n(s.train.tokens_per_micro_batch() * s.train.grad_accum * s.hardware.gpus)
    }),
];

/// The plan's loss, attention, engine and sharding where the format has none for them.
fn check_common(format: Format, s: &RunSpec) -> Result<(), String> {
    let name = format.name();
    if s.train.loss != vramplan_planner::LossMode::FloatCast && format != Format::Nanochat {
        return Err(cannot(name, format!("loss = \"{}\" (fit --allow-fused and chunked plans need a loss of the training code's own)", s.train.loss)));
    }
    if s.train.engine != vramplan_planner::Engine::Torch {
        return Err(cannot(name, format!("engine = \"{}\"", s.train.engine)));
    }
    let sharded = s.hardware.sharding != Sharding::Ddp;
    if sharded
        && matches!(
            format,
            Format::Torchtune | Format::Torchtitan | Format::Nanochat
        )
    {
        return Err(cannot(
            name,
            format!("sharding = \"{}\"", s.hardware.sharding),
        ));
    }
    if format == Format::Torchtune && s.hardware.gpus > 1 {
        return Err(cannot(
            name,
            "data parallelism on several GPUs without FSDP2",
        ));
    }
    if format == Format::Nanochat {
        nanochat_fits(s)?;
    }
    Ok(())
}

/// nanochat's fixed recipe: Muon, bf16 autocast, no checkpointing flag, the float cast
/// or its own softcapped loss.
fn nanochat_fits(s: &RunSpec) -> Result<(), String> {
    let t = &s.train;
    let ok = t.optimizer == Optimizer::Muon
        && t.precision == Precision::Bf16Autocast
        && t.checkpointing == Checkpointing::None
        && t.loss == vramplan_planner::LossMode::FloatCast;
    if ok {
        return Ok(());
    }
    Err(cannot(
        "nanochat",
        format!(
            "{}, {}, checkpointing {}, loss {} (base_train runs muon, bf16-autocast, none, float-cast)",
            t.optimizer, t.precision, t.checkpointing, t.loss
        ),
    ))
}

fn set(tree: &mut Value, path: &str, v: Option<Value>) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().unwrap_or(path);
    let mut node = tree;
    for p in parts {
        if !node.get(p).is_some_and(Value::is_object) {
            node[p] = Value::Object(Default::default());
        }
        node = &mut node[p];
    }
    match (v, node.as_object_mut()) {
        (Some(v), Some(m)) => {
            m.insert(last.to_string(), v);
        }
        (None, Some(m)) => {
            m.remove(last);
        }
        (_, None) => {}
    }
}

fn rows(format: Format) -> &'static [(&'static str, Put)] {
    match format {
        Format::HfArgs => HF,
        Format::Accelerate => ACCELERATE,
        Format::DeepSpeed => DEEPSPEED,
        Format::Torchtune => TORCHTUNE,
        Format::Torchtitan => TORCHTITAN,
        Format::Axolotl => AXOLOTL,
        Format::Nanochat | Format::Vramplan => NANOCHAT,
    }
}

/// The input in the emitted format, if it is in that format.
pub struct Source<'a> {
    pub format: Format,
    pub text: &'a str,
}

/// The plan `s` as `format`, over `base` where it is in that format.
pub fn emit(format: Format, base: Option<&Source>, s: &RunSpec) -> Result<String, String> {
    check_common(format, s)?;
    let base = base.filter(|b| b.format == format).map(|b| b.text);
    let command = format == Format::Nanochat
        || (format == Format::HfArgs
            && base.is_some_and(|t| {
                serde_norway::from_str::<Value>(t).map_or(true, |v| !v.is_object())
            }));
    if command {
        return emit_command(format, base, s);
    }
    let mut tree = match (format, base) {
        (_, None) => Value::Object(Default::default()),
        (Format::Torchtitan, Some(t)) => toml::from_str(t).map_err(|e| e.message().to_string())?,
        (Format::DeepSpeed, Some(t)) => serde_json::from_str(t).map_err(|e| e.to_string())?,
        (_, Some(t)) => serde_norway::from_str(t).map_err(|e| e.to_string())?,
    };
    let input = tree.clone();
    for (path, put) in rows(format) {
        set(&mut tree, path, put(s)?);
    }
    if format == Format::HfArgs {
        keep_seq_key(&mut tree, &input);
    }
    if tree.get("model_name_or_path").is_none() && format == Format::HfArgs {
        set(
            &mut tree,
            "model_name_or_path",
            Some(s.model.name.clone().into()),
        );
    }
    if tree.pointer("/model/_component_").is_none() && format == Format::Torchtune {
        if let Some(b) = super::torchtune::builder_of(&s.model.name) {
            set(&mut tree, "model._component_", Some(b.into()));
        }
    }
    if tree.get("base_model").is_none() && format == Format::Axolotl {
        set(&mut tree, "base_model", Some(s.model.name.clone().into()));
    }
    let text = match format {
        Format::Torchtitan => toml::to_string(&tree).map_err(|e| e.to_string())?,
        Format::DeepSpeed => serde_json::to_string_pretty(&tree).map_err(|e| e.to_string())? + "\n",
        _ => serde_norway::to_string(&tree).map_err(|e| e.to_string())?,
    };
    Ok(format!("{}{text}", launch_comment(format, s)))
}

/// Hugging Face's sequence key: the one the input used (scripts define their own:
/// `block_size`, `model_max_length`), else `max_length`; `max_length` is what HF's row
/// wrote.
fn keep_seq_key(tree: &mut Value, input: &Value) {
    let keys = ["max_seq_length", "block_size", "model_max_length"];
    let Some(k) = keys.iter().find(|k| input.get(**k).is_some()) else {
        return;
    };
    if let Some(m) = tree.as_object_mut() {
        if let Some(v) = m.remove("max_length") {
            m.insert(k.to_string(), v);
        }
    }
}

fn launch_comment(format: Format, s: &RunSpec) -> String {
    let g = s.hardware.gpus;
    match format {
        Format::Accelerate => format!(
            "# accelerate launch --config_file THIS_FILE train.py --per_device_train_batch_size {} --gradient_accumulation_steps {} --max_length {}   ({g} processes)\n",
            s.train.micro_batch, s.train.grad_accum, s.train.seq_len
        ),
        Format::DeepSpeed => String::new(),
        Format::Torchtune if g > 1 => format!("# tune run --nproc_per_node {g} full_finetune_distributed --config THIS_FILE\n"),
        Format::Torchtune => "# tune run full_finetune_single_device --config THIS_FILE\n".into(),
        Format::Torchtitan => format!("# NGPU={g} CONFIG_FILE=THIS_FILE ./run_train.sh\n"),
        Format::Axolotl => format!("# accelerate launch --num_processes {g} -m axolotl.cli.train THIS_FILE\n"),
        _ => String::new(),
    }
}

/// nanochat's and a pasted Hugging Face script's command line, with the plan's flags.
fn emit_command(format: Format, base: Option<&str>, s: &RunSpec) -> Result<String, String> {
    let (script, mut flags) = match base {
        Some(t) => {
            let c = args::command_line(t)?;
            (c.script, c.flags)
        }
        None if format == Format::Nanochat => {
            ("-m scripts.base_train".to_string(), Default::default())
        }
        None => ("train.py".to_string(), Default::default()),
    };
    let mut tree = Value::Object(std::mem::take(&mut flags));
    let input = tree.clone();
    for (path, put) in rows(format) {
        set(&mut tree, path, put(s)?);
    }
    if format == Format::HfArgs {
        keep_seq_key(&mut tree, &input);
    }
    if format == Format::Nanochat {
        if let Some(depth) = s.model.name.strip_prefix("nanochat-d") {
            set(&mut tree, "depth", Some(depth.into()));
        }
    }
    if format == Format::HfArgs && s.hardware.sharding != Sharding::Ddp {
        return Err("a ZeRO plan on a command line needs a DeepSpeed file: write it with --emit deepspeed and pass --deepspeed FILE".into());
    }
    let words: Vec<String> = tree
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| flag_word(format, k, v))
        .collect();
    let g = s.hardware.gpus;
    let (launcher, sep) = match (format, g) {
        (Format::Nanochat, 1) => ("python".to_string(), ""),
        (Format::Nanochat, _) => (format!("torchrun --standalone --nproc_per_node={g}"), " --"),
        (_, 1) => ("python".to_string(), ""),
        (_, _) => (format!("torchrun --nproc_per_node={g}"), ""),
    };
    Ok(format!(
        "{launcher} {script}{sep} \\\n    {}\n",
        words.join(" \\\n    ")
    ))
}

fn flag_word(format: Format, k: &str, v: &Value) -> Option<String> {
    let value = match v {
        Value::Bool(false) if format == Format::Nanochat => return None,
        Value::Bool(true) if format == Format::Nanochat => return Some(format!("--{k}")),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    Some(if format == Format::Nanochat {
        format!("--{k}={value}")
    } else {
        format!("--{k} {}", quote_word(&value))
    })
}

fn quote_word(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./=:".contains(c))
        && !s.is_empty()
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn set_creates_tables_and_removes_keys() {
        let mut t = json!({"optimizer": {"fused": true, "lr": 1}});
        set(&mut t, "optimizer.fused", None);
        set(&mut t, "training.seq_len", Some(json!(2048)));
        assert_eq!(
            t,
            json!({"optimizer": {"lr": 1}, "training": {"seq_len": 2048}})
        );
    }

    #[test]
    fn the_inputs_sequence_key_is_kept() {
        let input = json!({"block_size": 512});
        let mut t = json!({"max_length": 1024});
        keep_seq_key(&mut t, &input);
        assert_eq!(t, json!({"block_size": 1024}));
        let mut t = json!({"max_length": 1024});
        keep_seq_key(&mut t, &json!({}));
        assert_eq!(t, json!({"max_length": 1024}));
    }

    #[test]
    fn command_words_are_quoted_for_the_shell() {
        assert_eq!(quote_word("Qwen/Qwen2-0.5B"), "Qwen/Qwen2-0.5B");
        assert_eq!(quote_word("<|im_end|>"), "'<|im_end|>'");
        assert_eq!(quote_word("it's"), "'it'\\''s'");
        assert_eq!(quote_word(""), "''");
    }
}
