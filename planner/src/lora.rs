//! LoRA and QLoRA: which linears get adapters, and what the model's parameters become.
//!
//! PEFT 0.21 (`tuners/lora/layer.py`, `LoraLayer.update_layer` and `Linear.forward`)
//! wraps each targeted `nn.Linear` of `in → out` features: the base weight stays, frozen
//! (`requires_grad = False`, so no gradient and no optimizer state), and two adapter
//! matrices are added, `lora_A` (`rank × in`) and `lora_B` (`out × rank`), in fp32 whatever
//! the base dtype (`get_peft_model(autocast_adapter_dtype=True)`, the default). DoRA adds
//! one magnitude vector of `out` per layer. `modules_to_save` (the head or the embedding)
//! trains a copy of the module while the original stays, frozen. `target_modules =
//! "all-linear"` is every `nn.Linear` but the output layer; a mixture of experts keeps
//! its experts in 3-D parameters, which are not `nn.Linear` and so not targeted.
//!
//! QLoRA (bitsandbytes 0.50.2, `nn/modules.py` `Linear4bit` and `Params4bit`,
//! `functional.py` `quantize_4bit`): each targeted-or-not base linear of the blocks is
//! stored as 4-bit codes packed two to a byte (`ceil(n / 2)` bytes for `n` weights) with
//! one absmax per block of 64 weights, fp32 (`blocksize = 64`); double quantization
//! (`compress_statistics`) stores those absmax as bytes instead and adds one fp32 absmax
//! per 256 of them, the 256-entry fp32 code and an fp32 offset. `int8`
//! (`Linear8bitLt`, LLM.int8) stores one byte per weight and one fp32 scale per output
//! row. The embedding, the norms and the head are not quantized.

use crate::error::{quote, PlanError, Result};
use crate::params::{Param, Role};
use crate::spec::{Choice, ComputeDtype, ModelSpec, Quantize};
use crate::units::DType;
use serde::{Deserialize, Serialize};

impl ComputeDtype {
    pub fn dtype(self) -> DType {
        match self {
            ComputeDtype::Bf16 => DType::Bf16,
            ComputeDtype::Fp16 => DType::F16,
            ComputeDtype::Fp32 => DType::F32,
        }
    }
}

/// bitsandbytes' 4-bit block size (`Linear4bit(blocksize=64)`).
pub const BLOCK_4BIT: u64 = 64;
/// Double quantization's block of absmax values (`quantize_blockwise(blocksize=256)`).
pub const BLOCK_DOUBLE_QUANT: u64 = 256;

/// The `[lora]` section as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawLora {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dropout: Option<f64>,
    /// A list of PEFT module names, or the string "all-linear".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target_modules: Option<Targets>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_dora: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantize: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub double_quant: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compute_dtype: Option<String>,
}

/// `target_modules`: names, or every linear.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum Targets {
    All(String),
    Names(Vec<String>),
}

/// A validated LoRA (or QLoRA) configuration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LoraSpec {
    pub rank: u64,
    pub alpha: f64,
    pub dropout: f64,
    /// The PEFT module names that get adapters (resolved from "all-linear").
    pub targets: Vec<String>,
    /// `lm_head` and/or `embed_tokens`: trained as full copies.
    pub modules_to_save: Vec<String>,
    pub use_dora: bool,
    pub quantize: Quantize,
    pub double_quant: bool,
    pub compute_dtype: ComputeDtype,
}

/// Defaults: PEFT's `LoraConfig` (r 8, alpha 8, dropout 0, q/v targets for Llama-like
/// models) and bitsandbytes' QLoRA recipe (double quantization, bf16 compute).
pub mod defaults {
    pub const RANK: u64 = 8;
    pub const DROPOUT: f64 = 0.0;
    pub const TARGETS: &[&str] = &["q_proj", "v_proj"];
    pub const MAX_RANK: u64 = 1 << 16;
}

