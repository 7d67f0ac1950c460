//! From an out-of-memory report to its cause, the tensor behind it and ranked fixes.
//!
//! The planner returns data: a [`Diagnosis`] names the cause with the evidence for it and
//! a confidence ([`evidence`]), the numbers that support it ([`Explanation`]), what the log
//! says against the plan ([`PlanCheck`]) and each fix as the config edits it makes
//! ([`Edit`]) with the peak the planner predicts for it. The sentences are written by the
//! binary's renderers.
//!
//! Fixes depend on the run config, not on the report (only the tensor match reads the
//! report), so a [`FixPlan`] plans them once per config and every report of a log reuses
//! it: the work per report is one scan of the planned timeline's tensors.

mod evidence;
mod fixes;
mod plan_check;

pub use evidence::{assess, Assessment, Confidence, Evidence, Fact};
pub use fixes::planned_fixes;
pub use plan_check::{plan_checks, PlanCheck, Predicted};

use crate::oom::{match_tensor, Cause, HostSignal, Match, OomReport, Source};
use crate::report::estimate;
use crate::spec::{Checkpointing, LossMode, RunSpec, Sharding};
use crate::timeline::{Component, Timeline};
use serde::Serialize;

/// What the failing frame and code line say about the tensor, when no config names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hint {
    Logits,
    Attention,
    OptimizerState,
    /// A ZeRO-3/FSDP all-gather of sharded parameters.
    AllGather,
    /// Weights moved to the device (`.to(device)`, `from_pretrained`, `torch.load`).
    Loading,
}

impl Hint {
    /// Reads the frame and code line: `.float()`, `cross_entropy`, `lm_head` are the logits.
    pub fn from_code(code: &str) -> Option<Hint> {
        let c = code.to_ascii_lowercase();
        let any = |words: &[&str]| words.iter().any(|w| c.contains(w));
        if any(&[
            ".float()",
            "cross_entropy",
            "lm_head",
            "log_softmax",
            "log_prob",
            "logprob",
        ]) {
            Some(Hint::Logits)
        } else if any(&["scaled_dot_product_attention", "softmax", "attn"]) {
            Some(Hint::Attention)
        } else if any(&["optimizer.step", "adam", "_foreach_"]) {
            Some(Hint::OptimizerState)
        } else if any(&["all_gather", "allgather", "fetch_sub_module"]) {
            Some(Hint::AllGather)
        } else if any(&[
            ".to(device",
            "from_pretrained",
            "load_state_dict",
            "set_module_tensor_to_device",
            "torch.load",
            "_move_model_to_device",
            "create_weights",
        ]) {
            Some(Hint::Loading)
        } else {
            None
        }
    }

    /// The hint of a report's last frame and its code line.
    pub fn from_report(r: &OomReport) -> Option<Hint> {
        Hint::from_code(&format!(
            "{} {}",
            r.frame.as_deref().unwrap_or(""),
            r.code_line.as_deref().unwrap_or("")
        ))
    }

    pub fn name(self) -> &'static str {
        match self {
            Hint::Logits => "logits",
            Hint::Attention => "attention",
            Hint::OptimizerState => "optimizer state",
            Hint::AllGather => "parameter all-gather",
            Hint::Loading => "weight loading",
        }
    }
}

/// A logits tensor that is exactly tokens × vocab × width bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LogitsShape {
    pub micro_batch: u64,
    pub seq_len: u64,
    pub vocab_size: u64,
    pub width_bytes: u64,
}

/// A report whose numbers contradict each other: it is not matched against the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Implausible {
    /// "Tried to allocate 0 bytes" (or a negative amount, which reads as none).
    NoRequest,
    /// More allocated, reserved, free or in use than the GPU's capacity.
    AboveCapacity { field: &'static str, bytes: u64 },
}

