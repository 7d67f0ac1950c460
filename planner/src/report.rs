//! From a played step to the numbers users act on: allocated, reserved and device peaks
//! against capacity, the breakdown at the peak, and an estimate of throughput.
//!
//! Throughput: training FLOPs per token are `6·P_matmul + 12·L·Q·T` (Kaplan et al. 2020;
//! the attention term as nanochat's `estimate_flops` counts it), plus one more forward
//! (`2·P + 4·L·Q·T`) with full checkpointing. Time per micro-step is those FLOPs over the
//! GPU's bf16 throughput at an assumed utilization that grows with the tokens per
//! micro-batch (`U_MAX · n / (n + N_HALF)`), plus a fixed launch overhead per block;
//! the optimizer step streams its state once through memory. These are estimates for
//! ranking configurations, stated as such wherever they are shown.

use crate::allocator;
use crate::params;
use crate::spec::{Checkpointing, Device, Engine, Implementation, LossMode, Precision, RunSpec};
use crate::timeline::{Component, Timeline};
use crate::torch;
use crate::units::Bytes;
use serde::Serialize;
use std::collections::BTreeMap;

/// Highest utilization assumed for large micro-batches.
pub const U_MAX: f64 = 0.45;
/// Tokens per micro-batch at which utilization is half of `U_MAX`.
pub const N_HALF: f64 = 1024.0;
/// Kernel-launch and Python overhead per block per micro-step (forward + backward), seconds.
pub const BLOCK_OVERHEAD_S: f64 = 60e-6;
/// CPU throughput assumed for `gpu = "cpu"` (fp32 GEMM, a few cores), TFLOP/s.
pub const CPU_TFLOPS: f64 = 0.2;
/// Host memory bandwidth assumed for the CPU's step (the figure `gpu = "cpu"` runs at), B/s.
pub const HOST_BANDWIDTH: f64 = 20e9;
/// Host-device copies: PCIe 4.0 x16, 16 GT/s × 16 lanes × 128/130 encoding, one way, B/s.
pub const PCIE_BYTES_PER_S: f64 = 31.5e9;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub model: String,
    pub device: String,
    pub engine: Engine,
    /// Whose model code the torch engine followed, and whether compiled.
    pub implementation: Implementation,
    pub compile: bool,
    pub micro_batch: u64,
    pub seq_len: u64,
    pub grad_accum: u64,
    pub gpus: u64,
    pub params: u64,
    /// Live tensor bytes at the peak (`torch.cuda.max_memory_allocated`).
    pub peak_allocated_bytes: u64,
    /// Segments the caching allocator holds at its peak (`max_memory_reserved`).
    pub peak_reserved_bytes: u64,
    /// What nvidia-smi would show for the process: reserved plus the CUDA context.
    pub device_bytes: u64,
    pub capacity_bytes: u64,
    /// Optimizer state in CUDA managed memory (paged optimizers): on the card, in
    /// `device_bytes`, but outside the allocator and `peak_allocated_bytes`.
    pub paged_bytes: u64,
    /// What the step keeps in host memory: saved activations offloaded at the end of the
    /// forward, and DeepSpeed's offloaded optimizer (and parameter) state.
    pub host_bytes: u64,
    /// The part of `host_bytes` that is DeepSpeed's offloaded state.
    pub offloaded_state_bytes: u64,
    /// The optimizer implementation, precision and sharding regime modelled, in words.
    pub regime: String,
    pub fits: bool,
    /// Capacity minus device bytes (negative when it does not fit).
    pub headroom_bytes: i64,
    pub peak_phase: String,
    /// The allocation that reached the peak.
    pub peak_tensor: String,
    /// Bytes by component at the peak; they sum to `device_bytes`.
    pub components: BTreeMap<String, u64>,
    pub tokens_per_step: u64,
    pub flops_per_token: f64,
    pub est_step_seconds: f64,
    pub est_tokens_per_second: f64,
    /// Where the prediction is less sure than the model's tests say: the run is outside
    /// the domain a fitted part of it was calibrated on (today the candle engine's).
    pub warnings: Vec<String>,
    /// Host memory per process and per machine; `estimate` adds it with the host's options.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<crate::host::HostReport>,
    /// Steps and time per epoch, when the data set's size is given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<crate::schedule::TrainingTime>,
    #[serde(skip)]
    pub timeline: Timeline,
}

