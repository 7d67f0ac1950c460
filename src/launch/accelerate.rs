//! accelerate's config YAML (`accelerate config` writes it; `accelerate launch
//! --config_file` reads it): processes, mixed precision, and the DeepSpeed or FSDP
//! section. It names no model and no batch: those come from the script (`--model`, and
//! vramplan's defaults or `fit`'s search for the rest).

use super::deepspeed;
use super::*;

pub(super) const TABLE: &[Row] = &[
    ("distributed_type", Rule::Set(set_distributed)),
    (
        "num_processes",
        Rule::Set(|d, v, _| {
            d.gpus = Some(count(v)?);
            Ok(())
        }),
    ),
    ("mixed_precision", Rule::Set(set_precision)),
    (
        "use_cpu",
        Rule::Set(|d, v, _| {
            if flag(v)? {
                d.gpu = Some("cpu".into());
            }
            Ok(())
        }),
    ),
    (
        "deepspeed_config.zero_stage",
        Rule::Set(|d, v, _| {
            let s = pick(
                v,
                &[("0", "ddp"), ("1", "zero1"), ("2", "zero2"), ("3", "zero3")],
            )?;
            d.sharding = Some(s.into());
            Ok(())
        }),
    ),
    (
        "deepspeed_config.gradient_accumulation_steps",
        Rule::Set(set_grad_accum),
    ),
    (
        "deepspeed_config.offload_optimizer_device",
        Rule::Set(|d, v, _| deepspeed::offload(&mut d.offload_optimizer, v)),
    ),
    (
        "deepspeed_config.offload_param_device",
        Rule::Set(|d, v, _| deepspeed::offload(&mut d.offload_params, v)),
    ),
    (
        "deepspeed_config.deepspeed_config_file",
        Rule::Set(|d, v, _| {
            d.extra.push(("deepspeed_config_file".into(), v.clone()));
            Ok(())
        }),
    ),
    ("deepspeed_config.gradient_clipping", Rule::Ignore),
    ("deepspeed_config.zero3_init_flag", Rule::Ignore),
    ("deepspeed_config.zero3_save_16bit_model", Rule::Ignore),
    (
        "deepspeed_config.deepspeed_multinode_launcher",
        Rule::Ignore,
    ),
    (
        "fsdp_config.fsdp_version",
        Rule::Set(|d, v, _| keep(d, "fsdp_version", v)),
    ),
    (
        "fsdp_config.fsdp_reshard_after_forward",
        Rule::Set(set_reshard),
    ),
    (
        "fsdp_config.fsdp_sharding_strategy",
        Rule::Set(|d, v, _| keep(d, "fsdp_sharding_strategy", v)),
    ),
    (
        "fsdp_config.fsdp_activation_checkpointing",
        Rule::Set(|d, v, _| {
            if flag(v)? {
                d.checkpointing = Some("full".into());
            }
            Ok(())
        }),
    ),
    (
        "fsdp_config.fsdp_offload_params",
        Rule::Waits("cpu offload"),
    ),
    // Wrapping, prefetch, state dicts and loading: outside the step's memory.
    ("fsdp_config.*", Rule::Ignore),
    ("num_machines", Rule::Ignore),
    ("machine_rank", Rule::Ignore),
    ("main_process_ip", Rule::Ignore),
    ("main_process_port", Rule::Ignore),
    ("main_training_function", Rule::Ignore),
    ("compute_environment", Rule::Ignore),
    ("debug", Rule::Ignore),
    ("downcast_bf16", Rule::Ignore),
    ("enable_cpu_affinity", Rule::Ignore),
    ("gpu_ids", Rule::Ignore),
    ("rdzv_backend", Rule::Ignore),
    ("same_network", Rule::Ignore),
    ("tpu_env", Rule::Ignore),
    ("tpu_use_cluster", Rule::Ignore),
    ("tpu_use_sudo", Rule::Ignore),
    ("dynamo_config.dynamo_backend", Rule::Set(set_dynamo)),
    ("dynamo_config.*", Rule::Ignore),
];

fn set_distributed(d: &mut Draft, v: &Value, _: &Ctx) -> Result<(), Refusal> {
    let kinds = [
        ("NO", 0),
        ("MULTI_GPU", 0),
        ("DEEPSPEED", 1),
        ("FSDP", 2),
        ("MEGATRON_LM", 3),
        ("XLA", 3),
        ("MULTI_CPU", 3),
    ];
    match pick(v, &kinds)? {
        0 => {
            d.sharding.get_or_insert("ddp".into());
            Ok(())
        }
        1 => Ok(()),
        2 => {
            d.sharding = Some("fsdp2".into());
            Ok(())
        }
        _ => Err(Refusal::Unmodelled(
            "vramplan plans one process per CUDA GPU (NO, MULTI_GPU, DEEPSPEED)".into(),
        )),
    }
}

/// FSDP1 writes a strategy (`FULL_SHARD`, `SHARD_GRAD_OP`) where FSDP2 writes a boolean.
fn set_reshard(d: &mut Draft, v: &Value, _: &Ctx) -> Result<(), Refusal> {
    let r = match v {
        Value::String(s) => pick(
            &Value::String(s.clone()),
            &[
                ("true", true),
                ("false", false),
                ("FULL_SHARD", true),
                ("SHARD_GRAD_OP", false),
            ],
        )?,
        other => flag(other)?,
    };
    d.reshard_after_forward = Some(r);
    Ok(())
}

