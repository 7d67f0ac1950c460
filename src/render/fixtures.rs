//! Snapshots of the pure renderers on fixture reports: the seed scenario (nanochat d16 on
//! two RTX 5090D, seed 002) and its out-of-memory log, in both formats; `fit`'s ladder
//! when nothing fits (Llama-3.1-8B on one RTX 4090).

use super::{Format, Render};
use vramplan_planner::{
    diagnose_log, estimate, fit_or_ladder, host_memory, parse_log, training_time, Bytes, Context,
    DataSize, DiagnosedLog, FitRequest, FixPlan, GlobalBatch, HostOptions, Ladder, Presets,
    RawConfig, RawHardware, RawModel, RawTrain, Reader, RunSpec, Utilization, DEFAULT_UTILIZATION,
};

fn seed() -> RunSpec {
    let text = include_str!("../../presets/examples/nanochat-d16-failed.toml");
    let raw = RawConfig::from_toml(text).expect("the seed config parses");
    let presets = Presets::builtin().expect("the built-in presets load");
    raw.resolve(&presets, &Context::default())
        .expect("the seed config resolves")
}

fn diagnoses(with_config: bool) -> DiagnosedLog {
    let plan = with_config.then(|| FixPlan::new(&seed()));
    let reports = parse_log(include_str!("../../tests/data/oom/seed_nanochat_d16.log"));
    diagnose_log(reports, plan.as_ref(), 1000)
}

fn both(f: impl Fn(&dyn Render) -> String) -> (String, String) {
    (f(Format::Table.renderer()), f(Format::Json.renderer()))
}

#[test]
fn estimate_seed() {
    let s = seed();
    let r = estimate(&s);
    let (table, json) = both(|x| x.estimate(&s, &r).expect("renders"));
    insta::assert_snapshot!("estimate_table", table);
    insta::assert_snapshot!("estimate_json", json);
}

/// Seed 001 with its host side and data set: host RAM per process and machine, time per epoch.
#[test]
fn estimate_seed_001_with_host_and_time() {
    let text = include_str!("../../presets/examples/chatlm-pretrain-3x3080.toml");
    let raw = RawConfig::from_toml(text).expect("the seed config parses");
    let presets = Presets::builtin().expect("the built-in presets load");
    let s = raw
        .resolve(&presets, &Context::default())
        .expect("resolves");
    let mut r = estimate(&s);
    let mut o = HostOptions::for_run(&s);
    o.reader = Reader::RowGroup;
    o.samples = Some(10_000_000);
    o.capacity = Some(Bytes(12 << 30));
    let mut h = host_memory(&s, r.host_bytes, &o);
    h.capacity_source = Some("hardware.host_ram_gib".into());
    r.host = Some(h);
    let u = Utilization::parse("--utilization", DEFAULT_UTILIZATION).expect("the default parses");
    r.time = Some(training_time(&s, DataSize::Samples(10_000_000), 3.0, u));
    let (table, json) = both(|x| x.estimate(&s, &r).expect("renders"));
    insta::assert_snapshot!("estimate_seed_001_table", table);
    insta::assert_snapshot!("estimate_seed_001_json", json);
}

#[test]
fn diagnose_seed_with_config() {
    let ds = diagnoses(true);
    assert_eq!(ds.diagnoses.len(), 1);
    let (table, json) = both(|x| x.diagnose(&ds, None).expect("renders"));
    insta::assert_snapshot!("diagnose_config_table", table);
    insta::assert_snapshot!("diagnose_config_json", json);
}

#[test]
fn diagnose_seed_without_config() {
    let ds = diagnoses(false);
    let (table, json) = both(|x| x.diagnose(&ds, None).expect("renders"));
    insta::assert_snapshot!("diagnose_table", table);
    insta::assert_snapshot!("diagnose_json", json);
}

#[test]
fn diagnose_nothing_found() {
    let none = diagnose_log(Vec::new(), None, 1000);
    let (table, json) = both(|x| x.diagnose(&none, None).expect("renders"));
    assert_eq!(
        table,
        "no CUDA out-of-memory report found (nor ROCm, MPS, cuBLAS, candle or a host OOM kill)\n"
    );
    assert_eq!(
        json,
        "{\n  \"by_cause\": {},\n  \"report_count\": 0,\n  \"reports\": []\n}\n"
    );
}

/// The case: Llama-3.1-8B on one RTX 4090 at 2048 × 32, as `fit` builds it from
/// its flags; full fine-tuning fits nothing.
fn ladder_llama_8b() -> (RunSpec, Ladder) {
    let raw = RawConfig {
        model: RawModel {
            preset: Some("llama-3.1-8b".into()),
            ..RawModel::default()
        },
        train: RawTrain {
            seq_len: Some(2048),
            precision: Some("bf16-autocast".into()),
            ..RawTrain::default()
        },
        hardware: RawHardware {
            gpu: Some("rtx4090-24gb".into()),
            gpus: Some(1),
            sharding: Some("ddp".into()),
            ..RawHardware::default()
        },
        lora: None,
    };
    let presets = Presets::builtin().expect("the built-in presets load");
    let req = FitRequest {
        base: raw
            .resolve(&presets, &Context::default())
            .expect("the run resolves"),
        seq_len: Some(2048),
        global: GlobalBatch::Sequences(32),
        margin: 0.1,
        allow_fused: false,
        keep: Vec::new(),
    };
    match fit_or_ladder(&req, &[]).expect("a valid request") {
        Ok(r) => panic!(
            "8 B full fine-tuning fits 24 GB: {:?}",
            r.best.report.device_bytes
        ),
        Err(l) => (req.base, l),
    }
}

#[test]
fn ladder_when_nothing_fits() {
    let (base, l) = ladder_llama_8b();
    let (table, json) = both(|x| x.ladder(&base, &l).expect("renders"));
    insta::assert_snapshot!("ladder_table", table);
    let v: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
    assert_eq!(v["fits"], false);
    assert!(v["best"].is_null());
    let alts = v["alternatives"].as_array().expect("a list");
    assert_eq!(alts.len(), l.alternatives.len());
    for (a, want) in alts.iter().zip(&l.alternatives) {
        assert_eq!(a["fits"], want.fits);
        assert_eq!(a["flags"], super::prose::lever_flags(&want.levers));
        assert!(!a["gives_up"].as_str().unwrap().is_empty());
        // A plan that fits carries its numbers; one that does not, why not.
        assert_eq!(a["best"].is_object(), want.fits);
        assert_eq!(a["why_not"].is_string(), !want.fits);
    }
    assert!(v["why_not"][0]
        .as_str()
        .unwrap()
        .starts_with("seq 2048: the smallest candidate"));
}
