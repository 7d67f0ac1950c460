//! `vramplan sample --checkpoint DIR --prompt "..."`: generate from a checkpoint written by
//! `vramplan train`, or (`--init DIR`) from a Hugging Face checkpoint folder.

use crate::exit::bad;
use crate::load::{self, Env};
use anyhow::Result;
use candle_core::{Device, Tensor};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use vramplan::engine::{checkpoint, eval, hf, model::Model, rng::Rng, step, t5};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A checkpoint folder (ckpt-*) or a training output folder (its newest checkpoint).
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "init",
        conflicts_with = "init"
    )]
    pub checkpoint: Option<PathBuf>,
    /// A Hugging Face checkpoint folder (config.json + model.safetensors or shards), with
    /// its tokenizer.json when it has one (else bytes).
    #[arg(long, value_name = "DIR")]
    pub init: Option<PathBuf>,
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Tokens to generate (bytes, unless the run trained with a tokenizer).
    #[arg(long, default_value_t = 200)]
    pub tokens: usize,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// The context window `--init` samples with where the config gives none.
const INIT_CONTEXT: usize = 2048;

/// The model, its context window and the tokenizer.json it reads text with (if any).
fn open(env: &Env, a: &Args) -> Result<(Model, usize, Option<PathBuf>)> {
    if let Some(dir) = &a.init {
        let (p, model) = hf::load_model(dir)?;
        let ctx = serde_json::from_str::<serde_json::Value>(&p.config)
            .ok()
            .and_then(|v| v.get("max_position_embeddings")?.as_u64())
            .map_or(INIT_CONTEXT, |n| n as usize);
        let tok = dir.join(checkpoint::TOKENIZER);
        if !tok.is_file() && p.spec.vocab_size < 256 {
            return Err(bad(
                &dir.display().to_string(),
                format!(
                    "no tokenizer.json, and vocab_size {} is too small for bytes (256)",
                    p.spec.vocab_size
                ),
            ));
        }
        return Ok((model, ctx, tok.is_file().then_some(tok)));
    }
    let path = a.checkpoint.clone().unwrap_or_default();
    let name = path.display().to_string();
    if !path.exists() {
        return Err(bad(&name, "no such checkpoint folder"));
    }
    let l = checkpoint::latest(&path).map_err(|e| bad(&name, format!("{e:#}")))?;
    let loaded = load::resolve_text(env, &format!("{name} (plan)"), &l.meta.plan, Path::new("."))?;
    let model = eval::restored(&loaded.spec, &l)?;
    let tok = l.meta.tokenizer.then(|| {
        l.dir
            .parent()
            .unwrap_or(Path::new("."))
            .join(checkpoint::TOKENIZER)
    });
    Ok((model, loaded.spec.train.seq_len as usize, tok))
}

pub fn run(env: &Env, a: Args) -> Result<ExitCode> {
    let (model, ctx, tokenizer) = open(env, &a)?;
    let hf = match &tokenizer {
        Some(path) => Some(
            tokenizers::Tokenizer::from_file(path)
                .map_err(|e| bad(&path.display().to_string(), format!("tokenizer: {e}")))?,
        ),
        None => None,
    };
    let mut toks: Vec<u32> = match &hf {
        Some(t) => t
            .encode(a.prompt.as_str(), false)
            .map_err(|e| bad("--prompt", format!("tokenizer: {e}")))?
            .get_ids()
            .to_vec(),
        None => a.prompt.bytes().map(u32::from).collect(),
    };
    if toks.is_empty() {
        toks.push(if hf.is_some() { 0 } else { b'\n' as u32 });
    }
    let vocab = match &hf {
        Some(t) => t.get_vocab_size(true),
        None => 256,
    };
    let mut rng = Rng::new(a.seed);
    if model.spec.arch == vramplan_planner::Arch::T5 {
        return seq2seq(
            &model,
            &a,
            hf.as_ref(),
            tokenizer.as_deref(),
            vocab,
            &mut rng,
        );
    }
    let mut out = std::io::stdout().lock();
    if hf.is_none() {
        write!(out, "{}", a.prompt)?;
    }
    for _ in 0..a.tokens {
        let window = &toks[toks.len().saturating_sub(ctx)..];
        let ids = Tensor::from_vec(window.to_vec(), window.len(), &Device::Cpu)?;
        let z = step::last_logits(&model, &ids)?;
        let next = pick(&z[..z.len().min(vocab)], a.temperature, &mut rng);
        toks.push(next);
        if hf.is_none() {
            out.write_all(&[next.min(255) as u8])?;
            out.flush()?;
        }
    }
    if let Some(t) = &hf {
        // The whole sequence, so the decoder joins the prompt and the continuation.
        let text = t
            .decode(&toks[usize::from(a.prompt.is_empty())..], false)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        write!(out, "{text}")?;
    }
    writeln!(out)?;
    Ok(ExitCode::SUCCESS)
}

/// T5: the encoder reads the prompt and the end it was trained with (the tokenizer
/// config's `eos_token`, else a blank line); the decoder generates the response, which is
/// printed (up to that end, or `--tokens` tokens).
fn seq2seq(
    model: &Model,
    a: &Args,
    hf: Option<&tokenizers::Tokenizer>,
    tokenizer: Option<&Path>,
    vocab: usize,
    rng: &mut Rng,
) -> Result<ExitCode> {
    let fmt = vramplan::engine::sft::Formatter::load(
        tokenizer,
        vramplan::engine::sft::TrainOn::Response,
    )?;
    let end = fmt.end().to_string();
    let encode = |text: &str| -> Result<Vec<u32>> {
        Ok(match hf {
            Some(t) => t
                .encode(text, false)
                .map_err(|e| bad("--prompt", format!("tokenizer: {e}")))?
                .get_ids()
                .to_vec(),
            None => text.bytes().map(u32::from).collect(),
        })
    };
    let prompt = encode(&format!("{}{end}", a.prompt))?;
    let ids = t5::generate(model, &prompt, a.tokens, |z| {
        pick(&z[..z.len().min(vocab)], a.temperature, rng)
    })?;
    let text = match hf {
        Some(t) => t
            .decode(&ids, false)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?,
        None => String::from_utf8_lossy(&ids.iter().map(|&i| i.min(255) as u8).collect::<Vec<_>>())
            .into_owned(),
    };
    let text = text.split(end.as_str()).next().unwrap_or_default();
    println!("{text}");
    Ok(ExitCode::SUCCESS)
}

/// Samples from `softmax(z / temperature)` (greedy at 0).
fn pick(z: &[f32], temperature: f64, rng: &mut Rng) -> u32 {
    let best = z
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap_or(0);
    if temperature <= 0.0 {
        return best as u32;
    }
    let m = z[best] as f64;
    let w: Vec<f64> = z
        .iter()
        .map(|v| ((*v as f64 - m) / temperature).exp())
        .collect();
    let total: f64 = w.iter().sum();
    let mut u = rng.uniform() * total;
    for (i, x) in w.iter().enumerate() {
        u -= x;
        if u <= 0.0 {
            return i as u32;
        }
    }
    best as u32
}
