//! Whole config texts as a hostile user writes them: the real keys (and some unknown
//! ones) with huge, zero, negative, wrongly typed, long and multi-line values.
//!
//! Asserted for every text: resolution never panics and is quick, every error is one line
//! of at most 200 characters naming a key or table of the text, and every accepted config
//! estimates without panicking, quickly.

use proptest::prelude::*;
use std::time::{Duration, Instant};
use vramplan_planner::*;

/// Wall time allowed for one resolve and for one estimate (a debug build on a busy machine).
const QUICK: Duration = Duration::from_secs(1);

/// The inventory and the allocator's replay are linear in blocks: an estimate may take
/// `QUICK` more for each this many blocks (a 4,096-block estimate takes about 1.2 s in a
/// debug build, and 5.5 s with ZeRO-3 over two processes, which drew 5.1 s against a
/// limit of 5 s when this was 1,024; 0.5 s in a release build).
const BLOCKS_PER_QUICK: u64 = 512;

/// Values that hit each class of bad input, in TOML syntax.
fn hostile() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".to_string()),
        Just("-1".to_string()),
        Just("9223372036854775807".to_string()),
        Just("1e308".to_string()),
        Just("nan".to_string()),
        Just("-inf".to_string()),
        Just("true".to_string()),
        Just("[1, 2]".to_string()),
        Just("{ a = 1 }".to_string()),
        Just("\"\"".to_string()),
        Just(format!("\"{}\"", "x".repeat(10_000))),
        Just("\"line\\nbreak\\u0007\"".to_string()),
        Just("\"\"\"\nmulti\nline\n\"\"\"".to_string()),
        "[a-z0-9-]{1,12}".prop_map(|s| format!("\"{s}\"")),
    ]
}

/// Values a key of this kind accepts, and some just past its bounds.
fn plausible(key: &str) -> BoxedStrategy<String> {
    let names: &[&str] = match key {
        "preset" => &[
            "gpt2",
            "nanochat-d4",
            "smollm2-135m",
            "qwen2.5-0.5b",
            "gpt3",
        ],
        "arch" => &["llama", "qwen2", "gpt2", "nanochat", "t5", "bert"],
        "precision" => &["fp32", "bf16-autocast", "fp16-autocast", "bf16", "fp8"],
        "optimizer" => &["adamw", "adamw-8bit", "sgd", "adafactor", "muon"],
        "checkpointing" => &["none", "selective", "full"],
        "loss" => &["float-cast", "chunked", "fused"],
        "attention" => &["sdpa", "eager"],
        "engine" => &["torch", "candle"],
        "gpu" => &["cpu", "h100-80gb", "rtx4060-laptop-8gb", "auto", "rtx9090"],
        "sharding" => &["ddp", "zero1", "zero2", "zero3"],
        "tie_embeddings" | "gated_ffn" => {
            return prop_oneof![Just("true"), Just("false")]
                .prop_map(String::from)
                .boxed()
        }
        "memory_gib" | "learning_rate" => {
            return prop_oneof![Just(0.5f64), Just(8.0), Just(1e6), Just(-2.0)]
                .prop_map(|g| format!("{g:?}"))
                .boxed()
        }
        _ => {
            return prop_oneof![
                6 => prop::sample::select(vec![1u64, 2, 4, 64, 256]),
                1 => 1u64..9,
                1 => Just(64),
                1 => Just(1024),
                1 => Just(4096),
                1 => Just(4097),
                1 => Just(20_000),
                1 => Just(1 << 20),
                1 => Just((1 << 20) + 1),
                1 => Just(1 << 24),
            ]
            .prop_map(|n| n.to_string())
            .boxed()
        }
    };
    prop::sample::select(names.to_vec())
        .prop_map(|n| format!("\"{n}\""))
        .boxed()
}

const MODEL_KEYS: &[&str] = &[
    "preset",
    "arch",
    "hidden_size",
    "num_layers",
    "num_decoder_layers",
    "num_heads",
    "num_kv_heads",
    "head_dim",
    "intermediate_size",
    "vocab_size",
    "tie_embeddings",
    "max_position_embeddings",
    "gated_ffn",
    "name",
    "layers",
];
const TRAIN_KEYS: &[&str] = &[
    "micro_batch",
    "seq_len",
    "grad_accum",
    "precision",
    "optimizer",
    "checkpointing",
    "loss",
    "loss_chunk",
    "attention",
    "engine",
    "steps",
    "learning_rate",
    "batch_size",
];
const HARDWARE_KEYS: &[&str] = &["gpu", "gpus", "sharding", "memory_gib", "vram"];

