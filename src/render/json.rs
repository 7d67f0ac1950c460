//! JSON output (the contract of DESIGN.md: `peak_allocated_bytes`, `peak_reserved_bytes`,
//! `device_bytes`, `capacity_bytes`, `fits`, `peak_phase`, `components`).

use serde_json::{json, Value};
use vramplan_planner::{Comparison, FitResult, Report};

fn value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

pub fn report(r: &Report) -> String {
    serde_json::to_string_pretty(&value(r)).unwrap_or_default()
}

pub fn compare(na: &str, a: &Report, nb: &str, b: &Report, c: &Comparison) -> String {
    let mut va = value(a);
    let mut vb = value(b);
    va["config"] = json!(na);
    vb["config"] = json!(nb);
    serde_json::to_string_pretty(&json!({ "a": va, "b": vb, "comparison": value(c) }))
        .unwrap_or_default()
}

pub fn fit(f: &FitResult, plan_toml: &str) -> String {
    let mut v = value(f);
    v["plan_toml"] = json!(plan_toml);
    serde_json::to_string_pretty(&v).unwrap_or_default()
}
