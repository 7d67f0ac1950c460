//! A plan written back in a launcher's format (`estimate --emit`, `fit --emit`): the input
//! file's tree (when it is in that format) with the keys vramplan planned replaced, so
//! every other setting stays; for several GPUs, the command that launches it. A setting
//! the launcher cannot express is refused, naming it.

use super::args;
use super::*;
use vramplan_planner::{
    Checkpointing, Choice, ComputeDtype, LoraSpec, LossMode, Offload, Optimizer, Precision,
    Quantize, RunSpec, Sharding,
};

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
    match super::hf_optim_name(s.train.optimizer.name()) {
        Some(o) => Ok(Some(o.into())),
        None => Err(cannot(
            format,
            format!("optimizer = \"{}\"", s.train.optimizer),
        )),
    }
}

fn n(v: u64) -> Result<Option<Value>, String> {
    Ok(Some(v.into()))
}

/// A switch written only when on (scripts without the key still run).
fn when(on: bool) -> Result<Option<Value>, String> {
    Ok(on.then(|| true.into()))
}

fn sharded(s: &RunSpec) -> bool {
    s.hardware.sharding != Sharding::Ddp
}

fn zero(s: &RunSpec) -> bool {
    sharded(s) && s.hardware.sharding != Sharding::Fsdp2
}

/// DeepSpeed's `offload_*.device`: "cpu" when the plan offloads; the key is removed when
/// it does not (a file's "none" and a missing key are the same).
fn offload(o: Offload) -> Option<Value> {
    (o == Offload::Cpu).then(|| "cpu".into())
}

fn lora(s: &RunSpec) -> Option<&LoraSpec> {
    s.lora.as_ref()
}

fn targets(l: &LoraSpec) -> Value {
    l.targets.clone().into()
}

fn alpha(l: &LoraSpec) -> Value {
    if l.alpha.fract() == 0.0 && l.alpha < 1e15 {
        (l.alpha as u64).into()
    } else {
        l.alpha.into()
    }
}

/// QLoRA's compute dtype where a launcher takes it from the weights' dtype (TRL, axolotl).
fn compute_follows_weights(s: &RunSpec, format: &str) -> Result<(), String> {
    let Some(l) = lora(s).filter(|l| matches!(l.quantize, Quantize::Nf4 | Quantize::Fp4)) else {
        return Ok(());
    };
    let want = if s.train.precision == Precision::Bf16 {
        ComputeDtype::Bf16
    } else {
        ComputeDtype::Fp32
    };
    if l.compute_dtype != want {
        return Err(cannot(
            format,
            format!(
                "compute_dtype = \"{}\" with precision {} ({format} computes in the weights' dtype)",
                l.compute_dtype, s.train.precision
            ),
        ));
    }
    Ok(())
}

