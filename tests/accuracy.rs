//! The planner against PyTorch: `tests/data/torch_cpu.json` holds peaks measured by
//! `tools/measure_torch.py` (torch 2.15.0, transformers 5.23.0, CPU, one steady-state step
//! under the profiler's memory timeline). Every prediction must be within the bound.

use serde::Deserialize;
use vramplan_planner::{estimate, Context, Presets, RawConfig};

#[derive(Deserialize)]
struct Data {
    runs: Vec<Run>,
}

#[derive(Deserialize)]
struct Run {
    id: String,
    config: RawConfig,
    peak_bytes: u64,
}

/// (id, measured, predicted, relative error) for every measured run.
pub fn errors() -> Vec<(String, u64, u64, f64)> {
    errors_in(include_str!("data/torch_cpu.json"))
}

/// [`errors`] for one file of measurements.
fn errors_in(json: &str) -> Vec<(String, u64, u64, f64)> {
    let data: Data = serde_json::from_str(json).expect("measurement data parses");
    let presets = Presets::builtin().expect("presets");
    data.runs
        .into_iter()
        .map(|r| {
            let spec = r
                .config
                .resolve(&presets, &Context::default())
                .unwrap_or_else(|e| panic!("{}: {e}", r.id));
            let predicted = estimate(&spec).peak_allocated_bytes;
            let err = predicted as f64 / r.peak_bytes as f64 - 1.0;
            (r.id, r.peak_bytes, predicted, err)
        })
        .collect()
}

#[test]
fn torch_cpu_peaks_are_predicted_within_bound() {
    let errs = errors();
    assert!(errs.len() >= 15, "at least 15 measured configurations");
    let mut worst = 0.0f64;
    for (id, m, p, e) in &errs {
        println!(
            "{id:70} measured {m:>12} predicted {p:>12} error {:+.1} %",
            e * 100.0
        );
        worst = worst.max(e.abs());
    }
    println!("worst {:.1} %", worst * 100.0);
    assert!(
        worst <= BOUND,
        "worst error {:.1} % exceeds {:.0} %",
        worst * 100.0,
        BOUND * 100.0
    );
}

/// `tests/data/torch_frameworks.json` (`tools/measure_frameworks.py`): each framework's own
/// model and loss (transformers, nanochat, torchtune 0.6.1), eager and under
/// `torch.compile` (inductor's C++ backend), one steady-state step on the CPU.
#[test]
fn framework_and_compiled_peaks_are_predicted_within_bound() {
    let errs = errors_in(include_str!("data/torch_frameworks.json"));
    let mut worst = (0.0f64, 0.0f64);
    for (id, m, p, e) in &errs {
        println!(
            "{id:90} measured {m:>12} predicted {p:>12} error {:+.2} %",
            e * 100.0
        );
        let w = if id.ends_with("-compiled") {
            &mut worst.0
        } else {
            &mut worst.1
        };
        *w = w.max(e.abs());
    }
    let compiled = errs.iter().filter(|e| e.0.ends_with("-compiled")).count();
    assert!(errs.len() >= 22 && compiled >= 18, "{} runs", errs.len());
    // Every configuration within 3 %, compiled and eager (torchtune's eager chunked loss,
    // once at +3.8 %, is within 1.3 % since its backward order is modelled).
    assert!(worst.0 <= 0.03, "compiled: worst {:.2} %", worst.0 * 100.0);
    assert!(worst.1 <= 0.03, "eager: worst {:.2} %", worst.1 * 100.0);
}

/// `tests/data/torch_nanochat_wte.json` (`tools/measure_frameworks.py --only wte-bf16`):
/// nanochat with its token embedding cast to bf16 as `init_weights` does on CUDA (weight,
/// gradient and AdamW state bf16, a bf16 residual stream), eager and compiled under bf16
/// autocast, on the CPU (`train.embedding_dtype = "bf16"`).
#[test]
fn nanochat_with_a_bf16_embedding_is_predicted_within_3_percent() {
    all_within_3_percent(include_str!("data/torch_nanochat_wte.json"), 6, 3);
}