/// One table: a few of its keys, each with a plausible value most of the time.
fn table(keys: &'static [&'static str]) -> impl Strategy<Value = Vec<(String, String)>> {
    prop::collection::vec(prop::sample::select(keys.to_vec()), 0..4).prop_flat_map(|ks| {
        ks.into_iter()
            .map(|k| {
                let v = prop_oneof![12 => plausible(k), 1 => hostile()];
                (Just(k.to_string()), v)
            })
            .collect::<Vec<_>>()
    })
}

fn config_text() -> impl Strategy<Value = String> {
    // Most texts name a preset first, so that many get past the model and reach the rest.
    let model = (
        prop::option::weighted(0.7, plausible("preset")),
        table(MODEL_KEYS),
    )
        .prop_map(|(preset, mut keys)| {
            if let Some(p) = preset {
                keys.insert(0, ("preset".to_string(), p));
            }
            keys
        });
    (
        model,
        table(TRAIN_KEYS),
        table(HARDWARE_KEYS),
        prop::sample::select(vec!["", "", "", "[trian]\n", "[model.extra]\n"]),
    )
        .prop_map(|(model, train, hardware, extra)| {
            let mut text = String::new();
            for (name, keys) in [("model", model), ("train", train), ("hardware", hardware)] {
                text.push_str(&format!("[{name}]\n"));
                // A key given twice is a TOML error of its own; keep the first.
                let mut seen = std::collections::BTreeSet::new();
                for (k, v) in keys.into_iter().filter(|(k, _)| seen.insert(k.clone())) {
                    text.push_str(&format!("{k} = {v}\n"));
                }
            }
            text.push_str(extra);
            text
        })
}

/// Every table and dotted key written in the text.
fn names_in(text: &str) -> Vec<String> {
    let mut names = vec!["model".to_string()];
    let mut table = String::new();
    for line in text.lines() {
        if let Some(h) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            table = h.to_string();
            names.push(table.clone());
            // A sub-table is reported as an unknown field of its parent.
            names.extend(h.rsplit('.').next().map(|last| format!("`{last}`")));
        } else if let Some((k, _)) = line.split_once(" = ") {
            names.push(format!("{table}.{k}"));
            names.push(format!("`{k}`"));
        }
    }
    names
}

/// What one text did: resolved and estimated, or refused with a well-formed line.
fn check(text: &str) -> std::result::Result<bool, TestCaseError> {
    let presets = Presets::builtin().unwrap();
    let ctx = Context {
        host_memory: Some(Bytes(64 * GIB)),
        ..Context::default()
    };
    let start = Instant::now();
    let resolved = RawConfig::from_toml(text).and_then(|r| r.resolve(&presets, &ctx));
    prop_assert!(
        start.elapsed() < QUICK,
        "resolve took {:?}",
        start.elapsed()
    );
    match resolved {
        Err(e) => {
            let line = e.to_string();
            prop_assert!(!line.contains('\n'), "{line}");
            let n = line.chars().count();
            prop_assert!(n <= 200, "{n} chars: {line}");
            prop_assert!(
                names_in(text).iter().any(|k| line.contains(k.as_str())),
                "names no key of the text: {line}"
            );
            Ok(false)
        }
        Ok(spec) => {
            let blocks = spec.model.num_layers + spec.model.num_decoder_layers;
            let limit = QUICK * (1 + (blocks / BLOCKS_PER_QUICK) as u32);
            let start = Instant::now();
            let report = estimate(&spec);
            prop_assert!(
                start.elapsed() < limit,
                "estimate took {:?}",
                start.elapsed()
            );
            prop_assert!(report.peak_allocated_bytes > 0);
            Ok(true)
        }
    }
}

#[test]
fn hostile_configs_resolve_or_say_which_key_in_one_line() {
    use proptest::test_runner::{Config, TestRunner};
    const CASES: u32 = 3000;
    let accepted = std::cell::Cell::new(0u32);
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        ..Config::default()
    });
    runner
        .run(&config_text(), |text| {
            accepted.set(accepted.get() + u32::from(check(&text)?));
            Ok(())
        })
        .unwrap();
    // Not vacuous: a fair share of the texts must get through to `estimate`.
    assert!(
        accepted.get() > CASES / 40,
        "only {} of {CASES} accepted",
        accepted.get()
    );
}
