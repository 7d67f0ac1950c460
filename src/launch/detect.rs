//! Which format a file is in: by its content first (the keys only one launcher writes),
//! by its extension second.

use serde_json::Value;
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// vramplan's own run config (TOML).
    Vramplan,
    /// Hugging Face `TrainingArguments` (TRL's configs too): a JSON/YAML dict or a command line.
    HfArgs,
    Accelerate,
    DeepSpeed,
    Torchtune,
    Torchtitan,
    Axolotl,
    Nanochat,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Vramplan => "vramplan",
            Format::HfArgs => "hf-args",
            Format::Accelerate => "accelerate",
            Format::DeepSpeed => "deepspeed",
            Format::Torchtune => "torchtune",
            Format::Torchtitan => "torchtitan",
            Format::Axolotl => "axolotl",
            Format::Nanochat => "nanochat",
        }
    }
}

/// The formats `--emit` writes.
pub const EMITTED: [&str; 7] = [
    "hf-args",
    "accelerate",
    "deepspeed",
    "torchtune",
    "torchtitan",
    "axolotl",
    "nanochat",
];

impl Format {
    pub fn parse(name: &str) -> Option<Format> {
        [
            Format::HfArgs,
            Format::Accelerate,
            Format::DeepSpeed,
            Format::Torchtune,
            Format::Torchtitan,
            Format::Axolotl,
            Format::Nanochat,
        ]
        .into_iter()
        .find(|f| f.name() == name)
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What detection accepts, for the error when nothing matches.
pub const ACCEPTED: &str = "a vramplan run config (TOML), a torchtitan TOML, a DeepSpeed or Hugging Face TrainingArguments JSON, an accelerate, torchtune, axolotl or TrainingArguments YAML, or a run_clm.py/TRL/nanochat command line";

/// The format of `text`, named `name` (its extension is the fallback).
pub fn detect(name: &str, text: &str) -> Result<Format, String> {
    if let Some(f) = command_line(text) {
        return Ok(f);
    }
    let ext = name.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    if let Ok(v) = toml::from_str::<Value>(text) {
        return Ok(toml_format(&v));
    }
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        if let Some(f) = dict_format(&v, true) {
            return Ok(f);
        }
    }
    if ext.as_deref() != Some("toml") && ext.as_deref() != Some("json") {
        if let Ok(v) = serde_norway::from_str::<Value>(text) {
            if let Some(f) = dict_format(&v, false) {
                return Ok(f);
            }
        }
    }
    match ext.as_deref() {
        // vramplan's own reader reports the TOML's syntax error.
        Some("toml") => Ok(Format::Vramplan),
        Some("json") => Err(format!("not valid JSON, or not a config: {ACCEPTED}")),
        Some("yaml" | "yml") => Err(format!("not valid YAML, or not a config: {ACCEPTED}")),
        _ => Err(format!("cannot tell the format: {ACCEPTED}")),
    }
}

fn command_line(text: &str) -> Option<Format> {
    let code: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    let first = code.first()?;
    if first.starts_with('{') || first.starts_with('[') || first.contains(" = ") {
        return None;
    }
    let joined = code.join(" ");
    let nanochat = [
        "scripts.base_train",
        "scripts.mid_train",
        "scripts.chat_sft",
    ];
    if nanochat.iter().any(|s| joined.contains(s))
        || ["base_train.py", "mid_train.py", "chat_sft.py"]
            .iter()
            .any(|s| joined.contains(s))
    {
        return Some(Format::Nanochat);
    }
    let launcher = ["python", "torchrun", "accelerate", "deepspeed", "trl "];
    (launcher.iter().any(|l| first.starts_with(l)) && joined.contains("--"))
        .then_some(Format::HfArgs)
}

fn toml_format(v: &Value) -> Format {
    let has = |k: &str| v.get(k).is_some();
    let titan = [
        "job",
        "training",
        "parallelism",
        "activation_checkpoint",
        "compile",
    ];
    if titan.iter().any(|k| has(k)) || v.pointer("/model/flavor").is_some() {
        Format::Torchtitan
    } else {
        Format::Vramplan
    }
}

/// A dict's format by the keys only one launcher writes; `json` for a .json's top level.
fn dict_format(v: &Value, json: bool) -> Option<Format> {
    let m = v.as_object()?;
    let has = |k: &str| m.contains_key(k);
    let deepspeed = [
        "zero_optimization",
        "train_micro_batch_size_per_gpu",
        "train_batch_size",
        "gradient_clipping",
    ];
    if deepspeed.iter().any(|k| has(k)) {
        return Some(Format::DeepSpeed);
    }
    if has("distributed_type") || has("compute_environment") || has("num_processes") {
        return Some(Format::Accelerate);
    }
    if m.values().any(|x| x.get("_component_").is_some()) {
        return Some(Format::Torchtune);
    }
    let axolotl = ["base_model", "micro_batch_size", "sequence_len", "adapter"];
    if !json && axolotl.iter().any(|k| has(k)) {
        return Some(Format::Axolotl);
    }
    let hf = [
        "per_device_train_batch_size",
        "model_name_or_path",
        "output_dir",
        "gradient_accumulation_steps",
    ];
    hf.iter().any(|k| has(k)).then_some(Format::HfArgs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_decides_before_the_extension() {
        let cases = [
            (
                "a.json",
                "{\"zero_optimization\": {\"stage\": 2}}",
                Format::DeepSpeed,
            ),
            (
                "a.yaml",
                "distributed_type: MULTI_GPU\nnum_processes: 2\n",
                Format::Accelerate,
            ),
            (
                "a.txt",
                "model:\n  _component_: torchtune.models.llama3_2.llama3_2_1b\n",
                Format::Torchtune,
            ),
            (
                "a.yml",
                "base_model: NousResearch/Llama-3.2-1B\nsequence_len: 4096\n",
                Format::Axolotl,
            ),
            (
                "a",
                "[training]\nlocal_batch_size = 8\n",
                Format::Torchtitan,
            ),
            ("a.toml", "[model]\npreset = \"gpt2\"\n", Format::Vramplan),
            (
                "a.sh",
                "torchrun --nproc_per_node=8 -m scripts.base_train -- --depth=20",
                Format::Nanochat,
            ),
            (
                "a.txt",
                "python run_clm.py \\\n  --model_name_or_path gpt2",
                Format::HfArgs,
            ),
            (
                "a.json",
                "{\"per_device_train_batch_size\": 4}",
                Format::HfArgs,
            ),
            (
                "a.yaml",
                "model_name_or_path: gpt2\nbf16: true\n",
                Format::HfArgs,
            ),
        ];
        for (name, text, want) in cases {
            assert_eq!(detect(name, text), Ok(want), "{name}: {text}");
        }
    }

    #[test]
    fn an_unknown_file_is_refused_with_what_is_accepted() {
        let e = detect("notes.txt", "hello: [unclosed").unwrap_err();
        assert!(e.starts_with("cannot tell the format"), "{e}");
        assert!(detect("x.json", "{")
            .unwrap_err()
            .contains("not valid JSON"));
        // A broken .toml goes to vramplan's reader, which names the line.
        assert_eq!(detect("x.toml", "[model"), Ok(Format::Vramplan));
    }
}
