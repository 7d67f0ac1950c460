//! JSON output (the contract of DESIGN.md: `peak_allocated_bytes`, `peak_reserved_bytes`,
//! `device_bytes`, `capacity_bytes`, `fits`, `peak_phase`, `components`). A value that
//! cannot be serialized is an error, never a `null`.

use super::{prose, Render};
use crate::nvml::Detected;
use anyhow::{Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use std::path::Path;
use vramplan_planner::{
    Cause, Comparison, Confidence, DiagnosedLog, Diagnosis, Fact, FitResult, GpuSpec, Implausible,
    Ladder, ModelSpec, OomReport, PlanCheck, Report, RunSpec,
};

pub struct Json;

fn value<T: Serialize + ?Sized>(v: &T) -> Result<Value> {
    serde_json::to_value(v).context("cannot write the output as JSON")
}

fn text(v: &Value) -> Result<String> {
    let mut s = serde_json::to_string_pretty(v).context("cannot write the output as JSON")?;
    s.push('\n');
    Ok(s)
}

/// A diagnosis as `diagnose --json` has always written it: the report's fields at the top
/// level, the explanation and each fix's change as sentences.
#[derive(Serialize)]
struct DiagnosisView<'a> {
    cause: Cause,
    #[serde(flatten)]
    report: &'a OomReport,
    tensor: Option<&'a str>,
    tensor_layout: Option<&'a str>,
    explanation: String,
    implausible: Option<String>,
    implausible_kind: Option<&'a Implausible>,
    fixes: Vec<FixView>,
    confidence: Confidence,
    second_cause: Option<Cause>,
    evidence: Vec<EvidenceView<'a>>,
    plan_checks: Vec<CheckView<'a>>,
}

/// One fact weighed for a cause, with its sentence.
#[derive(Serialize)]
struct EvidenceView<'a> {
    cause: Cause,
    weight: u8,
    fact: &'a Fact,
    text: String,
}

/// One finding of the log against the plan, with its sentence.
#[derive(Serialize)]
struct CheckView<'a> {
    #[serde(flatten)]
    check: &'a PlanCheck,
    text: String,
}

#[derive(Serialize)]
struct FixView {
    change: String,
    predicted_peak_bytes: Option<u64>,
    fits: Option<bool>,
    keeps_global_batch: bool,
}

fn view(d: &Diagnosis) -> DiagnosisView<'_> {
    DiagnosisView {
        cause: d.cause,
        report: &d.report,
        tensor: d.tensor.as_deref(),
        tensor_layout: d.tensor_layout.as_deref(),
        explanation: prose::explanation(&d.explanation),
        implausible: d.implausible.as_ref().map(prose::implausible),
        implausible_kind: d.implausible.as_ref(),
        fixes: d
            .fixes
            .iter()
            .map(|f| FixView {
                change: prose::change(&f.kind),
                predicted_peak_bytes: f.predicted_peak_bytes,
                fits: f.fits,
                keeps_global_batch: f.keeps_global_batch,
            })
            .collect(),
        confidence: d.confidence,
        second_cause: d.second_cause,
        evidence: d
            .evidence
            .iter()
            .map(|e| EvidenceView {
                cause: e.cause,
                weight: e.weight,
                fact: &e.fact,
                text: prose::fact(&e.fact),
            })
            .collect(),
        plan_checks: d
            .plan_checks
            .iter()
            .map(|c| CheckView {
                check: c,
                text: prose::plan_check(c),
            })
            .collect(),
    }
}

fn detected_value(detected: &Result<Vec<Detected>>) -> Value {
    match detected {
        Ok(d) => json!(d
            .iter()
            .map(
                |d| json!({"index": d.index, "name": d.spec.display, "total_bytes": d.total.0,
                "capacity_bytes": d.spec.capacity.0, "capacity_source": d.capacity_source,
                "used_bytes": d.used.0, "free_bytes": d.free.0, "nearest_preset": d.preset})
            )
            .collect::<Vec<_>>()),
        Err(e) => json!({"error": format!("{e:#}")}),
    }
}

impl Render for Json {
    fn estimate(&self, _: &RunSpec, r: &Report) -> Result<String> {
        text(&value(r)?)
    }

    fn compare(
        &self,
        na: &str,
        a: &Report,
        nb: &str,
        b: &Report,
        c: &Comparison,
    ) -> Result<String> {
        let mut va = value(a)?;
        let mut vb = value(b)?;
        va["config"] = json!(na);
        vb["config"] = json!(nb);
        text(&json!({ "a": va, "b": vb, "comparison": value(c)? }))
    }

    fn fit(&self, f: &FitResult, plan: &str, _: usize, _: Option<&Path>) -> Result<String> {
        let mut v = value(f)?;
        v["plan_toml"] = json!(plan);
        text(&v)
    }

    fn ladder(&self, base: &RunSpec, l: &Ladder) -> Result<String> {
        let mut alternatives = Vec::new();
        for a in &l.alternatives {
            let mut v = value(a)?;
            v["flags"] = json!(prose::lever_flags(&a.levers));
            let shown = a
                .best
                .as_ref()
                .or(a.miss.as_ref().and_then(|m| m.smallest.as_ref()));
            v["gives_up"] = json!(prose::gives_up(&a.levers, base, shown));
            if let Some(m) = &a.miss {
                v["why_not"] = json!(prose::miss(m));
            }
            alternatives.push(v);
        }
        let why: Vec<String> = l.misses.iter().map(prose::miss).collect();
        text(&json!({
            "fits": false,
            "best": null,
            "why_not": why,
            "misses": value(&l.misses)?,
            "alternatives": alternatives,
            "shorter": value(&l.shorter)?,
        }))
    }

    fn diagnose(&self, log: &DiagnosedLog, _: Option<&Path>) -> Result<String> {
        let views: Vec<DiagnosisView> = log.diagnoses.iter().map(view).collect();
        let by_cause: serde_json::Map<String, Value> = log
            .by_cause
            .iter()
            .map(|(c, n)| (c.name().to_string(), json!(n)))
            .collect();
        text(&json!({
            "reports": value(&views)?,
            "report_count": log.reports,
            "by_cause": by_cause,
        }))
    }

    fn models(&self, ms: &[ModelSpec]) -> Result<String> {
        text(&value(ms)?)
    }

    fn gpus(&self, gs: &[GpuSpec], detected: &Result<Vec<Detected>>) -> Result<String> {
        text(&json!({"presets": value(gs)?, "detected": detected_value(detected)}))
    }
}