/// The numbers behind the cause; `None` where the report does not print one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Explanation {
    /// A huge request matched to a tensor of the planned step.
    HugeTensorMatched {
        tensor: String,
        bytes: u64,
        phase: String,
        shape: Option<LogitsShape>,
    },
    HugeTensor {
        request_bytes: u64,
        hint: Option<Hint>,
    },
    Fragmentation {
        reserved_unallocated_bytes: u64,
        request_bytes: u64,
    },
    /// The device reports the request as free and still refuses it.
    FreeButRefused { free_bytes: u64, request_bytes: u64 },
    OtherProcesses {
        other_processes_bytes: u64,
        capacity_bytes: u64,
    },
    /// candle/cudarc: no sizes in the message.
    DriverError,
    DoesNotFit {
        allocated_bytes: Option<u64>,
        free_bytes: Option<u64>,
        request_bytes: Option<u64>,
        hint: Option<Hint>,
    },
    /// The kernel killed the process for host memory.
    HostOom {
        how: HostSignal,
        process: Option<String>,
        anon_rss_bytes: Option<u64>,
        rank: Option<u32>,
    },
    /// An error without sizes: where it failed is all it says.
    NoSizes { source: Source, hint: Option<Hint> },
}

/// One change to the run config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "key", rename_all = "snake_case")]
pub enum Edit {
    MicroBatch { micro_batch: u64, grad_accum: u64 },
    Loss { loss: LossMode },
    Checkpointing { checkpointing: Checkpointing },
    SeqLen { seq_len: u64 },
    Sharding { sharding: Sharding },
}

/// A change on the host side, for a process the kernel killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostChange {
    /// Fewer data loader workers (each one is a copy of the dataset's state).
    FewerWorkers,
    /// No pinned (page-locked) host buffers.
    NoPinnedMemory,
    /// Memory-mapped datasets and weights instead of reading them into RAM (one copy for
    /// all ranks; `low_cpu_mem_usage`, safetensors).
    MmapLoading,
    /// A smaller shuffle buffer.
    SmallerShuffleBuffer,
}

/// What a fix does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum FixKind {
    /// Config edits, applied together.
    Edits {
        edits: Vec<Edit>,
    },
    /// `PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`.
    ExpandableSegments {
        reserved_unallocated_bytes: u64,
        request_bytes: u64,
    },
    FreeGpu {
        other_processes_bytes: u64,
    },
    /// Without a config: halve the micro-batch, double the accumulation.
    HalveMicroBatch,
    /// Without a config: shard the optimizer state (or an 8-bit optimizer).
    ShardOptimizer,
    /// No sizes: look at what holds the device (nvidia-smi, rocm-smi) before changing the run.
    CheckDevice,
    Host {
        change: HostChange,
    },
}

/// One suggested change, with the planner's prediction when a config was given.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fix {
    pub kind: FixKind,
    pub predicted_peak_bytes: Option<u64>,
    pub fits: Option<bool>,
    pub keeps_global_batch: bool,
    /// The fixed run, when the fix was planned.
    #[serde(skip)]
    pub spec: Option<RunSpec>,
}

impl Fix {
    fn advice(kind: FixKind) -> Fix {
        Fix {
            kind,
            predicted_peak_bytes: None,
            fits: None,
            keeps_global_batch: true,
            spec: None,
        }
    }

    fn edits(edits: Vec<Edit>) -> Fix {
        Fix::advice(FixKind::Edits { edits })
    }
}

/// One report, diagnosed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Diagnosis {
    pub cause: Cause,
    pub report: OomReport,
    pub tensor: Option<String>,
    /// The matched tensor's shape and dtype, e.g. `[20, 3072, 65536] f32`.
    pub tensor_layout: Option<String>,
    pub explanation: Explanation,
    /// Set when the report's numbers are nonsense: it was not matched against the plan.
    pub implausible: Option<Implausible>,
    pub fixes: Vec<Fix>,
    /// How sure the evidence makes the cause.
    pub confidence: Confidence,
    /// A second cause the evidence also supports.
    pub second_cause: Option<Cause>,
    /// The facts weighed, for and against.
    pub evidence: Vec<Evidence>,
    /// With a config: the log's numbers against the plan.
    pub plan_checks: Vec<PlanCheck>,
}

/// A run config's planned step and its fixes, ranked: computed once, used for every report.
#[derive(Debug, Clone)]
pub struct FixPlan {
    pub spec: RunSpec,
    pub timeline: Timeline,
    pub fixes: Vec<Fix>,
    /// The plan's own peak, to check the log against.
    pub predicted: Predicted,
}

impl FixPlan {
    pub fn new(spec: &RunSpec) -> FixPlan {
        let r = estimate(spec);
        FixPlan {
            spec: spec.clone(),
            predicted: Predicted::of(&r),
            timeline: r.timeline,
            fixes: planned_fixes(spec),
        }
    }
}

