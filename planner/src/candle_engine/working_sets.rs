//! The candle engine's fitted working sets: data, not code. `planner/data/candle_f32.toml`,
//! `candle_f32_avx2.toml` (the same engine with gemm's AVX2 kernels, whose packing scratch
//! is larger) and `candle_f16.toml` (written by `tools/calibrate_candle.py fit --write`) hold, per
//! arch and stage, the planes of a fit — each an intercept plus (coefficient, unit) terms
//! over the step's tensor sizes — and the stage's working set is the largest plane,
//! `max_k (c_k + Σ a_ki · u_i)`, clamped at zero. Each file also records the domain it
//! was calibrated on (every unit's min and max over the calibration set), so a run
//! outside it is reported as extrapolated rather than trusted silently.
//!
//! The files are parsed once (`LazyLock`); a unit test proves all three parse and name only
//! known units, so the `expect` on the embedded text cannot fire at run time.

use crate::spec::{Arch, Choice, CpuKernels, Precision};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::LazyLock;

/// Bytes per element of the units (f32), whatever the compute dtype.
pub(super) const F: f64 = 4.0;

/// Sizes of the step, in bytes of f32 tensors (`layers` is a count).
pub(super) struct Units {
    /// rows × width
    pub nc: f64,
    /// rows × query width
    pub nq: f64,
    /// rows × key/value width
    pub nkv: f64,
    /// rows × MLP width
    pub ni: f64,
    /// attention scores `B·H·T·T`
    pub s: f64,
    /// loss chunk rows × vocab, rows × width
    pub rv: f64,
    pub rc: f64,
    /// head (or embedding) matrix
    pub vc: f64,
    /// 1 when the loss runs in more than one chunk
    pub multi: f64,
    /// rows (u32 ids; also one f32 per row)
    pub n: f64,
    /// softmax rows `B·H·T`, rotary tables `T·D`, block weights `C·H·D`, `C·KV·D`, `C·I`
    pub bht: f64,
    pub td: f64,
    pub cq: f64,
    pub ckv: f64,
    pub ci: f64,
    /// AdamW's peak from the parameters' sizes in update order (`adam_peak`)
    pub adam: f64,
    pub layers: f64,
    /// T5: decoder layers (a count), the gated feed-forward's second projection and its
    /// output (`ci`, `ni` when gated, else 0), the query width again with one head (candle
    /// then makes no transposed copies of the heads), and the position biases and masks
    /// (`t5::tables`).
    pub dec_layers: f64,
    pub gni: f64,
    pub gci: f64,
    pub nq1: f64,
    pub tab: f64,
    /// The key/value width again with one key/value head (decoders: candle then makes no
    /// transposed copies of k and v), and `nq1` likewise for the queries.
    pub nkv1: f64,
    /// gemm's packing scratch in the loss's head-gradient product (`hpack`,
    /// [`super::head_grad_scratch`]).
    pub hpack: f64,
}

/// T5's calibrated working sets (`src/engine/t5.rs`), each above the live bytes before its
/// stage: with checkpointing one block of each stack forward and backward and each
/// stack's end; without, the whole graph as [`WorkingSets`]'s.
pub(super) struct T5WorkingSets {
    pub fwd_enc: u64,
    pub enc_out: u64,
    pub fwd_dec: u64,
    pub dec_out: u64,
    pub loss: u64,
    pub bwd_dec_out: u64,
    pub bwd_dec: u64,
    pub bwd_enc_out: u64,
    pub bwd_enc: u64,
    pub embedding: u64,
    pub graph: u64,
    pub fwd_peak: u64,
    pub bwd_peak: u64,
    pub optimizer: u64,
}

