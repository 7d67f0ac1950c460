//! Run configs: the TOML of DESIGN.md (and the same object as JSON), parsed strictly and
//! then validated into a [`RunSpec`].
//!
//! Parsing rejects unknown keys (`deny_unknown_fields`); validation checks every value and
//! names the key and what is accepted. Omitted `[train]` and `[hardware]` keys take the
//! defaults documented in `docs/config.md`.

use crate::error::{quote, PlanError, Result};
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
    /// LoRA / QLoRA over a frozen base; absent for full fine-tuning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<crate::lora::RawLora>,
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
    /// Attention window in tokens; 0 or absent: global attention.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<u64>,
    /// With a window, every n-th layer attends globally (0: none does).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub global_every: Option<u64>,
    /// MoE: routed experts per block, experts per token, each expert's width.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_experts: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub experts_per_token: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expert_intermediate_size: Option<u64>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub implementation: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compile: Option<bool>,
    pub offload_activations: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimizer_in_backward: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reduce_dtype: Option<String>,
    /// nanochat's `wte` dtype; by default bf16 on a CUDA GPU under bf16 autocast (its
    /// `init_weights`), fp32 otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub embedding_dtype: Option<String>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reshard_after_forward: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpus_per_node: Option<u64>,
    /// Overrides the device's capacity, in GiB (e.g. a `--memory-limit`, or host RAM for `cpu`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_gib: Option<f64>,
    /// The machine's RAM in GiB, which `estimate` checks the training processes' host
    /// memory against (its own reading of the machine when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_ram_gib: Option<f64>,
    /// With `gpu = "cpu"`: the matmul kernels the candle engine runs, "avx512" or "avx2"
    /// (the machine's, as the binary reads it, when absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_kernels: Option<String>,
    /// DeepSpeed's `offload_optimizer.device`: "none" or "cpu" (ZeRO stage 1–3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offload_optimizer: Option<String>,
    /// DeepSpeed's `offload_param.device`: "none" or "cpu" (ZeRO-3).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offload_params: Option<String>,
    /// DeepSpeed ZeRO's `reduce_bucket_size`, in elements.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reduce_bucket_size: Option<u64>,
    /// DeepSpeed ZeRO's `allgather_bucket_size`, in elements.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allgather_bucket_size: Option<u64>,
    /// DeepSpeed ZeRO-3's `stage3_prefetch_bucket_size`, in elements.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage3_prefetch_bucket_size: Option<u64>,
    /// DeepSpeed ZeRO-3's `stage3_max_live_parameters`, in elements.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage3_max_live_parameters: Option<u64>,
    /// DeepSpeed ZeRO-3's `stage3_param_persistence_threshold`, in elements.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage3_param_persistence_threshold: Option<u64>,
    /// DeepSpeed ZeRO-3's `stage3_max_reuse_distance`, in elements.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage3_max_reuse_distance: Option<u64>,
}

impl RawConfig {
    /// Parses TOML text. Errors carry the line number and no multi-line snippet.
    pub fn from_toml(src: &str) -> Result<RawConfig> {
        toml::from_str(src).map_err(|e| PlanError::from_toml(src, &e))
    }

