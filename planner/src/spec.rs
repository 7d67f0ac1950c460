//! The validated description of a training run: model, training options, hardware.
//!
//! Everything here has already been checked (see `config`), so the memory model can
//! rely on positive sizes and consistent head counts.

use crate::error::{quote, PlanError, Result};
use crate::units::Bytes;
use serde::Serialize;

/// An enum whose values are spelled as fixed strings in configs and on the command line.
pub trait Choice: Sized + Copy + 'static {
    const ALL: &'static [(&'static str, Self)];

    fn name(self) -> &'static str
    where
        Self: PartialEq,
    {
        Self::ALL
            .iter()
            .find(|(_, v)| *v == self)
            .map(|(n, _)| *n)
            .unwrap_or("?")
    }

    fn accepted() -> String {
        let names: Vec<&str> = Self::ALL.iter().map(|(n, _)| *n).collect();
        format!("expected one of {}", names.join(" | "))
    }

    fn parse(key: &str, value: &str) -> Result<Self> {
        Self::ALL
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(value.trim()))
            .map(|(_, v)| *v)
            .ok_or_else(|| PlanError::invalid(key, quote(value), Self::accepted()))
    }
}

macro_rules! choice {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $var:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($(#[$vm])* $var),+ }
        impl Choice for $name {
            const ALL: &'static [(&'static str, Self)] = &[$(($s, $name::$var)),+];
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }
    };
}

choice!(
    /// Model family, as the Hugging Face transformers implementation (or nanochat's gpt.py) builds it.
    Arch {
        Llama = "llama",
        Qwen2 = "qwen2",
        Gpt2 = "gpt2",
        Nanochat = "nanochat",
        T5 = "t5",
        /// Llama with QK-norm (per-head RMSNorm of q and k) and no q/k/v bias.
        Qwen3 = "qwen3",
        /// Four norms per block, GeGLU, scaled embedding, logit soft-capping.
        Gemma2 = "gemma2",
        /// Gemma 2 with QK-norm and 5:1 sliding/global layers.
        Gemma3 = "gemma3",
        /// Fused `qkv_proj` and `gate_up_proj`.
        Phi3 = "phi3",
        /// Norms after attention and MLP (not before), QK-norm over all heads.
        Olmo2 = "olmo2",
        /// Llama attention, a top-k mixture of SwiGLU experts.
        Mixtral = "mixtral",
        /// Qwen3 attention, a top-k mixture of SwiGLU experts.
        Qwen3Moe = "qwen3_moe",
    }
);
choice!(
    /// Numeric precision of the step.
    Precision {
        Fp32 = "fp32",
        Bf16Autocast = "bf16-autocast",
        Fp16Autocast = "fp16-autocast",
        /// Parameters, gradients and optimizer state in bf16, no fp32 master.
        Bf16 = "bf16",
        /// bf16 compute weights over fp32 masters (FSDP2's `MixedPrecisionPolicy`,
        /// DeepSpeed's bf16 optimizer): the forward runs in pure bf16.
        Bf16Mixed = "bf16-mixed",
    }
);
/// The optimizer and its implementation (`adamw` is PyTorch's default for the device:
/// foreach on CUDA, the single-tensor loop on CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Optimizer {
    AdamW,
    AdamWForeach,
    AdamWFused,
    AdamWSingle,
    AdamW8bit,
    PagedAdamW,
    PagedAdamW8bit,
    TorchaoAdamW8bit,
    TorchaoAdamW4bit,
    Sgd,
    Adafactor,
    Muon,
}

impl Choice for Optimizer {
    const ALL: &'static [(&'static str, Self)] = &[
        ("adamw", Optimizer::AdamW),
        ("adamw-foreach", Optimizer::AdamWForeach),
        ("adamw-fused", Optimizer::AdamWFused),
        ("adamw-single", Optimizer::AdamWSingle),
        ("adamw-8bit", Optimizer::AdamW8bit),
        ("paged-adamw", Optimizer::PagedAdamW),
        ("paged-adamw-8bit", Optimizer::PagedAdamW8bit),
        ("torchao-adamw-8bit", Optimizer::TorchaoAdamW8bit),
        ("torchao-adamw-4bit", Optimizer::TorchaoAdamW4bit),
        ("sgd", Optimizer::Sgd),
        ("adafactor", Optimizer::Adafactor),
        ("muon", Optimizer::Muon),
    ];

    /// The full list would not fit one error line (200 characters): the variants of a
    /// name are written in braces.
    fn accepted() -> String {
        "expected one of adamw | adamw-{foreach,fused,single,8bit} | paged-adamw[-8bit] | torchao-adamw-{8bit,4bit} | sgd | adafactor | muon".into()
    }
}