/// `dynamo_backend`: INDUCTOR is `torch.compile`'s default backend; NO is eager.
fn set_dynamo(d: &mut Draft, v: &Value, _: &Ctx) -> Result<(), Refusal> {
    match pick(
        v,
        &[
            ("NO", Some(false)),
            ("INDUCTOR", Some(true)),
            ("EAGER", None),
            ("AOT_EAGER", None),
            ("CUDAGRAPHS", None),
        ],
    )? {
        Some(c) => {
            d.compile = Some(c);
            Ok(())
        }
        None => Err(Refusal::Unmodelled(
            "torch.compile backends other than inductor".into(),
        )),
    }
}

fn set_precision(d: &mut Draft, v: &Value, _: &Ctx) -> Result<(), Refusal> {
    let modes = [("no", 0), ("bf16", 1), ("fp16", 2), ("fp8", 3)];
    match pick(v, &modes)? {
        0 => d.precision = Some("fp32".into()),
        1 => d.precision = Some("bf16-autocast".into()),
        2 => d.precision = Some("fp16-autocast".into()),
        _ => {
            return Err(Refusal::Unmodelled(
                "fp8 matmuls (Transformer Engine / torchao)".into(),
            ))
        }
    }
    Ok(())
}

pub fn read(text: &str, ctx: &Ctx) -> Result<Launch, String> {
    let v: Value = serde_norway::from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
    let mut d = Draft::default();
    let mut applied = apply(&[TABLE], &[], &flatten(&v), &mut d, ctx)?;
    let kind = v.get("distributed_type").and_then(Value::as_str);
    if kind == Some("DEEPSPEED") {
        d.sharding.get_or_insert("ddp".into());
        if let Some(file) = d.extra("deepspeed_config_file").cloned() {
            let more = deepspeed::merge(&file, &mut d, ctx, "deepspeed_config_file")?;
            applied.ignored.extend(more.ignored);
            applied.unknown.extend(more.unknown);
        }
        // accelerate hands mixed_precision to DeepSpeed (`set_mixed_precision`), whose
        // bf16 mode keeps bf16 weights beside fp32 masters.
        sixteen_bit(
            &mut d,
            &v,
            "DeepSpeed's fp16 mode (fp16 weights over fp32 masters)",
        )?;
    }
    if kind == Some("FSDP") {
        fsdp(&mut d, &v)?;
    }
    // One process: plain DDP, unless DeepSpeed offloads (its ZeRO optimizer runs on one GPU).
    let offloads = d.offload_optimizer.is_some() || d.offload_params.is_some();
    if d.sharding.as_deref() != Some("ddp") && d.gpus == Some(1) && !offloads {
        d.sharding = Some("ddp".into());
    }
    d.assumed.push("micro-batch, sequence length and accumulation: the script's (vramplan's defaults; `fit --from` searches them)".into());
    d.optimizer = Some("adamw-fused".into());
    d.assumed.push(
        "optimizer adamw-fused (the script's Trainer: transformers 5's default `optim`)".into(),
    );
    Ok(finish(Format::Accelerate, d, applied))
}

/// `mixed_precision` under DeepSpeed or FSDP2: bf16 parameters over fp32 masters.
fn sixteen_bit(d: &mut Draft, v: &Value, fp16: &str) -> Result<(), String> {
    match d.precision.as_deref() {
        Some("bf16-autocast") => d.precision = Some("bf16-mixed".into()),
        Some("fp16-autocast") => {
            let r = Refusal::Unmodelled(fp16.into());
            return Err(refusal_text("mixed_precision", &v["mixed_precision"], &r));
        }
        _ => {}
    }
    Ok(())
}

/// `distributed_type: FSDP` with `fsdp_version: 2` (`fully_shard`); FSDP1 is refused.
/// Under bf16 accelerate's `MixedPrecisionPolicy` casts parameters and reduces gradients
/// in bf16 (`FullyShardedDataParallelPlugin.set_mixed_precision`).
fn fsdp(d: &mut Draft, v: &Value) -> Result<(), String> {
    let version = d
        .extra("fsdp_version")
        .map(|x| x.to_string().trim_matches('"').to_string());
    if version.as_deref() != Some("2") {
        let r = Refusal::Unmodelled(super::hf::FSDP1.into());
        let shown = v
            .pointer("/fsdp_config/fsdp_version")
            .cloned()
            .unwrap_or(Value::from(1));
        let key = if v.pointer("/fsdp_config/fsdp_version").is_some() {
            "fsdp_config.fsdp_version"
        } else {
            "fsdp_config.fsdp_version (not set: the launcher's default)"
        };
        return Err(refusal_text(key, &shown, &r));
    }
    if let Some(s) = d.extra("fsdp_sharding_strategy").cloned() {
        match text(&s).unwrap_or_default() {
            "FULL_SHARD" => {}
            "SHARD_GRAD_OP" => {
                d.reshard_after_forward.get_or_insert(false);
            }
            _ => {
                let r = Refusal::Unmodelled(
                    "FSDP strategies other than FULL_SHARD and SHARD_GRAD_OP".into(),
                );
                return Err(refusal_text("fsdp_config.fsdp_sharding_strategy", &s, &r));
            }
        }
    }
    let bf16 = d.precision.as_deref() == Some("bf16-autocast");
    sixteen_bit(
        d,
        v,
        "FSDP2 with fp16 parameters (vramplan models bf16-mixed)",
    )?;
    if bf16 {
        d.reduce_dtype = Some("bf16".into());
    }
    Ok(())
}
