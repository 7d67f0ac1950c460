//! The regime a torch run trains in, beyond its block and loss: which combinations of
//! precision, sharding, checkpointing, offloading and optimizer implementation exist in
//! the frameworks, and the one line that names the regime in `estimate` and `compare`.
//!
//! The rules follow the frameworks' own refusals: torchtune's `optimizer_in_bwd` cannot
//! accumulate gradients (`full_finetune_*.py`: "Gradient accumulation is not supported
//! with optimizer in bwd") and steps each parameter's own state, so it needs the whole
//! gradient on this rank (FSDP2's sharded gradients are whole per shard; DeepSpeed's
//! buckets and DDP's all-reduce are not); bitsandbytes' paged optimizers allocate CUDA
//! managed memory (`cudaMallocManaged`), so they need a GPU; `reduce_dtype` is a field of
//! FSDP2's `MixedPrecisionPolicy`, which exists only for `bf16-mixed`.

use crate::error::{quote, PlanError, Result};
use crate::spec::{
    Arch, Checkpointing, Choice, Engine, Offload, Optimizer, Precision, ReduceDtype, RunSpec,
    Sharding,
};

/// Refuses combinations no framework runs, one key at a time.
pub fn check_regime(spec: &RunSpec) -> Result<()> {
    let (t, h) = (&spec.train, &spec.hardware);
    if t.engine == Engine::Candle {
        check_candle(spec)?;
    }
    if t.optimizer_in_backward {
        if t.grad_accum > 1 {
            return Err(PlanError::invalid(
                "train.optimizer_in_backward",
                "true",
                "false with grad_accum above 1: the step inside backward cannot accumulate gradients",
            ));
        }
        if h.gpus > 1 && h.sharding != Sharding::Fsdp2 {
            return Err(PlanError::invalid(
                "train.optimizer_in_backward",
                "true",
                "false with several GPUs unless sharding = \"fsdp2\" (the step needs each rank's whole gradient shard)",
            ));
        }
        if t.precision == Precision::Bf16Mixed {
            return Err(PlanError::invalid(
                "train.optimizer_in_backward",
                "true",
                "false with precision = \"bf16-mixed\" (the masters' gradients are made after backward)",
            ));
        }
        if t.optimizer == Optimizer::Muon {
            return Err(PlanError::invalid(
                "train.optimizer_in_backward",
                "true",
                "false with optimizer = \"muon\" (Muon steps its matrices together)",
            ));
        }
    }
    if matches!(
        t.optimizer,
        Optimizer::PagedAdamW | Optimizer::PagedAdamW8bit
    ) && !h.device.is_cuda()
    {
        return Err(PlanError::invalid(
            "train.optimizer",
            quote(t.optimizer.name()),
            "a GPU: paged optimizers keep their state in CUDA managed memory",
        ));
    }
    if t.offload_activations && !h.device.is_cuda() {
        return Err(PlanError::invalid(
            "train.offload_activations",
            "true",
            "false with gpu = \"cpu\": offloading moves saved activations from a GPU to host memory",
        ));
    }
    if t.checkpointing == Checkpointing::SelectiveOp && !matches!(spec.model.arch, Arch::Llama) {
        return Err(PlanError::invalid(
            "train.checkpointing",
            "\"selective-op\"",
            format!(
                "none | selective | full | every-N for arch {}: the op policy is modelled for llama blocks",
                spec.model.arch
            ),
        ));
    }
    if t.reduce_dtype != ReduceDtype::Fp32 && !super::shard::reduce_policy(t) {
        return Err(PlanError::invalid(
            "train.reduce_dtype",
            quote(t.reduce_dtype.name()),
            "fp32 unless precision = \"bf16-mixed\" or implementation = \"torchtitan\"",
        ));
    }
    check_sharding(spec)
}

fn check_sharding(spec: &RunSpec) -> Result<()> {
    let h = &spec.hardware;
    if !h.reshard_after_forward && h.sharding != Sharding::Fsdp2 {
        return Err(PlanError::invalid(
            "hardware.reshard_after_forward",
            "false",
            "true unless sharding = \"fsdp2\"",
        ));
    }
    if h.gpus_per_node != h.gpus {
        if h.sharding != Sharding::Fsdp2 {
            return Err(PlanError::invalid(
                "hardware.gpus_per_node",
                h.gpus_per_node,
                format!(
                    "gpus = {} unless sharding = \"fsdp2\" (hybrid sharding)",
                    h.gpus
                ),
            ));
        }
        if h.gpus_per_node > h.gpus || !h.gpus.is_multiple_of(h.gpus_per_node) {
            return Err(PlanError::invalid(
                "hardware.gpus_per_node",
                h.gpus_per_node,
                format!("a divisor of gpus = {}", h.gpus),
            ));
        }
    }
    Ok(())
}

