//! Hugging Face `config.json` → [`ModelSpec`], keys as transformers 5.23's `Config`
//! classes name them: Llama (and SmolLM2/3, Mistral), Qwen2, Qwen3, Qwen3-MoE, Mixtral,
//! Gemma 2, Gemma 3 (the text model of `Gemma3ForConditionalGeneration` too), Phi-3,
//! OLMo 2, GPT-2 and T5.
//!
//! Sliding windows: Mistral and Phi-3 window every layer (`sliding_window`, null for
//! none); Gemma 2 alternates windowed and global layers, Gemma 3 has five windowed layers
//! to one global (`layer_types`, else `sliding_window_pattern`, as their configs default
//! them); Qwen2/Qwen3 window only with `use_sliding_window`, which their releases leave off.

use crate::config::RawModel;
use crate::error::{quote, PlanError, Result};
use crate::spec::ModelSpec;
use serde_json::Value;

/// The `model_type`s read, and the architecture each is built as.
const SUPPORTED: &[(&str, &str)] = &[
    ("llama", "llama"),
    ("mistral", "llama"),
    ("smollm3", "llama"),
    ("qwen2", "qwen2"),
    ("qwen3", "qwen3"),
    ("qwen3_moe", "qwen3_moe"),
    ("mixtral", "mixtral"),
    ("gemma2", "gemma2"),
    ("gemma3", "gemma3"),
    ("gemma3_text", "gemma3"),
    ("phi3", "phi3"),
    ("olmo2", "olmo2"),
    ("gpt2", "gpt2"),
    ("t5", "t5"),
];

fn get(v: &Value, keys: &[&str]) -> Option<u64> {
    keys.iter().find_map(|k| v.get(*k).and_then(Value::as_u64))
}

/// The supported family an unsupported `model_type` is most like (by name, else by its
/// keys: experts make it a Mixtral, anything else a Llama).
fn closest(model_type: &str, v: &Value) -> &'static str {
    const PREFIXES: &[(&str, &str)] = &[
        ("qwen3_moe", "qwen3_moe"),
        ("qwen2_moe", "qwen3_moe"),
        ("qwen3", "qwen3"),
        ("qwen", "qwen2"),
        ("gemma3", "gemma3"),
        ("gemma", "gemma2"),
        ("phi", "phi3"),
        ("olmo", "olmo2"),
        ("mixtral", "mixtral"),
        ("mistral", "mistral"),
        ("ministral", "mistral"),
        ("gpt", "gpt2"),
        ("t5", "t5"),
        ("mt5", "t5"),
        ("umt5", "t5"),
    ];
    let t = model_type.to_ascii_lowercase();
    if let Some((_, family)) = PREFIXES.iter().find(|(p, _)| t.starts_with(p)) {
        return family;
    }
    let moe = ["num_local_experts", "num_experts", "n_routed_experts"]
        .iter()
        .any(|k| get(v, &[k]).is_some_and(|n| n > 0));
    if moe {
        "mixtral"
    } else {
        "llama"
    }
}