/// The PEFT module name of a block linear's weight (`layers.3.self_attn.q_proj.weight`
/// → `q_proj`); None for norms, biases, the router and the 3-D expert stacks.
pub fn module_of(p: &Param) -> Option<&str> {
    if p.role != Role::Matrix || p.layer.is_none() {
        return None;
    }
    let stem = p.name.strip_suffix(".weight")?;
    if stem.ends_with("mlp.gate") {
        return None; // MixtralTopKRouter / Qwen3MoeTopKRouter: an nn.Parameter, not nn.Linear
    }
    stem.rsplit('.').next()
}

/// The linears a model's blocks have, by PEFT name, in order of first appearance.
pub fn linear_modules(params: &[Param]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for p in params {
        if let Some(m) = module_of(p) {
            if !out.iter().any(|o| o == m) {
                out.push(m.to_string());
            }
        }
    }
    out
}

fn fraction(key: &str, v: Option<f64>, default: f64) -> Result<f64> {
    match v.unwrap_or(default) {
        x if x.is_finite() && (0.0..1.0).contains(&x) => Ok(x),
        x => Err(PlanError::invalid(
            key,
            x,
            "a probability from 0 to below 1",
        )),
    }
}

impl RawLora {
    /// Validates the section against the model's linears.
    pub fn resolve(&self, m: &ModelSpec) -> Result<LoraSpec> {
        let rank = match self.rank.unwrap_or(defaults::RANK) {
            r @ 1..=defaults::MAX_RANK => r,
            r => {
                return Err(PlanError::invalid(
                    "lora.rank",
                    r,
                    format!("a whole number from 1 to {}", defaults::MAX_RANK),
                ))
            }
        };
        let alpha = match self.alpha.unwrap_or(rank as f64) {
            a if a.is_finite() && a > 0.0 => a,
            a => return Err(PlanError::invalid("lora.alpha", a, "a positive number")),
        };
        let linears = linear_modules(&crate::params::shared(m));
        let targets = self.targets(&linears)?;
        let modules_to_save = self.modules_to_save.clone().unwrap_or_default();
        if let Some(bad) = modules_to_save
            .iter()
            .find(|s| !matches!(s.as_str(), "lm_head" | "embed_tokens"))
        {
            return Err(PlanError::invalid(
                "lora.modules_to_save",
                quote(bad),
                "a list of lm_head | embed_tokens",
            ));
        }
        Ok(LoraSpec {
            rank,
            alpha,
            dropout: fraction("lora.dropout", self.dropout, defaults::DROPOUT)?,
            targets,
            modules_to_save,
            use_dora: self.use_dora.unwrap_or(false),
            quantize: Quantize::parse("lora.quantize", self.quantize.as_deref().unwrap_or("none"))?,
            double_quant: self.double_quant.unwrap_or(true),
            compute_dtype: ComputeDtype::parse(
                "lora.compute_dtype",
                self.compute_dtype.as_deref().unwrap_or("bf16"),
            )?,
        })
    }

    fn targets(&self, linears: &[String]) -> Result<Vec<String>> {
        let accepted = || format!("\"all-linear\" or a list of {}", linears.join(" | "));
        let names: Vec<String> = match &self.target_modules {
            None => defaults::TARGETS
                .iter()
                .filter(|t| linears.iter().any(|l| l == *t))
                .map(|t| t.to_string())
                .collect(),
            Some(Targets::All(s)) if s.trim().eq_ignore_ascii_case("all-linear") => {
                linears.to_vec()
            }
            Some(Targets::All(s)) => {
                return Err(PlanError::invalid(
                    "lora.target_modules",
                    quote(s),
                    accepted(),
                ))
            }
            Some(Targets::Names(v)) => v.iter().map(|s| s.trim().to_string()).collect(),
        };
        if let Some(bad) = names.iter().find(|n| !linears.contains(n)) {
            return Err(PlanError::invalid(
                "lora.target_modules",
                quote(bad),
                accepted(),
            ));
        }
        if names.is_empty() {
            return Err(PlanError::invalid("lora.target_modules", "[]", accepted()));
        }
        Ok(names)
    }
}

impl LoraSpec {
    /// Whether the base linear `p` gets an adapter.
    pub fn targets(&self, p: &Param) -> bool {
        module_of(p).is_some_and(|m| self.targets.iter().any(|t| t == m))
    }

