//! Hugging Face `config.json` → [`ModelSpec`], for the Llama, Mistral, Qwen2, GPT-2 and
//! T5 architectures (keys as their `Config` classes name them in transformers).

use crate::config::RawModel;
use crate::error::{quote, PlanError, Result};
use crate::spec::ModelSpec;
use serde_json::Value;

fn get(v: &Value, keys: &[&str]) -> Option<u64> {
    keys.iter().find_map(|k| v.get(*k).and_then(Value::as_u64))
}

/// Parses the text of a config.json.
pub fn hf_config(text: &str) -> Result<ModelSpec> {
    let v: Value = serde_json::from_str(text).map_err(|e| PlanError::Syntax {
        line: format!("line {}: ", e.line()),
        message: e.to_string(),
    })?;
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    let arch = match model_type {
        "llama" | "mistral" => "llama",
        "qwen2" => "qwen2",
        "gpt2" => "gpt2",
        "t5" => "t5",
        other => {
            return Err(PlanError::invalid(
                "model_type",
                quote(other),
                "llama | mistral | qwen2 | gpt2 | t5",
            ))
        }
    };
    let mut raw = RawModel {
        name: v
            .get("_name_or_path")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .or(Some(format!("{model_type} (config.json)"))),
        arch: Some(arch.into()),
        vocab_size: get(&v, &["vocab_size"]),
        tie_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool),
        ..RawModel::default()
    };
    match arch {
        "gpt2" => {
            raw.hidden_size = get(&v, &["n_embd", "hidden_size"]);
            raw.num_layers = get(&v, &["n_layer", "num_hidden_layers"]);
            raw.num_heads = get(&v, &["n_head", "num_attention_heads"]);
            raw.intermediate_size = get(&v, &["n_inner"]).or(raw.hidden_size.map(|h| 4 * h));
            raw.max_position_embeddings = get(&v, &["n_positions", "max_position_embeddings"]);
            raw.tie_embeddings = raw.tie_embeddings.or(Some(true));
        }
        "t5" => {
            raw.hidden_size = get(&v, &["d_model"]);
            raw.num_layers = get(&v, &["num_layers"]);
            raw.num_decoder_layers = get(&v, &["num_decoder_layers"]).or(raw.num_layers);
            raw.num_heads = get(&v, &["num_heads"]);
            raw.head_dim = get(&v, &["d_kv"]);
            raw.intermediate_size = get(&v, &["d_ff"]);
            let proj = v
                .get("feed_forward_proj")
                .and_then(Value::as_str)
                .unwrap_or("relu");
            raw.gated_ffn = Some(proj.starts_with("gated"));
            raw.tie_embeddings = raw.tie_embeddings.or(Some(true));
        }
        _ => {
            raw.hidden_size = get(&v, &["hidden_size"]);
            raw.num_layers = get(&v, &["num_hidden_layers"]);
            raw.num_heads = get(&v, &["num_attention_heads"]);
            raw.num_kv_heads = get(&v, &["num_key_value_heads"]);
            raw.head_dim = get(&v, &["head_dim"]);
            raw.intermediate_size = get(&v, &["intermediate_size"]);
            raw.tie_embeddings = raw.tie_embeddings.or(Some(false));
        }
    }
    raw.resolve(None)
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
        let err = hf_config(r#"{"model_type":"bert"}"#).unwrap_err();
        assert!(err.to_string().starts_with("model_type = \"bert\""));
    }
}