    /// The config as TOML. A failure is returned, never an empty plan written in its place;
    /// so is a text that would not read back as this config (TOML integers are signed, so
    /// a `u64` past `i64::MAX` is written but refused on reading).
    pub fn to_toml(&self) -> Result<String> {
        let failed = |why: String| PlanError::Syntax {
            line: String::new(),
            message: format!("cannot write the plan as TOML: {why}"),
        };
        let text = toml::to_string(self).map_err(|e| failed(e.to_string()))?;
        match RawConfig::from_toml(&text) {
            Ok(back) if back == *self => Ok(text),
            Ok(_) => Err(failed("it would not read back the same".into())),
            Err(e) => Err(failed(format!("it would not read back ({e})"))),
        }
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
    pub const COMPILE: bool = false;

    /// nanochat's model is its own code; every other architecture runs transformers'.
    pub fn implementation(arch: crate::spec::Arch) -> &'static str {
        match arch {
            crate::spec::Arch::Nanochat => "nanochat",
            _ => "hf",
        }
    }
    pub const GPU: &str = "cpu";
    pub const SHARDING: &str = "ddp";
    pub const OFFLOAD: &str = "none";
    pub const REDUCE_DTYPE: &str = "fp32";
    /// Host memory assumed for `gpu = "cpu"` when neither the caller nor the config says.
    pub const CPU_MEMORY_GIB: f64 = 64.0;
    /// The CPU kernels assumed when neither the caller nor the config says: the default
    /// build's on a CPU with avx512f.
    pub const CPU_KERNELS: &str = "avx512";
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

/// A model size: the value given, else the default, from 1 to [`MAX_DIM`].
fn dim(key: &str, v: Option<u64>, default: Option<u64>) -> Result<u64> {
    positive(&format!("model.{key}"), v, default, MAX_DIM)
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
    /// The CPU matmul kernels this machine's engine runs, for `gpu = "cpu"` without
    /// `cpu_kernels`.
    pub cpu_kernels: Option<CpuKernels>,
}

/// Where named GPUs and models come from. `Presets` implements it; the config layer only
/// asks by name, so data flows one way: presets are built from configs, never the reverse.
pub trait PresetSource {
    fn model(&self, name: &str) -> Result<&ModelSpec>;
    fn gpu(&self, name: &str) -> Result<&GpuSpec>;
}

impl RawModel {
    /// Validates the model section over `base`, the model it starts from (a preset or a
    /// config.json, already resolved): keys given here replace the base's.
    pub fn resolve(&self, base: Option<&ModelSpec>) -> Result<ModelSpec> {
        let b = |f: fn(&ModelSpec) -> u64| base.map(f);
        let arch = match (&self.arch, base) {
            (Some(a), _) => Arch::parse("model.arch", a)?,
            (None, Some(b)) => b.arch,
            (None, None) => {
                return Err(PlanError::Missing {
                    key: "model".into(),
                    accepted: "preset = \"NAME\" (see `vramplan models`), hf_config = \"config.json\", or arch = \"llama\" with its sizes".into(),
                })
            }
        };
        let hidden = dim("hidden_size", self.hidden_size, b(|m| m.hidden_size))?;
        // Each block is a few timeline events and inventory entries: bounded like T5's decoder.
        let layers = positive(
            "model.num_layers",
            self.num_layers,
            b(|m| m.num_layers),
            MAX_LAYERS,
        )?;
        let (heads, kv, head_dim) = self.attention_shape(base, hidden)?;
        let default_ffn = matches!(arch, Arch::Gpt2 | Arch::Nanochat | Arch::T5)
            .then(|| hidden.saturating_mul(4));
        let inter = dim(
            "intermediate_size",
            self.intermediate_size,
            b(|m| m.intermediate_size).or(default_ffn),
        )?;
        let vocab = dim("vocab_size", self.vocab_size, b(|m| m.vocab_size))?;
        let num_decoder_layers = match arch {
            Arch::T5 => positive(
                "model.num_decoder_layers",
                self.num_decoder_layers,
                b(|m| m.num_decoder_layers).or(Some(layers)),
                MAX_LAYERS,
            )?,
            _ => 0,
        };
        let max_positions = match arch {
            Arch::Gpt2 => dim(
                "max_position_embeddings",
                self.max_position_embeddings,
                b(|m| m.max_positions).or(Some(1024)),
            )?,
            _ => 0,
        };
        let name = self
            .name
            .clone()
            .or(self.preset.clone())
            .or(base.map(|m| m.name.clone()))
            .unwrap_or_else(|| format!("{arch}-h{hidden}-l{layers}"));
        Ok(ModelSpec {
            name,
            arch,
            hidden_size: hidden,
            num_layers: layers,
            num_decoder_layers,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim,
            intermediate_size: inter,
            vocab_size: vocab,
            tie_embeddings: self
                .tie_embeddings
                .or(base.map(|m| m.tie_embeddings))
                .unwrap_or(!matches!(arch, Arch::Nanochat)),
            max_positions,
            gated_ffn: self
                .gated_ffn
                .or(base.map(|m| m.gated_ffn))
                .unwrap_or(false),
            features: self.features(arch, base, inter)?,
        })
    }