const HF: &[(&str, Put)] = &[
    ("per_device_train_batch_size", |s| n(s.train.micro_batch)),
    ("gradient_accumulation_steps", |s| n(s.train.grad_accum)),
    ("max_length", |s| n(s.train.seq_len)),
    ("bf16", |s| {
        Ok(Some(
            matches!(
                s.train.precision,
                Precision::Bf16Autocast | Precision::Bf16 | Precision::Bf16Mixed
            )
            .into(),
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
    ("torch_compile", |s| when(s.train.compile)),
    ("activation_offloading", |s| {
        when(s.train.offload_activations)
    }),
    ("deepspeed", |s| Ok(zero(s).then(|| deepspeed_dict(s)))),
    ("fsdp", |s| {
        Ok((s.hardware.sharding == Sharding::Fsdp2).then(|| "full_shard auto_wrap".into()))
    }),
    ("fsdp_config.fsdp_version", |s| {
        Ok((s.hardware.sharding == Sharding::Fsdp2).then(|| 2.into()))
    }),
    ("fsdp_config.reshard_after_forward", |s| {
        Ok((s.hardware.sharding == Sharding::Fsdp2)
            .then(|| s.hardware.reshard_after_forward.into()))
    }),
    ("use_peft", |s| when(s.lora.is_some())),
    ("lora_r", |s| Ok(lora(s).map(|l| l.rank.into()))),
    ("lora_alpha", |s| Ok(lora(s).map(alpha))),
    ("lora_dropout", |s| Ok(lora(s).map(|l| l.dropout.into()))),
    ("lora_target_modules", |s| Ok(lora(s).map(targets))),
    ("lora_modules_to_save", |s| {
        Ok(lora(s)
            .filter(|l| !l.modules_to_save.is_empty())
            .map(|l| l.modules_to_save.clone().into()))
    }),
    ("use_dora", |s| when(lora(s).is_some_and(|l| l.use_dora))),
    ("load_in_4bit", |s| {
        compute_follows_weights(s, "hf-args")?;
        when(lora(s).is_some_and(|l| matches!(l.quantize, Quantize::Nf4 | Quantize::Fp4)))
    }),
    ("bnb_4bit_quant_type", |s| {
        Ok(lora(s).and_then(|l| match l.quantize {
            Quantize::Nf4 => Some("nf4".into()),
            Quantize::Fp4 => Some("fp4".into()),
            _ => None,
        }))
    }),
    ("use_bnb_nested_quant", |s| {
        when(lora(s).is_some_and(|l| l.quantize != Quantize::None && l.double_quant))
    }),
    ("load_in_8bit", |s| {
        when(lora(s).is_some_and(|l| l.quantize == Quantize::Int8))
    }),
];

/// The DeepSpeed section a Trainer-based launcher passes (`deepspeed:` in its file):
/// batch and accumulation follow the Trainer's ("auto"), and so does bf16.
fn deepspeed_dict(s: &RunSpec) -> Value {
    let mut v = serde_json::json!({
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "zero_optimization": {"stage": s.hardware.sharding.stage()},
    });
    if s.train.precision == Precision::Bf16Mixed {
        v["bf16"] = serde_json::json!({"enabled": "auto"});
    }
    let h = &s.hardware;
    for (key, o) in [
        ("offload_optimizer", h.offload_optimizer),
        ("offload_param", h.offload_params),
    ] {
        if let Some(device) = offload(o) {
            v["zero_optimization"][key] = serde_json::json!({ "device": device });
        }
    }
    v
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
    ("fp16.enabled", |_| Ok(Some(false.into()))),
    ("bf16.enabled", |s| {
        Ok(Some((s.train.precision == Precision::Bf16Mixed).into()))
    }),
    ("zero_optimization.offload_optimizer.device", |s| {
        Ok(offload(s.hardware.offload_optimizer))
    }),
    ("zero_optimization.offload_param.device", |s| {
        Ok(offload(s.hardware.offload_params))
    }),
    ("optimizer.type", |_| Ok(Some("AdamW".into()))),
    // FusedAdam is DeepSpeed's Adam unless `torch_adam` asks for torch.optim.AdamW.
    ("optimizer.params.torch_adam", |s| {
        when(s.train.optimizer == Optimizer::AdamW)
    }),
];

const ACCELERATE: &[(&str, Put)] = &[
    ("distributed_type", |s| {
        Ok(Some(
            match (s.hardware.sharding, s.hardware.gpus) {
                (Sharding::Ddp, 1) => "NO",
                (Sharding::Ddp, _) => "MULTI_GPU",
                (Sharding::Fsdp2, _) => "FSDP",
                _ => "DEEPSPEED",
            }
            .into(),
        ))
    }),
    ("num_processes", |s| n(s.hardware.gpus)),
    ("mixed_precision", |s| {
        Ok(Some(
            match s.train.precision {
                Precision::Bf16Autocast | Precision::Bf16Mixed => "bf16",
                Precision::Fp16Autocast => "fp16",
                _ => "no",
            }
            .into(),
        ))
    }),
    ("deepspeed_config", |s| {
        Ok(zero(s).then(|| {
            serde_json::json!({
                "zero_stage": s.hardware.sharding.stage(),
                "gradient_accumulation_steps": s.train.grad_accum,
                "offload_optimizer_device": s.hardware.offload_optimizer.name(),
                "offload_param_device": s.hardware.offload_params.name(),
            })
        }))
    }),
    ("fsdp_config.fsdp_version", |s| {
        Ok((s.hardware.sharding == Sharding::Fsdp2).then(|| 2.into()))
    }),
    ("fsdp_config.fsdp_reshard_after_forward", |s| {
        Ok((s.hardware.sharding == Sharding::Fsdp2)
            .then(|| s.hardware.reshard_after_forward.into()))
    }),
    // FSDP2 per decoder block (`_no_split_modules`), as vramplan plans it.
    ("fsdp_config.fsdp_auto_wrap_policy", |s| {
        Ok((s.hardware.sharding == Sharding::Fsdp2).then(|| "TRANSFORMER_BASED_WRAP".into()))
    }),
    ("fsdp_config.fsdp_activation_checkpointing", |s| {
        Ok((s.hardware.sharding == Sharding::Fsdp2)
            .then(|| (s.train.checkpointing == Checkpointing::Full).into()))
    }),
    ("fsdp_config.fsdp_sharding_strategy", |_| Ok(None)),
    ("dynamo_config.dynamo_backend", |s| {
        Ok(Some(if s.train.compile { "INDUCTOR" } else { "NO" }.into()))
    }),
];

const TORCHTUNE: &[(&str, Put)] = &[
    ("batch_size", |s| n(s.train.micro_batch)),
    ("gradient_accumulation_steps", |s| n(s.train.grad_accum)),
    ("tokenizer.max_seq_len", |s| n(s.train.seq_len)),
    ("dtype", |s| {
        Ok(Some(
            if s.train.precision == Precision::Bf16 {
                "bf16"
            } else {
                "fp32"
            }
            .into(),
        ))
    }),
    ("enable_activation_checkpointing", |s| {
        ckpt_flag(s, "torchtune")
    }),
    ("enable_activation_offloading", |s| {
        Ok(Some(s.train.offload_activations.into()))
    }),
    ("optimizer_in_bwd", |s| {
        Ok(Some(s.train.optimizer_in_backward.into()))
    }),
    ("compile", |s| Ok(Some(s.train.compile.into()))),
    ("optimizer._component_", |s| {
        Ok(Some(
            match s.train.optimizer {
                Optimizer::AdamW8bit => "bitsandbytes.optim.AdamW8bit",
                Optimizer::PagedAdamW8bit => "bitsandbytes.optim.PagedAdamW8bit",
                Optimizer::PagedAdamW => "bitsandbytes.optim.PagedAdamW",
                Optimizer::TorchaoAdamW8bit => "torchao.optim.AdamW8bit",
                Optimizer::TorchaoAdamW4bit => "torchao.optim.AdamW4bit",
                Optimizer::Sgd => "torch.optim.SGD",
                _ => "torch.optim.AdamW",
            }
            .into(),
        ))
    }),
    ("optimizer.fused", |s| {
        when(s.train.optimizer == Optimizer::AdamWFused)
    }),
    ("loss._component_", |s| {
        Ok(Some(
            match s.train.loss {
                LossMode::Chunked => "torchtune.modules.loss.CEWithChunkedOutputLoss",
                _ => "torch.nn.CrossEntropyLoss",
            }
            .into(),
        ))
    }),
    ("fsdp_reshard_after_forward", |s| {
        Ok(Some(s.hardware.reshard_after_forward.into()))
    }),
];

const TORCHTITAN: &[(&str, Put)] = &[
    ("training.local_batch_size", |s| n(s.train.micro_batch)),
    ("training.seq_len", |s| n(s.train.seq_len)),
    ("training.global_batch_size", |s| {
        n(s.train.micro_batch * s.train.grad_accum * s.hardware.gpus)
    }),
    ("training.dtype", |s| {
        Ok((s.train.precision == Precision::Bf16).then(|| "bfloat16".into()))
    }),
    ("training.mixed_precision_param", |s| {
        Ok(Some(
            if s.train.precision == Precision::Fp32 {
                "float32"
            } else {
                "bfloat16"
            }
            .into(),
        ))
    }),
    ("training.mixed_precision_reduce", |s| {
        Ok(Some(
            match s.train.reduce_dtype {
                vramplan_planner::ReduceDtype::Bf16 => "bfloat16",
                vramplan_planner::ReduceDtype::Fp32 => "float32",
            }
            .into(),
        ))
    }),
    ("activation_checkpoint.mode", |s| {
        Ok(Some(
            match s.train.checkpointing {
                Checkpointing::None => "none",
                Checkpointing::Full => "full",
                _ => "selective",
            }
            .into(),
        ))
    }),
    ("activation_checkpoint.selective_ac_option", |s| {
        Ok(match s.train.checkpointing {
            Checkpointing::SelectiveOp => Some("op".into()),
            Checkpointing::Every(k) => Some(k.to_string().into()),
            _ => None,
        })
    }),
    ("compile.enable", |s| Ok(Some(s.train.compile.into()))),
    ("optimizer.name", |_| Ok(Some("AdamW".into()))),
    ("optimizer.implementation", |s| {
        Ok(Some(
            match s.train.optimizer {
                Optimizer::AdamWForeach => "foreach",
                Optimizer::AdamWSingle => "for-loop",
                _ => "fused",
            }
            .into(),
        ))
    }),
    ("optimizer.early_step_in_backward", |s| {
        Ok(Some(s.train.optimizer_in_backward.into()))
    }),
    // FSDP shards over the group, replicated across groups; plain data parallelism is
    // replicas of one shard.
    ("parallelism.data_parallel_shard_degree", |s| {
        let h = &s.hardware;
        // The group written out (not -1) so that the file says its GPU count.
        n(match h.sharding {
            Sharding::Fsdp2 => h.shard_group(),
            _ => 1,
        })
    }),
    ("parallelism.data_parallel_replicate_degree", |s| {
        let h = &s.hardware;
        n(match h.sharding {
            Sharding::Fsdp2 => h.gpus / h.shard_group(),
            _ => h.gpus,
        })
    }),
    ("parallelism.fsdp_reshard_after_forward", |s| {
        Ok(Some(
            if s.hardware.reshard_after_forward {
                "default"
            } else {
                "never"
            }
            .into(),
        ))
    }),
];

const AXOLOTL: &[(&str, Put)] = &[
    ("micro_batch_size", |s| n(s.train.micro_batch)),
    ("gradient_accumulation_steps", |s| n(s.train.grad_accum)),
    ("sequence_len", |s| n(s.train.seq_len)),
    ("bf16", |s| {
        Ok(Some(
            matches!(s.train.precision, Precision::Bf16 | Precision::Bf16Mixed).into(),
        ))
    }),
    ("gradient_checkpointing", |s| {
        if s.train.offload_activations {
            return match s.train.checkpointing {
                Checkpointing::Full => Ok(Some("offload".into())),
                c => Err(cannot("axolotl", format!("offload_activations with checkpointing = \"{c}\" (axolotl offloads the checkpointed inputs)"))),
            };
        }
        ckpt_flag(s, "axolotl")
    }),
    ("optimizer", |s| hf_optim(s, "axolotl")),
    ("torch_compile", |s| when(s.train.compile)),
    ("deepspeed", |s| Ok(zero(s).then(|| deepspeed_dict(s)))),
    ("fsdp_version", |s| {
        Ok((s.hardware.sharding == Sharding::Fsdp2).then(|| 2.into()))
    }),
    ("fsdp", |_| Ok(None)),
    ("fsdp_config.reshard_after_forward", |s| {
        Ok((s.hardware.sharding == Sharding::Fsdp2)
            .then(|| s.hardware.reshard_after_forward.into()))
    }),
    ("fsdp_config.auto_wrap_policy", |s| {
        Ok((s.hardware.sharding == Sharding::Fsdp2).then(|| "TRANSFORMER_BASED_WRAP".into()))
    }),
    ("adapter", |s| {
        compute_follows_weights(s, "axolotl")?;
        Ok(lora(s).map(|l| match l.quantize {
            Quantize::None | Quantize::Int8 => "lora".into(),
            _ => "qlora".into(),
        }))
    }),
    ("lora_r", |s| Ok(lora(s).map(|l| l.rank.into()))),
    ("lora_alpha", |s| Ok(lora(s).map(alpha))),
    ("lora_dropout", |s| Ok(lora(s).map(|l| l.dropout.into()))),
    ("lora_target_modules", |s| Ok(lora(s).map(targets))),
    ("lora_target_linear", |_| Ok(None)),
    ("lora_modules_to_save", |s| {
        Ok(lora(s)
            .filter(|l| !l.modules_to_save.is_empty())
            .map(|l| l.modules_to_save.clone().into()))
    }),
    ("peft_use_dora", |s| {
        when(lora(s).is_some_and(|l| l.use_dora))
    }),
    ("load_in_4bit", |s| {
        let q = lora(s).map(|l| (l.quantize, l.double_quant));
        match q {
            Some((Quantize::Nf4, true)) => Ok(Some(true.into())),
            Some((Quantize::Nf4 | Quantize::Fp4, _)) => Err(cannot(
                "axolotl",
                "QLoRA other than NF4 with double quantization",
            )),
            _ => Ok(Some(false.into())),
        }
    }),
    ("load_in_8bit", |s| {
        Ok(Some(
            lora(s).is_some_and(|l| l.quantize == Quantize::Int8).into(),
        ))
    }),
];

const NANOCHAT: &[(&str, Put)] = &[
    ("device_batch_size", |s| n(s.train.micro_batch)),
    ("max_seq_len", |s| n(s.train.seq_len)),
    ("total_batch_size", |s| {
        n(s.train.tokens_per_micro_batch() * s.train.grad_accum * s.hardware.gpus)
    }),
];

fn set(tree: &mut Value, path: &str, v: Option<Value>) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().unwrap_or(path);
    let mut node = tree;
    for p in parts {
        if !node.get(p).is_some_and(Value::is_object) {
            if v.is_none() {
                return; // nothing to remove
            }
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
    super::can::check(format, s)?;
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
    let flavor = s.model.name.strip_prefix("torchtitan-llama3-");
    if tree.pointer("/model/flavor").is_none() && format == Format::Torchtitan {
        if let Some(f) = flavor {
            set(&mut tree, "model.name", Some("llama3".into()));
            set(&mut tree, "model.flavor", Some(f.into()));
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

/// The first line of an emitted file: the command that launches it (the files name no
/// process count).
fn launch_comment(format: Format, s: &RunSpec) -> String {
    let g = s.hardware.gpus;
    match format {
        Format::Accelerate => format!(
            "# accelerate launch --config_file THIS_FILE train.py {}   ({g} processes)\n",
            trainer_flags(s).join(" ")
        ),
        Format::HfArgs if g > 1 => format!(
            "# torchrun --nproc_per_node={g} train.py THIS_FILE   (or: accelerate launch --num_processes {g} train.py THIS_FILE)\n"
        ),
        Format::Torchtune if g > 1 => format!("# tune run --nproc_per_node {g} full_finetune_distributed --config THIS_FILE\n"),
        Format::Torchtune => "# tune run full_finetune_single_device --config THIS_FILE\n".into(),
        Format::Torchtitan => format!("# NGPU={g} CONFIG_FILE=THIS_FILE ./run_train.sh\n"),
        Format::Axolotl => format!("# accelerate launch --num_processes {g} -m axolotl.cli.train THIS_FILE\n"),
        _ => String::new(),
    }
}

/// The Trainer flags a script launched with an accelerate or DeepSpeed file takes.
fn trainer_flags(s: &RunSpec) -> Vec<String> {
    let t = &s.train;
    let mut f = vec![
        format!("--per_device_train_batch_size {}", t.micro_batch),
        format!("--gradient_accumulation_steps {}", t.grad_accum),
        format!("--max_length {}", t.seq_len),
    ];
    if t.checkpointing == Checkpointing::Full && s.hardware.sharding != Sharding::Fsdp2 {
        f.push("--gradient_checkpointing true".into());
    }
    if let Some(o) = super::hf_optim_name(t.optimizer.name()) {
        f.push(format!("--optim {o}"));
    }
    f
}

/// The command that launches a DeepSpeed file (JSON has no comments): said on stderr.
pub fn launch_note(format: Format, s: &RunSpec) -> Option<String> {
    (format == Format::DeepSpeed).then(|| {
        format!(
            "launch: deepspeed --num_gpus {} train.py --deepspeed THIS_FILE {}",
            s.hardware.gpus,
            trainer_flags(s).join(" ")
        )
    })
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
    if format == Format::HfArgs && zero(s) {
        return Err("a ZeRO plan on a command line needs a DeepSpeed file: write it with --emit deepspeed and pass --deepspeed FILE".into());
    }
    if format == Format::HfArgs && sharded(s) {
        return Err("an FSDP2 plan on a command line needs an fsdp_config file: write the arguments as a dict (emit over a YAML or JSON input)".into());
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
        // argparse's nargs="+": one word each (TRL's --lora_target_modules q_proj v_proj).
        Value::Array(a) => {
            let words: Vec<String> = a
                .iter()
                .map(|x| quote_word(&x.as_str().map_or_else(|| x.to_string(), String::from)))
                .collect();
            return Some(format!("--{k} {}", words.join(" ")));
        }
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
        set(&mut t, "fsdp_config.fsdp_version", None);
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
