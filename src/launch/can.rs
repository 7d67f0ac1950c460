//! What each launcher can run: one row per format of the settings it has a key for. `fit
//! --emit FORMAT` keeps only the candidates its launcher can run, and `--emit` refuses a
//! plan with a setting the launcher cannot express, naming it.

use super::Format;
use vramplan_planner::{
    Checkpointing, Implementation, LossMode, Offload, Optimizer, Precision, RawConfig, ReduceDtype,
    RunSpec, Sharding,
};

/// One launcher's settings.
pub struct Caps {
    pub format: Format,
    /// Whose model code it runs.
    pub implementation: Implementation,
    /// The checkpointing policies it has a key for.
    pub checkpointing: fn(Checkpointing) -> bool,
    pub losses: &'static [LossMode],
    pub precisions: &'static [Precision],
    pub optimizers: &'static [Optimizer],
    /// Sharding on several GPUs (plain DDP is always there).
    pub sharding: &'static [Sharding],
    pub lora: bool,
    /// `torch.compile`: `None` when it is the launcher's only mode (nanochat's
    /// `base_train`).
    pub compile: Option<bool>,
    pub offload_activations: bool,
    pub optimizer_in_backward: bool,
    /// DeepSpeed's CPU offload of the optimizer and parameters (DeepSpeed's file,
    /// accelerate's `deepspeed_config`, the Trainer's and axolotl's `deepspeed` section).
    pub offload_state: bool,
}

fn none_or_full(c: Checkpointing) -> bool {
    matches!(c, Checkpointing::None | Checkpointing::Full)
}

fn only_none(c: Checkpointing) -> bool {
    c == Checkpointing::None
}

/// torchtitan's `activation_checkpoint`: none, full, the op policy, every N-th block.
fn titan_ckpt(c: Checkpointing) -> bool {
    !matches!(c, Checkpointing::Selective)
}

const HF_OPTIMIZERS: &[Optimizer] = &[
    Optimizer::AdamW,
    Optimizer::AdamWFused,
    Optimizer::AdamW8bit,
    Optimizer::PagedAdamW,
    Optimizer::PagedAdamW8bit,
    Optimizer::TorchaoAdamW8bit,
    Optimizer::TorchaoAdamW4bit,
    Optimizer::Adafactor,
    Optimizer::Sgd,
];

const ZERO_AND_FSDP: &[Sharding] = &[
    Sharding::Zero1,
    Sharding::Zero2,
    Sharding::Zero3,
    Sharding::Fsdp2,
];