    /// Sliding window and experts over `base`'s; the MoE families need their experts.
    fn features(&self, arch: Arch, base: Option<&ModelSpec>, inter: u64) -> Result<ArchFeatures> {
        let b = base.map(|m| m.features.clone()).unwrap_or_default();
        let window = self.sliding_window.unwrap_or(b.sliding_window);
        if window > MAX_DIM {
            return Err(PlanError::invalid(
                "model.sliding_window",
                window,
                format!("0 (global attention) or a window from 1 to {MAX_DIM} tokens"),
            ));
        }
        let global_every = self.global_every.unwrap_or(b.global_every);
        if global_every > MAX_LAYERS {
            return Err(PlanError::invalid(
                "model.global_every",
                global_every,
                format!("0 (every layer windowed) or a period from 1 to {MAX_LAYERS}"),
            ));
        }
        if !matches!(arch, Arch::Mixtral | Arch::Qwen3Moe) {
            return Ok(ArchFeatures {
                sliding_window: window,
                global_every,
                ..ArchFeatures::default()
            });
        }
        let experts = positive(
            "model.num_experts",
            self.num_experts,
            Some(b.experts).filter(|e| *e > 0),
            MAX_LAYERS,
        )?;
        let k = positive(
            "model.experts_per_token",
            self.experts_per_token,
            Some(b.experts_per_token).filter(|e| *e > 0),
            experts,
        )?;
        let width = dim(
            "expert_intermediate_size",
            self.expert_intermediate_size,
            Some(b.expert_intermediate)
                .filter(|e| *e > 0)
                .or(Some(inter)),
        )?;
        Ok(ArchFeatures {
            sliding_window: window,
            global_every,
            experts,
            experts_per_token: k,
            expert_intermediate: width,
        })
    }

    /// Query heads, key/value heads and head width, over `base` where given.
    fn attention_shape(&self, base: Option<&ModelSpec>, hidden: u64) -> Result<(u64, u64, u64)> {
        let b = |f: fn(&ModelSpec) -> u64| base.map(f);
        let heads = dim("num_heads", self.num_heads, b(|m| m.num_heads))?;
        let kv = dim(
            "num_kv_heads",
            self.num_kv_heads,
            b(|m| m.num_kv_heads).or(Some(heads)),
        )?;
        if heads % kv != 0 {
            return Err(PlanError::invalid(
                "model.num_kv_heads",
                kv,
                format!("a divisor of num_heads = {heads}"),
            ));
        }
        // A base's head_dim stands only while the sizes it was derived from do.
        let default_head_dim = match base {
            Some(m) if self.hidden_size.is_none() && self.num_heads.is_none() => Some(m.head_dim),
            _ => hidden.is_multiple_of(heads).then(|| hidden / heads),
        };
        let head_dim = dim("head_dim", self.head_dim, default_head_dim)?;
        Ok((heads, kv, head_dim))
    }

    /// The model this section starts from: the named preset or the caller's config.json.
    fn base<'a>(
        &self,
        presets: &'a impl PresetSource,
        ctx: &'a Context,
    ) -> Result<Option<&'a ModelSpec>> {
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
        if let Some(p) = &self.preset {
            return presets.model(p).map(Some);
        }
        if self.hf_config.is_some() {
            return ctx
                .hf_model
                .as_ref()
                .map(Some)
                .ok_or_else(|| PlanError::Missing {
                    key: "model.hf_config".into(),
                    accepted: "a readable Hugging Face config.json".into(),
                });
        }
        Ok(None)
    }
}