/// Plays the step on the run's engine.
pub fn play(spec: &RunSpec) -> Timeline {
    match spec.train.engine {
        Engine::Torch => torch::play(spec),
        Engine::Candle => crate::candle_engine::play(spec),
    }
}

/// Allocated and reserved bytes at the peak, the bytes by component, and the runtime's
/// context: through the caching allocator for the torch engine on a GPU; what is live
/// elsewhere.
fn memory(
    spec: &RunSpec,
    timeline: &Timeline,
) -> (Bytes, Bytes, BTreeMap<Component, Bytes>, Bytes) {
    match &spec.hardware.device {
        // The candle engine has no caching allocator: each tensor is its own allocation
        // from the CUDA pool, so what it holds is what is live.
        Device::Gpu(g) if spec.train.engine == Engine::Candle => (
            timeline.peak.total,
            timeline.peak.total,
            timeline.peak.by_component.clone(),
            g.context,
        ),
        Device::Gpu(g) => {
            let st = allocator::simulate(timeline);
            (
                st.peak_allocated,
                st.peak_reserved,
                st.by_component,
                g.context,
            )
        }
        Device::Cpu { .. } => (
            timeline.peak.total,
            timeline.peak.total,
            timeline.peak.by_component.clone(),
            Bytes(0),
        ),
    }
}

/// Estimates one run.
pub fn estimate(spec: &RunSpec) -> Report {
    let timeline = play(spec);
    let (allocated, reserved, by_component, context) = memory(spec, &timeline);
    let (paged, host, regime) = regime(spec);
    let device = reserved + context + Bytes(paged);
    let capacity = spec.hardware.device.capacity();
    let mut components: BTreeMap<String, u64> = by_component
        .iter()
        .map(|(c, b)| (c.key().to_string(), b.0))
        .collect();
    if spec.hardware.device.is_cuda() {
        components.insert("allocator".into(), (reserved - allocated).0);
        components.insert("runtime".into(), context.0);
    }
    if paged > 0 {
        components.insert("paged_optimizer".into(), paged);
    }
    let (flops_per_token, step_seconds) = throughput(spec);
    let tokens_per_step = spec.global_batch_tokens();
    Report {
        model: spec.model.name.clone(),
        device: spec.hardware.device.name().to_string(),
        engine: spec.train.engine,
        implementation: spec.train.implementation,
        compile: spec.train.compile,
        micro_batch: spec.train.micro_batch,
        seq_len: spec.train.seq_len,
        grad_accum: spec.train.grad_accum,
        gpus: spec.hardware.gpus,
        params: params::count(&spec.model),
        peak_allocated_bytes: allocated.0,
        peak_reserved_bytes: reserved.0,
        device_bytes: device.0,
        capacity_bytes: capacity.0,
        paged_bytes: paged,
        host_bytes: host,
        offloaded_state_bytes: match spec.train.engine {
            Engine::Torch => torch::offloaded_state_bytes(spec),
            Engine::Candle => 0,
        },
        regime,
        fits: device <= capacity,
        headroom_bytes: (capacity.0 as i128 - device.0 as i128)
            .clamp(i64::MIN as i128, i64::MAX as i128) as i64,
        peak_phase: timeline.peak.phase.clone(),
        peak_tensor: timeline.peak.tensor.clone(),
        components,
        tokens_per_step,
        flops_per_token,
        est_step_seconds: step_seconds,
        est_tokens_per_second: if step_seconds > 0.0 {
            tokens_per_step as f64 / step_seconds
        } else {
            0.0
        },
        warnings: match spec.train.engine {
            Engine::Candle => crate::candle_engine::warnings(spec),
            Engine::Torch => Vec::new(),
        },
        host: None,
        time: None,
        timeline,
    }
}