impl std::fmt::Display for Optimizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for Optimizer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// Activation checkpointing: `selective` recomputes the attention core (Megatron-style),
/// `selective-op` saves the outputs of torchtitan's op list and recomputes the rest,
/// `full` recomputes each block, `every-N` recomputes every N-th block (transformers'
/// `every_n_layers`, torchtitan's layer mode `selective_ac_option = "N"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Checkpointing {
    None,
    Selective,
    Full,
    SelectiveOp,
    /// Every N-th block (N ≥ 1) is checkpointed whole; the others keep everything.
    Every(u64),
}

impl Checkpointing {
    /// Whether block `l` (from 0) is checkpointed whole. Every N-th counts from the first
    /// block, as transformers' `_set_gradient_checkpointing` does (`layer_index % n == 0`).
    pub fn whole_block(self, l: u64) -> bool {
        match self {
            Checkpointing::Full => true,
            Checkpointing::Every(n) => l.is_multiple_of(n.max(1)),
            _ => false,
        }
    }
}

impl Choice for Checkpointing {
    const ALL: &'static [(&'static str, Self)] = &[
        ("none", Checkpointing::None),
        ("selective", Checkpointing::Selective),
        ("full", Checkpointing::Full),
        ("selective-op", Checkpointing::SelectiveOp),
    ];

    fn accepted() -> String {
        "expected one of none | selective | full | selective-op | every-N (N from 1 to 4096)".into()
    }

    fn parse(key: &str, value: &str) -> Result<Self> {
        let v = value.trim();
        let every = v.get(..6).filter(|p| p.eq_ignore_ascii_case("every-"));
        if every.is_some() {
            return match v[6..].parse::<u64>() {
                Ok(n) if (1..=4096).contains(&n) => Ok(Checkpointing::Every(n)),
                _ => Err(PlanError::invalid(key, quote(value), Self::accepted())),
            };
        }
        Self::ALL
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(v))
            .map(|(_, c)| *c)
            .ok_or_else(|| PlanError::invalid(key, quote(value), Self::accepted()))
    }
}

impl std::fmt::Display for Checkpointing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Checkpointing::Every(n) => write!(f, "every-{n}"),
            c => f.write_str(c.name()),
        }
    }
}

