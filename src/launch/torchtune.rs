//! A torchtune recipe config (`recipes/configs/*.yaml`): the model builder, batch size,
//! accumulation, `dtype` (torchtune trains in pure bf16: weights, gradients and optimizer
//! state in bf16, no fp32 master), activation checkpointing and offloading, the optimizer
//! and its fusing, `optimizer_in_bwd`, the loss and `compile`.

use super::*;
use vramplan_planner::RawModel;

/// torchtune model builders with a vramplan preset of the same shape
/// (`torchtune/models/*/_model_builders.py`).
const BUILDERS: &[(&str, &str)] = &[
    ("llama3_2_1b", "llama-3.2-1b"),
    ("llama3_2_3b", "llama-3.2-3b"),
    ("llama3_1_8b", "llama-3.1-8b"),
    ("qwen2_5_0_5b", "qwen2.5-0.5b"),
];

/// Builders without a preset: width, layers, heads, kv heads, MLP width, vocabulary, from
/// `models/llama2/_model_builders.py` (`llama2_7b`, MLP by `scale_hidden_dim_for_mlp`)
/// and `models/llama3/_model_builders.py` (`llama3_8b`). Embeddings untied.
const SIZES: &[(&str, [u64; 6])] = &[
    ("llama2_7b", [4096, 32, 32, 32, 11008, 32000]),
    ("llama3_8b", [4096, 32, 32, 8, 14336, 128256]),
];

/// The builder of a preset, for `--emit torchtune`.
pub fn builder_of(preset: &str) -> Option<String> {
    let (b, _) = BUILDERS.iter().find(|(_, p)| *p == preset)?;
    let family = b.rsplit_once('_').map_or(*b, |(f, _)| f);
    // llama3_2_1b → torchtune.models.llama3_2; qwen2_5_0_5b → torchtune.models.qwen2_5.
    let family = match family {
        "qwen2_5_0" => "qwen2_5",
        f => f,
    };
    Some(format!("torchtune.models.{family}.{b}"))
}

fn builder_model(builder: &str) -> Option<RawModel> {
    if let Some((_, p)) = BUILDERS.iter().find(|(b, _)| *b == builder) {
        return Some(preset(p));
    }
    let (name, [h, l, n, kv, i, v]) = SIZES.iter().find(|(b, _)| *b == builder)?;
    Some(RawModel {
        name: Some(format!("torchtune-{name}")),
        arch: Some("llama".into()),
        hidden_size: Some(*h),
        num_layers: Some(*l),
        num_heads: Some(*n),
        num_kv_heads: Some(*kv),
        head_dim: Some(h / n),
        intermediate_size: Some(*i),
        vocab_size: Some(*v),
        tie_embeddings: Some(false),
        ..RawModel::default()
    })
}

/// Why torchtune's LoRA is not planned as PEFT's: its recipes build the model under
/// `set_default_dtype(bf16)`, so `LoRALinear`'s `lora_a`/`lora_b` are bf16, where PEFT's
/// adapters (what vramplan's `[lora]` models) are fp32 and keep fp32 copies of their inputs.
const LORA: &str = "torchtune's LoRALinear keeps bf16 adapters, unlike the fp32 PEFT adapters vramplan's lora models";

pub(super) const TABLE: &[Row] = &[
    ("model._component_", Rule::Set(set_model)),
    ("model.lora_attn_modules", Rule::Unmodelled(LORA)),
    ("model.lora_rank", Rule::Unmodelled(LORA)),
    ("model.lora_alpha", Rule::Unmodelled(LORA)),
    ("model.lora_dropout", Rule::Ignore),
    ("model.apply_lora_to_mlp", Rule::Unmodelled(LORA)),
    ("model.apply_lora_to_output", Rule::Unmodelled(LORA)),
    ("model.use_dora", Rule::Unmodelled(LORA)),
    ("batch_size", Rule::Set(set_micro_batch)),
    ("gradient_accumulation_steps", Rule::Set(set_grad_accum)),
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
        Rule::Set(|d, v, _| switch(v, &mut d.offload_activations)),
    ),
    (
        "optimizer_in_bwd",
        Rule::Set(|d, v, _| switch(v, &mut d.optimizer_in_backward)),
    ),
    ("compile", Rule::Set(|d, v, _| switch(v, &mut d.compile))),
    ("optimizer._component_", Rule::Set(set_optimizer)),
    (
        "optimizer.fused",
        Rule::Set(|d, v, _| {
            flag(v)?;
            keep(d, "fused", v)
        }),
    ),
    ("optimizer.*", Rule::Ignore),
    ("loss._component_", Rule::Set(set_loss)),
    ("loss.*", Rule::Ignore),
    (
        "mixed_precision.enabled",
        Rule::Unmodelled("int8 mixed-precision matmuls"),
    ),
    ("mixed_precision.*", Rule::Ignore),
    ("fsdp_cpu_offload", Rule::Waits("cpu offload")),
    (
        "fsdp_reshard_after_forward",
        Rule::Set(|d, v, _| switch(v, &mut d.reshard_after_forward)),
    ),
    ("memory_efficient_fsdp_wrap", Rule::Ignore),
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
        return Err(Refusal::Unmodelled(format!(
            "QLoRA: torchao's NF4 base under {LORA}"
        )));
    }
    if builder.starts_with("lora_") {
        return Err(Refusal::Unmodelled(LORA.into()));
    }
    let base = builder.strip_prefix("lora_").unwrap_or(builder);
    d.model = builder_model(base);
    Ok(())
}