/// Every launcher's row. The Trainer-based ones (hf-args, accelerate, axolotl) compute
/// the loss as transformers' `ForCausalLMLoss` (the float cast); torchtune's
/// `CEWithChunkedOutputLoss` is vramplan's chunked loss of the torchtune implementation.
pub const CAPS: &[Caps] = &[
    Caps {
        format: Format::HfArgs,
        implementation: Implementation::Hf,
        checkpointing: none_or_full,
        losses: &[LossMode::FloatCast],
        precisions: &[
            Precision::Fp32,
            Precision::Bf16Autocast,
            Precision::Fp16Autocast,
            Precision::Bf16,
            Precision::Bf16Mixed,
        ],
        optimizers: HF_OPTIMIZERS,
        sharding: ZERO_AND_FSDP,
        lora: true,
        compile: Some(true),
        offload_activations: true,
        offload_state: true,
        optimizer_in_backward: false,
    },
    Caps {
        format: Format::Accelerate,
        implementation: Implementation::Hf,
        checkpointing: none_or_full,
        losses: &[LossMode::FloatCast],
        precisions: &[
            Precision::Fp32,
            Precision::Bf16Autocast,
            Precision::Fp16Autocast,
            Precision::Bf16Mixed,
        ],
        optimizers: HF_OPTIMIZERS,
        sharding: ZERO_AND_FSDP,
        lora: false,
        compile: Some(true),
        offload_activations: false,
        offload_state: true,
        optimizer_in_backward: false,
    },
    Caps {
        format: Format::DeepSpeed,
        implementation: Implementation::Hf,
        checkpointing: only_none,
        losses: &[LossMode::FloatCast],
        precisions: &[Precision::Fp32, Precision::Bf16Mixed],
        optimizers: &[Optimizer::AdamW, Optimizer::AdamWFused],
        sharding: &[Sharding::Zero1, Sharding::Zero2, Sharding::Zero3],
        lora: false,
        compile: Some(false),
        offload_activations: false,
        offload_state: true,
        optimizer_in_backward: false,
    },
    Caps {
        format: Format::Torchtune,
        implementation: Implementation::Torchtune,
        checkpointing: none_or_full,
        losses: &[LossMode::FloatCast, LossMode::Chunked],
        precisions: &[Precision::Fp32, Precision::Bf16],
        optimizers: &[
            Optimizer::AdamW,
            Optimizer::AdamWFused,
            Optimizer::AdamW8bit,
            Optimizer::PagedAdamW,
            Optimizer::PagedAdamW8bit,
            Optimizer::TorchaoAdamW8bit,
            Optimizer::TorchaoAdamW4bit,
            Optimizer::Sgd,
        ],
        sharding: &[Sharding::Fsdp2],
        lora: false,
        compile: Some(true),
        offload_activations: true,
        offload_state: false,
        optimizer_in_backward: true,
    },
    Caps {
        format: Format::Torchtitan,
        implementation: Implementation::Torchtitan,
        checkpointing: titan_ckpt,
        losses: &[LossMode::FloatCast],
        precisions: &[
            Precision::Fp32,
            Precision::Bf16Autocast,
            Precision::Bf16Mixed,
            Precision::Bf16,
        ],
        optimizers: &[
            Optimizer::AdamWFused,
            Optimizer::AdamWForeach,
            Optimizer::AdamWSingle,
        ],
        sharding: &[Sharding::Fsdp2],
        lora: false,
        compile: Some(true),
        offload_activations: false,
        offload_state: false,
        optimizer_in_backward: true,
    },
    Caps {
        format: Format::Axolotl,
        implementation: Implementation::Hf,
        checkpointing: none_or_full,
        losses: &[LossMode::FloatCast],
        precisions: &[Precision::Fp32, Precision::Bf16, Precision::Bf16Mixed],
        optimizers: HF_OPTIMIZERS,
        sharding: ZERO_AND_FSDP,
        lora: true,
        compile: Some(true),
        offload_activations: true,
        offload_state: true,
        optimizer_in_backward: false,
    },
    Caps {
        format: Format::Nanochat,
        implementation: Implementation::Nanochat,
        checkpointing: only_none,
        losses: &[LossMode::FloatCast],
        precisions: &[Precision::Bf16Autocast],
        optimizers: &[Optimizer::Muon],
        sharding: &[],
        lora: false,
        // The plan is written as `scripts.base_train`, which always compiles.
        compile: None,
        offload_activations: false,
        offload_state: false,
        optimizer_in_backward: false,
    },
];

pub fn caps(format: Format) -> Option<&'static Caps> {
    CAPS.iter().find(|c| c.format == format)
}

fn cannot(format: Format, what: impl std::fmt::Display) -> String {
    format!("the plan's {what} has no {format} setting")
}

/// Whether `format`'s launcher can run `s`; the first setting it cannot, named.
pub fn check(format: Format, s: &RunSpec) -> Result<(), String> {
    let Some(c) = caps(format) else {
        return Ok(());
    };
    let (t, h) = (&s.train, &s.hardware);
    if t.engine != vramplan_planner::Engine::Torch {
        return Err(cannot(format, format!("engine = \"{}\"", t.engine)));
    }
    if t.implementation != c.implementation {
        return Err(cannot(
            format,
            format!(
                "implementation = \"{}\" ({format} runs {} model code)",
                t.implementation, c.implementation
            ),
        ));
    }
    if !c.losses.contains(&t.loss) {
        return Err(cannot(format, format!("loss = \"{}\" (fit --allow-fused and chunked plans need a loss of the training code's own)", t.loss)));
    }
    if !(c.checkpointing)(t.checkpointing) {
        return Err(cannot(
            format,
            format!("checkpointing = \"{}\"", t.checkpointing),
        ));
    }
    if !c.precisions.contains(&t.precision) {
        let why = match (format, t.precision) {
            (Format::Axolotl, Precision::Bf16Autocast) => {
                " (axolotl loads the weights in bf16 whenever bf16 is on; bf16 there is precision = \"bf16\")"
            }
            (Format::DeepSpeed, Precision::Bf16Autocast) => {
                " (DeepSpeed's bf16 keeps bf16 weights over fp32 masters: precision = \"bf16-mixed\")"
            }
            _ => "",
        };
        return Err(cannot(
            format,
            format!("precision = \"{}\"{why}", t.precision),
        ));
    }
    if !c.optimizers.contains(&t.optimizer) {
        return Err(cannot(format, format!("optimizer = \"{}\"", t.optimizer)));
    }
    if let Some(what) = missing_switch(c, s) {
        return Err(cannot(format, what));
    }
    match c.compile {
        None if !t.compile => return Err(cannot(format, "compile = false")),
        Some(false) if t.compile => return Err(cannot(format, "compile = true")),
        _ => {}
    }
    if h.sharding != Sharding::Ddp && !c.sharding.contains(&h.sharding) {
        return Err(cannot(format, format!("sharding = \"{}\"", h.sharding)));
    }
    check_regime(format, s)
}