impl Serialize for Checkpointing {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

choice!(
    /// The dtype gradients are reduced in under `bf16-mixed` (FSDP2's `reduce_dtype`).
    ReduceDtype { Fp32 = "fp32", Bf16 = "bf16" }
);
choice!(
    /// nanochat's token embedding `wte`: `init_weights` casts it to bf16 where the model
    /// lives on CUDA (its weight, gradient and AdamW state, and the residual stream from
    /// the embedding on), and leaves it fp32 on the CPU.
    EmbeddingDtype { Fp32 = "fp32", Bf16 = "bf16" }
);
choice!(
    /// How the cross-entropy over the vocabulary is computed.
    LossMode { FloatCast = "float-cast", Chunked = "chunked", Fused = "fused" }
);
choice!(Attention { Sdpa = "sdpa", Eager = "eager" });
choice!(
    /// Whose model code the torch engine follows: what its forward saves differs
    /// (`docs/model.md`, a section each).
    Implementation {
        /// Hugging Face transformers' modeling files.
        Hf = "hf",
        /// karpathy/nanochat's `gpt.py`.
        Nanochat = "nanochat",
        /// torchtitan's Llama (`torchtitan/models/llama3`).
        Torchtitan = "torchtitan",
        /// torchtune's `TransformerDecoder` with `CEWithChunkedOutputLoss`.
        Torchtune = "torchtune",
    }
);
choice!(
    /// How QLoRA stores the frozen base linears (`[lora] quantize`).
    Quantize { None = "none", Nf4 = "nf4", Fp4 = "fp4", Int8 = "int8" }
);
choice!(
    /// The dtype bitsandbytes dequantizes to for each matmul (`bnb_4bit_compute_dtype`).
    ComputeDtype { Bf16 = "bf16", Fp16 = "fp16", Fp32 = "fp32" }
);
choice!(Engine { Torch = "torch", Candle = "candle" });
choice!(
    /// A kind of change `fit` may make to the run; `fit --keep KIND` forbids it.
    Change {
        /// The search over checkpointing policies.
        Checkpointing = "checkpointing",
        /// The search over loss implementations.
        Loss = "loss",
        /// The ladder's ZeRO / FSDP2 over the GPUs the run has.
        Sharding = "sharding",
        /// The ladder's 8-bit optimizer.
        Optimizer = "optimizer",
        /// The ladder's pure bf16.
        Precision = "precision",
        /// The ladder's LoRA and QLoRA.
        Lora = "lora",
        /// The ladder's more GPUs.
        Gpus = "gpus",
        /// The ladder's offloads: saved activations, and DeepSpeed's optimizer (and
        /// parameters) to host memory.
        Offload = "offload",
    }
);
choice!(Sharding { Ddp = "ddp", Zero1 = "zero1", Zero2 = "zero2", Zero3 = "zero3", Fsdp2 = "fsdp2" });
choice!(
    /// Where DeepSpeed keeps state it moves off the GPU (`offload_optimizer.device`,
    /// `offload_param.device`); NVMe is not modelled.
    Offload { None = "none", Cpu = "cpu" }
);

impl Precision {
    /// Bytes per element of the activations the matmuls produce.
    pub fn compute_bytes(self) -> u64 {
        match self {
            Precision::Fp32 => 4,
            _ => 2,
        }
    }

    /// Bytes per element of the parameters as stored (the master copy).
    pub fn param_bytes(self) -> u64 {
        match self {
            Precision::Bf16 => 2,
            _ => 4,
        }
    }

    /// bf16 compute copies of fp32 master parameters.
    pub fn is_mixed(self) -> bool {
        self == Precision::Bf16Mixed
    }

    pub fn is_autocast(self) -> bool {
        matches!(self, Precision::Bf16Autocast | Precision::Fp16Autocast)
    }
}

impl Sharding {
    /// The ZeRO stage: 0 for plain DDP.
    pub fn stage(self) -> u8 {
        match self {
            Sharding::Ddp => 0,
            Sharding::Zero1 => 1,
            Sharding::Zero2 => 2,
            Sharding::Zero3 | Sharding::Fsdp2 => 3,
        }
    }
}

/// The shape of a model; enough to list every parameter and every activation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSpec {
    pub name: String,
    pub arch: Arch,
    pub hidden_size: u64,
    /// Decoder layers; for T5 the encoder layers.
    pub num_layers: u64,
    /// T5 only: decoder layers (0 for decoder-only models).
    pub num_decoder_layers: u64,
    pub num_heads: u64,
    pub num_kv_heads: u64,
    pub head_dim: u64,
    pub intermediate_size: u64,
    pub vocab_size: u64,
    pub tie_embeddings: bool,
    /// GPT-2's learned position table; 0 where positions are rotary or relative.
    pub max_positions: u64,
    /// T5: gated feed-forward (`gated-gelu`, v1.1) rather than plain ReLU.
    pub gated_ffn: bool,
    /// Sliding-window attention and mixture of experts (none for dense, global models).
    pub features: ArchFeatures,
}

/// What the newer families add to a decoder block, read from their `config.json`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ArchFeatures {
    /// Attention window in tokens (`sliding_window`); 0 when every layer attends globally.
    pub sliding_window: u64,
    /// With a window: every n-th layer is global (Gemma 2: 2, Gemma 3: 6); 0 when all
    /// layers use the window (Mistral).
    pub global_every: u64,
    /// Routed experts per MoE block (0: a dense MLP).
    pub experts: u64,
    /// Experts each token is sent to (top-k).
    pub experts_per_token: u64,
    /// Each expert's intermediate width.
    pub expert_intermediate: u64,
}