/// The candle engine trains plain AdamW with no checkpointing or full checkpointing.
fn check_candle(spec: &RunSpec) -> Result<()> {
    let (t, h) = (&spec.train, &spec.hardware);
    let refuse = |key: &str, value: String| {
        Err(PlanError::invalid(
            key,
            value,
            "the torch engine: the candle engine trains without it",
        ))
    };
    if matches!(
        t.checkpointing,
        Checkpointing::SelectiveOp | Checkpointing::Every(_)
    ) {
        return refuse("train.checkpointing", quote(&t.checkpointing.to_string()));
    }
    if t.offload_activations {
        return refuse("train.offload_activations", "true".into());
    }
    if t.optimizer_in_backward {
        return refuse("train.optimizer_in_backward", "true".into());
    }
    if t.precision == Precision::Bf16Mixed {
        return refuse("train.precision", quote(t.precision.name()));
    }
    if h.sharding == Sharding::Fsdp2 {
        return refuse("hardware.sharding", quote(h.sharding.name()));
    }
    Ok(())
}

/// The regime in words, for the headline of `estimate` and each side of `compare`:
/// only what differs from the plain eager step is named.
pub fn describe(spec: &RunSpec) -> String {
    let (t, h) = (&spec.train, &spec.hardware);
    let mut parts = vec![format!(
        "optimizer {}",
        optimizer_implementation(t.optimizer, h.device.is_cuda())
    )];
    if t.optimizer_in_backward {
        parts.push("stepped in backward".into());
    }
    if t.precision == Precision::Bf16Mixed {
        parts.push(format!(
            "bf16 compute over fp32 masters, gradients reduced in {}",
            t.reduce_dtype
        ));
    }
    if t.offload_activations {
        parts.push("saved activations offloaded to host".into());
    }
    match (h.offload_optimizer, h.offload_params) {
        (Offload::Cpu, Offload::Cpu) => parts.push(format!(
            "{}, optimizer and parameters offloaded to host (ZeRO-Infinity, Adam on the CPU)",
            zero(h)
        )),
        (Offload::Cpu, _) => parts.push(format!(
            "{}, optimizer offloaded to host (ZeRO-Offload: fp32 masters, moments and gradients, Adam on the CPU)",
            zero(h)
        )),
        (_, Offload::Cpu) => parts.push(format!("{}, parameters offloaded to host", zero(h))),
        _ => {}
    }
    if h.sharding == Sharding::Fsdp2 {
        let group = h.shard_group();
        let ranks = if h.device.is_cuda() {
            "GPU(s)"
        } else {
            "CPU processes"
        };
        let mut s = format!("FSDP2 over {group} {ranks}");
        if t.precision != Precision::Bf16Mixed && super::shard::reduce_policy(t) {
            s.push_str(&format!(", gradients reduced in {}", t.reduce_dtype));
        }
        if group < h.gpus {
            s.push_str(&format!(", replicated {}×", h.gpus / group));
        }
        if !h.reshard_after_forward {
            s.push_str(", no reshard after forward");
        }
        parts.push(s);
    }
    parts.join(", ")
}

/// "DeepSpeed ZeRO-2 over 1 GPU(s)".
fn zero(h: &crate::spec::HardwareSpec) -> String {
    format!(
        "DeepSpeed ZeRO-{} over {} GPU(s)",
        h.sharding.stage(),
        h.shard_group()
    )
}

/// What `adamw` means on this device: PyTorch's `_default_to_fused_or_foreach` picks
/// foreach for CUDA tensors and the single-tensor loop on CPU (torch/optim/optimizer.py).
pub fn optimizer_implementation(o: Optimizer, cuda: bool) -> &'static str {
    match o {
        Optimizer::AdamW if cuda => "adamw (foreach)",
        Optimizer::AdamW => "adamw (single-tensor)",
        o => o.name(),
    }
}
