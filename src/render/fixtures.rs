//! Snapshots of the pure renderers on fixture reports: the seed scenario (nanochat d16 on
//! two RTX 5090D, seed 002) and its out-of-memory log, in both formats.

use super::{Format, Render};
use vramplan_planner::{
    diagnose_log, estimate, host_memory, parse_log, training_time, Bytes, Context, DataSize,
    DiagnosedLog, FixPlan, HostOptions, Presets, RawConfig, Reader, RunSpec, Utilization,
    DEFAULT_UTILIZATION,
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