impl ArchFeatures {
    /// Whether layer `l` attends through the sliding window.
    pub fn sliding(&self, l: u64) -> bool {
        self.sliding_window > 0
            && (self.global_every == 0 || !(l + 1).is_multiple_of(self.global_every))
    }
}

/// Training options for one step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainSpec {
    pub micro_batch: u64,
    pub seq_len: u64,
    pub grad_accum: u64,
    pub precision: Precision,
    pub optimizer: Optimizer,
    pub checkpointing: Checkpointing,
    pub loss: LossMode,
    /// Rows (tokens) per chunk for the chunked loss.
    pub loss_chunk: u64,
    pub attention: Attention,
    pub engine: Engine,
    /// Whose model code the step runs.
    pub implementation: Implementation,
    /// `torch.compile`: AOTAutograd's partitioner decides what backward keeps.
    pub compile: bool,
    /// Saved activations go to host memory (`torch.autograd.graph.save_on_cpu`, torchtune's
    /// `OffloadActivations`) and come back for backward.
    pub offload_activations: bool,
    /// Each parameter is stepped as soon as its gradient is complete (torchtune's
    /// `optimizer_in_bwd`), and its gradient freed.
    pub optimizer_in_backward: bool,
    /// Gradient reduction dtype under `bf16-mixed`.
    pub reduce_dtype: ReduceDtype,
    /// nanochat's `wte` dtype, resolved for the device (None for other implementations).
    pub embedding_dtype: Option<EmbeddingDtype>,
}

impl TrainSpec {
    pub fn tokens_per_micro_batch(&self) -> u64 {
        self.micro_batch.saturating_mul(self.seq_len)
    }
}

/// A GPU as the planner sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuSpec {
    pub name: String,
    pub display: String,
    /// Total memory as PyTorch reports it (`torch.cuda.mem_get_info()` total), for a
    /// preset; NVML's total for a detected GPU.
    pub capacity: Bytes,
    /// What the CUDA context and PyTorch's kernels take before the first tensor.
    pub context: Bytes,
    /// Dense bf16 tensor-core throughput, TFLOP/s.
    pub bf16_tflops: f64,
    /// Memory bandwidth, GB/s.
    pub bandwidth_gbs: f64,
}

choice!(
    /// The matmul kernels the candle engine's CPU build runs (gemm dispatches at run time:
    /// AVX-512 where the CPU has avx512f and the binary was built with feature `avx512`,
    /// else AVX2/FMA). Their packing scratch differs, so the f32 working sets have one fit
    /// for each.
    CpuKernels {
        Avx512 = "avx512",
        Avx2 = "avx2",
    }
);

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Device {
    Gpu(GpuSpec),
    /// Host memory: no CUDA context, no caching allocator.
    Cpu {
        capacity: Bytes,
        kernels: CpuKernels,
    },
}

impl Device {
    pub fn capacity(&self) -> Bytes {
        match self {
            Device::Gpu(g) => g.capacity,
            Device::Cpu { capacity, .. } => *capacity,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Device::Gpu(g) => &g.name,
            Device::Cpu { .. } => "cpu",
        }
    }