/// Diagnoses one report, against a planned config when there is one.
pub fn diagnose(report: OomReport, plan: Option<&FixPlan>) -> Diagnosis {
    let a = assess(&report);
    let cause = a.cause;
    let implausible = implausible(&report);
    let matched = match (plan, implausible) {
        (Some(p), None) if report.source.has_sizes() => match_tensor(&report, &p.timeline),
        _ => None,
    };
    let hint = Hint::from_report(&report);
    let explanation = explain(&report, cause, matched.as_ref(), plan, hint);
    let mut fixes = cause_fixes(&report, cause);
    match plan {
        _ if cause == Cause::HostOom => {}
        Some(p) => fixes.extend(p.fixes.iter().cloned()),
        None => {
            let logits = matched
                .as_ref()
                .map(|m| m.component == Component::Logits)
                .unwrap_or(hint == Some(Hint::Logits));
            fixes.extend(generic_fixes(logits, hint));
        }
    }
    let checks = plan
        .map(|p| plan_checks(&report, cause, &p.predicted))
        .unwrap_or_default();
    Diagnosis {
        cause,
        tensor_layout: matched.as_ref().and_then(|m| m.layout.clone()),
        tensor: matched.map(|m| m.name),
        report,
        explanation,
        implausible,
        fixes,
        confidence: a.confidence,
        second_cause: a.second,
        evidence: a.evidence,
        plan_checks: checks,
    }
}

/// A log's reports: the first ones diagnosed in full, every one counted by cause.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DiagnosedLog {
    pub diagnoses: Vec<Diagnosis>,
    /// Every report of the log, diagnosed in full or only counted.
    pub reports: usize,
    /// Every report's cause, counted, in the order of [`Cause::ALL`] (causes with none left out).
    pub by_cause: Vec<(Cause, usize)>,
}

/// Diagnoses the first `shown` reports in full and only classifies the rest: a log with
/// hundreds of thousands of reports is summarized, not rendered whole.
pub fn diagnose_log(reports: Vec<OomReport>, plan: Option<&FixPlan>, shown: usize) -> DiagnosedLog {
    let total = reports.len();
    let mut counts = [0usize; Cause::ALL.len()];
    let mut diagnoses = Vec::with_capacity(total.min(shown));
    for (i, r) in reports.into_iter().enumerate() {
        let cause = if i < shown {
            let d = diagnose(r, plan);
            let c = d.cause;
            diagnoses.push(d);
            c
        } else {
            assess(&r).cause
        };
        if let Some(k) = Cause::ALL.iter().position(|&c| c == cause) {
            counts[k] += 1;
        }
    }
    DiagnosedLog {
        diagnoses,
        reports: total,
        by_cause: Cause::ALL
            .into_iter()
            .zip(counts)
            .filter(|&(_, n)| n > 0)
            .collect(),
    }
}

/// The run of the best planned fix over all reports: what `diagnose --out` writes.
pub fn best_fix(ds: &[Diagnosis]) -> Option<&RunSpec> {
    ds.iter()
        .flat_map(|d| d.fixes.iter())
        .find_map(|f| f.spec.as_ref())
}

/// Numbers no allocator prints: nothing requested, or more held than the GPU has.
pub fn implausible(r: &OomReport) -> Option<Implausible> {
    if r.request_bytes == Some(0) {
        return Some(Implausible::NoRequest);
    }
    let cap = r.capacity_bytes?;
    [
        ("allocated", r.allocated_bytes),
        ("reserved", r.reserved_bytes),
        ("free", r.free_bytes),
        ("process in use", r.process_in_use_bytes),
    ]
    .into_iter()
    .find_map(|(field, v)| {
        v.filter(|&b| b > cap)
            .map(|bytes| Implausible::AboveCapacity { field, bytes })
    })
}

