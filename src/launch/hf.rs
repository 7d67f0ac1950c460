//! Hugging Face `TrainingArguments` (and TRL's `SFTConfig`/`ModelConfig`, the same
//! dataclass flags): a JSON or YAML dict (alignment-handbook recipes), or the command line
//! of `run_clm.py` / `trl sft` pasted into a file. Defaults are transformers 5's
//! (`training_args.py`): `optim = adamw_torch_fused`, no mixed precision; TRL's configs
//! turn bf16 on unless told otherwise.

use super::args;
use super::deepspeed;
use super::*;

pub(super) const TABLE: &[Row] = &[
    (
        "model_name_or_path",
        Rule::Set(|d, v, c| set_hub_model(d, "model_name_or_path", v, c)),
    ),
    ("per_device_train_batch_size", Rule::Set(set_micro_batch)),
    ("gradient_accumulation_steps", Rule::Set(set_grad_accum)),
    ("max_seq_length", Rule::Set(set_seq_len_or_null)),
    ("max_length", Rule::Set(set_seq_len_or_null)),
    ("block_size", Rule::Set(set_seq_len_or_null)),
    ("model_max_length", Rule::Set(set_seq_len_or_null)),
    (
        "bf16",
        Rule::Set(|d, v, _| {
            if flag(v)? {
                d.precision.get_or_insert("bf16-autocast".into());
            }
            Ok(())
        }),
    ),
    (
        "fp16",
        Rule::Set(|d, v, _| {
            if flag(v)? {
                d.precision = Some("fp16-autocast".into());
            }
            Ok(())
        }),
    ),
    ("torch_dtype", Rule::Set(set_dtype)),
    ("dtype", Rule::Set(set_dtype)),
    ("gradient_checkpointing", Rule::Set(set_checkpointing)),
    ("optim", Rule::Set(set_hf_optim)),
    ("attn_implementation", Rule::Set(set_attention)),
    ("deepspeed", Rule::Set(|d, v, _| keep(d, "deepspeed", v))),
    ("fsdp", Rule::Set(|d, v, _| keep(d, "fsdp", v))),
    ("fsdp_config.fsdp_version", Rule::Set(fsdp_version)),
    ("fsdp_config.version", Rule::Set(fsdp_version)),
    (
        "fsdp_config.reshard_after_forward",
        Rule::Set(|d, v, _| switch(v, &mut d.reshard_after_forward)),
    ),
    (
        "fsdp_config.fsdp_reshard_after_forward",
        Rule::Set(|d, v, _| switch(v, &mut d.reshard_after_forward)),
    ),
    (
        "fsdp_config.activation_checkpointing",
        Rule::Set(set_checkpointing),
    ),
    (
        "fsdp_config.fsdp_activation_checkpointing",
        Rule::Set(set_checkpointing),
    ),
    (
        "fsdp_config.offload_params",
        Rule::Waits("cpu offload"),
    ),
    (
        "fsdp_config.fsdp_offload_params",
        Rule::Waits("cpu offload"),
    ),
    // Wrapping, prefetch, state dicts and loading: outside the step's memory.
    ("fsdp_config.*", Rule::Ignore),
    ("use_peft", Rule::Set(|d, v, _| lora_row(d, "on", v))),
    ("use_dora", Rule::Set(|d, v, _| lora_row(d, "dora", v))),
    // rsLoRA changes the scaling, not what is kept; the task type is the model's head.
    ("use_rslora", Rule::Ignore),
    ("lora_task_type", Rule::Ignore),
    (
        "bnb_4bit_quant_type",
        Rule::Set(|d, v, _| {
            pick(v, &[("nf4", ()), ("fp4", ())])?;
            keep(d, "bnb_4bit_quant_type", v)
        }),
    ),
    (
        "use_bnb_nested_quant",
        Rule::Set(|d, v, _| {
            flag(v)?;
            keep(d, "use_bnb_nested_quant", v)
        }),
    ),
    (
        "peft_config.*",
        Rule::Unmodelled("a PEFT config dict: vramplan reads TRL's use_peft, lora_r, lora_alpha, lora_dropout and lora_target_modules"),
    ),
    // TRL's SFTConfig: `torch.autograd.graph.save_on_cpu` around the forward.
    (
        "activation_offloading",
        Rule::Set(|d, v, _| switch(v, &mut d.offload_activations)),
    ),
    (
        "use_flash_attention_2",
        Rule::Set(|d, v, _| {
            if flag(v)? {
                d.attention = Some("sdpa".into());
            }
            Ok(())
        }),
    ),
    (
        "use_liger_kernel",
        Rule::Unmodelled("Liger swaps the RMSNorm, SwiGLU and RoPE kernels besides the loss"),
    ),
    (
        "use_liger",
        Rule::Unmodelled("Liger swaps the RMSNorm, SwiGLU and RoPE kernels besides the loss"),
    ),
    ("per_device_eval_batch_size", Rule::Ignore),
    ("eval_accumulation_steps", Rule::Ignore),
    ("bf16_full_eval", Rule::Ignore),
    ("fp16_full_eval", Rule::Ignore),
    ("packing", Rule::Ignore),
    ("overwrite_output_dir", Rule::Ignore),
    ("do_train", Rule::Ignore),
    ("do_eval", Rule::Ignore),
    ("do_predict", Rule::Ignore),
    ("eval_strategy", Rule::Ignore),
    ("evaluation_strategy", Rule::Ignore),
    ("adam_beta1", Rule::Ignore),
    ("adam_beta2", Rule::Ignore),
    ("adam_epsilon", Rule::Ignore),
    ("num_train_epochs", Rule::Ignore),
    ("lr_scheduler_type", Rule::Ignore),
    ("lr_scheduler_kwargs.*", Rule::Ignore),
    ("log_level", Rule::Ignore),
    ("logging_dir", Rule::Ignore),
    ("logging_strategy", Rule::Ignore),
    ("logging_first_step", Rule::Ignore),
    ("save_strategy", Rule::Ignore),
    ("save_total_limit", Rule::Ignore),
    ("save_only_model", Rule::Ignore),
    ("data_seed", Rule::Ignore),
    ("report_to", Rule::Ignore),
    ("run_name", Rule::Ignore),
    ("push_to_hub", Rule::Ignore),
    ("hub_strategy", Rule::Ignore),
    ("hub_private_repo", Rule::Ignore),
    ("dataloader_num_workers", Rule::Ignore),
    ("dataloader_pin_memory", Rule::Ignore),
    ("dataloader_drop_last", Rule::Ignore),
    ("remove_unused_columns", Rule::Ignore),
    ("load_best_model_at_end", Rule::Ignore),
    ("metric_for_best_model", Rule::Ignore),
    ("ddp_timeout", Rule::Ignore),
    ("dataset_name", Rule::Ignore),
    ("dataset_config_name", Rule::Ignore),
    ("dataset_text_field", Rule::Ignore),
    ("dataset_num_proc", Rule::Ignore),
    ("dataset_mixer.*", Rule::Ignore),
    ("dataset_mixture.*", Rule::Ignore),
    ("dataset_splits", Rule::Ignore),
    ("dataset_config", Rule::Ignore),
    ("dataset_train_split", Rule::Ignore),
    ("dataset_test_split", Rule::Ignore),
    ("train_file", Rule::Ignore),
    ("validation_file", Rule::Ignore),
    ("preprocessing_num_workers", Rule::Ignore),
    ("overwrite_cache", Rule::Ignore),
    ("max_train_samples", Rule::Ignore),
    ("max_eval_samples", Rule::Ignore),
    ("cache_dir", Rule::Ignore),
    ("tokenizer_name", Rule::Ignore),
    ("model_revision", Rule::Ignore),
    ("hub_model_revision", Rule::Ignore),
    ("trust_remote_code", Rule::Ignore),
    ("low_cpu_mem_usage", Rule::Ignore),
    ("eos_token", Rule::Ignore),
    ("completion_only_loss", Rule::Ignore),
    ("assistant_only_loss", Rule::Ignore),
];