/// Bytes outside the allocator (paged optimizer state, offloaded activations) and the
/// regime in words.
fn regime(spec: &RunSpec) -> (u64, u64, String) {
    match spec.train.engine {
        Engine::Torch => {
            let (paged, host) = torch::off_allocator(spec);
            (paged, host, torch::describe_regime(spec))
        }
        Engine::Candle => (0, 0, format!("optimizer {}", spec.train.optimizer)),
    }
}

impl Report {
    /// Whether the run fits with `margin` (a fraction of capacity) to spare.
    pub fn fits_with_margin(&self, margin: f64) -> bool {
        let limit = self.capacity_bytes as f64 * (1.0 - margin.clamp(0.0, 0.99));
        (self.device_bytes as f64) <= limit
    }
}

/// One token's forward FLOPs: `(2·P_matmul + 4·L·Q·T, the attention part 4·L·Q·T)`.
fn forward_flops(spec: &RunSpec) -> (f64, f64) {
    let m = &spec.model;
    let matmul_params: u64 = params::shared(m)
        .iter()
        .filter(|p| {
            p.role != crate::params::Role::Vector && p.role != crate::params::Role::Embedding
        })
        .map(|p| p.numel())
        .sum::<u64>()
        + if m.tie_embeddings {
            m.vocab_size * m.hidden_size
        } else {
            0
        };
    let layers = (m.num_layers + m.num_decoder_layers) as f64;
    let q = (m.num_heads * m.head_dim) as f64;
    let attention = 4.0 * layers * q * spec.train.seq_len as f64;
    (2.0 * matmul_params as f64 + attention, attention)
}

/// The model's FLOPs per trained token, forward and backward, without recomputation
/// (`6·P_matmul + 12·L·Q·T`): the numerator of MFU.
pub fn model_flops_per_token(spec: &RunSpec) -> f64 {
    3.0 * forward_flops(spec).0
}

/// (FLOPs per token, seconds per optimizer step) for one GPU.
fn throughput(spec: &RunSpec) -> (f64, f64) {
    let m = &spec.model;
    let t = &spec.train;
    let layers = (m.num_layers + m.num_decoder_layers) as f64;
    let (fwd, attention) = forward_flops(spec);
    let mut per_token = 3.0 * fwd;
    match t.checkpointing {
        Checkpointing::Full => per_token += fwd,
        Checkpointing::Selective => per_token += attention,
        Checkpointing::Every(n) => {
            // Blocks 0, n, 2n, … are recomputed.
            let whole = (m.num_layers + m.num_decoder_layers).div_ceil(n.max(1)) as f64;
            per_token += fwd * whole / layers.max(1.0);
        }
        // Three of a Llama block's seven matmuls are recomputed (and the attention off CUDA).
        Checkpointing::SelectiveOp => per_token += (fwd - attention) * 3.0 / 7.0,
        Checkpointing::None => {}
    }
    if t.loss == LossMode::Chunked {
        // Each chunk's logits are produced and consumed separately: same FLOPs, a little
        // less reuse of the head weight.
        per_token += 0.02 * 6.0 * (m.vocab_size * m.hidden_size) as f64;
    }
    let n = t.tokens_per_micro_batch() as f64;
    let (peak, bandwidth) = match &spec.hardware.device {
        Device::Gpu(g) => {
            let p = if t.precision == Precision::Fp32 {
                g.bf16_tflops / 8.0
            } else {
                g.bf16_tflops
            };
            (p * 1e12, g.bandwidth_gbs * 1e9)
        }
        Device::Cpu { .. } => (CPU_TFLOPS * 1e12, HOST_BANDWIDTH),
    };
    let utilization = U_MAX * n / (n + N_HALF);
    let micro = per_token * n / (peak * utilization) + BLOCK_OVERHEAD_S * layers;
    let state_bytes = params::count(m) as f64 * 16.0 / spec.hardware.gpus.max(1) as f64;
    let optimizer = if spec.hardware.offloads() {
        // DeepSpeedCPUAdam streams the state through host memory, and the 16-bit
        // gradients and parameters cross PCIe.
        state_bytes / HOST_BANDWIDTH + torch::offload_traffic(spec) as f64 / PCIE_BYTES_PER_S
    } else {
        state_bytes / bandwidth
    };
    (per_token, micro * t.grad_accum as f64 + optimizer)
}
