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
        Rule::Set(offload),
    ),
    ("deepspeed_config.offload_param_device", Rule::Set(offload)),
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
    // Read only with distributed_type FSDP, which waits for vramplan's fsdp2.
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
    ("dynamo_config.dynamo_backend", Rule::Waits("compile")),
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
        2 => Err(Refusal::Waits("fsdp2")),
        _ => Err(Refusal::Unmodelled(
            "vramplan plans one process per CUDA GPU (NO, MULTI_GPU, DEEPSPEED)".into(),
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

fn offload(_: &mut Draft, v: &Value, _: &Ctx) -> Result<(), Refusal> {
    match pick(v, &[("none", false), ("cpu", true), ("nvme", true)])? {
        true => Err(Refusal::Unmodelled(
            "ZeRO-Offload keeps this state on the host".into(),
        )),
        false => Ok(()),
    }
}

pub fn read(text: &str, ctx: &Ctx) -> Result<Launch, String> {
    let v: Value = serde_norway::from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
    let mut d = Draft::default();
    let mut applied = apply(TABLE, &[], &flatten(&v), &mut d, ctx)?;
    let deepspeed = v.get("distributed_type").and_then(Value::as_str) == Some("DEEPSPEED");
    if deepspeed {
        if d.precision.as_deref().is_some_and(|p| p != "fp32") {
            // accelerate hands mixed_precision to DeepSpeed, whose bf16/fp16 modes keep
            // 16-bit weights beside fp32 masters.
            let r = Refusal::Waits("bf16-mixed");
            return Err(refusal_text("mixed_precision", &v["mixed_precision"], &r));
        }
        d.sharding.get_or_insert("ddp".into());
        if let Some(file) = d.extra("deepspeed_config_file").cloned() {
            let more = deepspeed::merge(&file, &mut d, ctx, "deepspeed_config_file")?;
            applied.ignored.extend(more.ignored);
            applied.unknown.extend(more.unknown);
        }
    }
    if d.sharding.as_deref() != Some("ddp") && d.gpus == Some(1) {
        d.sharding = Some("ddp".into());
    }
    d.assumed.push("micro-batch, sequence length and accumulation: the script's (vramplan's defaults; `fit --from` searches them)".into());
    Ok(finish(Format::Accelerate, d, applied))
}