fn explain(
    r: &OomReport,
    cause: Cause,
    matched: Option<&Match>,
    plan: Option<&FixPlan>,
    hint: Option<Hint>,
) -> Explanation {
    let req = r.request_bytes.unwrap_or(0);
    match cause {
        Cause::HugeTensor => match (matched, plan) {
            (Some(m), Some(p)) => Explanation::HugeTensorMatched {
                tensor: m.name.clone(),
                bytes: m.bytes,
                phase: m.phase.clone(),
                shape: logits_shape(m, &p.spec),
            },
            _ => Explanation::HugeTensor {
                request_bytes: req,
                hint,
            },
        },
        Cause::Fragmentation => match r.free_bytes.filter(|&f| f >= req) {
            Some(free_bytes) => Explanation::FreeButRefused {
                free_bytes,
                request_bytes: req,
            },
            None => Explanation::Fragmentation {
                reserved_unallocated_bytes: r.reserved_unallocated_bytes.unwrap_or(0),
                request_bytes: req,
            },
        },
        Cause::OtherProcesses => Explanation::OtherProcesses {
            other_processes_bytes: held_elsewhere(r),
            capacity_bytes: r.capacity_bytes.unwrap_or(0),
        },
        Cause::DoesNotFit if r.driver_error => Explanation::DriverError,
        Cause::DoesNotFit => Explanation::DoesNotFit {
            allocated_bytes: r.allocated_bytes,
            free_bytes: r.free_bytes,
            request_bytes: r.request_bytes,
            hint,
        },
        Cause::HostOom => {
            let h = r.host.clone();
            Explanation::HostOom {
                how: h.as_ref().map_or(HostSignal::Sigkill, |h| h.how),
                process: h.as_ref().and_then(|h| h.process.clone()),
                anon_rss_bytes: h.as_ref().and_then(|h| h.anon_rss_bytes),
                rank: r.rank,
            }
        }
        Cause::Unknown => Explanation::NoSizes {
            source: r.source,
            hint,
        },
    }
}

/// Memory on the device held by others: listed processes, or what PyTorch does not hold.
fn held_elsewhere(r: &OomReport) -> u64 {
    r.other_processes_bytes
        .filter(|&b| b > 0)
        .or_else(|| r.outside_pytorch_bytes())
        .unwrap_or(0)
}

/// The shape of a logits tensor that is exactly micro-batch × seq × vocab × 4 (or 2) bytes.
pub fn logits_shape(m: &Match, s: &RunSpec) -> Option<LogitsShape> {
    let (mb, t, v) = (s.train.micro_batch, s.train.seq_len, s.model.vocab_size);
    if m.component != Component::Logits {
        return None;
    }
    [4u64, 2].into_iter().find_map(|w| {
        let bytes = mb.checked_mul(t)?.checked_mul(v)?.checked_mul(w)?;
        (bytes == m.bytes).then_some(LogitsShape {
            micro_batch: mb,
            seq_len: t,
            vocab_size: v,
            width_bytes: w,
        })
    })
}

/// The fix the cause itself calls for, before any config change.
fn cause_fixes(r: &OomReport, cause: Cause) -> Vec<Fix> {
    match cause {
        Cause::Fragmentation => vec![Fix::advice(FixKind::ExpandableSegments {
            reserved_unallocated_bytes: r.reserved_unallocated_bytes.unwrap_or(0),
            request_bytes: r.request_bytes.unwrap_or(0),
        })],
        Cause::OtherProcesses => vec![Fix::advice(FixKind::FreeGpu {
            other_processes_bytes: held_elsewhere(r),
        })],
        Cause::HostOom => [
            HostChange::FewerWorkers,
            HostChange::NoPinnedMemory,
            HostChange::MmapLoading,
            HostChange::SmallerShuffleBuffer,
        ]
        .into_iter()
        .map(|change| Fix::advice(FixKind::Host { change }))
        .collect(),
        Cause::Unknown => vec![Fix::advice(FixKind::CheckDevice)],
        _ => Vec::new(),
    }
}

