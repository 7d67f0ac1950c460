//! The validation loss of a saved checkpoint (`vramplan eval`): the model rebuilt from the
//! checkpoint's plan, its weights restored, and the same fixed validation windows the
//! trainer measures, so a checkpoint's number here equals its run's `val_loss` there.

use crate::engine::checkpoint::{self, Loaded};
use crate::engine::load_tokenizer;
use crate::engine::model::Model;
use crate::engine::rng::Rng;
use crate::engine::sft::{Formatter, TrainOn};
use crate::engine::trainer::{corpus, validate};
use crate::engine::Result;
use candle_core::{DType, Device};
use std::path::Path;
use vramplan_planner::RunSpec;

/// The model of checkpoint `l` (whose plan resolves to `spec`), in f32 on the CPU; under
/// LoRA its base from the run's `--init` folder (or its seed) and its adapters.
pub fn restored(spec: &RunSpec, l: &Loaded) -> Result<Model> {
    let mut model = Model::new(
        &spec.model,
        DType::F32,
        DType::F32,
        &Device::Cpu,
        &mut Rng::new(l.meta.seed),
    )?;
    model.numerics = crate::engine::hf::numerics_of(l.meta.hf_config.as_deref());
    if let Some(lora) = &spec.lora {
        crate::engine::lora::attach(&mut model, lora, l)?;
    }
    checkpoint::restore(l, &model, None)?;
    Ok(model)
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Evaluation {
    pub checkpoint: String,
    pub step: u64,
    pub val_loss: f64,
    pub val_bits_per_byte: f64,
    /// The data whose validation split was measured.
    pub data: String,
}

/// Evaluates the checkpoint `l` (whose plan resolves to `spec`) on the validation split of
/// `data`, else of the data it trained on; with the run's tokenizer when it had one.
pub fn evaluate(spec: &RunSpec, l: &Loaded, data: Option<&Path>) -> Result<Evaluation> {
    let data = data.or((l.meta.data != "built-in").then(|| Path::new(&l.meta.data)));
    let run = l.dir.parent().unwrap_or(Path::new("."));
    let tokenizer = l.meta.tokenizer.then(|| run.join(checkpoint::TOKENIZER));
    let hf = match &tokenizer {
        Some(p) => Some(load_tokenizer(p, spec)?),
        None => None,
    };
    // SFT data is validated on its responses, formatted as the run formatted them.
    let fmt = Formatter::load(tokenizer.as_deref(), TrainOn::Response)?
        .for_model(spec, l.meta.hf_config.as_deref());
    let corpus = corpus(spec, data, &hf, &fmt)?;
    let model = restored(spec, l)?;
    let val_loss = validate(&model, &corpus, spec)?;
    Ok(Evaluation {
        checkpoint: l.dir.display().to_string(),
        step: l.meta.step,
        val_loss,
        val_bits_per_byte: val_loss / corpus.bytes_per_token / std::f64::consts::LN_2,
        data: corpus.name.clone(),
    })
}