/// Prints every run of `json`, asserts at least `runs` of them (`compiled` compiled) and
/// every one within 3 %.
fn all_within_3_percent(json: &str, runs: usize, compiled: usize) {
    let errs = errors_in(json);
    let mut worst = 0.0f64;
    for (id, m, p, e) in &errs {
        println!(
            "{id:90} measured {m:>11} predicted {p:>11} error {:+.2} %",
            e * 100.0
        );
        worst = worst.max(e.abs());
    }
    let n = errs.iter().filter(|e| e.0.ends_with("-compiled")).count();
    assert!(errs.len() >= runs && n >= compiled, "{} runs", errs.len());
    assert!(worst <= 0.03, "worst {:.2} %", worst * 100.0);
}

/// `tests/data/torch_torchtitan.json` (`tools/measure_frameworks.py --set torchtitan`):
/// torchtitan 0.3.0's own Llama3Model (fused `wqkv`, complex RoPE), its
/// `ChunkedLossWrapper` or whole-logits cross-entropy, its `FullAC` and `SelectiveAC`,
/// eager and compiled per block as its `apply_compile` does (also over both checkpoint
/// wrappers), fp32 and bf16, on the CPU (its SDPA module in place of flex attention,
/// whose backward does not run there).
#[test]
fn torchtitan_peaks_are_predicted_within_3_percent() {
    let json = include_str!("data/torch_torchtitan.json");
    all_within_3_percent(json, 27, 15);
    let sac = errors_in(json)
        .into_iter()
        .filter(|e| e.0.contains("-selective-op-") && e.0.ends_with("-compiled"))
        .count();
    assert!(sac >= 7, "{sac} runs compiled over SelectiveAC");
}

/// The bound this model meets today (worst 2.02 %, GPT-2 with full checkpointing); the
/// target of the issue is 5 %.
const BOUND: f64 = 0.03;

/// `tests/data/torch_lora.json` (`tools/measure_lora.py`: peft 0.21, transformers 5.23.0,
/// torch 2.15.0, CPU): LoRA ranks, targets, dropout and precisions, checkpointing, and
/// full fine-tuning of Qwen3, Mistral's window, Gemma 2/3, Phi-3, OLMo 2, SmolLM3,
/// Mixtral and Qwen3-MoE, built from their real config.json at reduced sizes.
#[test]
fn lora_and_new_family_peaks_are_predicted_within_3_percent() {
    let errs = errors_in(include_str!("data/torch_lora.json"));
    let mut worst = 0.0f64;
    let mut beyond = Vec::new();
    for (id, m, p, e) in &errs {
        println!(
            "{id:90} measured {m:>11} predicted {p:>11} error {:+.1} %",
            e * 100.0
        );
        let bound = OUTLIERS
            .iter()
            .find(|(o, _)| o == id)
            .map_or(LORA_BOUND, |(_, b)| *b);
        if e.abs() > bound {
            beyond.push(format!("{id}: {:+.1} %", e * 100.0));
        }
        if bound == LORA_BOUND {
            worst = worst.max(e.abs());
        }
    }
    println!("worst outside the listed outliers {:.1} %", worst * 100.0);
    assert!(beyond.is_empty(), "beyond their bound: {beyond:?}");
    assert!(errs.len() >= 55, "at least 55 measured configurations");
}

const LORA_BOUND: f64 = 0.03;

/// Measured runs whose memory the inventory does not yet itemize, with the bound each
/// meets today (docs/accuracy.md says what is missing); every other run is within 3 %.
/// None today: LoRA with full checkpointing in fp32, once +5.5 %, is within 3 % since the
/// MLP's backward frees down_proj's adapter input before its gradients peak.
const OUTLIERS: &[(&str, f64)] = &[];

