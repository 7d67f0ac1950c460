//! How long the planner takes to answer: `fit` of a 1.7 B model on an H100 beside
//! `estimate` of the built-in default (`presets/examples/nanochat-d16-stable.toml`), both without process start or rendering.
//!
//! `cargo bench -p vramplan-planner --bench planner`. The whole-process comparison against
//! another build is `tools/bench_fit.sh` (docs/performance.md, "planner speed").

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use vramplan_planner::{
    estimate, fit, Context, FitRequest, GlobalBatch, Presets, RawConfig, RawHardware, RawModel,
    RawTrain, RunSpec,
};

const DEFAULT_CONFIG: &str = include_str!("../../presets/examples/nanochat-d16-stable.toml");

fn spec(presets: &Presets, model: &str, gpu: &str, seq_len: u64) -> RunSpec {
    let raw = RawConfig {
        model: RawModel {
            preset: Some(model.into()),
            ..RawModel::default()
        },
        train: RawTrain {
            seq_len: Some(seq_len),
            ..RawTrain::default()
        },
        hardware: RawHardware {
            gpu: Some(gpu.into()),
            ..RawHardware::default()
        },
        lora: None,
    };
    raw.resolve(presets, &Context::default())
        .expect("the benchmark's configs are valid")
}

fn planner(c: &mut Criterion) {
    let presets = Presets::builtin().expect("presets");
    // `vramplan fit --gpu h100-80gb --model smollm2-1.7b --seq-len 2048 --global-batch 64`
    let req = FitRequest {
        base: spec(&presets, "smollm2-1.7b", "h100-80gb", 2048),
        seq_len: Some(2048),
        global: GlobalBatch::Sequences(64),
        margin: 0.1,
        allow_fused: false,
        keep: Vec::new(),
    };
    c.bench_function("fit smollm2-1.7b h100-80gb seq 2048 global 64", |b| {
        b.iter(|| fit(black_box(&req)).expect("fits"))
    });
    // `vramplan estimate` with no file: nanochat d16 on 2 × RTX 5090D (seed 002).
    let default = RawConfig::from_toml(DEFAULT_CONFIG)
        .and_then(|r| r.resolve(&presets, &Context::default()))
        .expect("the default plan is valid");
    c.bench_function("estimate nanochat-d16-stable (the default)", |b| {
        b.iter(|| estimate(black_box(&default)))
    });
}

criterion_group!(benches, planner);
criterion_main!(benches);