/// The calibrated working sets of one step, each above the live bytes before its stage.
pub(super) struct WorkingSets {
    /// With checkpointing: each half's forward, and its recompute-and-backward.
    pub fwd_attn: u64,
    pub fwd_mlp: u64,
    pub bwd_mlp: u64,
    pub bwd_attn: u64,
    /// Without: the forward graph kept for backward, the forward's peak above the step's
    /// start, and the backward's peak above the end of the loss.
    pub graph: u64,
    pub fwd_peak: u64,
    pub bwd_peak: u64,
    /// One loss chunk's graph and the head-gradient accumulation.
    pub loss: u64,
    /// The embedding's graph and backward (with checkpointing).
    pub embedding: u64,
    /// AdamW's update temporaries.
    pub optimizer: u64,
}

/// A unit a plane's term multiplies: its name in the data files, what it measures (for
/// warnings) and its value.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Unit {
    N,
    Nc,
    Nq,
    Nkv,
    Ni,
    S,
    Rv,
    Rc,
    Vc,
    Bht,
    Td,
    Cq,
    Ckv,
    Ci,
    /// The head matrix when the loss runs in more than one chunk.
    Mvc,
    Adam,
    Layers,
    DecLayers,
    Gni,
    Gci,
    Nq1,
    Tab,
    Nkv1,
    Hpack,
}

/// (name in the files, what users would call it).
const UNITS: [(Unit, &str, &str); 24] = [
    (Unit::N, "n", "rows (micro_batch × seq_len)"),
    (Unit::Nc, "nc", "rows × hidden_size"),
    (Unit::Nq, "nq", "rows × query width"),
    (Unit::Nkv, "nkv", "rows × key/value width"),
    (Unit::Ni, "ni", "rows × intermediate_size"),
    (
        Unit::S,
        "s",
        "attention scores (micro_batch × heads × seq_len²)",
    ),
    (Unit::Rv, "rv", "loss chunk rows × vocab_size"),
    (Unit::Rc, "rc", "loss chunk rows × hidden_size"),
    (Unit::Vc, "vc", "vocab_size × hidden_size"),
    (Unit::Bht, "bht", "micro_batch × heads × seq_len"),
    (Unit::Td, "td", "seq_len × head_dim"),
    (Unit::Cq, "cq", "the query projection"),
    (Unit::Ckv, "ckv", "a key/value projection"),
    (Unit::Ci, "ci", "an MLP projection"),
    (Unit::Mvc, "mvc", "the head matrix, with a chunked loss"),
    (Unit::Adam, "adam", "AdamW's largest update"),
    (Unit::Layers, "layers", "num_layers"),
    (Unit::DecLayers, "dec_layers", "num_decoder_layers"),
    (
        Unit::Gni,
        "gni",
        "rows × intermediate_size of a gated feed-forward",
    ),
    (Unit::Gci, "gci", "a gated feed-forward's second projection"),
    (Unit::Nq1, "nq1", "rows × query width with one head"),
    (Unit::Tab, "tab", "the position biases and masks"),
    (
        Unit::Nkv1,
        "nkv1",
        "rows × key/value width with one key/value head",
    ),
    (
        Unit::Hpack,
        "hpack",
        "the head gradient's packed block of the logits' gradient",
    ),
];

impl Unit {
    fn parse(name: &str) -> Option<Unit> {
        UNITS.iter().find(|u| u.1 == name).map(|u| u.0)
    }

    fn label(self) -> &'static str {
        UNITS.iter().find(|u| u.0 == self).map_or("", |u| u.2)
    }

    fn value(self, u: &Units) -> f64 {
        match self {
            Unit::N => u.n,
            Unit::Nc => u.nc,
            Unit::Nq => u.nq,
            Unit::Nkv => u.nkv,
            Unit::Ni => u.ni,
            Unit::S => u.s,
            Unit::Rv => u.rv,
            Unit::Rc => u.rc,
            Unit::Vc => u.vc,
            Unit::Bht => u.bht,
            Unit::Td => u.td,
            Unit::Cq => u.cq,
            Unit::Ckv => u.ckv,
            Unit::Ci => u.ci,
            Unit::Mvc => u.multi * u.vc,
            Unit::Adam => u.adam,
            Unit::Layers => u.layers,
            Unit::DecLayers => u.dec_layers,
            Unit::Gni => u.gni,
            Unit::Gci => u.gci,
            Unit::Nq1 => u.nq1,
            Unit::Tab => u.tab,
            Unit::Nkv1 => u.nkv1,
            Unit::Hpack => u.hpack,
        }
    }

    /// The value in the domain's terms: f32 elements, or a count of layers.
    fn size(self, u: &Units) -> f64 {
        match self {
            Unit::Layers | Unit::DecLayers => self.value(u),
            _ => self.value(u) / F,
        }
    }
}

