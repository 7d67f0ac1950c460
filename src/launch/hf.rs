//! Hugging Face `TrainingArguments` (and TRL's `SFTConfig`/`ModelConfig`, the same
//! dataclass flags): a JSON or YAML dict (alignment-handbook recipes), or the command line
//! of `run_clm.py` / `trl sft` pasted into a file. Defaults are transformers 5's
//! (`training_args.py`): `optim = adamw_torch_fused`, no mixed precision.

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
    (
        "gradient_checkpointing",
        Rule::Set(|d, v, _| {
            if flag(v)? {
                d.checkpointing = Some("full".into());
            }
            Ok(())
        }),
    ),
    ("optim", Rule::Set(set_optim)),
    ("attn_implementation", Rule::Set(set_attention)),
    (
        "deepspeed",
        Rule::Set(|d, v, _| {
            d.extra.push(("deepspeed".into(), v.clone()));
            Ok(())
        }),
    ),
    ("fsdp", Rule::Waits("fsdp2")),
    ("fsdp_config.*", Rule::Ignore),
    ("use_peft", Rule::Waits("lora")),
    ("lora_r", Rule::Waits("lora")),
    ("lora_alpha", Rule::Waits("lora")),
    ("lora_dropout", Rule::Waits("lora")),
    ("lora_target_modules", Rule::Waits("lora")),
    ("peft_config.*", Rule::Waits("lora")),
    ("torch_compile", Rule::Waits("compile")),
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
        "load_in_4bit",
        Rule::Unmodelled("bitsandbytes 4-bit base weights"),
    ),
    (
        "load_in_8bit",
        Rule::Unmodelled("bitsandbytes 8-bit base weights"),
    ),
    (
        "use_liger_kernel",
        Rule::Unmodelled("Liger swaps the RMSNorm, SwiGLU and RoPE kernels besides the loss"),
    ),
    (
        "use_liger",
        Rule::Unmodelled("Liger swaps the RMSNorm, SwiGLU and RoPE kernels besides the loss"),
    ),
    ("gradient_checkpointing_kwargs.*", Rule::Ignore),
    ("per_device_eval_batch_size", Rule::Ignore),
    ("eval_accumulation_steps", Rule::Ignore),
    ("bf16_full_eval", Rule::Ignore),
    ("fp16_full_eval", Rule::Ignore),
    ("tf32", Rule::Ignore),
    ("packing", Rule::Ignore),
    ("output_dir", Rule::Ignore),
    ("overwrite_output_dir", Rule::Ignore),
    ("do_train", Rule::Ignore),
    ("do_eval", Rule::Ignore),
    ("do_predict", Rule::Ignore),
    ("eval_strategy", Rule::Ignore),
    ("evaluation_strategy", Rule::Ignore),
    ("eval_steps", Rule::Ignore),
    ("learning_rate", Rule::Ignore),
    ("weight_decay", Rule::Ignore),
    ("adam_beta1", Rule::Ignore),
    ("adam_beta2", Rule::Ignore),
    ("adam_epsilon", Rule::Ignore),
    ("max_grad_norm", Rule::Ignore),
    ("num_train_epochs", Rule::Ignore),
    ("max_steps", Rule::Ignore),
    ("lr_scheduler_type", Rule::Ignore),
    ("lr_scheduler_kwargs.*", Rule::Ignore),
    ("warmup_ratio", Rule::Ignore),
    ("warmup_steps", Rule::Ignore),
    ("log_level", Rule::Ignore),
    ("logging_dir", Rule::Ignore),
    ("logging_strategy", Rule::Ignore),
    ("logging_steps", Rule::Ignore),
    ("logging_first_step", Rule::Ignore),
    ("save_strategy", Rule::Ignore),
    ("save_steps", Rule::Ignore),
    ("save_total_limit", Rule::Ignore),
    ("save_only_model", Rule::Ignore),
    ("seed", Rule::Ignore),
    ("data_seed", Rule::Ignore),
    ("report_to", Rule::Ignore),
    ("run_name", Rule::Ignore),
    ("push_to_hub", Rule::Ignore),
    ("hub_model_id", Rule::Ignore),
    ("hub_strategy", Rule::Ignore),
    ("hub_private_repo", Rule::Ignore),
    ("dataloader_num_workers", Rule::Ignore),
    ("dataloader_pin_memory", Rule::Ignore),
    ("dataloader_drop_last", Rule::Ignore),
    ("remove_unused_columns", Rule::Ignore),
    ("load_best_model_at_end", Rule::Ignore),
    ("metric_for_best_model", Rule::Ignore),
    ("resume_from_checkpoint", Rule::Ignore),
    ("ddp_timeout", Rule::Ignore),
    ("group_by_length", Rule::Ignore),
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
    ("chat_template", Rule::Ignore),
    ("completion_only_loss", Rule::Ignore),
    ("assistant_only_loss", Rule::Ignore),
];

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

fn set_optim(d: &mut Draft, v: &Value, _: &Ctx) -> Result<(), Refusal> {
    const OPTIM: &[(&str, Option<&str>)] = &[
        ("adamw_torch", Some("adamw")),
        ("adamw_hf", Some("adamw")),
        ("adamw_torch_fused", None),
        ("adamw_8bit", Some("adamw-8bit")),
        ("adamw_bnb_8bit", Some("adamw-8bit")),
        ("paged_adamw_8bit", None),
        ("paged_adamw_32bit", None),
        ("adafactor", Some("adafactor")),
        ("sgd", Some("sgd")),
    ];
    match pick(v, OPTIM)? {
        Some(o) => {
            d.optimizer = Some(o.into());
            Ok(())
        }
        None if text(v)?.starts_with("paged") => Err(Refusal::Waits("paged-adamw-8bit")),
        None => Err(Refusal::Waits("adamw-fused")),
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
    let a = pick(v, &choices)?.ok_or(Refusal::Waits("implementation"))?;
    d.attention = Some(a.into());
    Ok(())
}

type Keys = Vec<(String, Value)>;

/// The file's keys, and the process count of a pasted launcher (torchrun, accelerate).
fn keys(text: &str) -> Result<(Keys, Option<u64>), String> {
    if let Ok(v @ Value::Object(_)) = serde_norway::from_str::<Value>(text) {
        return Ok((flatten(&v), None));
    }
    let c = args::command_line(text)?;
    Ok((
        flatten(&Value::Object(c.flags)),
        args::processes(&c.launcher)?,
    ))
}

pub fn read(text: &str, ctx: &Ctx) -> Result<Launch, String> {
    let (keys, gpus) = keys(text)?;
    let mut d = Draft {
        gpus,
        ..Draft::default()
    };
    let mut applied = apply(TABLE, &[], &keys, &mut d, ctx)?;
    assume_foreach(&mut d, &keys, "optim", "transformers 5");
    if d.extra("bf16-weights").is_some() {
        d.precision = Some("bf16".into());
    }
    // Without bf16/fp16 the Trainer trains in fp32.
    d.precision.get_or_insert("fp32".into());
    if d.seq_len.is_none() {
        d.seq_len = Some(1024);
        d.assumed.push("seq_len 1024 (block_size / max_length not set: run_clm.py and TRL's SFTConfig default to 1024)".into());
    }
    if let Some(ds) = d.extra("deepspeed").cloned() {
        let more = deepspeed::merge(&ds, &mut d, ctx, "deepspeed")?;
        applied.ignored.extend(more.ignored);
        applied.unknown.extend(more.unknown);
    }
    Ok(finish(Format::HfArgs, d, applied))
}