/// Parses the text of a config.json.
pub fn hf_config(text: &str) -> Result<ModelSpec> {
    let outer: Value = serde_json::from_str(text).map_err(|e| PlanError::Syntax {
        line: format!("line {}: ", e.line()),
        message: e.to_string(),
    })?;
    let outer_type = outer
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or("");
    // Gemma 3 4B and up are image-text models: the language model is `text_config`.
    let v = match (outer_type, outer.get("text_config")) {
        ("gemma3", Some(t)) => t,
        _ => &outer,
    };
    let model_type = match (outer_type, v.get("model_type").and_then(Value::as_str)) {
        ("gemma3", _) => "gemma3",
        (_, Some(t)) => t,
        _ => outer_type,
    };
    let Some(&(_, arch)) = SUPPORTED.iter().find(|(t, _)| *t == model_type) else {
        let names: Vec<&str> = SUPPORTED.iter().map(|(t, _)| *t).collect();
        return Err(PlanError::invalid(
            "model_type",
            quote(model_type),
            format!(
                "supported: {}; closest: {}",
                names.join(" | "),
                closest(model_type, &outer)
            ),
        ));
    };
    let mut raw = RawModel {
        name: outer
            .get("_name_or_path")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .or(Some(format!("{model_type} (config.json)"))),
        arch: Some(arch.into()),
        vocab_size: get(v, &["vocab_size"]),
        tie_embeddings: v
            .get("tie_word_embeddings")
            .or(outer.get("tie_word_embeddings"))
            .and_then(Value::as_bool),
        ..RawModel::default()
    };
    match arch {
        "gpt2" => gpt2(v, &mut raw),
        "t5" => t5(v, &mut raw),
        _ => decoder(v, model_type, &mut raw),
    }
    raw.resolve(None)
}

fn gpt2(v: &Value, raw: &mut RawModel) {
    raw.hidden_size = get(v, &["n_embd", "hidden_size"]);
    raw.num_layers = get(v, &["n_layer", "num_hidden_layers"]);
    raw.num_heads = get(v, &["n_head", "num_attention_heads"]);
    raw.intermediate_size = get(v, &["n_inner"]).or(raw.hidden_size.map(|h| 4 * h));
    raw.max_position_embeddings = get(v, &["n_positions", "max_position_embeddings"]);
    raw.tie_embeddings = raw.tie_embeddings.or(Some(true));
}

fn t5(v: &Value, raw: &mut RawModel) {
    raw.hidden_size = get(v, &["d_model"]);
    raw.num_layers = get(v, &["num_layers"]);
    raw.num_decoder_layers = get(v, &["num_decoder_layers"]).or(raw.num_layers);
    raw.num_heads = get(v, &["num_heads"]);
    raw.head_dim = get(v, &["d_kv"]);
    raw.intermediate_size = get(v, &["d_ff"]);
    let proj = v
        .get("feed_forward_proj")
        .and_then(Value::as_str)
        .unwrap_or("relu");
    raw.gated_ffn = Some(proj.starts_with("gated"));
    raw.tie_embeddings = raw.tie_embeddings.or(Some(true));
}

/// The Llama-style decoders: sizes, then the window and the experts.
fn decoder(v: &Value, model_type: &str, raw: &mut RawModel) {
    raw.hidden_size = get(v, &["hidden_size"]);
    raw.num_layers = get(v, &["num_hidden_layers"]);
    raw.num_heads = get(v, &["num_attention_heads"]);
    raw.num_kv_heads = get(v, &["num_key_value_heads"]);
    raw.head_dim = get(v, &["head_dim"]);
    raw.intermediate_size = get(v, &["intermediate_size"]);
    // Gemma ties its head to the embedding unless told otherwise; SmolLM3 configs say so.
    let tied_default = model_type.starts_with("gemma");
    raw.tie_embeddings = raw.tie_embeddings.or(Some(tied_default));
    (raw.sliding_window, raw.global_every) = window(v, model_type);
    if let Some(e) = get(v, &["num_local_experts", "num_experts"]) {
        raw.num_experts = Some(e);
        raw.experts_per_token = get(v, &["num_experts_per_tok"]);
        raw.expert_intermediate_size = get(v, &["moe_intermediate_size"]).or(raw.intermediate_size);
    }
}