/// A choice's key, with its default where the config leaves it out.
fn choice<C: Choice>(key: &str, v: &Option<String>, default: &str) -> Result<C> {
    C::parse(key, v.as_deref().unwrap_or(default))
}

impl RawTrain {
    /// Validates the train section; `model` picks the defaults that depend on it
    /// (GPT-2's position table caps the sequence, nanochat trains with Muon).
    pub fn resolve(&self, model: &ModelSpec) -> Result<TrainSpec> {
        let seq_default = match model.arch {
            Arch::Gpt2 => model.max_positions.min(defaults::SEQ_LEN),
            _ => defaults::SEQ_LEN,
        };
        let optimizer_default = match model.arch {
            Arch::Nanochat => "muon",
            _ => defaults::OPTIMIZER,
        };
        let count = |key: &str, v: Option<u64>, d: u64| positive(key, v, Some(d), MAX_COUNT);
        Ok(TrainSpec {
            micro_batch: count("train.micro_batch", self.micro_batch, defaults::MICRO_BATCH)?,
            seq_len: positive("train.seq_len", self.seq_len, Some(seq_default), MAX_DIM)?,
            grad_accum: count("train.grad_accum", self.grad_accum, defaults::GRAD_ACCUM)?,
            precision: choice("train.precision", &self.precision, defaults::PRECISION)?,
            optimizer: choice("train.optimizer", &self.optimizer, optimizer_default)?,
            checkpointing: choice(
                "train.checkpointing",
                &self.checkpointing,
                defaults::CHECKPOINTING,
            )?,
            loss: choice("train.loss", &self.loss, defaults::LOSS)?,
            loss_chunk: positive(
                "train.loss_chunk",
                self.loss_chunk,
                Some(defaults::LOSS_CHUNK),
                MAX_DIM,
            )?,
            attention: choice("train.attention", &self.attention, defaults::ATTENTION)?,
            engine: choice("train.engine", &self.engine, defaults::ENGINE)?,
            implementation: choice(
                "train.implementation",
                &self.implementation,
                defaults::implementation(model.arch),
            )?,
            compile: self.compile.unwrap_or(defaults::COMPILE),
            offload_activations: self.offload_activations.unwrap_or(false),
            optimizer_in_backward: self.optimizer_in_backward.unwrap_or(false),
            reduce_dtype: choice(
                "train.reduce_dtype",
                &self.reduce_dtype,
                defaults::REDUCE_DTYPE,
            )?,
            embedding_dtype: self
                .embedding_dtype
                .as_deref()
                .map(|v| EmbeddingDtype::parse("train.embedding_dtype", v))
                .transpose()?,
        })
    }
}

/// nanochat's `wte` dtype for the device: what the config names, else bf16 where
/// `init_weights` casts it (a CUDA GPU; under bf16 autocast, the only precision nanochat's
/// `base_train` runs), else fp32. Other implementations have none.
fn embedding_dtype(t: &TrainSpec, h: &HardwareSpec) -> Option<EmbeddingDtype> {
    if t.implementation != Implementation::Nanochat || t.engine != Engine::Torch {
        return t.embedding_dtype;
    }
    let cast = h.device.is_cuda() && t.precision == Precision::Bf16Autocast;
    Some(t.embedding_dtype.unwrap_or(if cast {
        EmbeddingDtype::Bf16
    } else {
        EmbeddingDtype::Fp32
    }))
}

/// Upper bound on GPUs in one run.
pub const MAX_GPUS: u64 = 1024;

impl RawHardware {
    /// `host_ram_gib`, validated.
    pub fn host_ram(&self) -> Result<Option<Bytes>> {
        self.host_ram_gib
            .map(|g| crate::host::host_ram("hardware.host_ram_gib", g))
            .transpose()
    }