/// Without a config: the usual savers, the loss first when the logits are to blame.
pub fn generic_fixes(logits: bool, hint: Option<Hint>) -> Vec<Fix> {
    let mut v = Vec::new();
    if logits {
        for loss in [LossMode::Chunked, LossMode::Fused] {
            v.push(Fix::edits(vec![Edit::Loss { loss }]));
        }
    }
    if hint == Some(Hint::OptimizerState) {
        v.push(Fix::advice(FixKind::ShardOptimizer));
    }
    v.push(Fix::advice(FixKind::HalveMicroBatch));
    v.push(Fix::edits(vec![Edit::Checkpointing {
        checkpointing: Checkpointing::Full,
    }]));
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MAX_COUNT;
    use crate::oom::parse_log;
    use crate::presets::Presets;
    use crate::units::GIB;

    const V1: &str = "  File \"gpt.py\", line 301, in forward\n    logits = logits.float()\nRuntimeError: CUDA out of memory. Tried to allocate 15.00 GiB (GPU 0; 31.84 GiB total capacity; 12.10 GiB already allocated; 3.20 GiB free; 14.00 GiB reserved in total by PyTorch)";

    fn seed_spec() -> RunSpec {
        let text = include_str!("../../../presets/examples/nanochat-d16-failed.toml");
        let raw = crate::config::RawConfig::from_toml(text).expect("parses");
        let presets = Presets::builtin().expect("presets");
        raw.resolve(&presets, &crate::config::Context::default())
            .expect("resolves")
    }

    /// Regression: halving the micro-batch doubled an accumulation already at its bound,
    /// so `diagnose --out` could write a plan that `estimate` refuses.
    #[test]
    fn every_planned_fix_is_a_plan_the_config_accepts() {
        let mut spec = seed_spec();
        spec.train.grad_accum = MAX_COUNT;
        let fixes = planned_fixes(&spec);
        assert!(!fixes.is_empty());
        for f in &fixes {
            let s = f.spec.as_ref().expect("planned fixes carry their run");
            assert!(s.train.grad_accum <= MAX_COUNT, "{:?}", f.kind);
        }
        assert!(!fixes.iter().any(|f| matches!(
            &f.kind,
            FixKind::Edits { edits } if edits.iter().any(|e| matches!(e, Edit::MicroBatch { .. }))
        )));
    }

    #[test]
    fn without_a_config_the_code_line_names_the_logits() {
        let d = diagnose(parse_log(V1)[0].clone(), None);
        assert_eq!(d.cause, Cause::HugeTensor);
        assert_eq!(
            d.explanation,
            Explanation::HugeTensor {
                request_bytes: 15 * GIB,
                hint: Some(Hint::Logits)
            }
        );
        let kinds: Vec<_> = d.fixes.iter().map(|f| &f.kind).collect();
        assert_eq!(
            kinds[0],
            &FixKind::Edits {
                edits: vec![Edit::Loss {
                    loss: LossMode::Chunked
                }]
            }
        );
        assert!(d.fixes.iter().all(|f| f.predicted_peak_bytes.is_none()));
    }

    #[test]
    fn hints_table() {
        for (code, hint) in [
            ("logits = logits.float()", Some(Hint::Logits)),
            ("F.cross_entropy(x, y)", Some(Hint::Logits)),
            (
                "F.scaled_dot_product_attention(q, k, v)",
                Some(Hint::Attention),
            ),
            ("optimizer.step()", Some(Hint::OptimizerState)),
            ("x = y + 1", None),
        ] {
            assert_eq!(Hint::from_code(code), hint, "{code}");
        }
    }

    #[test]
    fn nonsense_numbers_are_not_matched() {
        let mut r = parse_log(V1)[0].clone();
        r.allocated_bytes = Some(40 * GIB);
        assert_eq!(
            implausible(&r),
            Some(Implausible::AboveCapacity {
                field: "allocated",
                bytes: 40 * GIB
            })
        );
        r.allocated_bytes = None;
        assert_eq!(implausible(&r), None);
        r.request_bytes = Some(0);
        assert_eq!(implausible(&r), Some(Implausible::NoRequest));
    }

    #[test]
    fn a_plan_ranks_fitting_fixes_first_and_is_reused() {
        let spec = seed_spec();
        let plan = FixPlan::new(&spec);
        assert!(!plan.fixes.is_empty());
        // Reference: seed 002, the fp32 copy of 10 × 1536 × 65,536 logits is 3.75 GiB.
        let d = diagnose(parse_log(V1)[0].clone(), Some(&plan));
        assert_eq!(d.fixes[..], plan.fixes[..]);
        let first_non_fit = plan.fixes.iter().position(|f| f.fits != Some(true));
        if let Some(k) = first_non_fit {
            assert!(plan.fixes[k..].iter().all(|f| f.fits != Some(true)));
        }
        assert!(plan.fixes.iter().all(|f| f.spec.is_some()));
    }

    #[test]
    fn an_implausible_report_with_a_plan_keeps_the_fixes() {
        let plan = FixPlan::new(&seed_spec());
        let mut r = parse_log(V1)[0].clone();
        r.free_bytes = Some(u64::MAX);
        let d = diagnose(r, Some(&plan));
        assert!(d.implausible.is_some());
        assert_eq!(d.tensor, None);
        assert_eq!(d.fixes.len(), plan.fixes.len());
    }
}
