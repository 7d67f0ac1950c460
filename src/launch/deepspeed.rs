//! A DeepSpeed config JSON (`ds_config.json`): ZeRO stage, offload, precision, micro-batch
//! and accumulation. The GPU count is the launcher's (`deepspeed --num_gpus N`), so it is
//! derived from `train_batch_size = micro × accumulation × GPUs` where all three are given.
//! `"auto"` leaves a value to the Hugging Face Trainer or accelerate that passes the file.
//!
//! `offload_optimizer.device` / `offload_param.device` = "cpu" (ZeRO-Offload, ZeRO-Infinity
//! on the CPU) are vramplan's `offload_optimizer` / `offload_params`; "nvme" is refused.
//!
//! DeepSpeed's `bf16`/`fp16` modes keep 16-bit weights beside fp32 master copies in the
//! optimizer, unlike autocast over fp32 weights; its default `Adam`/`AdamW` is the fused
//! multi-tensor `FusedAdam` unless `torch_adam` is set (`deepspeed/ops/adam/fused_adam.py`).

use super::*;

pub(super) const TABLE: &[Row] = &[
    (
        "train_micro_batch_size_per_gpu",
        Rule::Set(|d, v, _| auto_or(v, |n| d.micro_batch = Some(n))),
    ),
    (
        "gradient_accumulation_steps",
        Rule::Set(|d, v, _| auto_or(v, |n| d.grad_accum = Some(n))),
    ),
    (
        "train_batch_size",
        Rule::Set(|d, v, _| auto_or(v, |n| d.global_batch = Some(n))),
    ),
    ("fp16.enabled", Rule::Set(|d, v, _| mode(d, "fp16", v))),
    ("bf16.enabled", Rule::Set(|d, v, _| mode(d, "bf16", v))),
    ("fp16.*", Rule::Ignore),
    ("bf16.*", Rule::Ignore),
    ("zero_optimization.stage", Rule::Set(set_stage)),
    (
        "zero_optimization.offload_optimizer.device",
        Rule::Set(|d, v, _| offload(&mut d.offload_optimizer, v)),
    ),
    (
        "zero_optimization.offload_param.device",
        Rule::Set(|d, v, _| offload(&mut d.offload_params, v)),
    ),
    // Pinning, buffer counts and NVMe paths: host-side settings of the offload (pinned,
    // DeepSpeed's default, is what vramplan's host estimate assumes).
    (
        "zero_optimization.offload_optimizer.pin_memory",
        Rule::Ignore,
    ),
    ("zero_optimization.offload_param.pin_memory", Rule::Ignore),
    ("zero_optimization.offload_optimizer.*", Rule::Ignore),
    ("zero_optimization.offload_param.*", Rule::Ignore),
    // The legacy boolean of DeepSpeed < 0.3.16: the optimizer to the CPU.
    (
        "zero_optimization.cpu_offload",
        Rule::Set(|d, v, _| {
            if flag(v)? {
                d.offload_optimizer = Some("cpu".into());
            }
            Ok(())
        }),
    ),
    // The buckets the ZeRO inventory sizes (`docs/model.md`, "DeepSpeed ZeRO"); DeepSpeed
    // writes them as numbers, "auto" leaves DeepSpeed's default.
    (
        "zero_optimization.reduce_bucket_size",
        Rule::Set(|d, v, _| bucket(&mut d.reduce_bucket_size, v)),
    ),
    (
        "zero_optimization.allgather_bucket_size",
        Rule::Set(|d, v, _| bucket(&mut d.allgather_bucket_size, v)),
    ),
    (
        "zero_optimization.stage3_prefetch_bucket_size",
        Rule::Set(|d, v, _| bucket(&mut d.stage3_prefetch_bucket_size, v)),
    ),
    (
        "zero_optimization.stage3_max_live_parameters",
        Rule::Set(|d, v, _| bucket(&mut d.stage3_max_live_parameters, v)),
    ),
    (
        "zero_optimization.stage3_param_persistence_threshold",
        Rule::Set(|d, v, _| bucket(&mut d.stage3_param_persistence_threshold, v)),
    ),
    (
        "zero_optimization.stage3_max_reuse_distance",
        Rule::Set(|d, v, _| bucket(&mut d.stage3_max_reuse_distance, v)),
    ),
    // The rest (overlap_comm, contiguous_gradients, ...): not in the inventory.
    ("zero_optimization.*", Rule::Ignore),
    (
        "optimizer.type",
        Rule::Set(|d, v, _| keep(d, "optimizer.type", v)),
    ),
    (
        "optimizer.params.torch_adam",
        Rule::Set(|d, v, _| keep(d, "torch_adam", v)),
    ),
    ("optimizer.params.*", Rule::Ignore),
    ("scheduler.*", Rule::Ignore),
    (
        "activation_checkpointing.partition_activations",
        Rule::Unmodelled("activation partitioning across model-parallel ranks"),
    ),
    (
        "activation_checkpointing.cpu_checkpointing",
        Rule::Unmodelled("checkpoints kept on the host"),
    ),
    ("activation_checkpointing.*", Rule::Ignore),
    ("amp.enabled", Rule::Unmodelled("apex AMP")),
    (
        "data_types.grad_accum_dtype",
        Rule::Unmodelled("a gradient accumulation dtype of its own"),
    ),
    ("gradient_clipping", Rule::Ignore),
    ("steps_per_print", Rule::Ignore),
    ("wall_clock_breakdown", Rule::Ignore),
    ("prescale_gradients", Rule::Ignore),
    ("gradient_predivide_factor", Rule::Ignore),
    ("zero_allow_untested_optimizer", Rule::Ignore),
    ("flops_profiler.*", Rule::Ignore),
    ("tensorboard.*", Rule::Ignore),
    ("wandb.*", Rule::Ignore),
    ("csv_monitor.*", Rule::Ignore),
    ("comms_logger.*", Rule::Ignore),
    ("autotuning.*", Rule::Ignore),
];

