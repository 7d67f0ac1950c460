//! An axolotl config YAML (`examples/*/*.yml`): `base_model`, `sequence_len`,
//! `micro_batch_size`, `gradient_accumulation_steps`, the adapter, quantized loading,
//! `gradient_checkpointing`, attention, the optimizer and a DeepSpeed file. axolotl loads
//! the weights in bf16 when `bf16` is on (`utils/config/__init__.py`: `cfg.torch_dtype =
//! torch.bfloat16`), so a bf16 run is pure bf16; its default optimizer is
//! `adamw_torch_fused` (`utils/schemas/training.py`).

use super::deepspeed;
use super::*;

pub(super) const TABLE: &[Row] = &[
    (
        "base_model",
        Rule::Set(|d, v, c| set_hub_model(d, "base_model", v, c)),
    ),
    ("sequence_len", Rule::Set(set_seq_len)),
    ("micro_batch_size", Rule::Set(set_micro_batch)),
    ("gradient_accumulation_steps", Rule::Set(set_grad_accum)),
    ("bf16", Rule::Set(set_bf16)),
    ("bfloat16", Rule::Set(set_bf16)),
    (
        "fp16",
        Rule::Unmodelled("fp16 weights (axolotl loads in float16)"),
    ),
    (
        "float16",
        Rule::Unmodelled("fp16 weights (axolotl loads in float16)"),
    ),
    (
        "gradient_checkpointing",
        Rule::Set(|d, v, _| {
            if v.as_str() == Some("offload") {
                return Err(Refusal::Waits("offload_activations"));
            }
            if flag(v)? {
                d.checkpointing = Some("full".into());
            }
            Ok(())
        }),
    ),
    ("optimizer", Rule::Set(set_optimizer)),
    // FlashAttention-2 saves what SDPA's flash kernel saves: the output and log-sum-exp.
    ("flash_attention", Rule::Set(|d, v, _| sdpa_if(d, v))),
    ("sdp_attention", Rule::Set(|d, v, _| sdpa_if(d, v))),
    (
        "attn_implementation",
        Rule::Set(|d, v, _| {
            let a = pick(
                v,
                &[
                    ("flash_attention_2", Some("sdpa")),
                    ("sdpa", Some("sdpa")),
                    ("eager", Some("eager")),
                    ("flex_attention", None),
                ],
            )?;
            d.attention = Some(a.ok_or(Refusal::Waits("implementation"))?.into());
            Ok(())
        }),
    ),
    ("xformers_attention", Rule::Waits("implementation")),
    (
        "adapter",
        Rule::Set(
            |_, v, _| match pick(v, &[("lora", true), ("qlora", false)])? {
                true => Err(Refusal::Waits("lora")),
                false => Err(Refusal::Unmodelled("QLoRA's 4-bit NF4 base weights".into())),
            },
        ),
    ),
    ("lora_r", Rule::Waits("lora")),
    ("lora_alpha", Rule::Waits("lora")),
    ("lora_dropout", Rule::Waits("lora")),
    ("lora_target_modules", Rule::Waits("lora")),
    ("lora_target_linear", Rule::Waits("lora")),
    ("lora_model_dir", Rule::Waits("lora")),
    (
        "load_in_4bit",
        Rule::Unmodelled("bitsandbytes 4-bit base weights"),
    ),
    (
        "load_in_8bit",
        Rule::Unmodelled("bitsandbytes 8-bit base weights"),
    ),
    (
        "deepspeed",
        Rule::Set(|d, v, _| {
            d.extra.push(("deepspeed".into(), v.clone()));
            Ok(())
        }),
    ),
    ("fsdp", Rule::Waits("fsdp2")),
    ("fsdp_version", Rule::Waits("fsdp2")),
    ("fsdp_config.*", Rule::Ignore),
    ("torch_compile", Rule::Waits("compile")),
    (
        "plugins",
        Rule::Unmodelled("axolotl plugins (Liger, Cut Cross-Entropy) replace kernels"),
    ),
    ("gradient_checkpointing_kwargs.*", Rule::Ignore),
    ("sample_packing", Rule::Ignore),
    ("eval_sample_packing", Rule::Ignore),
    ("pad_to_sequence_len", Rule::Ignore),
    ("tf32", Rule::Ignore),
    ("datasets", Rule::Ignore),
    ("dataset_prepared_path", Rule::Ignore),
    ("val_set_size", Rule::Ignore),
    ("output_dir", Rule::Ignore),
    ("hub_model_id", Rule::Ignore),
    ("wandb_project", Rule::Ignore),
    ("wandb_entity", Rule::Ignore),
    ("wandb_watch", Rule::Ignore),
    ("wandb_name", Rule::Ignore),
    ("wandb_log_model", Rule::Ignore),
    ("num_epochs", Rule::Ignore),
    ("max_steps", Rule::Ignore),
    ("lr_scheduler", Rule::Ignore),
    ("learning_rate", Rule::Ignore),
    ("warmup_ratio", Rule::Ignore),
    ("warmup_steps", Rule::Ignore),
    ("evals_per_epoch", Rule::Ignore),
    ("saves_per_epoch", Rule::Ignore),
    ("eval_steps", Rule::Ignore),
    ("save_steps", Rule::Ignore),
    ("weight_decay", Rule::Ignore),
    ("max_grad_norm", Rule::Ignore),
    ("special_tokens.*", Rule::Ignore),
    ("tokens", Rule::Ignore),
    ("chat_template", Rule::Ignore),
    ("resume_from_checkpoint", Rule::Ignore),
    ("logging_steps", Rule::Ignore),
    ("loss_watchdog_threshold", Rule::Ignore),
    ("loss_watchdog_patience", Rule::Ignore),
    ("early_stopping_patience", Rule::Ignore),
    ("train_on_inputs", Rule::Ignore),
    ("group_by_length", Rule::Ignore),
    ("strict", Rule::Ignore),
    ("seed", Rule::Ignore),
    ("model_type", Rule::Ignore),
    ("tokenizer_type", Rule::Ignore),
    ("save_first_step", Rule::Ignore),
    ("debug", Rule::Ignore),
];

