//! Run configs: the TOML of DESIGN.md (and the same object as JSON), parsed strictly and
//! then validated into a [`RunSpec`].
//!
//! Parsing rejects unknown keys (`deny_unknown_fields`); validation checks every value and
//! names the key and what is accepted. Omitted `[train]` and `[hardware]` keys take the
//! defaults documented in `docs/config.md`.

use crate::error::{PlanError, Result};
use crate::presets::Presets;
use crate::spec::*;
use crate::units::Bytes;
use serde::{Deserialize, Serialize};

/// The largest size accepted for any dimension: beyond it no real run exists and the
/// arithmetic could overflow.
pub const MAX_DIM: u64 = 1 << 24;
/// Upper bound on micro-batch and accumulation steps.
pub const MAX_COUNT: u64 = 1 << 20;
/// Upper bound on blocks (the timeline holds a few events per block).
pub const MAX_LAYERS: u64 = 4096;

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub model: RawModel,
    #[serde(default)]
    pub train: RawTrain,
    #[serde(default)]
    pub hardware: RawHardware,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    /// A Hugging Face `config.json`, resolved relative to the run config by the caller.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hf_config: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hidden_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_layers: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_decoder_layers: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_heads: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_kv_heads: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intermediate_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tie_embeddings: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_position_embeddings: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gated_ffn: Option<bool>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawTrain {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub micro_batch: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq_len: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_accum: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpointing: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_chunk: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine: Option<String>,
    /// Training-loop settings the memory model ignores but `vramplan train` reads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawHardware {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sharding: Option<String>,
    /// Overrides the device's capacity, in GiB (e.g. a `--memory-limit`, or host RAM for `cpu`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_gib: Option<f64>,
}

impl RawConfig {
    /// Parses TOML text. Errors carry the line number and no multi-line snippet.
    pub fn from_toml(src: &str) -> Result<RawConfig> {
        toml::from_str(src).map_err(|e| PlanError::from_toml(src, &e))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_default()
    }
}

/// Default training options; see `docs/config.md`.
pub mod defaults {
    pub const MICRO_BATCH: u64 = 1;
    pub const SEQ_LEN: u64 = 2048;
    pub const GRAD_ACCUM: u64 = 1;
    pub const PRECISION: &str = "bf16-autocast";
    pub const OPTIMIZER: &str = "adamw";
    pub const CHECKPOINTING: &str = "none";
    pub const LOSS: &str = "float-cast";
    pub const LOSS_CHUNK: u64 = 1024;
    pub const ATTENTION: &str = "sdpa";
    pub const ENGINE: &str = "torch";
    pub const GPU: &str = "cpu";
    pub const SHARDING: &str = "ddp";
    /// Host memory assumed for `gpu = "cpu"` when neither the caller nor the config says.
    pub const CPU_MEMORY_GIB: f64 = 64.0;
}

fn positive(key: &str, v: Option<u64>, default: Option<u64>, max: u64) -> Result<u64> {
    match v.or(default) {
        None => Err(PlanError::Missing {
            key: key.to_string(),
            accepted: format!("a whole number from 1 to {max}"),
        }),
        Some(0) => Err(PlanError::invalid(
            key,
            0,
            format!("a whole number from 1 to {max}"),
        )),
        Some(n) if n > max => Err(PlanError::invalid(
            key,
            n,
            format!("a whole number from 1 to {max}"),
        )),
        Some(n) => Ok(n),
    }
}

/// What the caller resolved outside the planner (files and devices are I/O).
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// The model from `hf_config`, already read and parsed by the caller.
    pub hf_model: Option<ModelSpec>,
    /// Host memory, for `gpu = "cpu"` without `memory_gib`.
    pub host_memory: Option<Bytes>,
    /// The device NVML found, for `gpu = "auto"`.
    pub detected_gpu: Option<GpuSpec>,
}