/// `gradient_checkpointing` (and FSDP's `activation_checkpointing`): every block.
fn set_checkpointing(d: &mut Draft, v: &Value, _: &Ctx) -> Result<(), Refusal> {
    if flag(v)? {
        d.checkpointing = Some("full".into());
    }
    Ok(())
}

/// accelerate's FSDP version: 2 is `fully_shard` (FSDP2); 1, the default, wraps
/// `FullyShardedDataParallel` with flat parameters.
fn fsdp_version(d: &mut Draft, v: &Value, _: &Ctx) -> Result<(), Refusal> {
    match pick(v, &[("1", false), ("2", true)])? {
        true => keep(d, "fsdp_version", v),
        false => Err(Refusal::Unmodelled(FSDP1.into())),
    }
}

pub(super) const FSDP1: &str =
    "FSDP1's flat parameters (fsdp_version 1, the default); FSDP2 (fsdp_version: 2) is modelled";

/// A length that may be left null (TRL's `max_length: null`).
fn set_seq_len_or_null(d: &mut Draft, v: &Value, c: &Ctx) -> Result<(), Refusal> {
    if v.is_null() {
        return Ok(());
    }
    set_seq_len(d, v, c)
}

/// The weights' dtype as loaded: bf16 weights train in pure bf16 (optimizer states too).
fn set_dtype(d: &mut Draft, v: &Value, _: &Ctx) -> Result<(), Refusal> {
    match pick(
        v,
        &[("float32", 0), ("bfloat16", 1), ("float16", 2), ("auto", 3)],
    )? {
        0 => Ok(()),
        1 => {
            d.extra.push(("bf16-weights".into(), Value::Bool(true)));
            Ok(())
        }
        2 => Err(Refusal::Unmodelled(
            "fp16 weights (the Trainer refuses to unscale fp16 gradients)".into(),
        )),
        _ => Err(Refusal::Bad(
            "float32 or bfloat16: auto takes the checkpoint's dtype, which vramplan cannot see"
                .into(),
        )),
    }
}

