//! LoRA (Hu et al. 2021) as PEFT 0.21 computes it (`tuners/lora/layer.py`, `Linear.forward`
//! and `LoraLayer.reset_lora_parameters`): each targeted linear `W` (`out × in`) of the
//! blocks keeps its weight, frozen, and gains `A` (`r × in`) and `B` (`out × r`):
//!
//! `y = W·x + (alpha / r)·B·(A·x)`, `A ~ kaiming_uniform(a = √5)` = `U(−1/√in, 1/√in)`,
//! `B = 0`,
//!
//! so the adapted model starts as the base model exactly. The base parameters (every one:
//! the linears, norms, embedding, head, biases) move out of the trained parameters into
//! [`Model::frozen`] as plain tensors that are not candle `Var`s: no operation on them
//! alone is recorded for backward, they get no gradient and AdamW keeps no state for
//! them; the adapters are the model's only parameters, named after their linear
//! (`layers.0.self_attn.q_proj.lora_A.weight`).
//!
//! PEFT's files: `adapter_model.safetensors` holds the adapters under PEFT's names
//! (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, f32) and
//! `adapter_config.json` its `LoraConfig` (peft_type `LORA`, task_type `CAUSAL_LM`, r,
//! lora_alpha, target_modules, lora_dropout 0, bias `none`, fan_in_fan_out false);
//! `PeftModel.from_pretrained(base, DIR)` loads them. [`merged`] is PEFT's
//! `merge_and_unload`: `W + (alpha / r)·B·A`.

use crate::engine::model::Model;
use crate::engine::rng::Rng;
use crate::fsutil::{self, sync_dir};
use crate::Error;
use candle_core::{Device, Tensor, Var};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;
use vramplan_planner::LoraSpec;

pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// PEFT's prefix of the adapted model's names (`PeftModel.base_model.model`), before
/// transformers' `model.` of the decoder.
const PEFT_PREFIX: &str = "base_model.model.";

/// What the adapters of a model compute: the scaling and the targeted linears.
#[derive(Debug, Clone, PartialEq)]
pub struct Adapters {
    pub rank: usize,
    pub alpha: f64,
    /// PEFT module names (`q_proj`, `down_proj`, ...).
    pub targets: Vec<String>,
}

impl Adapters {
    pub fn of(spec: &LoraSpec) -> Adapters {
        Adapters {
            rank: spec.rank as usize,
            alpha: spec.alpha,
            targets: spec.targets.clone(),
        }
    }

    /// PEFT's `scaling = lora_alpha / r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Whether the linear `stem` (`layers.0.self_attn.q_proj`) gets an adapter.
    pub fn targets(&self, stem: &str) -> bool {
        stem.starts_with("layers.")
            && stem
                .rsplit('.')
                .next()
                .is_some_and(|m| self.targets.iter().any(|t| t == m))
    }
}

/// `A`'s and `B`'s names for the linear `stem`.
pub fn names(stem: &str) -> (String, String) {
    (
        format!("{stem}.lora_A.weight"),
        format!("{stem}.lora_B.weight"),
    )
}

/// Freezes every parameter of `model` and adds an adapter pair to each targeted linear:
/// `A` kaiming-uniform from `rng` (in name order), `B` zeros.
pub fn apply(model: &mut Model, adapters: Adapters, rng: &mut Rng) -> candle_core::Result<()> {
    let base = std::mem::take(&mut model.params);
    let mut params = BTreeMap::new();
    for (name, var) in &base {
        let Some(stem) = name.strip_suffix(".weight") else {
            continue;
        };
        if !adapters.targets(stem) {
            continue;
        }
        let (out, inp) = var.as_tensor().dims2()?;
        let bound = 1.0 / (inp as f64).sqrt();
        let a: Vec<f64> = (0..adapters.rank * inp)
            .map(|_| (2.0 * rng.uniform() - 1.0) * bound)
            .collect();
        let a = Tensor::from_vec(a, (adapters.rank, inp), &Device::Cpu)?
            .to_dtype(model.dtype)?
            .to_device(&model.device)?;
        let b = Tensor::zeros((out, adapters.rank), model.dtype, &model.device)?;
        let (na, nb) = names(stem);
        params.insert(na, Var::from_tensor(&a)?);
        params.insert(nb, Var::from_tensor(&b)?);
    }
    model.frozen = base
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().detach()))
        .collect();
    model.params = params;
    model.lora = Some(adapters);
    Ok(())
}

/// Gives `model` (built from checkpoint `l`'s plan and seed) its base, from the run's
/// `--init` folder when it had one, and empty adapters for `restore` to fill.
pub fn attach(
    model: &mut Model,
    spec: &LoraSpec,
    l: &crate::engine::checkpoint::Loaded,
) -> Result<(), Error> {
    if let Some(dir) = &l.meta.init {
        let dir = Path::new(dir);
        if !dir.join(crate::engine::hf::CONFIG).is_file() {
            return Err(Error::checkpoint(
                &l.dir,
                format!(
                    "its LoRA base {} (the run's --init) is gone: the checkpoint holds the adapters only",
                    dir.display()
                ),
            ));
        }
        crate::engine::hf::load_weights(model, dir)?;
    }
    apply(model, Adapters::of(spec), &mut Rng::new(0))?;
    Ok(())
}

