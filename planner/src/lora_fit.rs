//! The LoRA and QLoRA runs `fit` tries when full fine-tuning does not fit (the ladder's
//! LoRA and QLoRA steps, `levers.rs`), keeping the model, the global batch and the sequence
//! length asked for.
//!
//! The adapters are the ones `vramplan fit --lora` and `--qlora` use: rank 16 on every
//! linear of the blocks (`all-linear`), alpha 32, no dropout, base weights in bf16; QLoRA
//! adds NF4 with double quantization, bf16 compute, and 8-bit AdamW for the adapters
//! (bitsandbytes' paged 8-bit AdamW holds the same state; paging moves it to host
//! memory only under pressure, which the planner does not count on).

use crate::lora::{RawLora, Targets};
use crate::spec::{Optimizer, Precision, RunSpec};
use crate::Result;

/// The rank `--lora` and `--qlora` use when none is given.
pub const DEFAULT_RANK: u64 = 16;

/// The `[lora]` section `--lora RANK` (or `--qlora RANK`) stands for.
pub fn adapters(rank: u64, quantized: bool) -> RawLora {
    RawLora {
        rank: Some(rank),
        alpha: Some(2.0 * rank as f64),
        target_modules: Some(Targets::All("all-linear".into())),
        quantize: quantized.then(|| "nf4".to_string()),
        double_quant: quantized.then_some(true),
        compute_dtype: quantized.then(|| "bf16".to_string()),
        ..RawLora::default()
    }
}

/// `base` with the adapters of [`adapters`], the base weights in bf16 and, for QLoRA,
/// 8-bit AdamW in place of AdamW.
pub fn with_adapters(base: &RunSpec, rank: u64, quantized: bool) -> Result<RunSpec> {
    let mut spec = base.clone();
    spec.lora = Some(adapters(rank, quantized).resolve(&base.model)?);
    if spec.train.precision.is_autocast() || spec.train.precision == Precision::Fp32 {
        spec.train.precision = Precision::Bf16;
    }
    if quantized && spec.train.optimizer == Optimizer::AdamW {
        spec.train.optimizer = Optimizer::AdamW8bit;
    }
    Ok(spec)
}