/// A bucket size: a whole number of elements (DeepSpeed accepts `5e8` written as a float),
/// or "auto".
fn bucket(slot: &mut Option<u64>, v: &Value) -> Result<(), Refusal> {
    if v.as_str() == Some("auto") {
        return Ok(());
    }
    let n = v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| *f >= 0.0 && f.fract() == 0.0)
            .map(|f| f as u64)
    });
    *slot = Some(n.ok_or_else(|| Refusal::Bad("a whole number of elements, or \"auto\"".into()))?);
    Ok(())
}

fn auto_or(v: &Value, set: impl FnOnce(u64)) -> Result<(), Refusal> {
    if v.as_str() != Some("auto") {
        set(count(v).map_err(|_| Refusal::Bad("a whole number above 0, or \"auto\"".into()))?);
    }
    Ok(())
}

/// `fp16.enabled` / `bf16.enabled`: true is DeepSpeed's 16-bit mode; "auto" follows the
/// caller's mixed precision, which then is that mode too.
fn mode(d: &mut Draft, dtype: &str, v: &Value) -> Result<(), Refusal> {
    if v.as_str() == Some("auto") {
        return keep(d, &format!("{dtype} auto"), v);
    }
    match (flag(v)?, dtype) {
        (true, "fp16") => return Err(Refusal::Unmodelled(FP16.into())),
        (true, _) => d.precision = Some("bf16-mixed".into()),
        (false, "bf16") => keep(d, "bf16 off", v)?,
        (false, _) => {}
    }
    Ok(())
}

const FP16: &str = "DeepSpeed's fp16 mode (fp16 weights over fp32 masters, loss scaling); its bf16 mode is modelled as bf16-mixed";

fn set_stage(d: &mut Draft, v: &Value, _: &Ctx) -> Result<(), Refusal> {
    let s = pick(
        v,
        &[("0", "ddp"), ("1", "zero1"), ("2", "zero2"), ("3", "zero3")],
    )?;
    d.sharding = Some(s.into());
    Ok(())
}

/// `offload_*.device`: "cpu" is vramplan's `offload_optimizer` / `offload_params`.
pub(super) fn offload(slot: &mut Option<String>, v: &Value) -> Result<(), Refusal> {
    match pick(v, &[("none", 0), ("cpu", 1), ("nvme", 2)])? {
        0 => *slot = None,
        1 => *slot = Some("cpu".into()),
        _ => {
            return Err(Refusal::Unmodelled(
                "ZeRO-Infinity's NVMe offload (vramplan models \"cpu\")".into(),
            ))
        }
    }
    Ok(())
}