/// The first on/off setting of `s` the launcher `c` has no key for.
fn missing_switch(c: &Caps, s: &RunSpec) -> Option<&'static str> {
    let (t, h) = (&s.train, &s.hardware);
    let switches = [
        (s.lora.is_some(), c.lora, "[lora] section"),
        (
            t.offload_activations,
            c.offload_activations,
            "offload_activations = true",
        ),
        (
            t.optimizer_in_backward,
            c.optimizer_in_backward,
            "optimizer_in_backward = true",
        ),
        (
            h.offload_optimizer == Offload::Cpu,
            c.offload_state,
            "offload_optimizer = \"cpu\" (DeepSpeed's ZeRO-Offload: DeepSpeed, and the Trainer, accelerate and axolotl with DeepSpeed, run it)",
        ),
        (
            h.offload_params == Offload::Cpu,
            c.offload_state,
            "offload_params = \"cpu\" (DeepSpeed's parameter offload: DeepSpeed, and the Trainer, accelerate and axolotl with DeepSpeed, run it)",
        ),
    ];
    switches
        .into_iter()
        .find(|(on, can, _)| *on && !*can)
        .map(|(_, _, what)| what)
}

/// The joins: what a launcher's precision means depends on its sharding.
fn check_regime(format: Format, s: &RunSpec) -> Result<(), String> {
    let (t, h) = (&s.train, &s.hardware);
    let sharded = h.sharding != Sharding::Ddp;
    let mixed = t.precision == Precision::Bf16Mixed;
    let trainer = matches!(
        format,
        Format::HfArgs | Format::Accelerate | Format::Axolotl
    );
    // The Trainer's bf16 under DeepSpeed or FSDP2 is bf16 over fp32 masters, never autocast
    // or pure bf16; with FSDP2 accelerate reduces in bf16, DeepSpeed in fp32.
    if trainer && sharded && t.precision != Precision::Fp32 && !mixed {
        return Err(cannot(
            format,
            format!(
                "precision = \"{}\" with sharding = \"{}\" (its bf16 there is bf16-mixed)",
                t.precision, h.sharding
            ),
        ));
    }
    if mixed && !sharded && format != Format::DeepSpeed {
        return Err(cannot(
            format,
            "precision = \"bf16-mixed\" without sharding",
        ));
    }
    let want = match (format, h.sharding) {
        (Format::Torchtitan, _) => None,
        (_, Sharding::Fsdp2) => Some(ReduceDtype::Bf16),
        _ => Some(ReduceDtype::Fp32),
    };
    if mixed && want.is_some_and(|w| w != t.reduce_dtype) {
        return Err(cannot(
            format,
            format!("reduce_dtype = \"{}\" with {}", t.reduce_dtype, h.sharding),
        ));
    }
    let pure = matches!(t.precision, Precision::Fp32 | Precision::Bf16);
    if format == Format::Torchtitan && h.sharding == Sharding::Fsdp2 && !mixed && !pure {
        return Err(cannot(format, format!("precision = \"{}\" with fsdp2 (torchtitan's FSDP casts with its MixedPrecisionPolicy: bf16-mixed)", t.precision)));
    }
    if format == Format::Torchtitan && h.sharding == Sharding::Ddp && mixed {
        return Err(cannot(format, "precision = \"bf16-mixed\" without FSDP"));
    }
    if format == Format::Torchtune && h.gpus > 1 && h.sharding != Sharding::Fsdp2 {
        return Err(cannot(
            format,
            "data parallelism on several GPUs without FSDP2",
        ));
    }
    if h.gpus_per_node != h.gpus && format != Format::Torchtitan {
        return Err(cannot(
            format,
            format!("gpus_per_node = {} (hybrid sharding)", h.gpus_per_node),
        ));
    }
    Ok(())
}

