//! A torchtune recipe config (`recipes/configs/*.yaml`): the model builder, batch size,
//! accumulation, `dtype` (torchtune trains in pure bf16: weights, gradients and optimizer
//! state in bf16, no fp32 master), activation checkpointing and offloading, the optimizer
//! and its fusing, `optimizer_in_bwd`, the loss and `compile`.

use super::*;

/// torchtune model builders with a vramplan preset of the same shape
/// (`torchtune/models/*/_model_builders.py`).
const BUILDERS: &[(&str, &str)] = &[
    ("llama3_2_1b", "llama-3.2-1b"),
    ("qwen2_5_0_5b", "qwen2.5-0.5b"),
];

const TABLE: &[Row] = &[
    ("model._component_", Rule::Set(set_model)),
    ("model.lora_attn_modules", Rule::Waits("lora")),
    ("model.lora_rank", Rule::Waits("lora")),
    ("model.lora_alpha", Rule::Waits("lora")),
    ("model.lora_dropout", Rule::Ignore),
    ("model.apply_lora_to_mlp", Rule::Waits("lora")),
    ("model.apply_lora_to_output", Rule::Waits("lora")),
    ("model.use_dora", Rule::Waits("lora")),
    (
        "batch_size",
        Rule::Set(|d, v, _| {
            d.micro_batch = Some(count(v)?);
            Ok(())
        }),
    ),
    (
        "gradient_accumulation_steps",
        Rule::Set(|d, v, _| {
            d.grad_accum = Some(count(v)?);
            Ok(())
        }),
    ),
    (
        "tokenizer.max_seq_len",
        Rule::Set(|d, v, _| {
            if !v.is_null() {
                d.seq_len = Some(count(v)?);
            }
            Ok(())
        }),
    ),
    (
        "dtype",
        Rule::Set(|d, v, _| {
            d.precision = Some(pick(v, &[("bf16", "bf16"), ("fp32", "fp32")])?.into());
            Ok(())
        }),
    ),
    (
        "enable_activation_checkpointing",
        Rule::Set(|d, v, _| {
            if flag(v)? {
                d.checkpointing = Some("full".into());
            }
            Ok(())
        }),
    ),
    (
        "enable_activation_offloading",
        Rule::Waits("offload_activations"),
    ),
    ("optimizer_in_bwd", Rule::Waits("optimizer_in_backward")),
    ("compile", Rule::Waits("compile")),
    ("optimizer._component_", Rule::Set(set_optimizer)),
    ("optimizer.fused", Rule::Waits("adamw-fused")),
    ("optimizer.*", Rule::Ignore),
    ("loss._component_", Rule::Set(set_loss)),
    ("loss.*", Rule::Ignore),
    (
        "mixed_precision.enabled",
        Rule::Unmodelled("int8 mixed-precision matmuls"),
    ),
    ("mixed_precision.*", Rule::Ignore),
    (
        "fsdp_cpu_offload",
        Rule::Unmodelled("FSDP keeps parameters on the host"),
    ),
    ("fsdp_reshard_after_forward", Rule::Ignore),
    ("custom_sharded_layers", Rule::Ignore),
    ("tokenizer.*", Rule::Ignore),
    ("dataset.*", Rule::Ignore),
    ("checkpointer.*", Rule::Ignore),
    ("metric_logger.*", Rule::Ignore),
    ("profiler.*", Rule::Ignore),
    ("lr_scheduler.*", Rule::Ignore),
    ("output_dir", Rule::Ignore),
    ("seed", Rule::Ignore),
    ("shuffle", Rule::Ignore),
    ("epochs", Rule::Ignore),
    ("max_steps_per_epoch", Rule::Ignore),
    ("resume_from_checkpoint", Rule::Ignore),
    ("save_adapter_weights_only", Rule::Ignore),
    ("device", Rule::Ignore),
    ("log_every_n_steps", Rule::Ignore),
    ("log_peak_memory_stats", Rule::Ignore),
    ("log_level", Rule::Ignore),
    ("clip_grad_norm", Rule::Ignore),
];

fn set_model(d: &mut Draft, v: &Value, _: &Ctx) -> Result<(), Refusal> {
    let component = text(v)?;
    let builder = component.rsplit('.').next().unwrap_or(component);
    d.model_ref = Some(format!("model._component_ = \"{component}\""));
    if builder.starts_with("qlora_") {
        return Err(Refusal::Unmodelled("QLoRA's 4-bit NF4 base weights".into()));
    }
    let base = builder.strip_prefix("lora_").unwrap_or(builder);
    d.model = BUILDERS
        .iter()
        .find(|(b, _)| *b == base)
        .map(|(_, p)| preset(p));
    Ok(())
}

fn set_optimizer(d: &mut Draft, v: &Value, _: &Ctx) -> Result<(), Refusal> {
    let opts = [
        ("torch.optim.AdamW", Some("adamw")),
        ("torch.optim.Adam", Some("adamw")),
        ("torch.optim.SGD", Some("sgd")),
        ("bitsandbytes.optim.AdamW8bit", Some("adamw-8bit")),
        ("bitsandbytes.optim.PagedAdamW8bit", None),
        ("bitsandbytes.optim.PagedAdamW", None),
    ];
    match pick(v, &opts)? {
        Some(o) => d.optimizer = Some(o.into()),
        None => return Err(Refusal::Waits("paged-adamw-8bit")),
    }
    Ok(())
}

fn set_loss(d: &mut Draft, v: &Value, _: &Ctx) -> Result<(), Refusal> {
    let losses = [
        // The older TransformerDecoder returned `self.output(h).float()`: the float cast.
        ("torch.nn.CrossEntropyLoss", None),
        ("torchtune.modules.loss.CEWithChunkedOutputLoss", Some("CEWithChunkedOutputLoss keeps the bf16 logits whole and upcasts one chunk at a time, unlike vramplan's float-cast, chunked or fused losses")),
        ("torchtune.modules.loss.LinearCrossEntropyLoss", Some("LinearCrossEntropyLoss runs the output projection and cross-entropy chunk by chunk under autograd, unlike vramplan's chunked loss, which takes each chunk's gradient in forward")),
    ];
    match pick(v, &losses)? {
        None => {
            d.loss = Some("float-cast".into());
            Ok(())
        }
        Some(why) => Err(Refusal::Unmodelled(why.into())),
    }
}

pub fn read(text: &str, ctx: &Ctx) -> Result<Launch, String> {
    let v: Value = serde_norway::from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
    let mut d = Draft::default();
    let applied = apply(TABLE, &[], &flatten(&v), &mut d, ctx)?;
    if d.seq_len.is_none() {
        d.seq_len = Some(2048);
        d.assumed
            .push("seq_len 2048 (tokenizer.max_seq_len is null: samples are not truncated)".into());
    }
    if d.optimizer.is_none() {
        d.assumed.push("optimizer adamw".into());
    }
    let mut launch = finish(Format::Torchtune, d, applied);
    // `tune run --nproc_per_node N full_finetune_distributed` shards with FSDP2.
    launch.fsdp = true;
    Ok(launch)
}