/// `tests/data/torch_regimes.json` (`tools/measure_regimes.py`): optimizer implementations,
/// every-N and op-level selective checkpointing, the optimizer stepped inside backward and
/// bf16 compute over fp32 masters, measured the same way.
#[test]
fn torch_regime_peaks_are_predicted_within_3_percent() {
    let errs = errors_in(include_str!("data/torch_regimes.json"));
    let mut worst = 0.0f64;
    let mut held = 0;
    for (id, m, p, e) in &errs {
        let why = NOT_MODELLED.iter().find(|(x, _)| x == id).map(|(_, w)| *w);
        println!(
            "{id:80} measured {m:>11} predicted {p:>11} error {:+.2} %{}",
            e * 100.0,
            why.map(|w| format!("  (not held: {w})"))
                .unwrap_or_default()
        );
        if why.is_none() {
            worst = worst.max(e.abs());
            held += 1;
        }
    }
    println!("worst {:.2} % over {held} held", worst * 100.0);
    assert!(held >= 30, "at least 30 held regimes, {held}");
    assert!(worst <= REGIME_BOUND, "worst error {:.2} %", worst * 100.0);
    for (id, _) in NOT_MODELLED {
        assert!(errs.iter().any(|e| e.0 == *id), "{id} is not in the data");
    }
}

/// The bound of issue 10 for every regime measurement.
const REGIME_BOUND: f64 = 0.03;

/// Measured runs the model does not reproduce yet, with the reason (docs/accuracy.md).
const NOT_MODELLED: &[(&str, &str)] = &[(
    "llama-h512-l4-kv4-v8192-b1-s64-fp32-sdpa-none-untied-adamw-8bit",
    "bitsandbytes' CPU fallback dequantizes states; the model follows the CUDA kernel",
)];

/// Issue 10's second bound: over every measured run the tests above hold (the seven files,
/// old and new, less the runs listed as not modelled), the median error stays within 1 %.
#[test]
fn the_whole_held_set_has_a_median_error_within_1_percent() {
    let files = [
        include_str!("data/torch_cpu.json"),
        include_str!("data/torch_frameworks.json"),
        include_str!("data/torch_torchtitan.json"),
        include_str!("data/torch_lora.json"),
        include_str!("data/torch_regimes.json"),
        include_str!("data/torch_fsdp.json"),
        include_str!("data/torch_nanochat_wte.json"),
        include_str!("data/deepspeed_zero_cpu.json"),
    ];
    let mut errs: Vec<f64> = files
        .iter()
        .flat_map(|f| errors_in(f))
        .filter(|(id, ..)| !NOT_MODELLED.iter().any(|(x, _)| x == id))
        .filter(|(id, ..)| !ZERO_NOT_MODELLED.iter().any(|(x, _)| x == id))
        .map(|(.., e)| e.abs())
        .collect();
    assert!(errs.len() >= 155, "{} held runs", errs.len());
    errs.sort_by(f64::total_cmp);
    let n = errs.len();
    let median = (errs[(n - 1) / 2] + errs[n / 2]) / 2.0;
    let within_1 = errs.iter().filter(|e| **e <= 0.01).count();
    println!(
        "{n} held runs: median |error| {:.3} %, {within_1} within 1 %, worst {:.2} %",
        median * 100.0,
        errs[n - 1] * 100.0
    );
    assert!(median <= 0.01, "median |error| {:.3} %", median * 100.0);
}

/// `tests/data/torch_fsdp.json` (`tools/measure_fsdp.py`): FSDP2's `fully_shard` per block
/// and on the root over gloo, 2 and 4 CPU processes on one host (`gpu = "cpu"`,
/// `gpus = N`), rank 0's peak of one steady-state step; fp32 and `bf16-mixed` with fp32
/// or bf16 reduction, with and without resharding after forward and full checkpointing,
/// a model whose dims 4 does not divide (padded shards), and torchtitan's own grouping
/// (`apply_fsdp_to_decoder`) under its chunked loss and its float-cast one, tied and untied.
#[test]
fn fsdp2_peaks_on_the_cpu_are_predicted_within_3_percent() {
    let errs = errors_in(include_str!("data/torch_fsdp.json"));
    let mut beyond = Vec::new();
    for (id, m, p, e) in &errs {
        println!(
            "{id:92} measured {m:>11} predicted {p:>11} error {:+.2} %",
            e * 100.0
        );
        let bound = FSDP2_GLOO
            .iter()
            .find(|(o, ..)| o == id)
            .map_or(FSDP2_BOUND, |(_, b, _)| *b);
        if e.abs() > bound {
            beyond.push(format!("{id}: {:+.2} %", e * 100.0));
        }
    }
    let worst = errs
        .iter()
        .filter(|e| !FSDP2_GLOO.iter().any(|(o, ..)| *o == e.0))
        .map(|e| e.3.abs())
        .fold(0.0, f64::max);
    println!("worst {:.2} % over the others", worst * 100.0);
    assert!(beyond.is_empty(), "beyond their bound: {beyond:?}");
    for (id, ..) in FSDP2_GLOO {
        assert!(errs.iter().any(|e| e.0 == *id), "{id} is not in the data");
    }
    assert!(
        errs.len() >= 16,
        "at least 16 measured FSDP2 runs, {}",
        errs.len()
    );
    let four = errs.iter().filter(|e| e.0.contains("-fsdp2-x4")).count();
    assert!(four >= 5, "at least 5 runs over 4 processes, {four}");
}