    /// Validates the hardware section: the device by name (a preset, `auto` from the
    /// caller's NVML reading, or `cpu`), with `memory_gib` over its capacity.
    pub fn resolve(&self, presets: &impl PresetSource, ctx: &Context) -> Result<HardwareSpec> {
        let memory_override = match self.memory_gib {
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
        let gpu = |mut g: GpuSpec| {
            if let Some(m) = memory_override {
                g.capacity = m;
            }
            Device::Gpu(g)
        };
        let device = match self.gpu.as_deref().unwrap_or(defaults::GPU) {
            "cpu" => Device::Cpu {
                capacity: memory_override.or(ctx.host_memory).unwrap_or(Bytes(
                    (defaults::CPU_MEMORY_GIB * crate::units::GIB as f64) as u64,
                )),
                kernels: match (&self.cpu_kernels, ctx.cpu_kernels) {
                    (None, Some(k)) => k,
                    (given, _) => choice("hardware.cpu_kernels", given, defaults::CPU_KERNELS)?,
                },
            },
            _ if self.cpu_kernels.is_some() => {
                return Err(PlanError::invalid(
                    "hardware.cpu_kernels",
                    quote(self.cpu_kernels.as_deref().unwrap_or_default()),
                    "no value with a GPU: the key applies to gpu = \"cpu\" only",
                ))
            }
            "auto" => gpu(ctx.detected_gpu.clone().ok_or_else(|| {
                PlanError::invalid(
                    "hardware.gpu",
                    "\"auto\"",
                    "a GPU visible through NVML; none was found: name a preset (see `vramplan gpus`) or \"cpu\"",
                )
            })?),
            name => gpu(presets.gpu(name)?.clone()),
        };
        let gpus = positive("hardware.gpus", self.gpus, Some(1), MAX_GPUS)?;
        self.host_ram()?;
        Ok(HardwareSpec {
            device,
            gpus,
            sharding: choice("hardware.sharding", &self.sharding, defaults::SHARDING)?,
            reshard_after_forward: self.reshard_after_forward.unwrap_or(true),
            gpus_per_node: positive(
                "hardware.gpus_per_node",
                self.gpus_per_node,
                Some(gpus),
                MAX_GPUS,
            )?,
            offload_optimizer: choice(
                "hardware.offload_optimizer",
                &self.offload_optimizer,
                defaults::OFFLOAD,
            )?,
            offload_params: choice(
                "hardware.offload_params",
                &self.offload_params,
                defaults::OFFLOAD,
            )?,
            zero: self.zero_buckets()?,
        })
    }

    /// DeepSpeed's bucket keys over its defaults; the sizes it accepts (0.19.6
    /// `runtime/zero/config.py` L113, L132, L215, L221, L238, L244: the reduce bucket
    /// above 0, the others 0 or more), at most [`MAX_BUCKET`] elements; the all-gather
    /// bucket even (`stage_1_and_2.py` L351–353 asserts a multiple of 2).
    fn zero_buckets(&self) -> Result<crate::spec::ZeroBuckets> {
        let d = crate::spec::ZeroBuckets::default();
        let size = |key: &str, v: Option<u64>, default: u64, min: u64| match v {
            None => Ok(default),
            Some(n) if (min..=MAX_BUCKET).contains(&n) => Ok(n),
            Some(n) => Err(PlanError::invalid(
                key,
                n,
                format!("a whole number of elements from {min} to {MAX_BUCKET}"),
            )),
        };
        if let Some(n) = self.allgather_bucket_size.filter(|n| n % 2 == 1) {
            return Err(PlanError::invalid(
                "hardware.allgather_bucket_size",
                n,
                "an even number of elements (DeepSpeed asserts a multiple of 2)",
            ));
        }
        Ok(crate::spec::ZeroBuckets {
            reduce_bucket_size: size(
                "hardware.reduce_bucket_size",
                self.reduce_bucket_size,
                d.reduce_bucket_size,
                1,
            )?,
            allgather_bucket_size: size(
                "hardware.allgather_bucket_size",
                self.allgather_bucket_size,
                d.allgather_bucket_size,
                0,
            )?,
            prefetch_bucket_size: size(
                "hardware.stage3_prefetch_bucket_size",
                self.stage3_prefetch_bucket_size,
                d.prefetch_bucket_size,
                0,
            )?,
            max_live_parameters: size(
                "hardware.stage3_max_live_parameters",
                self.stage3_max_live_parameters,
                d.max_live_parameters,
                0,
            )?,
            param_persistence_threshold: size(
                "hardware.stage3_param_persistence_threshold",
                self.stage3_param_persistence_threshold,
                d.param_persistence_threshold,
                0,
            )?,
            max_reuse_distance: size(
                "hardware.stage3_max_reuse_distance",
                self.stage3_max_reuse_distance,
                d.max_reuse_distance,
                0,
            )?,
        })
    }
}

/// nanochat's `wte` cast: its implementation only, and not under fp32 linears.
fn check_embedding_dtype(t: &TrainSpec) -> Result<()> {
    let Some(e) = t.embedding_dtype else {
        return Ok(());
    };
    if t.implementation != Implementation::Nanochat || t.engine != Engine::Torch {
        return Err(PlanError::invalid(
            "train.embedding_dtype",
            quote(e.name()),
            "only for implementation = \"nanochat\" on the torch engine (its wte cast); leave it out",
        ));
    }
    if e == EmbeddingDtype::Bf16 && t.precision == Precision::Fp32 {
        return Err(PlanError::invalid(
            "train.embedding_dtype",
            quote(e.name()),
            "fp32 with precision = \"fp32\" (a bf16 embedding feeds fp32 linears)",
        ));
    }
    Ok(())
}

/// The largest DeepSpeed bucket size accepted, in elements.
pub const MAX_BUCKET: u64 = 1 << 40;

/// The rules that join sections: what one section allows depends on another.
pub fn check_run(spec: &RunSpec) -> Result<()> {
    let (m, t, h) = (&spec.model, &spec.train, &spec.hardware);
    if m.arch == Arch::Gpt2 && t.seq_len > m.max_positions {
        return Err(PlanError::invalid(
            "train.seq_len",
            t.seq_len,
            format!(
                "at most max_position_embeddings = {} for gpt2",
                m.max_positions
            ),
        ));
    }
    if t.optimizer == Optimizer::Muon && m.arch == Arch::T5 {
        return Err(PlanError::invalid(
            "train.optimizer",
            "\"muon\"",
            "adamw | adamw-8bit | sgd | adafactor for t5",
        ));
    }
    check_embedding_dtype(t)?;
    if t.engine == Engine::Candle {
        check_candle(spec)?;
    }
    crate::torch::check_implementation(m, t)?;
    if let (Some(l), Engine::Candle) = (&spec.lora, t.engine) {
        crate::candle_engine::check_lora(m, l)?;
    }
    if spec.lora.is_some() && t.compile {
        return Err(PlanError::invalid(
            "train.compile",
            "true",
            "false with a [lora] section: what the compiled graph keeps under LoRA is not modelled",
        ));
    }
    // On the CPU, gpus = N means N processes on one host (gloo), each estimated alone;
    // FSDP2 and DeepSpeed ZeRO have been measured that way (tests/data/torch_fsdp.json,
    // tests/data/deepspeed_zero_cpu.json), DDP has not.
    if !h.device.is_cuda() && h.gpus > 1 && h.sharding == Sharding::Ddp {
        return Err(PlanError::invalid(
            "hardware.gpus",
            h.gpus,
            "1 with gpu = \"cpu\" unless sharding = \"fsdp2\" | \"zero1\" | \"zero2\" | \"zero3\" (N processes over gloo)",
        ));
    }
    check_offload(spec)?;
    // On one GPU there is nothing to shard over: the planner would model plain DDP while
    // the config says ZeRO, so the config is refused rather than silently reinterpreted.
    // DeepSpeed's offload runs its ZeRO optimizer on one GPU too (ZeRO-Offload's case).
    if h.sharding != Sharding::Ddp && h.gpus == 1 && !h.offloads() {
        return Err(PlanError::invalid(
            "hardware.sharding",
            quote(h.sharding.name()),
            "ddp with gpus = 1: ZeRO shards model state over several GPUs; set gpus above 1 or use ddp",
        ));
    }
    crate::torch::check_regime(spec)
}

/// What the candle engine runs (`src/engine`): its architectures, T5 with its tied head
/// and without LoRA, one attention window for all layers.
fn check_candle(spec: &RunSpec) -> Result<()> {
    let m = &spec.model;
    let candle_arch = matches!(
        m.arch,
        Arch::Llama | Arch::Qwen2 | Arch::Qwen3 | Arch::Nanochat | Arch::T5
    );
    if !candle_arch {
        return Err(PlanError::invalid(
            "train.engine",
            "\"candle\"",
            format!(
                "torch for arch {}; the candle engine trains llama, qwen2, qwen3, nanochat and t5",
                m.arch
            ),
        ));
    }
    // The engine's T5 (src/engine/t5.rs) ties its head to the shared embedding and has no LoRA.
    if m.arch == Arch::T5 && !m.tie_embeddings {
        return Err(PlanError::invalid(
            "model.tie_embeddings",
            "false",
            "true for arch t5 on the candle engine (its head is the shared embedding, as ChatLM-mini-Chinese's)",
        ));
    }
    if m.arch == Arch::T5 && spec.lora.is_some() {
        return Err(PlanError::invalid(
            "train.engine",
            "\"candle\"",
            "torch for arch t5 with a [lora] section; the candle engine's LoRA takes llama, qwen2 and qwen3",
        ));
    }
    // The engine's attention has one mask for all layers: a window on every layer or none.
    if m.features.sliding_window > 0 && m.features.global_every > 0 {
        return Err(PlanError::invalid(
            "model.global_every",
            m.features.global_every,
            "0 on the candle engine: it windows every layer or none",
        ));
    }
    Ok(())
}

/// DeepSpeed's offload: the optimizer with ZeRO stage 1–3, the parameters with ZeRO-3,
/// both from a GPU, with DeepSpeedCPUAdam (an AdamW), in DeepSpeed's fp32 or bf16 mode,
/// on the torch engine, without LoRA (whose offload is not modelled).
fn check_offload(spec: &RunSpec) -> Result<()> {
    let (t, h) = (&spec.train, &spec.hardware);
    let refuse = |key: &str, why: &str| Err(PlanError::invalid(key, "\"cpu\"", why));
    for (on, key) in [
        (
            h.offload_optimizer == Offload::Cpu,
            "hardware.offload_optimizer",
        ),
        (h.offload_params == Offload::Cpu, "hardware.offload_params"),
    ] {
        if !on {
            continue;
        }
        let need = if key.ends_with("params") {
            (h.sharding == Sharding::Zero3, "sharding = \"zero3\"")
        } else {
            (
                matches!(
                    h.sharding,
                    Sharding::Zero1 | Sharding::Zero2 | Sharding::Zero3
                ),
                "sharding = \"zero1\" | \"zero2\" | \"zero3\"",
            )
        };
        if !need.0 {
            return refuse(
                key,
                &format!("\"none\" unless {} (DeepSpeed's offload)", need.1),
            );
        }
        if !h.device.is_cuda() || t.engine != Engine::Torch {
            return refuse(key, "\"none\" unless gpu is a GPU and engine = \"torch\"");
        }
        let adam = matches!(
            t.optimizer,
            Optimizer::AdamW
                | Optimizer::AdamWFused
                | Optimizer::AdamWForeach
                | Optimizer::AdamWSingle
        );
        if !adam {
            return refuse(key, "\"none\" unless optimizer is an adamw (DeepSpeedCPUAdam steps the offloaded state)");
        }
        if !matches!(t.precision, Precision::Fp32 | Precision::Bf16Mixed) {
            return refuse(
                key,
                "\"none\" unless precision = \"fp32\" | \"bf16-mixed\" (DeepSpeed's modes)",
            );
        }
        if spec.lora.is_some() || t.optimizer_in_backward {
            return refuse(
                key,
                "\"none\" with a [lora] section or optimizer_in_backward",
            );
        }
    }
    Ok(())
}

impl RawConfig {
    /// Validates everything and resolves presets. The caller has done any file or device I/O.
    pub fn resolve(&self, presets: &impl PresetSource, ctx: &Context) -> Result<RunSpec> {
        let model = self.model.resolve(self.model.base(presets, ctx)?)?;
        let mut train = self.train.resolve(&model)?;
        let hardware = self.hardware.resolve(presets, ctx)?;
        train.embedding_dtype = embedding_dtype(&train, &hardware);
        let lora = self.lora.as_ref().map(|l| l.resolve(&model)).transpose()?;
        let spec = RunSpec {
            model,
            train,
            hardware,
            lora,
        };
        check_run(&spec)?;
        Ok(spec)
    }