/// FlashAttention-2 saves what SDPA's flash kernel saves: the output and log-sum-exp.
fn set_attention(d: &mut Draft, v: &Value, _: &Ctx) -> Result<(), Refusal> {
    let choices = [
        ("eager", Some("eager")),
        ("sdpa", Some("sdpa")),
        ("flash_attention_2", Some("sdpa")),
        ("flex_attention", None),
    ];
    let a = pick(v, &choices)?.ok_or(Refusal::Unmodelled(
        "flex attention (vramplan's attention is sdpa or eager)".into(),
    ))?;
    d.attention = Some(a.into());
    Ok(())
}

type Keys = Vec<(String, Value)>;

/// What the file holds: its keys, the process count of a pasted launcher (torchrun,
/// accelerate), and whether TRL runs it.
struct Source {
    keys: Keys,
    gpus: Option<u64>,
    trl: bool,
}

/// Keys only TRL's configs have (`SFTConfig`, `ModelConfig`, `ScriptArguments`), never
/// transformers' `TrainingArguments`.
const TRL_ONLY: &[&str] = &[
    "use_peft",
    "packing",
    "max_length",
    "max_seq_length",
    "dataset_text_field",
    "completion_only_loss",
    "assistant_only_loss",
    "padding_free",
    "eos_token",
    "model_init_kwargs",
    "lora_r",
    "load_in_4bit",
    "load_in_8bit",
    "activation_offloading",
];

/// TRL runs a YAML dict (`trl sft --config`, alignment-handbook recipes: transformers'
/// `run_clm.py` reads only JSON), a `trl ...` command or a script under `trl/`, and any
/// file with a key only TRL has.
fn source(text: &str) -> Result<Source, String> {
    let trl_key = |keys: &Keys| keys.iter().any(|(k, _)| TRL_ONLY.contains(&k.as_str()));
    if let Ok(v @ Value::Object(_)) = serde_norway::from_str::<Value>(text) {
        let keys = flatten(&v);
        let yaml = !text.trim_start().starts_with('{');
        let trl = yaml || trl_key(&keys);
        return Ok(Source {
            keys,
            gpus: None,
            trl,
        });
    }
    let c = args::command_line(text)?;
    let keys = flatten(&Value::Object(c.flags));
    let trl = c.script.starts_with("trl ") || c.script.contains("trl/") || trl_key(&keys);
    Ok(Source {
        trl,
        keys,
        gpus: args::processes(&c.launcher)?,
    })
}

/// TRL's configs turn bf16 on unless fp16 is (`self.bf16 = not (self.fp16) if self.bf16
/// is None`, `trl/trainer/base_config.py`, TRL 1.16), over weights TRL loads in fp32
/// unless `dtype` says otherwise (`ModelConfig.dtype`, `create_model_from_path`).
fn trl_bf16_default(d: &mut Draft, keys: &Keys) {
    let given = |name: &str| keys.iter().any(|(k, _)| k == name);
    if d.precision.is_none() && !given("bf16") && !given("fp16") {
        d.precision = Some("bf16-autocast".into());
        d.assumed.push(
            "bf16 autocast (bf16 is not set: TRL's configs turn it on unless fp16 is)".into(),
        );
    }
}