/// The model with each adapter merged into its weight (`W + scale·B·A`) and every
/// parameter trainable again: PEFT's `merge_and_unload`.
pub fn merged(model: &Model) -> candle_core::Result<Model> {
    let Some(ad) = &model.lora else {
        candle_core::bail!("the model has no adapters to merge");
    };
    let mut params = BTreeMap::new();
    for (name, w) in &model.frozen {
        let stem = name.strip_suffix(".weight").unwrap_or(name);
        let (na, nb) = names(stem);
        let w = match (model.params.get(&na), model.params.get(&nb)) {
            (Some(a), Some(b)) if ad.targets(stem) => {
                (w + (b.as_tensor().matmul(a.as_tensor())? * ad.scale())?)?
            }
            _ => w.copy()?,
        };
        params.insert(name.clone(), Var::from_tensor(&w)?);
    }
    Ok(Model {
        spec: model.spec.clone(),
        dtype: model.dtype,
        compute: model.compute,
        device: model.device.clone(),
        params,
        frozen: BTreeMap::new(),
        lora: None,
        numerics: model.numerics,
    })
}

/// PEFT's name of the engine's adapter `n` (`layers.0.self_attn.q_proj.lora_A.weight`).
pub fn peft_name(n: &str) -> String {
    format!("{PEFT_PREFIX}{}", crate::engine::hf::hf_name(n))
}

/// PEFT's `adapter_config.json` for `ad`, with the base's folder (or name) when known.
pub fn peft_config(ad: &Adapters, base: Option<&str>) -> String {
    let v = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "revision": null,
        "r": ad.rank,
        "lora_alpha": ad.alpha,
        "lora_dropout": 0.0,
        "target_modules": ad.targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_rslora": false,
        "use_dora": false,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "inference_mode": true,
    });
    serde_json::to_string_pretty(&v).unwrap_or_default()
}

/// Writes the adapters of `model` as PEFT's two files in `dir` (which must exist), each
/// flushed.
pub fn write_peft(model: &Model, base: Option<&str>, dir: &Path) -> Result<(), Error> {
    let Some(ad) = &model.lora else {
        return Err(Error::bad(
            "vramplan export",
            "the run has no LoRA adapters",
        ));
    };
    let tensors: BTreeMap<String, &Tensor> = model
        .params
        .iter()
        .map(|(n, v)| (peft_name(n), v.as_tensor()))
        .collect();
    let meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    fsutil::write_synced(&dir.join(ADAPTER_WEIGHTS), |w| {
        crate::engine::checkpoint::write_safetensors(w, &tensors, Some(&meta))
    })?;
    let config = peft_config(ad, base);
    fsutil::write_synced(&dir.join(ADAPTER_CONFIG), |w| {
        w.write_all(config.as_bytes())
    })?;
    sync_dir(dir).map_err(|e| Error::io(dir, e))
}

/// The adapters PEFT's `adapter_config.json` in `dir` describes; refuses what the engine
/// does not compute (another peft_type, rsLoRA, DoRA, biases, fan_in_fan_out, patterns).
pub fn read_peft_config(dir: &Path) -> Result<Adapters, Error> {
    let path = dir.join(ADAPTER_CONFIG);
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::bad(&shown, format!("cannot read: {e}")))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::bad(&shown, e))?;
    let s = |k: &str| v.get(k).and_then(Value::as_str);
    if s("peft_type") != Some("LORA") {
        return Err(Error::bad(&shown, "peft_type: the engine reads \"LORA\""));
    }
    for key in ["use_rslora", "use_dora", "fan_in_fan_out"] {
        if v.get(key).and_then(Value::as_bool) == Some(true) {
            return Err(Error::bad(&shown, format!("{key} = true: not supported")));
        }
    }
    if s("bias").is_some_and(|b| b != "none") {
        return Err(Error::bad(&shown, "bias: the engine reads \"none\""));
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if v.get(key)
            .and_then(Value::as_object)
            .is_some_and(|o| !o.is_empty())
        {
            return Err(Error::bad(&shown, format!("{key}: not supported")));
        }
    }
    let rank = v.get("r").and_then(Value::as_u64).filter(|&r| r > 0);
    let alpha = v.get("lora_alpha").and_then(Value::as_f64);
    let targets: Option<Vec<String>> = v.get("target_modules").and_then(|t| {
        t.as_array()?
            .iter()
            .map(|x| x.as_str().map(str::to_string))
            .collect()
    });
    match (rank, alpha, targets) {
        (Some(rank), Some(alpha), Some(targets)) => Ok(Adapters {
            rank: rank as usize,
            alpha,
            targets,
        }),
        _ => Err(Error::bad(
            &shown,
            "needs r (> 0), lora_alpha and target_modules (a list of names)",
        )),
    }
}

/// Adds the adapters of PEFT's folder `dir` to `model` (whose base is loaded): every
/// adapter the config implies must be in the file with its shape, and nothing else.
pub fn load_peft(model: &mut Model, dir: &Path) -> Result<(), Error> {
    let ad = read_peft_config(dir)?;
    apply(model, ad, &mut Rng::new(0))?;
    let path = dir.join(ADAPTER_WEIGHTS);
    let shown = path.display().to_string();
    let st =
        candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| Error::bad(&shown, e))?;
    for (n, var) in &model.params {
        let pn = peft_name(n);
        let t = st
            .get(&pn)
            .ok_or_else(|| Error::bad(&shown, format!("no tensor {pn}")))?;
        if t.dims() != var.as_tensor().dims() {
            return Err(Error::bad(
                &shown,
                format!(
                    "{pn} has shape {:?}; the model needs {:?}",
                    t.dims(),
                    var.as_tensor().dims()
                ),
            ));
        }
        var.set(&t.to_dtype(model.dtype)?.to_device(&model.device)?)?;
    }
    if let Some(extra) = st
        .keys()
        .find(|k| !model.params.keys().any(|n| &peft_name(n) == *k))
    {
        return Err(Error::bad(
            &shown,
            format!("tensor {extra} is not an adapter of the model"),
        ));
    }
    Ok(())
}

#[cfg(test)]
#[path = "lora_tests.rs"]
mod tests;
