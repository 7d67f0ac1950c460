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
            // axolotl's "offload": checkpointed block inputs kept on the host.
            if v.as_str() == Some("offload") {
                d.checkpointing = Some("full".into());
                d.offload_activations = Some(true);
                return Ok(());
            }
            if flag(v)? {
                d.checkpointing = Some("full".into());
            }
            Ok(())
        }),
    ),
    ("optimizer", Rule::Set(set_hf_optim)),
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
            d.attention = Some(
                a.ok_or(Refusal::Unmodelled(
                    "flex attention (vramplan's attention is sdpa or eager)".into(),
                ))?
                .into(),
            );
            Ok(())
        }),
    ),
    (
        "xformers_attention",
        Rule::Unmodelled("xformers attention (vramplan's attention is sdpa or eager)"),
    ),
    (
        "adapter",
        Rule::Set(|d, v, _| {
            pick(v, &[("lora", ()), ("qlora", ())])?;
            keep(d, "adapter", v)
        }),
    ),
    (
        "lora_target_linear",
        Rule::Set(|d, v, _| {
            if flag(v)? {
                lora_row(d, "targets", &Value::from("all-linear"))?;
            }
            Ok(())
        }),
    ),
    ("peft_use_dora", Rule::Set(|d, v, _| lora_row(d, "dora", v))),
    // A trained adapter to start from: the same shapes.
    ("lora_model_dir", Rule::Ignore),
    ("peft_use_rslora", Rule::Ignore),
    (
        "deepspeed",
        Rule::Set(|d, v, _| {
            d.extra.push(("deepspeed".into(), v.clone()));
            Ok(())
        }),
    ),
    ("fsdp", Rule::Set(|d, v, _| keep(d, "fsdp", v))),
    (
        "fsdp_version",
        Rule::Set(|d, v, _| keep(d, "fsdp_version", v)),
    ),
    (
        "fsdp_config.fsdp_version",
        Rule::Set(|d, v, _| keep(d, "fsdp_version", v)),
    ),
    (
        "fsdp_config.reshard_after_forward",
        Rule::Set(|d, v, _| switch(v, &mut d.reshard_after_forward)),
    ),
    (
        "fsdp_config.fsdp_reshard_after_forward",
        Rule::Set(|d, v, _| switch(v, &mut d.reshard_after_forward)),
    ),
    ("fsdp_config.offload_params", Rule::Waits("cpu offload")),
    (
        "fsdp_config.fsdp_offload_params",
        Rule::Waits("cpu offload"),
    ),
    (
        "fsdp_config.activation_checkpointing",
        Rule::Set(|d, v, _| {
            if flag(v)? {
                d.checkpointing = Some("full".into());
            }
            Ok(())
        }),
    ),
    (
        "fsdp_config.*",
        Rule::Set(|d, _, _| keep(d, "fsdp", &Value::Bool(true))),
    ),
    (
        "plugins",
        Rule::Unmodelled("axolotl plugins (Liger, Cut Cross-Entropy) replace kernels"),
    ),
    ("sample_packing", Rule::Ignore),
    ("eval_sample_packing", Rule::Ignore),
    ("pad_to_sequence_len", Rule::Ignore),
    ("datasets", Rule::Ignore),
    ("dataset_prepared_path", Rule::Ignore),
    ("val_set_size", Rule::Ignore),
    ("wandb_project", Rule::Ignore),
    ("wandb_entity", Rule::Ignore),
    ("wandb_watch", Rule::Ignore),
    ("wandb_name", Rule::Ignore),
    ("wandb_log_model", Rule::Ignore),
    ("num_epochs", Rule::Ignore),
    ("lr_scheduler", Rule::Ignore),
    ("evals_per_epoch", Rule::Ignore),
    ("saves_per_epoch", Rule::Ignore),
    ("special_tokens.*", Rule::Ignore),
    ("tokens", Rule::Ignore),
    ("loss_watchdog_threshold", Rule::Ignore),
    ("loss_watchdog_patience", Rule::Ignore),
    ("early_stopping_patience", Rule::Ignore),
    ("train_on_inputs", Rule::Ignore),
    ("strict", Rule::Ignore),
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

pub fn read(text: &str, ctx: &Ctx) -> Result<Launch, String> {
    let v: Value = serde_norway::from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
    let mut d = Draft::default();
    let keys = flatten(&v);
    let mut applied = apply(&[TABLE, super::trainer::TABLE], &[], &keys, &mut d, ctx)?;
    default_fused(&mut d, &keys, "optimizer", "axolotl");
    if d.precision.is_none() {
        d.precision = Some("fp32".into());
    }
    adapter(&mut d)?;
    if d.extra("fsdp").is_some_and(on) || d.extra("fsdp_version").is_some() {
        fsdp(&mut d)?;
    }
    if let Some(ds) = d.extra("deepspeed").cloned() {
        let more = deepspeed::merge(&ds, &mut d, ctx, "deepspeed")?;
        applied.ignored.extend(more.ignored);
        applied.unknown.extend(more.unknown);
    }
    Ok(finish(Format::Axolotl, d, applied))
}

/// `adapter: lora` (PEFT over the loaded base: 8-bit with `load_in_8bit`) or `qlora` (a
/// 4-bit NF4 base, double quantization and the weights' dtype for compute: axolotl's
/// `BitsAndBytesConfig`). The lora_* keys are read only with an adapter.
fn adapter(d: &mut Draft) -> Result<(), String> {
    let four = d.extra("load_in_4bit").is_some_and(on);
    let eight = d.extra("load_in_8bit").is_some_and(on);
    let kind = d
        .extra("adapter")
        .and_then(Value::as_str)
        .map(str::to_ascii_lowercase);
    let Some(kind) = kind else {
        if four || eight {
            let key = if four { "load_in_4bit" } else { "load_in_8bit" };
            let r = Refusal::Unmodelled("a quantized base without an adapter".into());
            return Err(refusal_text(key, &Value::Bool(true), &r));
        }
        return Ok(());
    };
    let mut lora = peft_lora(d, (None, None, None));
    let bf16 = d.precision.as_deref() == Some("bf16");
    if kind == "qlora" || four {
        lora.quantize = Some("nf4".into());
        lora.double_quant = Some(true);
        lora.compute_dtype = Some(if bf16 { "bf16" } else { "fp32" }.into());
    } else if eight {
        lora.quantize = Some("int8".into());
    }
    d.lora = Some(lora);
    Ok(())
}

/// axolotl's FSDP (`fsdp_version: 2`, accelerate's `fully_shard`): under bf16 accelerate
/// upcasts the bf16-loaded model to fp32 masters and casts parameters and gradient
/// reduction to bf16 (`fsdp2_prepare_model`, `set_mixed_precision`).
fn fsdp(d: &mut Draft) -> Result<(), String> {
    let version = d
        .extra("fsdp_version")
        .map(|x| x.to_string().trim_matches('"').to_string());
    if version.as_deref() != Some("2") {
        let r = Refusal::Unmodelled(super::hf::FSDP1.into());
        return Err(refusal_text(
            "fsdp_version",
            &Value::from(version.unwrap_or("1".into())),
            &r,
        ));
    }
    d.sharding = Some("fsdp2".into());
    if d.precision.as_deref() == Some("bf16") {
        d.precision = Some("bf16-mixed".into());
        d.reduce_dtype = Some("bf16".into());
    }
    Ok(())
}