/// What multiplies a term's coefficient: 1, the layer count (`L*x`: one per block's
/// graph kept), one fewer (`L1*x`: the blocks behind the one being differentiated) or
/// T5's decoder layers (`D*x`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scale {
    One,
    Layers,
    LayersBelow,
    DecLayers,
}

#[derive(Debug, Clone)]
struct Term {
    coefficient: f64,
    scale: Scale,
    unit: Unit,
}

#[derive(Debug, Clone)]
struct Plane {
    intercept: f64,
    terms: Vec<Term>,
}

impl Plane {
    /// `c + Σ a·u` in bytes, clamped at zero. The coefficient is scaled by the layers
    /// before it meets its unit, in the order the fits were always evaluated in, so the
    /// predictions stay bit for bit what they were.
    fn eval(&self, u: &Units) -> u64 {
        let l1 = (u.layers - 1.0).max(0.0);
        let v: f64 = self
            .terms
            .iter()
            .map(|t| {
                let c = match t.scale {
                    Scale::One => t.coefficient,
                    Scale::Layers => t.coefficient * u.layers,
                    Scale::LayersBelow => t.coefficient * l1,
                    Scale::DecLayers => t.coefficient * u.dec_layers,
                };
                c * t.unit.value(u)
            })
            .sum::<f64>()
            + self.intercept;
        v.max(0.0).round() as u64
    }
}

/// One stage's fit: the largest of its planes.
#[derive(Debug, Clone)]
struct Stage {
    planes: Vec<Plane>,
}

impl Stage {
    fn eval(&self, u: &Units) -> u64 {
        self.planes.iter().map(|p| p.eval(u)).max().unwrap_or(0)
    }
}

/// A unit's calibrated range, in f32 elements (layers as a count).
#[derive(Debug, Clone)]
struct Range {
    unit: Unit,
    min: f64,
    max: f64,
}

/// One arch's fits (in the order of its stage list) and domain.
#[derive(Debug, Clone)]
struct ArchFit {
    domain: Vec<Range>,
    stages: Vec<Stage>,
}

/// The stages a data file must fit for a decoder-only arch, in `WorkingSets` order.
const STAGES: [&str; 10] = [
    "fwd_attn", "fwd_mlp", "bwd_mlp", "bwd_attn", "graph", "fwd_peak", "bwd_peak", "loss", "emb",
    "opt",
];

/// T5's stages, in `T5WorkingSets` order.
const T5_STAGES: [&str; 14] = [
    "fwd_enc",
    "enc_out",
    "fwd_dec",
    "dec_out",
    "loss",
    "bwd_dec_out",
    "bwd_dec",
    "bwd_enc_out",
    "bwd_enc",
    "emb",
    "graph",
    "fwd_peak",
    "bwd_peak",
    "opt",
];

