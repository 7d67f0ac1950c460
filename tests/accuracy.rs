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

/// The same for one measurement file's text.
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
    // Every compiled configuration within 3 %; torchtune's eager chunked loss in fp32 is
    // at +3.8 % (docs/accuracy.md), so eager runs are held to 4 %.
    assert!(worst.0 <= 0.03, "compiled: worst {:.2} %", worst.0 * 100.0);
    assert!(worst.1 <= 0.04, "eager: worst {:.2} %", worst.1 * 100.0);
}

/// The bound this model meets today; the target of the issue is 5 %.
const BOUND: f64 = 0.05;