/// Issue 10's bound for the sharding regimes measured on the CPU.
const FSDP2_BOUND: f64 = 0.03;

/// FSDP2 runs whose peak is set by gloo's own buffers, with the bound each meets and why
/// (docs/accuracy.md). With bf16 reduction, torchtitan's peak is where the norm's
/// pre-backward gathers [norm, lm_head] again, and there gloo's all-gather holds a copy of
/// the input shard (4.19 MB) and a buffer the profiler sees without a tensor (8.39 MB):
/// rank 0 measured 121.4 MB in three runs and 115.9 MB in one. NCCL gathers into the
/// output, so the inventory leaves both out.
const FSDP2_GLOO: &[(&str, f64, &str)] = &[(
    "llama-h256-l3-kv2-v16384-b2-s256-bf16-mixed-sdpa-none-untied-fsdp2-x2-torchtitan-chunked-reduce-bf16",
    0.05,
    "gloo's all-gather buffers at the head group's second gather",
)];

/// `tests/data/deepspeed_zero_cpu.json` (`tools/measure_deepspeed_zero.py`): DeepSpeed
/// 0.19.6's own engine (`deepspeed.initialize`, its CPU accelerator) with ZeRO-1, 2 and 3
/// over gloo, 2 and 4 CPU processes on one host (`gpu = "cpu"`, `gpus = N`), rank 0's peak
/// of one steady-state step; fp32 and DeepSpeed's bf16 (`bf16-mixed`), accumulation 1 and
/// 2, the default buckets and smaller ones.
#[test]
fn deepspeed_zero_peaks_on_the_cpu_are_predicted_within_3_percent() {
    let errs = errors_in(include_str!("data/deepspeed_zero_cpu.json"));
    let mut worst = 0.0f64;
    let mut beyond = Vec::new();
    for (id, m, p, e) in &errs {
        let why = ZERO_NOT_MODELLED
            .iter()
            .find(|(x, _)| x == id)
            .map(|(_, w)| *w);
        println!(
            "{id:90} measured {m:>11} predicted {p:>11} error {:+.2} %{}",
            e * 100.0,
            why.map(|w| format!("  (not held: {w})"))
                .unwrap_or_default()
        );
        if why.is_none() {
            worst = worst.max(e.abs());
            if e.abs() > ZERO_BOUND {
                beyond.push(format!("{id}: {:+.2} %", e * 100.0));
            }
        }
    }
    println!("worst {:.2} % over {} runs", worst * 100.0, errs.len());
    assert!(beyond.is_empty(), "beyond 3 %: {beyond:?}");
    let stages = ["-zero1-", "-zero2-", "-zero3-"];
    for st in stages {
        let n = errs.iter().filter(|e| e.0.contains(st)).count();
        assert!(n >= 4, "at least 4 runs of {st}, {n}");
    }
    let four = errs.iter().filter(|e| e.0.contains("-x4")).count();
    assert!(four >= 4, "at least 4 runs over 4 processes, {four}");
    assert!(
        errs.len() >= 27,
        "at least 27 measured ZeRO runs, {}",
        errs.len()
    );
    for (id, _) in ZERO_NOT_MODELLED {
        assert!(errs.iter().any(|e| e.0 == *id), "{id} is not in the data");
    }
}

/// Issue 10's bound for DeepSpeed ZeRO on the CPU.
const ZERO_BOUND: f64 = 0.03;

/// ZeRO runs the model does not reproduce, with the reason (docs/accuracy.md).
const ZERO_NOT_MODELLED: &[(&str, &str)] = &[];