    pub fn is_cuda(&self) -> bool {
        matches!(self, Device::Gpu(_))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HardwareSpec {
    pub device: Device,
    pub gpus: u64,
    pub sharding: Sharding,
    /// FSDP2: free each block's gathered parameters after its forward (gather again in backward).
    pub reshard_after_forward: bool,
    /// GPUs the model state is sharded over (hybrid sharding shards within a node and
    /// replicates across nodes); equal to `gpus` unless set.
    pub gpus_per_node: u64,
    /// DeepSpeed ZeRO-Offload: fp32 masters, optimizer state and gradient partitions in
    /// host memory, the Adam step on the CPU (ZeRO stage 1–3).
    pub offload_optimizer: Offload,
    /// DeepSpeed ZeRO-Infinity's parameter offload: the 16-bit parameter partitions in host
    /// memory, gathered to the GPU module by module (ZeRO-3 only).
    pub offload_params: Offload,
    /// DeepSpeed ZeRO's buffer sizes (`zero_optimization`).
    pub zero: ZeroBuckets,
}

/// DeepSpeed ZeRO's buffer sizes in elements, named as in its `zero_optimization`
/// section; the defaults are DeepSpeed 0.19.6's (`runtime/zero/config.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ZeroBuckets {
    /// The gradient bucket (IPG buffer) backward copies gradients into (5·10⁸).
    pub reduce_bucket_size: u64,
    /// ZeRO-1/2's all-gather of the updated partitions, in pieces of this size (5·10⁸).
    pub allgather_bucket_size: u64,
    /// ZeRO-3: elements of upcoming parameters gathered ahead (`stage3_prefetch_bucket_size`, 5·10⁷).
    pub prefetch_bucket_size: u64,
    /// ZeRO-3: gathered elements kept at once (`stage3_max_live_parameters`, 10⁹).
    pub max_live_parameters: u64,
    /// ZeRO-3: parameters of at most this many elements stay whole on every rank
    /// (`stage3_param_persistence_threshold`, 10⁵).
    pub param_persistence_threshold: u64,
    /// ZeRO-3: a module's gathered parameters are kept while they are used again within
    /// this many elements of the trace (`stage3_max_reuse_distance`, 10⁹).
    pub max_reuse_distance: u64,
}

impl Default for ZeroBuckets {
    fn default() -> ZeroBuckets {
        ZeroBuckets {
            reduce_bucket_size: 500_000_000,
            allgather_bucket_size: 500_000_000,
            prefetch_bucket_size: 50_000_000,
            max_live_parameters: 1_000_000_000,
            param_persistence_threshold: 100_000,
            max_reuse_distance: 1_000_000_000,
        }
    }
}

impl HardwareSpec {
    /// Ranks model state is split over: the node under hybrid sharding, else all GPUs.
    pub fn shard_group(&self) -> u64 {
        self.gpus_per_node.clamp(1, self.gpus.max(1))
    }

    /// Whether DeepSpeed keeps the optimizer (or the parameters too) in host memory.
    pub fn offloads(&self) -> bool {
        self.offload_optimizer == Offload::Cpu || self.offload_params == Offload::Cpu
    }
}

/// A whole, validated run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunSpec {
    pub model: ModelSpec,
    pub train: TrainSpec,
    pub hardware: HardwareSpec,
    /// LoRA / QLoRA adapters over a frozen base (None: full fine-tuning).
    pub lora: Option<crate::lora::LoraSpec>,
}

impl RunSpec {
    /// Sequences per optimizer step over all GPUs.
    pub fn global_batch(&self) -> u64 {
        self.train
            .micro_batch
            .saturating_mul(self.train.grad_accum)
            .saturating_mul(self.hardware.gpus)
    }

    pub fn global_batch_tokens(&self) -> u64 {
        self.global_batch().saturating_mul(self.train.seq_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_name_round_trip() {
        for (name, v) in Precision::ALL {
            assert_eq!(Precision::parse("train.precision", name).unwrap(), *v);
            assert_eq!(v.name(), *name);
        }
        let err = Precision::parse("train.precision", "bf8").unwrap_err();
        assert_eq!(
            err.to_string(),
            "train.precision = \"bf8\": expected one of fp32 | bf16-autocast | fp16-autocast | bf16 | bf16-mixed"
        );
    }

    #[test]
    fn checkpointing_reads_every_n_and_writes_it_back() {
        for text in [
            "none",
            "selective",
            "full",
            "selective-op",
            "every-2",
            "every-17",
        ] {
            let c = Checkpointing::parse("train.checkpointing", text).unwrap();
            assert_eq!(c.to_string(), text);
        }
        assert_eq!(
            Checkpointing::parse("train.checkpointing", "EVERY-3").unwrap(),
            Checkpointing::Every(3)
        );
        for bad in ["every-0", "every-", "every-x", "every-4097", "every--1"] {
            let err = Checkpointing::parse("train.checkpointing", bad).unwrap_err();
            assert!(err.to_string().contains("every-N"), "{bad}: {err}");
        }
        let every2 = Checkpointing::Every(2);
        let whole: Vec<bool> = (0..4).map(|l| every2.whole_block(l)).collect();
        assert_eq!(whole, [true, false, true, false]);
    }
}