fn set_bf16(d: &mut Draft, v: &Value, _: &Ctx) -> Result<(), Refusal> {
    if v.as_str() == Some("auto") {
        d.assumed
            .push("bf16: auto is bf16 (an Ampere or newer GPU)".into());
        d.precision = Some("bf16".into());
    } else if flag(v)? {
        d.precision = Some("bf16".into());
    }
    Ok(())
}

fn sdpa_if(d: &mut Draft, v: &Value) -> Result<(), Refusal> {
    if flag(v)? {
        d.attention = Some("sdpa".into());
    }
    Ok(())
}

fn set_optimizer(d: &mut Draft, v: &Value, _: &Ctx) -> Result<(), Refusal> {
    let opts = [
        ("adamw_torch", Some("adamw")),
        ("adamw_8bit", Some("adamw-8bit")),
        ("adamw_bnb_8bit", Some("adamw-8bit")),
        ("adafactor", Some("adafactor")),
        ("sgd", Some("sgd")),
        ("adamw_torch_fused", None),
        ("paged_adamw_8bit", None),
        ("paged_adamw_32bit", None),
    ];
    match pick(v, &opts)? {
        Some(o) => d.optimizer = Some(o.into()),
        None if text(v)?.starts_with("paged") => return Err(Refusal::Waits("paged-adamw-8bit")),
        None => return Err(Refusal::Waits("adamw-fused")),
    }
    Ok(())
}

pub fn read(text: &str, ctx: &Ctx) -> Result<Launch, String> {
    let v: Value = serde_norway::from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
    let mut d = Draft::default();
    let keys = flatten(&v);
    let mut applied = apply(TABLE, &[], &keys, &mut d, ctx)?;
    assume_foreach(&mut d, &keys, "optimizer", "axolotl");
    if d.precision.is_none() {
        d.precision = Some("fp32".into());
    }
    if let Some(ds) = d.extra("deepspeed").cloned() {
        let more = deepspeed::merge(&ds, &mut d, ctx, "deepspeed")?;
        applied.ignored.extend(more.ignored);
        applied.unknown.extend(more.unknown);
    }
    Ok(finish(Format::Axolotl, d, applied))
}