    /// Whether the base linear `p` is stored quantized (every block linear under QLoRA).
    pub fn quantized(&self, p: &Param) -> bool {
        self.quantize != Quantize::None && module_of(p).is_some()
    }

    /// The PEFT scaling `alpha / rank` (rsLoRA aside).
    pub fn scaling(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// How a frozen base weight of `n` elements is stored, as (suffix, shape, dtype).
    pub fn storage(&self, n: u64) -> Vec<(&'static str, Vec<u64>, DType)> {
        let blocks = n.div_ceil(BLOCK_4BIT);
        match self.quantize {
            Quantize::None => Vec::new(),
            Quantize::Int8 => vec![(" (int8)", vec![n], DType::U8)],
            Quantize::Nf4 | Quantize::Fp4 if self.double_quant => vec![
                (" (4-bit packed)", vec![n.div_ceil(2)], DType::U8),
                (" absmax (8-bit)", vec![blocks], DType::U8),
                (
                    " absmax of absmax (fp32)",
                    vec![blocks.div_ceil(BLOCK_DOUBLE_QUANT) + 256 + 1],
                    DType::F32,
                ),
            ],
            Quantize::Nf4 | Quantize::Fp4 => vec![
                (" (4-bit packed)", vec![n.div_ceil(2)], DType::U8),
                (" absmax (fp32)", vec![blocks], DType::F32),
            ],
        }
    }

    /// The stored bytes of a frozen base weight of `n` elements under QLoRA.
    pub fn stored_bytes(&self, n: u64) -> u64 {
        self.storage(n)
            .iter()
            .map(|(_, shape, dt)| shape.iter().product::<u64>().saturating_mul(dt.bytes()))
            .sum()
    }
}

/// What LoRA makes of the model's parameter list: the base parameters (frozen, except
/// modules_to_save copies), then for each targeted linear its `lora_A`, `lora_B` (and
/// DoRA's magnitude), right after the base weight so each block's parameters stay
/// together.
pub fn parameters(base: &[Param], lora: &LoraSpec) -> Vec<Param> {
    let mut out = Vec::with_capacity(base.len() * 2);
    // A tied model has no head parameter: `lm_head` in modules_to_save copies the module,
    // whose weight is the embedding's, into a trained, untied head.
    let tied = !base.iter().any(|p| p.role == Role::Head);
    let saves = |m: &str| lora.modules_to_save.iter().any(|s| s == m);
    for p in base {
        out.push(Param {
            trainable: false,
            ..p.clone()
        });
        if lora.targets(p) {
            let stem = p.name.strip_suffix(".weight").unwrap_or(&p.name);
            let adapter = |name: String, rows: u64, cols: u64, role: Role| Param {
                name: name.into(),
                rows,
                cols,
                role,
                layer: p.layer,
                trainable: true,
                dtype: Some(DType::F32),
            };
            out.push(adapter(
                format!("{stem}.lora_A.weight"),
                lora.rank,
                p.cols,
                Role::Matrix,
            ));
            out.push(adapter(
                format!("{stem}.lora_B.weight"),
                p.rows,
                lora.rank,
                Role::Matrix,
            ));
            if lora.use_dora {
                out.push(adapter(
                    format!("{stem}.lora_magnitude_vector"),
                    1,
                    p.rows,
                    Role::Vector,
                ));
            }
        }
        let saved = match p.role {
            Role::Head => saves("lm_head"),
            Role::Embedding => saves("embed_tokens"),
            _ => false,
        };
        if saved {
            out.push(Param {
                name: format!("{} (modules_to_save copy)", p.name).into(),
                trainable: true,
                ..p.clone()
            });
        }
        if p.role == Role::Embedding && tied && saves("lm_head") {
            out.push(Param {
                name: "lm_head.weight (modules_to_save copy, untied)".into(),
                role: Role::Head,
                trainable: true,
                ..p.clone()
            });
        }
    }
    out
}

/// Trainable elements (adapters and modules_to_save copies).
pub fn trainable_count(params: &[Param]) -> u64 {
    params
        .iter()
        .filter(|p| p.trainable)
        .map(Param::numel)
        .fold(0, u64::saturating_add)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presets::Presets;

    fn model() -> ModelSpec {
        Presets::builtin()
            .unwrap()
            .model("llama-3.2-1b")
            .unwrap()
            .clone()
    }

    #[test]
    fn adapters_count_as_peft_counts_them() {
        // PEFT's print_trainable_parameters for Llama-3.2-1B (16 layers, hidden 2048,
        // kv 512, intermediate 8192), r = 16 on q and v: 16 × 16 × (2048 + 2048 + 2048 + 512)
        // = 1,703,936 trainable.
        let m = model();
        let raw = RawLora {
            rank: Some(16),
            target_modules: Some(Targets::Names(vec!["q_proj".into(), "v_proj".into()])),
            ..RawLora::default()
        };
        let spec = raw.resolve(&m).unwrap();
        let ps = parameters(&crate::params::shared(&m), &spec);
        assert_eq!(trainable_count(&ps), 1_703_936);
        let all = RawLora {
            target_modules: Some(Targets::All("all-linear".into())),
            ..raw
        };
        let spec = all.resolve(&m).unwrap();
        assert_eq!(spec.targets.len(), 7);
    }

    #[test]
    fn a_saved_head_of_a_tied_model_is_an_untied_trained_copy() {
        // Llama-3.2-1B ties its head to the embedding (128,256 × 2048): PEFT's
        // modules_to_save = ["lm_head"] trains a copy of it beside the q/v adapters.
        let m = model();
        let raw = RawLora {
            rank: Some(16),
            target_modules: Some(Targets::Names(vec!["q_proj".into(), "v_proj".into()])),
            modules_to_save: Some(vec!["lm_head".into()]),
            ..RawLora::default()
        };
        let spec = raw.resolve(&m).unwrap();
        let ps = parameters(&crate::params::shared(&m), &spec);
        assert_eq!(trainable_count(&ps), 1_703_936 + 128_256 * 2048);
        assert_eq!(ps.iter().filter(|p| p.role == Role::Head).count(), 1);
    }

    #[test]
    fn bad_sections_name_the_key_and_what_is_accepted() {
        let m = model();
        let cases = [
            (
                RawLora {
                    rank: Some(0),
                    ..RawLora::default()
                },
                "lora.rank = 0: a whole number from 1 to 65536",
            ),
            (
                RawLora {
                    target_modules: Some(Targets::Names(vec!["qkv_proj".into()])),
                    ..RawLora::default()
                },
                "lora.target_modules = \"qkv_proj\": \"all-linear\" or a list of q_proj | k_proj | v_proj | o_proj | gate_proj | up_proj | down_proj",
            ),
            (
                RawLora {
                    quantize: Some("nf3".into()),
                    ..RawLora::default()
                },
                "lora.quantize = \"nf3\": expected one of none | nf4 | fp4 | int8",
            ),
            (
                RawLora {
                    dropout: Some(1.5),
                    ..RawLora::default()
                },
                "lora.dropout = 1.5: a probability from 0 to below 1",
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(raw.resolve(&m).unwrap_err().to_string(), want);
        }
    }

    #[test]
    fn four_bit_storage_is_half_a_byte_plus_the_absmax() {
        // bitsandbytes quantize_4bit: 4096 × 4096 weights, blocksize 64.
        let n = 4096 * 4096;
        let lora = |dq| LoraSpec {
            rank: 8,
            alpha: 8.0,
            dropout: 0.0,
            targets: vec![],
            modules_to_save: vec![],
            use_dora: false,
            quantize: Quantize::Nf4,
            double_quant: dq,
            compute_dtype: ComputeDtype::Bf16,
        };
        assert_eq!(lora(false).stored_bytes(n), n / 2 + n / 64 * 4);
        assert_eq!(
            lora(true).stored_bytes(n),
            n / 2 + n / 64 + (n / 64 / 256 + 257) * 4
        );
    }
}