/// The JSON behind `v`: a dict, or a path (relative to the file that names it).
fn json_of(v: &Value, ctx: &Ctx, key: &str) -> Result<(Value, String), String> {
    match v {
        Value::Object(_) => Ok((v.clone(), key.to_string())),
        Value::String(p) => {
            let path = ctx.dir.join(p);
            let name = path.display().to_string();
            let text = std::fs::read_to_string(&path)
                .map_err(|e| format!("{key} = \"{p}\": cannot read {name}: {e}"))?;
            let v = serde_json::from_str(&text)
                .map_err(|e| format!("{key} = \"{p}\": not valid JSON ({e})"))?;
            Ok((v, p.clone()))
        }
        _ => Err(format!(
            "{key} = {}: a DeepSpeed config path or dict",
            show(v)
        )),
    }
}

/// Reads a DeepSpeed config named by another launcher's key into `d`; its keys' outcome
/// comes back prefixed with the key.
pub fn merge(v: &Value, d: &mut Draft, ctx: &Ctx, key: &str) -> Result<Applied, String> {
    let (json, name) = json_of(v, ctx, key)?;
    let applied =
        apply(&[TABLE], &[], &flatten(&json), d, ctx).map_err(|e| format!("{name}: {e}"))?;
    settle(d).map_err(|e| format!("{name}: {e}"))?;
    let tag = |k: String| format!("{key}:{k}");
    Ok(Applied {
        ignored: applied.ignored.into_iter().map(tag).collect(),
        unknown: applied.unknown.into_iter().map(tag).collect(),
    })
}

/// The optimizer, precision and batch arithmetic once every key is read.
fn settle(d: &mut Draft) -> Result<(), String> {
    // A caller's bf16 (the Trainer's `bf16`, accelerate's `mixed_precision`, axolotl's
    // bf16 weights) turns DeepSpeed's bf16 mode on: "auto" follows it, and accelerate's
    // `DeepSpeedPlugin.set_mixed_precision` adds `bf16.enabled` where the file has none.
    match d.precision.as_deref() {
        Some("bf16-autocast" | "bf16") if d.extra("bf16 off").is_some() => {
            let r = Refusal::Unmodelled("the caller's bf16 with DeepSpeed's bf16 mode off".into());
            return Err(refusal_text("bf16.enabled", &Value::Bool(false), &r));
        }
        Some("bf16-autocast" | "bf16") => d.precision = Some("bf16-mixed".into()),
        Some("fp16-autocast") => {
            let r = Refusal::Unmodelled(FP16.into());
            return Err(refusal_text("fp16.enabled", &Value::from("auto"), &r));
        }
        _ => {}
    }
    if let Some(t) = d.extra("optimizer.type").cloned() {
        let torch = d.extra("torch_adam").is_some_and(on);
        match text(&t).unwrap_or_default().to_ascii_lowercase().as_str() {
            // torch.optim.AdamW: foreach on CUDA.
            "adam" | "adamw" if torch => d.optimizer = Some("adamw".into()),
            // FusedAdam: one multi-tensor kernel updating in place, like torch's fused AdamW.
            "adam" | "adamw" => d.optimizer = Some("adamw-fused".into()),
            _ => {
                let r = Refusal::Unmodelled("only Adam/AdamW are modelled".into());
                return Err(refusal_text("optimizer.type", &t, &r));
            }
        }
    }
    if let (Some(g), Some(m)) = (d.global_batch, d.micro_batch) {
        match (d.grad_accum, d.gpus) {
            (Some(a), None) if g.is_multiple_of(m * a) => d.gpus = Some(g / (m * a)),
            (Some(a), None) => {
                return Err(format!(
                    "train_batch_size = {g}: a multiple of micro-batch × accumulation = {}",
                    m * a
                ))
            }
            (None, _) => {
                d.grad_accum = Some(d.accum_for(g, "train_batch_size").map_err(|r| match r {
                    Refusal::Bad(s) => s,
                    other => format!("{other:?}"),
                })?)
            }
            (Some(_), Some(_)) => {}
        }
    }
    Ok(())
}

pub fn read(text: &str, ctx: &Ctx) -> Result<Launch, String> {
    let json: Value = serde_json::from_str(text).map_err(|e| format!("not valid JSON: {e}"))?;
    let mut d = Draft::default();
    let applied = apply(&[TABLE], &[], &flatten(&json), &mut d, ctx)?;
    settle(&mut d)?;
    // Neither fp16 nor bf16 enabled: DeepSpeed trains in fp32.
    d.precision.get_or_insert("fp32".into());
    if d.micro_batch.is_none() {
        d.assumed.push(
            "micro-batch 1 (train_micro_batch_size_per_gpu is \"auto\": the Trainer's)".into(),
        );
    }
    Ok(finish(Format::DeepSpeed, d, applied))
}