fn set_optimizer(d: &mut Draft, v: &Value, _: &Ctx) -> Result<(), Refusal> {
    let opts = [
        // torch.optim's default on CUDA: foreach (`optimizer.fused: True` makes it fused).
        ("torch.optim.AdamW", "adamw"),
        ("torch.optim.Adam", "adamw"),
        ("torch.optim.SGD", "sgd"),
        ("bitsandbytes.optim.AdamW8bit", "adamw-8bit"),
        ("bitsandbytes.optim.PagedAdamW8bit", "paged-adamw-8bit"),
        ("bitsandbytes.optim.PagedAdamW", "paged-adamw"),
        ("torchao.optim.AdamW8bit", "torchao-adamw-8bit"),
        ("torchao.optim.AdamW4bit", "torchao-adamw-4bit"),
        (
            "torchao.prototype.low_bit_optim.AdamW8bit",
            "torchao-adamw-8bit",
        ),
        (
            "torchao.prototype.low_bit_optim.AdamW4bit",
            "torchao-adamw-4bit",
        ),
    ];
    d.optimizer = Some(pick(v, &opts)?.into());
    Ok(())
}

fn set_loss(d: &mut Draft, v: &Value, _: &Ctx) -> Result<(), Refusal> {
    let losses = [
        // The older TransformerDecoder returned `self.output(h).float()`: the float cast.
        ("torch.nn.CrossEntropyLoss", None),
        ("torchtune.modules.loss.CEWithChunkedOutputLoss", Some("chunked")),
        ("torchtune.modules.loss.LinearCrossEntropyLoss", Some("LinearCrossEntropyLoss runs the output projection and cross-entropy chunk by chunk under autograd, unlike vramplan's chunked loss, which takes each chunk's gradient in forward")),
    ];
    match pick(v, &losses)? {
        None => d.loss = Some("float-cast".into()),
        // vramplan's torchtune implementation: the output projection and cross-entropy of
        // `CEWithChunkedOutputLoss`'s 8 chunks.
        Some("chunked") => d.loss = Some("chunked".into()),
        Some(why) => return Err(Refusal::Unmodelled(why.into())),
    }
    Ok(())
}

pub fn read(text: &str, ctx: &Ctx) -> Result<Launch, String> {
    let v: Value = serde_norway::from_str(text).map_err(|e| format!("not valid YAML: {e}"))?;
    let mut d = Draft::default();
    let applied = apply(&[TABLE], &[], &flatten(&v), &mut d, ctx)?;
    if d.seq_len.is_none() {
        d.seq_len = Some(2048);
        d.assumed
            .push("seq_len 2048 (tokenizer.max_seq_len is null: samples are not truncated)".into());
    }
    if d.optimizer.is_none() {
        d.assumed.push("optimizer adamw".into());
    }
    if let Some(f) = d.extra("fused").cloned().filter(on) {
        if d.optimizer.as_deref() != Some("adamw") {
            return Err(format!(
                "optimizer.fused = {}: true only with torch.optim.AdamW or Adam",
                show(&f)
            ));
        }
        d.optimizer = Some("adamw-fused".into());
    }
    d.implementation = Some("torchtune".into());
    let mut launch = finish(Format::Torchtune, d, applied);
    // `tune run --nproc_per_node N full_finetune_distributed` shards with FSDP2, its
    // parameters in the recipe's dtype (no MixedPrecisionPolicy).
    launch.fsdp = Some(Fsdp {
        replicas: 1,
        precision: None,
        reduce_dtype: None,
    });
    Ok(launch)
}