pub fn read(text: &str, ctx: &Ctx) -> Result<Launch, String> {
    let Source { keys, gpus, trl } = source(text)?;
    if let Some((k, v)) = keys
        .iter()
        .find(|(k, v)| k == "fsdp_config" && v.is_string())
    {
        let r = Refusal::Unmodelled(
            "an fsdp_config file: vramplan reads its keys written inline".into(),
        );
        return Err(refusal_text(k, v, &r));
    }
    let mut d = Draft {
        gpus,
        ..Draft::default()
    };
    let mut applied = apply(&[TABLE, super::trainer::TABLE], &[], &keys, &mut d, ctx)?;
    default_fused(&mut d, &keys, "optim", "transformers 5");
    if d.extra("bf16-weights").is_some() {
        d.precision = Some("bf16".into());
    }
    if trl {
        trl_bf16_default(&mut d, &keys);
    }
    // Without bf16/fp16 transformers' Trainer trains in fp32.
    d.precision.get_or_insert("fp32".into());
    if d.seq_len.is_none() {
        d.seq_len = Some(1024);
        d.assumed.push("seq_len 1024 (block_size / max_length not set: run_clm.py and TRL's SFTConfig default to 1024)".into());
    }
    trl_lora(&mut d)?;
    if d.extra("fsdp").is_some_and(on) {
        fsdp(&mut d)?;
    }
    if let Some(ds) = d.extra("deepspeed").cloned() {
        let more = deepspeed::merge(&ds, &mut d, ctx, "deepspeed")?;
        applied.ignored.extend(more.ignored);
        applied.unknown.extend(more.unknown);
    }
    Ok(finish(Format::HfArgs, d, applied))
}

/// TRL's `ModelConfig`: adapters only with `use_peft` (r 16, alpha 32, dropout 0.05 and
/// PEFT's default targets when not given), over a bitsandbytes base with `load_in_4bit`
/// (`bnb_4bit_quant_type`, nf4; `use_bnb_nested_quant`, off; the model's dtype for compute)
/// or `load_in_8bit`.
fn trl_lora(d: &mut Draft) -> Result<(), String> {
    let four = d.extra("load_in_4bit").is_some_and(on);
    let eight = d.extra("load_in_8bit").is_some_and(on);
    if !d.extra("lora.on").is_some_and(on) {
        if four || eight {
            let key = if four { "load_in_4bit" } else { "load_in_8bit" };
            let r = Refusal::Unmodelled(
                "a quantized base without use_peft (it trains only through adapters)".into(),
            );
            return Err(refusal_text(key, &Value::Bool(true), &r));
        }
        if d.extra.iter().any(|(k, _)| k.starts_with("lora.")) {
            d.assumed
                .push("no LoRA (use_peft is not set, so TRL does not read lora_*)".into());
        }
        return Ok(());
    }
    let mut lora = peft_lora(d, (Some(16), Some(32.0), Some(0.05)));
    let bf16 = d.precision.as_deref() == Some("bf16");
    if four {
        let kind = d.extra("bnb_4bit_quant_type").and_then(Value::as_str);
        lora.quantize = Some(kind.unwrap_or("nf4").to_ascii_lowercase());
        lora.double_quant = Some(d.extra("use_bnb_nested_quant").is_some_and(on));
        lora.compute_dtype = Some(if bf16 { "bf16" } else { "fp32" }.into());
    } else if eight {
        lora.quantize = Some("int8".into());
    }
    d.lora = Some(lora);
    Ok(())
}

/// `fsdp: "full_shard auto_wrap"` with `fsdp_config.fsdp_version: 2`: accelerate's
/// `fully_shard`. `shard_grad_op` keeps the gathered parameters after forward; under
/// `bf16` accelerate's `MixedPrecisionPolicy` casts parameters and reduces gradients in
/// bf16 over fp32 masters (`FullyShardedDataParallelPlugin.set_mixed_precision`).
fn fsdp(d: &mut Draft) -> Result<(), String> {
    let v = d.extra("fsdp").cloned().unwrap_or_default();
    let words: Vec<String> = match &v {
        Value::String(s) => s.split_whitespace().map(str::to_ascii_lowercase).collect(),
        Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_ascii_lowercase))
            .collect(),
        _ => vec!["full_shard".into()],
    };
    let refuse = |r: Refusal| -> Result<(), String> { Err(refusal_text("fsdp", &v, &r)) };
    if words.iter().any(|w| w == "offload") {
        return refuse(Refusal::Waits("cpu offload"));
    }
    if words.iter().any(|w| w.starts_with("hybrid_shard")) {
        return refuse(Refusal::Unmodelled(
            "hybrid sharding: the node size is not in the file (plan it with hardware.gpus_per_node)".into(),
        ));
    }
    if d.extra("fsdp_version").is_none() {
        return refuse(Refusal::Unmodelled(FSDP1.into()));
    }
    if words.iter().any(|w| w == "shard_grad_op") {
        d.reshard_after_forward.get_or_insert(false);
    }
    d.sharding = Some("fsdp2".into());
    match d.precision.as_deref() {
        Some("bf16-autocast") => {
            d.precision = Some("bf16-mixed".into());
            d.reduce_dtype = Some("bf16".into());
        }
        Some("fp16-autocast") => {
            let r = Refusal::Unmodelled(
                "FSDP2 with fp16 parameters (vramplan models bf16-mixed)".into(),
            );
            return Err(refusal_text("fp16", &Value::Bool(true), &r));
        }
        _ => {}
    }
    Ok(())
}