    /// This config with its planned values replaced by `spec`'s (for `fit --out`,
    /// `diagnose --out` and `train`'s `plan.fit.toml`). The model section and the keys
    /// the memory model does not read (`steps`, `learning_rate`, `memory_gib`) are kept.
    pub fn with_spec(&self, spec: &RunSpec) -> RawConfig {
        let t = &spec.train;
        let gpu = match &spec.hardware.device {
            // A detected GPU is written as "auto" so the plan resolves the same way again.
            Device::Gpu(g) if g.name.starts_with("auto:") => "auto".to_string(),
            Device::Gpu(g) => g.name.clone(),
            Device::Cpu { .. } => "cpu".to_string(),
        };
        RawConfig {
            model: self.model.clone(),
            train: RawTrain {
                micro_batch: Some(t.micro_batch),
                seq_len: Some(t.seq_len),
                grad_accum: Some(t.grad_accum),
                precision: Some(t.precision.name().into()),
                optimizer: Some(t.optimizer.name().into()),
                checkpointing: Some(t.checkpointing.to_string()),
                loss: Some(t.loss.name().into()),
                loss_chunk: (t.loss == LossMode::Chunked).then_some(t.loss_chunk),
                attention: Some(t.attention.name().into()),
                engine: Some(t.engine.name().into()),
                // Written when the config named them or the plan departs from the default.
                implementation: (self.train.implementation.is_some()
                    || t.implementation.name() != defaults::implementation(spec.model.arch))
                .then(|| t.implementation.name().into()),
                compile: (self.train.compile.is_some() || t.compile).then_some(t.compile),
                ..self.train.clone()
            },
            hardware: RawHardware {
                gpu: Some(gpu),
                gpus: Some(spec.hardware.gpus),
                sharding: Some(spec.hardware.sharding.name().into()),
                // Written when the config named them or the plan offloads.
                offload_optimizer: written(
                    &self.hardware.offload_optimizer,
                    spec.hardware.offload_optimizer,
                ),
                offload_params: written(
                    &self.hardware.offload_params,
                    spec.hardware.offload_params,
                ),
                ..self.hardware.clone()
            },
            lora: self.lora.clone(),
        }
    }
}

/// An offload key of a written plan: when the config named it or the plan offloads.
fn written(raw: &Option<String>, o: Offload) -> Option<String> {
    (raw.is_some() || o != Offload::None).then(|| o.name().into())
}