impl RawModel {
    pub fn resolve(&self, presets: &Presets, ctx: &Context) -> Result<ModelSpec> {
        let sources = [
            self.preset.is_some(),
            self.hf_config.is_some(),
            self.arch.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() > 1 {
            return Err(PlanError::invalid(
                "model",
                "several sources",
                "give one of preset, hf_config, or arch with its sizes",
            ));
        }
        let base = if let Some(p) = &self.preset {
            Some(presets.model(p)?.clone())
        } else if self.hf_config.is_some() {
            Some(ctx.hf_model.clone().ok_or_else(|| PlanError::Missing {
                key: "model.hf_config".into(),
                accepted: "a readable Hugging Face config.json".into(),
            })?)
        } else {
            None
        };
        let arch = match (&self.arch, &base) {
            (Some(a), _) => Arch::parse("model.arch", a)?,
            (None, Some(b)) => b.arch,
            (None, None) => {
                return Err(PlanError::Missing {
                    key: "model".into(),
                    accepted: "preset = \"NAME\" (see `vramplan models`), hf_config = \"config.json\", or arch = \"llama\" with its sizes".into(),
                })
            }
        };
        let pick = |key: &str, v: Option<u64>, b: Option<u64>| -> Result<u64> {
            positive(&format!("model.{key}"), v, b, MAX_DIM)
        };
        let hidden = pick(
            "hidden_size",
            self.hidden_size,
            base.as_ref().map(|b| b.hidden_size),
        )?;
        let layers = pick(
            "num_layers",
            self.num_layers,
            base.as_ref().map(|b| b.num_layers),
        )?;
        let heads = pick(
            "num_heads",
            self.num_heads,
            base.as_ref().map(|b| b.num_heads),
        )?;
        let kv = pick(
            "num_kv_heads",
            self.num_kv_heads,
            base.as_ref().map(|b| b.num_kv_heads).or(Some(heads)),
        )?;
        if heads % kv != 0 {
            return Err(PlanError::invalid(
                "model.num_kv_heads",
                kv,
                format!("a divisor of num_heads = {heads}"),
            ));
        }
        let default_head_dim =
            if base.is_some() && self.hidden_size.is_none() && self.num_heads.is_none() {
                base.as_ref().map(|b| b.head_dim)
            } else if hidden % heads == 0 {
                Some(hidden / heads)
            } else {
                None
            };
        let head_dim = pick("head_dim", self.head_dim, default_head_dim)?;
        let default_ffn = match arch {
            Arch::Gpt2 | Arch::Nanochat | Arch::T5 => Some(hidden.saturating_mul(4)),
            _ => None,
        };
        let inter = pick(
            "intermediate_size",
            self.intermediate_size,
            base.as_ref().map(|b| b.intermediate_size).or(default_ffn),
        )?;
        let vocab = pick(
            "vocab_size",
            self.vocab_size,
            base.as_ref().map(|b| b.vocab_size),
        )?;
        let tie = self
            .tie_embeddings
            .or(base.as_ref().map(|b| b.tie_embeddings))
            .unwrap_or(!matches!(arch, Arch::Nanochat));
        let decoder_layers = match arch {
            Arch::T5 => positive(
                "model.num_decoder_layers",
                self.num_decoder_layers,
                base.as_ref().map(|b| b.num_decoder_layers).or(Some(layers)),
                MAX_LAYERS,
            )?,
            _ => 0,
        };
        let max_positions = match arch {
            Arch::Gpt2 => pick(
                "max_position_embeddings",
                self.max_position_embeddings,
                base.as_ref().map(|b| b.max_positions).or(Some(1024)),
            )?,
            _ => 0,
        };
        let name = self
            .name
            .clone()
            .or(self.preset.clone())
            .or(base.as_ref().map(|b| b.name.clone()))
            .unwrap_or_else(|| format!("{arch}-h{hidden}-l{layers}"));
        Ok(ModelSpec {
            name,
            arch,
            hidden_size: hidden,
            num_layers: layers,
            num_decoder_layers: decoder_layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim,
            intermediate_size: inter,
            vocab_size: vocab,
            tie_embeddings: tie,
            max_positions,
            gated_ffn: self
                .gated_ffn
                .or(base.as_ref().map(|b| b.gated_ffn))
                .unwrap_or(false),
        })
    }
}

impl RawConfig {
    /// Validates everything and resolves presets. The caller has done any file or device I/O.
    pub fn resolve(&self, presets: &Presets, ctx: &Context) -> Result<RunSpec> {
        let model = self.model.resolve(presets, ctx)?;
        let t = &self.train;
        let seq_default = match model.arch {
            Arch::Gpt2 => model.max_positions.min(defaults::SEQ_LEN),
            _ => defaults::SEQ_LEN,
        };
        let seq_len = positive("train.seq_len", t.seq_len, Some(seq_default), MAX_DIM)?;
        if model.arch == Arch::Gpt2 && seq_len > model.max_positions {
            return Err(PlanError::invalid(
                "train.seq_len",
                seq_len,
                format!(
                    "at most max_position_embeddings = {} for gpt2",
                    model.max_positions
                ),
            ));
        }
        let optimizer_default = if model.arch == Arch::Nanochat {
            "muon"
        } else {
            defaults::OPTIMIZER
        };
        let optimizer = Optimizer::parse(
            "train.optimizer",
            t.optimizer.as_deref().unwrap_or(optimizer_default),
        )?;
        let train = TrainSpec {
            micro_batch: positive(
                "train.micro_batch",
                t.micro_batch,
                Some(defaults::MICRO_BATCH),
                MAX_COUNT,
            )?,
            seq_len,
            grad_accum: positive(
                "train.grad_accum",
                t.grad_accum,
                Some(defaults::GRAD_ACCUM),
                MAX_COUNT,
            )?,
            precision: Precision::parse(
                "train.precision",
                t.precision.as_deref().unwrap_or(defaults::PRECISION),
            )?,
            optimizer,
            checkpointing: Checkpointing::parse(
                "train.checkpointing",
                t.checkpointing
                    .as_deref()
                    .unwrap_or(defaults::CHECKPOINTING),
            )?,
            loss: LossMode::parse("train.loss", t.loss.as_deref().unwrap_or(defaults::LOSS))?,
            loss_chunk: positive(
                "train.loss_chunk",
                t.loss_chunk,
                Some(defaults::LOSS_CHUNK),
                MAX_DIM,
            )?,
            attention: Attention::parse(
                "train.attention",
                t.attention.as_deref().unwrap_or(defaults::ATTENTION),
            )?,
            engine: Engine::parse(
                "train.engine",
                t.engine.as_deref().unwrap_or(defaults::ENGINE),
            )?,
        };
        if train.optimizer == Optimizer::Muon && model.arch == Arch::T5 {
            return Err(PlanError::invalid(
                "train.optimizer",
                "\"muon\"",
                "adamw | adamw-8bit | sgd | adafactor for t5",
            ));
        }
        if train.engine == Engine::Candle && !matches!(model.arch, Arch::Llama | Arch::Nanochat) {
            return Err(PlanError::invalid(
                "train.engine",
                "\"candle\"",
                format!(
                    "torch for arch {}; the candle engine trains llama and nanochat",
                    model.arch
                ),
            ));
        }
        let h = &self.hardware;
        let gpu_name = h.gpu.as_deref().unwrap_or(defaults::GPU);
        let memory_override = match h.memory_gib {
            Some(g) if !(g.is_finite() && g > 0.0 && g < 1.0e6) => {
                return Err(PlanError::invalid(
                    "hardware.memory_gib",
                    g,
                    "a positive number of GiB",
                ))
            }
            Some(g) => Some(Bytes((g * crate::units::GIB as f64) as u64)),
            None => None,
        };
        let device = match gpu_name {
            "cpu" => Device::Cpu {
                capacity: memory_override.or(ctx.host_memory).unwrap_or(Bytes(
                    (defaults::CPU_MEMORY_GIB * crate::units::GIB as f64) as u64,
                )),
            },
            "auto" => {
                let mut g = ctx.detected_gpu.clone().ok_or_else(|| {
                    PlanError::invalid(
                        "hardware.gpu",
                        "\"auto\"",
                        "a GPU visible through NVML; none was found: name a preset (see `vramplan gpus`) or \"cpu\"",
                    )
                })?;
                if let Some(m) = memory_override {
                    g.capacity = m;
                }
                Device::Gpu(g)
            }
            name => {
                let mut g = presets.gpu(name)?.clone();
                if let Some(m) = memory_override {
                    g.capacity = m;
                }
                Device::Gpu(g)
            }
        };
        let gpus = positive("hardware.gpus", h.gpus, Some(1), 1024)?;
        let sharding = Sharding::parse(
            "hardware.sharding",
            h.sharding.as_deref().unwrap_or(defaults::SHARDING),
        )?;
        if !device.is_cuda() && gpus > 1 {
            return Err(PlanError::invalid(
                "hardware.gpus",
                gpus,
                "1 with gpu = \"cpu\"",
            ));
        }
        Ok(RunSpec {
            model,
            train,
            hardware: HardwareSpec {
                device,
                gpus,
                sharding,
            },
        })
    }
}

/// Builds the raw config that reproduces a resolved run (for `fit --out` and `diagnose --out`).
pub fn raw_from_spec(spec: &RunSpec, model: &RawModel) -> RawConfig {
    let t = &spec.train;
    let gpu = match &spec.hardware.device {
        // A detected GPU is written as "auto" so the plan resolves the same way again.
        Device::Gpu(g) if g.name.starts_with("auto:") => "auto".to_string(),
        Device::Gpu(g) => g.name.clone(),
        Device::Cpu { .. } => "cpu".to_string(),
    };
    RawConfig {
        model: model.clone(),
        train: RawTrain {
            micro_batch: Some(t.micro_batch),
            seq_len: Some(t.seq_len),
            grad_accum: Some(t.grad_accum),
            precision: Some(t.precision.name().into()),
            optimizer: Some(t.optimizer.name().into()),
            checkpointing: Some(t.checkpointing.name().into()),
            loss: Some(t.loss.name().into()),
            loss_chunk: (t.loss == LossMode::Chunked).then_some(t.loss_chunk),
            attention: Some(t.attention.name().into()),
            engine: Some(t.engine.name().into()),
            steps: None,
            learning_rate: None,
        },
        hardware: RawHardware {
            gpu: Some(gpu),
            gpus: Some(spec.hardware.gpus),
            sharding: Some(spec.hardware.sharding.name().into()),
            memory_gib: None,
        },
    }
}