/// One precision's data file, validated.
#[derive(Debug, Clone)]
pub(super) struct Fits {
    /// The compute dtype it was measured in (`f32` or `f16`).
    compute: String,
    /// The CPU matmul kernels whose scratch it counts (f32: the whole heap); none for
    /// tensors alone (f16).
    kernels: Option<CpuKernels>,
    nanochat: ArchFit,
    llama: ArchFit,
    t5: ArchFit,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFits {
    compute: String,
    kernels: Option<String>,
    #[allow(dead_code)] // provenance, read by people
    data: String,
    #[allow(dead_code)]
    configurations: u64,
    nanochat: BTreeMap<String, toml::Value>,
    llama: BTreeMap<String, toml::Value>,
    t5: BTreeMap<String, toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStage {
    #[allow(dead_code)] // the fit's quality, read by people
    rms: f64,
    #[allow(dead_code)]
    worst: f64,
    planes: Vec<RawPlane>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlane {
    intercept: f64,
    terms: Vec<(f64, String)>,
}

fn term(coefficient: f64, name: &str) -> Option<Term> {
    let (scale, unit) = if let Some(u) = name.strip_prefix("L1*") {
        (Scale::LayersBelow, u)
    } else if let Some(u) = name.strip_prefix("L*") {
        (Scale::Layers, u)
    } else if let Some(u) = name.strip_prefix("D*") {
        (Scale::DecLayers, u)
    } else {
        (Scale::One, name)
    };
    Some(Term {
        coefficient,
        scale,
        unit: Unit::parse(unit)?,
    })
}

fn stage(arch: &str, name: &str, value: Option<&toml::Value>) -> Result<Stage, String> {
    let value = value.ok_or_else(|| format!("{arch}.{name}: missing"))?;
    let raw: RawStage = value
        .clone()
        .try_into()
        .map_err(|e| format!("{arch}.{name}: {}", e.message()))?;
    if raw.planes.is_empty() {
        return Err(format!("{arch}.{name}.planes: at least one plane"));
    }
    let planes = raw
        .planes
        .into_iter()
        .map(|p| {
            let terms = p
                .terms
                .iter()
                .map(|(c, u)| {
                    term(*c, u).ok_or_else(|| {
                        let known: Vec<&str> = UNITS.iter().map(|u| u.1).collect();
                        format!(
                            "{arch}.{name}: unknown unit {u:?}; expected one of {} (optionally L*x, L1*x or D*x)",
                            known.join(", ")
                        )
                    })
                })
                .collect::<Result<_, _>>()?;
            Ok(Plane {
                intercept: p.intercept,
                terms,
            })
        })
        .collect::<Result<_, String>>()?;
    Ok(Stage { planes })
}

fn domain(arch: &str, value: Option<&toml::Value>) -> Result<Vec<Range>, String> {
    let value = value.ok_or_else(|| format!("{arch}.domain: missing"))?;
    let raw: BTreeMap<String, [f64; 2]> = value
        .clone()
        .try_into()
        .map_err(|e| format!("{arch}.domain: {}", e.message()))?;
    raw.into_iter()
        .map(|(name, [min, max])| {
            let unit = Unit::parse(&name)
                .filter(|u| *u != Unit::Mvc)
                .ok_or_else(|| format!("{arch}.domain: unknown unit {name:?}"))?;
            if min > max {
                return Err(format!("{arch}.domain.{name}: min {min} above max {max}"));
            }
            Ok(Range { unit, min, max })
        })
        .collect::<Result<Vec<_>, String>>()
        .map(|mut d| {
            // In the order of `UNITS` (rows first), for warnings that read well.
            d.sort_by_key(|r| UNITS.iter().position(|u| u.0 == r.unit));
            d
        })
}

fn arch_fit(
    arch: &str,
    names: &[&str],
    mut t: BTreeMap<String, toml::Value>,
) -> Result<ArchFit, String> {
    let domain = domain(arch, t.remove("domain").as_ref())?;
    let mut stages = Vec::with_capacity(names.len());
    for name in names {
        stages.push(stage(arch, name, t.remove(*name).as_ref())?);
    }
    if let Some(extra) = t.keys().next() {
        return Err(format!(
            "{arch}.{extra}: unknown stage; expected domain, {}",
            names.join(", ")
        ));
    }
    Ok(ArchFit { domain, stages })
}

/// Parses and validates one data file.
pub(super) fn parse(text: &str) -> Result<Fits, String> {
    let raw: RawFits = toml::from_str(text).map_err(|e| e.message().to_string())?;
    Ok(Fits {
        compute: raw.compute,
        kernels: raw
            .kernels
            .as_deref()
            .map(|k| CpuKernels::parse("kernels", k).map_err(|e| e.to_string()))
            .transpose()?,
        nanochat: arch_fit("nanochat", &STAGES, raw.nanochat)?,
        llama: arch_fit("llama", &STAGES, raw.llama)?,
        t5: arch_fit("t5", &T5_STAGES, raw.t5)?,
    })
}

pub(super) const F32_TEXT: &str = include_str!("../../data/candle_f32.toml");
pub(super) const F32_AVX2_TEXT: &str = include_str!("../../data/candle_f32_avx2.toml");
pub(super) const F16_TEXT: &str = include_str!("../../data/candle_f16.toml");

static F32: LazyLock<Fits> =
    LazyLock::new(|| parse(F32_TEXT).expect("candle_f32.toml parses (unit-tested)"));
static F32_AVX2: LazyLock<Fits> =
    LazyLock::new(|| parse(F32_AVX2_TEXT).expect("candle_f32_avx2.toml parses (unit-tested)"));
static HALF: LazyLock<Fits> =
    LazyLock::new(|| parse(F16_TEXT).expect("candle_f16.toml parses (unit-tested)"));

/// The fits for a run's precision and CPU kernels: f32 with the kernels' packing scratch
/// (off the CPU, the AVX-512 fits, whose scratch is next to none), or 16-bit compute over
/// f32 masters (tensors alone, whatever the kernels).
pub(super) fn fits(precision: Precision, kernels: CpuKernels) -> &'static Fits {
    match (precision, kernels) {
        (Precision::Fp32, CpuKernels::Avx512) => &F32,
        (Precision::Fp32, CpuKernels::Avx2) => &F32_AVX2,
        _ => &HALF,
    }
}

impl Fits {
    /// The CPU kernels whose scratch the fits count (none: tensors alone).
    pub fn kernels(&self) -> Option<CpuKernels> {
        self.kernels
    }

    /// Only nanochat, llama, qwen2, qwen3 and t5 run on the candle engine (validated with
    /// the config); llama's block is the general one, used for qwen2 (q/k/v biases) and
    /// qwen3 (per-head q/k norms) too, whose extra tensors are added from the shapes
    /// (`arch_extras`).
    fn arch(&self, arch: Arch) -> &ArchFit {
        match arch {
            Arch::Nanochat => &self.nanochat,
            Arch::T5 => &self.t5,
            _ => &self.llama,
        }
    }

    /// The stages of `fit` evaluated at `u`, as many as `N` (its stage list's length).
    fn eval<const N: usize>(fit: &ArchFit, u: &Units) -> [u64; N] {
        std::array::from_fn(|i| fit.stages.get(i).map_or(0, |s| s.eval(u)))
    }

    pub fn working_sets(&self, arch: Arch, u: &Units) -> WorkingSets {
        let [fwd_attn, fwd_mlp, bwd_mlp, bwd_attn, graph, fwd_peak, bwd_peak, loss, embedding, optimizer] =
            Self::eval::<10>(self.arch(arch), u);
        WorkingSets {
            fwd_attn,
            fwd_mlp,
            bwd_mlp,
            bwd_attn,
            graph,
            fwd_peak,
            bwd_peak,
            loss,
            embedding,
            optimizer,
        }
    }

    pub fn t5_working_sets(&self, u: &Units) -> T5WorkingSets {
        let [fwd_enc, enc_out, fwd_dec, dec_out, loss, bwd_dec_out, bwd_dec, bwd_enc_out, bwd_enc, embedding, graph, fwd_peak, bwd_peak, optimizer] =
            Self::eval::<14>(&self.t5, u);
        T5WorkingSets {
            fwd_enc,
            enc_out,
            fwd_dec,
            dec_out,
            loss,
            bwd_dec_out,
            bwd_dec,
            bwd_enc_out,
            bwd_enc,
            embedding,
            graph,
            fwd_peak,
            bwd_peak,
            optimizer,
        }
    }

    /// One line for each size of the run below its calibrated range, and one for all
    /// those above it: there the fitted planes are extrapolated (below, the intercepts
    /// dominate and the error grows; the planner does not claim the calibrated accuracy).
    pub fn warnings(&self, arch: Arch, u: &Units) -> Vec<String> {
        let kernels = self
            .kernels
            .map_or(String::new(), |k| format!(", {k} kernels"));
        let what = format!(
            "candle working sets ({} compute{kernels}, {arch})",
            self.compute
        );
        let mut out = Vec::new();
        let mut above = Vec::new();
        for r in &self.arch(arch).domain {
            let v = r.unit.size(u);
            if v < r.min {
                out.push(format!(
                    "{what} are calibrated for {} from {} to {}; this run has {}: the prediction is extrapolated",
                    r.unit.label(),
                    r.min,
                    r.max,
                    v
                ));
            } else if v > r.max {
                above.push(format!(
                    "{} {v} (calibrated up to {})",
                    r.unit.label(),
                    r.max
                ));
            }
        }
        if !above.is_empty() {
            out.push(format!(
                "{what} are extrapolated above the calibrated sizes: {}",
                above.join(", ")
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded files parse, fit every stage of every arch and record the domain of
    /// every unit the planes use.
    #[test]
    fn every_data_file_parses_and_covers_every_stage() {
        for (name, text, kernels) in [
            ("f32", F32_TEXT, Some(CpuKernels::Avx512)),
            ("f32", F32_AVX2_TEXT, Some(CpuKernels::Avx2)),
            ("f16", F16_TEXT, None),
        ] {
            let f = parse(text).unwrap_or_else(|e| panic!("candle_{name}.toml: {e}"));
            assert_eq!(f.compute, name);
            assert_eq!(f.kernels, kernels, "candle_{name}.toml");
            for (arch, a, names) in [
                ("nanochat", &f.nanochat, &STAGES[..]),
                ("llama", &f.llama, &STAGES[..]),
                ("t5", &f.t5, &T5_STAGES[..]),
            ] {
                assert_eq!(a.stages.len(), names.len(), "{name} {arch}");
                for (stage, s) in names.iter().zip(&a.stages) {
                    assert!(!s.planes.is_empty(), "{name} {arch} {stage}");
                    for t in s.planes.iter().flat_map(|p| &p.terms) {
                        let u = if t.unit == Unit::Mvc {
                            Unit::Vc
                        } else {
                            t.unit
                        };
                        assert!(
                            a.domain.iter().any(|r| r.unit == u),
                            "{name} {arch} {stage}: no domain for {u:?}"
                        );
                    }
                }
                let rows = a.domain.iter().find(|r| r.unit == Unit::N).unwrap();
                // The calibration draws at least 256 rows per micro-batch
                // (tools/calibrate_candle.py, `draw`).
                assert_eq!(rows.min, 256.0, "{name} {arch}");
            }
        }
    }

    /// Bad data files are refused with the key that is wrong.
    #[test]
    fn bad_data_files_name_the_key() {
        let good = F32_TEXT;
        let cases = [
            (
                good.replacen("\"nc\"]", "\"nx\"]", 1),
                "nanochat.fwd_attn: unknown unit \"nx\"",
            ),
            (
                good.replacen("[nanochat.opt]", "[nanochat.optimiser]", 1),
                "nanochat.opt: missing",
            ),
            (
                good.replacen("n = [256,", "rows = [256,", 1),
                "nanochat.domain: unknown unit \"rows\"",
            ),
            (
                good.replacen("n = [256, 4096]", "n = [4096, 256]", 1),
                "nanochat.domain.n: min 4096 above max 256",
            ),
            (good.replacen("compute", "computed", 1), "unknown field"),
        ];
        for (text, want) in cases {
            let err = parse(&text).expect_err(want);
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
    }
}