/// The run `fit --emit FORMAT` searches from: the base run as that launcher runs it (its
/// model code, and what its bf16 means once sharded). Returns what was changed, in words.
pub fn adapt(format: Format, raw: &mut RawConfig) -> Vec<String> {
    let gpus = raw.hardware.gpus.unwrap_or(1);
    let mut changed = Vec::new();
    let mut put = |slot: &mut Option<String>, key: &str, value: &str| {
        if slot.as_deref() != Some(value) {
            *slot = Some(value.to_string());
            changed.push(format!("{key} {value}"));
        }
    };
    let t = &mut raw.train;
    let h = &mut raw.hardware;
    let bf16 = matches!(
        t.precision.as_deref(),
        None | Some("bf16-autocast" | "bf16" | "bf16-mixed")
    );
    let sharded = gpus > 1 && h.sharding.as_deref().is_some_and(|s| s != "ddp");
    // An optimizer left out is the launcher's default: the fused AdamW of transformers 5's
    // Trainer and of torchtitan.
    let trainer = matches!(
        format,
        Format::HfArgs | Format::Accelerate | Format::Axolotl | Format::Torchtitan
    );
    if trainer && t.optimizer.is_none() {
        put(&mut t.optimizer, "optimizer", "adamw-fused");
    }
    match format {
        Format::HfArgs | Format::Accelerate | Format::Axolotl | Format::DeepSpeed
            if sharded && bf16 =>
        {
            put(&mut t.precision, "precision", "bf16-mixed");
            let reduce = if h.sharding.as_deref() == Some("fsdp2") {
                "bf16"
            } else {
                "fp32"
            };
            put(&mut t.reduce_dtype, "reduce_dtype", reduce);
        }
        Format::Torchtune => {
            put(&mut t.implementation, "implementation", "torchtune");
            if bf16 {
                put(&mut t.precision, "precision", "bf16");
            }
            if gpus > 1 {
                put(&mut h.sharding, "sharding", "fsdp2");
            }
        }
        Format::Nanochat if t.compile != Some(true) => {
            t.compile = Some(true);
            put(&mut None, "compile", "true");
        }
        Format::Torchtitan => {
            put(&mut t.implementation, "implementation", "torchtitan");
            if gpus > 1 {
                put(&mut h.sharding, "sharding", "fsdp2");
                if bf16 {
                    put(&mut t.precision, "precision", "bf16-mixed");
                }
            }
        }
        _ => {}
    }
    changed
}

/// Whether fit's search may keep a candidate for `format`: the launcher runs it.
pub fn runs(format: Format, s: &RunSpec) -> bool {
    check(format, s).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_searches_from_the_run_as_the_launcher_runs_it() {
        let mut raw = RawConfig::default();
        raw.hardware.gpus = Some(8);
        raw.hardware.sharding = Some("fsdp2".into());
        raw.train.precision = Some("bf16-autocast".into());
        let mut acc = raw.clone();
        let changed = adapt(Format::Accelerate, &mut acc);
        assert_eq!(
            changed,
            [
                "optimizer adamw-fused",
                "precision bf16-mixed",
                "reduce_dtype bf16"
            ]
        );
        let mut tune = raw.clone();
        adapt(Format::Torchtune, &mut tune);
        assert_eq!(tune.train.implementation.as_deref(), Some("torchtune"));
        assert_eq!(tune.train.precision.as_deref(), Some("bf16"));
        let mut titan = raw.clone();
        adapt(Format::Torchtitan, &mut titan);
        assert_eq!(titan.train.implementation.as_deref(), Some("torchtitan"));
        assert_eq!(titan.train.precision.as_deref(), Some("bf16-mixed"));
        // One GPU, plain DDP: the Trainer's bf16 is autocast, nothing to change.
        let mut one = RawConfig::default();
        one.train.precision = Some("bf16-autocast".into());
        one.train.optimizer = Some("adamw".into());
        assert!(adapt(Format::HfArgs, &mut one).is_empty());
    }

    #[test]
    fn every_emitted_format_has_one_row() {
        for name in super::super::EMITTED {
            let f = Format::parse(name).unwrap();
            assert_eq!(CAPS.iter().filter(|c| c.format == f).count(), 1, "{name}");
        }
    }

    #[test]
    fn only_torchtune_has_a_chunked_loss_and_only_torchtitan_the_op_policy() {
        for c in CAPS {
            assert_eq!(
                c.losses.contains(&LossMode::Chunked),
                c.format == Format::Torchtune,
                "{}",
                c.format
            );
            assert_eq!(
                (c.checkpointing)(Checkpointing::SelectiveOp),
                c.format == Format::Torchtitan,
                "{}",
                c.format
            );
            assert!(!c.losses.contains(&LossMode::Fused), "{}", c.format);
        }
    }
}