/// (`sliding_window`, `global_every`) as the family's config resolves them.
fn window(v: &Value, model_type: &str) -> (Option<u64>, Option<u64>) {
    let w = get(v, &["sliding_window"]).filter(|w| *w > 0);
    let enabled = match model_type {
        "qwen2" | "qwen3" | "qwen3_moe" => v
            .get("use_sliding_window")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        "mistral" | "mixtral" | "phi3" | "gemma2" | "gemma3" | "gemma3_text" => true,
        _ => false,
    };
    let Some(w) = w.filter(|_| enabled) else {
        return (None, None);
    };
    let from_types = v.get("layer_types").and_then(Value::as_array).map(|types| {
        types
            .iter()
            .position(|t| t.as_str() == Some("full_attention"))
            .map_or(0, |i| i as u64 + 1)
    });
    let every = from_types.unwrap_or(match model_type {
        "gemma2" => 2,
        "gemma3" | "gemma3_text" => {
            get(v, &["sliding_window_pattern", "_sliding_window_pattern"]).unwrap_or(6)
        }
        _ => 0,
    });
    (Some(w), Some(every))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_smollm2_and_t5_configs() {
        // HuggingFaceTB/SmolLM2-135M config.json (abridged).
        let m = hf_config(r#"{"model_type":"llama","hidden_size":576,"num_hidden_layers":30,"num_attention_heads":9,
            "num_key_value_heads":3,"intermediate_size":1536,"vocab_size":49152,"tie_word_embeddings":true}"#)
        .unwrap();
        assert_eq!(crate::params::count(&m), 134_515_008);
        let t5 = hf_config(r#"{"model_type":"t5","d_model":768,"num_layers":10,"num_heads":12,"d_kv":64,"d_ff":3072,"vocab_size":29298}"#).unwrap();
        assert_eq!(t5.num_decoder_layers, 10);
    }

    #[test]
    fn an_unsupported_model_type_names_the_supported_and_the_closest() {
        let cases = [
            (r#"{"model_type":"bert"}"#, "closest: llama"),
            (r#"{"model_type":"gemma"}"#, "closest: gemma2"),
            (r#"{"model_type":"qwen2_moe"}"#, "closest: qwen3_moe"),
            (r#"{"model_type":"phi"}"#, "closest: phi3"),
            (
                r#"{"model_type":"dbrx","num_experts":16}"#,
                "closest: mixtral",
            ),
        ];
        for (json, closest) in cases {
            let e = hf_config(json).unwrap_err().to_string();
            assert!(e.starts_with("model_type = \""), "{e}");
            assert!(e.contains("supported: llama | mistral"), "{e}");
            assert!(e.ends_with(closest), "{e}");
            assert!(
                !e.contains('\n') && e.len() <= crate::error::LINE_CHARS,
                "{e}"
            );
        }
    }

    #[test]
    fn windows_follow_each_family() {
        let m = |extra: &str| {
            hf_config(&format!(
                r#"{{"hidden_size":64,"num_hidden_layers":6,"num_attention_heads":4,"intermediate_size":128,"vocab_size":100,{extra}}}"#
            ))
            .unwrap()
            .features
        };
        let mistral = m(r#""model_type":"mistral","sliding_window":4096"#);
        assert_eq!((mistral.sliding_window, mistral.global_every), (4096, 0));
        assert!(mistral.sliding(5));
        let qwen = m(r#""model_type":"qwen2","sliding_window":4096,"use_sliding_window":false"#);
        assert_eq!(qwen.sliding_window, 0);
        let gemma2 = m(r#""model_type":"gemma2","sliding_window":4096"#);
        assert!(gemma2.sliding(0) && !gemma2.sliding(1));
        let gemma3 =
            m(r#""model_type":"gemma3_text","sliding_window":512,"sliding_window_pattern":6"#);
        assert!(gemma3.sliding(4) && !gemma3.sliding(5));
        let typed = m(
            r#""model_type":"gemma3_text","sliding_window":512,"layer_types":["sliding_attention","sliding_attention","full_attention"]"#,
        );
        assert_eq!(typed.global_every, 3);
    }
}

#[cfg(test)]
mod counts {
    use super::*;

    /// The committed config.json files (see tests/data/hf_configs/README.md).
    const CONFIGS: &[(&str, &str)] = &[
        (
            "gemma-2-2b",
            include_str!("../../tests/data/hf_configs/gemma-2-2b.json"),
        ),
        (
            "gemma-2-9b",
            include_str!("../../tests/data/hf_configs/gemma-2-9b.json"),
        ),
        (
            "gemma-3-1b",
            include_str!("../../tests/data/hf_configs/gemma-3-1b.json"),
        ),
        (
            "gemma-3-4b",
            include_str!("../../tests/data/hf_configs/gemma-3-4b.json"),
        ),
        (
            "llama-3.1-8b",
            include_str!("../../tests/data/hf_configs/llama-3.1-8b.json"),
        ),
        (
            "llama-3.2-3b",
            include_str!("../../tests/data/hf_configs/llama-3.2-3b.json"),
        ),
        (
            "mistral-7b",
            include_str!("../../tests/data/hf_configs/mistral-7b.json"),
        ),
        (
            "mixtral-8x7b",
            include_str!("../../tests/data/hf_configs/mixtral-8x7b.json"),
        ),
        (
            "olmo-2-1b",
            include_str!("../../tests/data/hf_configs/olmo-2-1b.json"),
        ),
        (
            "phi-3.5-mini",
            include_str!("../../tests/data/hf_configs/phi-3.5-mini.json"),
        ),
        (
            "qwen2.5-1.5b",
            include_str!("../../tests/data/hf_configs/qwen2.5-1.5b.json"),
        ),
        (
            "qwen2.5-14b",
            include_str!("../../tests/data/hf_configs/qwen2.5-14b.json"),
        ),
        (
            "qwen2.5-3b",
            include_str!("../../tests/data/hf_configs/qwen2.5-3b.json"),
        ),
        (
            "qwen2.5-7b",
            include_str!("../../tests/data/hf_configs/qwen2.5-7b.json"),
        ),
        (
            "qwen3-0.6b",
            include_str!("../../tests/data/hf_configs/qwen3-0.6b.json"),
        ),
        (
            "qwen3-1.7b",
            include_str!("../../tests/data/hf_configs/qwen3-1.7b.json"),
        ),
        (
            "qwen3-14b",
            include_str!("../../tests/data/hf_configs/qwen3-14b.json"),
        ),
        (
            "qwen3-30b-a3b",
            include_str!("../../tests/data/hf_configs/qwen3-30b-a3b.json"),
        ),
        (
            "qwen3-4b",
            include_str!("../../tests/data/hf_configs/qwen3-4b.json"),
        ),
        (
            "qwen3-8b",
            include_str!("../../tests/data/hf_configs/qwen3-8b.json"),
        ),
        (
            "smollm3-3b",
            include_str!("../../tests/data/hf_configs/smollm3-3b.json"),
        ),
    ];

    #[test]
    fn parameter_counts_equal_transformers_on_the_meta_device() {
        // tools/param_counts.py: sum(p.numel()) of AutoModelForCausalLM.from_config,
        // transformers 5.23.0.
        let data: Value = serde_json::from_str(include_str!(
            "../../tests/data/hf_configs/param_counts.json"
        ))
        .unwrap();
        let counts = data["counts"].as_object().unwrap();
        assert_eq!(
            counts.len(),
            CONFIGS.len(),
            "every committed config is counted"
        );
        for (name, text) in CONFIGS {
            let m = hf_config(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            let want = counts[*name].as_u64().unwrap();
            assert_eq!(crate::params::count(&m), want, "{name}");
        }
    }

    #[test]
    fn each_preset_is_its_config_json() {
        let presets = crate::presets::Presets::builtin().unwrap();
        for (name, text) in CONFIGS {
            let from_json = hf_config(text).unwrap();
            let preset = crate::config::PresetSource::model(&presets, name).unwrap();
            assert_eq!(
                ModelSpec {
                    name: preset.name.clone(),
                    ..from_json
                },
                *preset,
                "{name}"
            );
        }
    }
}
