//! nanochat's training scripts (`scripts/base_train.py`, `mid_train.py`, `chat_sft.py`),
//! from their command line: `torchrun --nproc_per_node N -m scripts.base_train --
//! --depth=20 --device_batch_size=16`. Flags are spelled with underscores (the
//! configurator of October 2025) or dashes (the later argparse). The model is nanochat's
//! `gpt.py` of October 2025: width depth × aspect ratio (64), heads of 128, an MLP of 4×
//! the width, 65,536 tokens, untied embeddings. `mid_train` and `chat_sft` load the base
//! checkpoint, whose depth is not on their command line.
//!
//! What each script runs (commit fe5aed9, October 2025): `base_train.py` (line 102) and
//! `mid_train.py` (line 69) call `torch.compile(model, dynamic=False)` on the model they
//! train; `chat_sft.py` leaves it commented out (line 73: variable-length batches), so it
//! trains eager.

use super::args;
use super::*;
use vramplan_planner::RawModel;

pub(super) const TABLE: &[Row] = &[
    ("depth", Rule::Set(|d, v, _| keep(d, "depth", v))),
    (
        "aspect_ratio",
        Rule::Set(|d, v, _| keep(d, "aspect_ratio", v)),
    ),
    ("head_dim", Rule::Set(|d, v, _| keep(d, "head_dim", v))),
    ("max_seq_len", Rule::Set(set_seq_len)),
    ("device_batch_size", Rule::Set(set_micro_batch)),
    (
        "total_batch_size",
        Rule::Set(|d, v, _| {
            if int(v)? < 0 {
                return Err(Refusal::Bad("tokens per step; -1 (computed from the scaling law) cannot be planned: write the number".into()));
            }
            d.global_tokens = Some(count(v)?);
            Ok(())
        }),
    ),
    (
        "target_examples_per_step",
        Rule::Set(|d, v, _| {
            d.global_batch = Some(count(v)?);
            Ok(())
        }),
    ),
    (
        "dtype",
        Rule::Set(|d, v, _| {
            let p = pick(v, &[("bfloat16", "bf16-autocast"), ("float32", "fp32")])?;
            d.precision = Some(p.into());
            Ok(())
        }),
    ),
    (
        "device_type",
        Rule::Set(|d, v, _| {
            if pick(
                v,
                &[("cuda", false), ("cpu", true), ("", false), ("mps", true)],
            )? {
                d.gpu = Some("cpu".into());
            }
            Ok(())
        }),
    ),
    ("fp8", Rule::Unmodelled("FP8 matmuls (torchao)")),
    ("fp8_recipe", Rule::Ignore),
    // Sliding windows change which keys attention reads, not what it keeps (flash attention).
    ("window_pattern", Rule::Ignore),
    ("run", Rule::Ignore),
    ("num_iterations", Rule::Ignore),
    ("max_iterations", Rule::Ignore),
    ("num_epochs", Rule::Ignore),
    ("target_flops", Rule::Ignore),
    ("target_param_data_ratio", Rule::Ignore),
    ("embedding_lr", Rule::Ignore),
    ("unembedding_lr", Rule::Ignore),
    ("matrix_lr", Rule::Ignore),
    ("scalar_lr", Rule::Ignore),
    ("weight_decay", Rule::Ignore),
    ("grad_clip", Rule::Ignore),
    ("init_lr_frac", Rule::Ignore),
    ("warmup_steps", Rule::Ignore),
    ("warmup_ratio", Rule::Ignore),
    ("warmdown_ratio", Rule::Ignore),
    ("final_lr_frac", Rule::Ignore),
    ("resume_from_step", Rule::Ignore),
    ("eval_every", Rule::Ignore),
    ("eval_tokens", Rule::Ignore),
    ("eval_steps", Rule::Ignore),
    ("eval_metrics_every", Rule::Ignore),
    ("core_metric_every", Rule::Ignore),
    ("core_metric_max_per_task", Rule::Ignore),
    ("sample_every", Rule::Ignore),
    ("save_every", Rule::Ignore),
    ("model_tag", Rule::Ignore),
    ("step", Rule::Ignore),
    ("source", Rule::Ignore),
    ("dry_run", Rule::Ignore),
];

fn keep(d: &mut Draft, key: &str, v: &Value) -> Result<(), Refusal> {
    count(v)?;
    d.extra.push((key.to_string(), v.clone()));
    Ok(())
}

/// The script's defaults (October 2025): batch, sequence and tokens per step, and
/// whether it compiles the model it trains.
struct Script {
    name: &'static str,
    compiled: bool,
    device_batch: u64,
    seq_len: Option<u64>,
    total_tokens: Option<u64>,
    examples_per_step: Option<u64>,
}

const SCRIPTS: &[Script] = &[
    Script {
        name: "base_train",
        compiled: true,
        device_batch: 32,
        seq_len: Some(2048),
        total_tokens: Some(524288),
        examples_per_step: None,
    },
    Script {
        name: "mid_train",
        compiled: true,
        device_batch: 32,
        seq_len: Some(2048),
        total_tokens: Some(524288),
        examples_per_step: None,
    },
    Script {
        name: "chat_sft",
        compiled: false,
        device_batch: 4,
        seq_len: None,
        total_tokens: None,
        examples_per_step: Some(32),
    },
];

/// The model of `--depth` (with `--aspect_ratio`, `--head_dim`): the preset of that
/// depth when the shape is the default one, else its sizes.
fn model(d: &Draft, ctx: &Ctx) -> Option<RawModel> {
    let get = |k: &str, default: u64| d.extra(k).map_or(Ok(default), count).ok();
    let depth = get("depth", 20)?;
    let (ratio, head) = (get("aspect_ratio", 64)?, get("head_dim", 128)?);
    let name = format!("nanochat-d{depth}");
    if ratio == 64 && head == 128 && ctx.presets.model(&name).is_ok() {
        return Some(preset(&name));
    }
    let dim = depth * ratio;
    let heads = dim.div_ceil(head).max(1);
    Some(RawModel {
        name: Some(name),
        arch: Some("nanochat".into()),
        hidden_size: Some(dim),
        num_layers: Some(depth),
        num_heads: Some(heads),
        num_kv_heads: Some(heads),
        head_dim: Some(head),
        intermediate_size: Some(4 * dim),
        vocab_size: Some(65536),
        tie_embeddings: Some(false),
        ..RawModel::default()
    })
}

pub fn read(text: &str, ctx: &Ctx) -> Result<Launch, String> {
    let c = args::command_line(text)?;
    let short = c
        .script
        .rsplit(['.', '/', ' '])
        .find(|s| !s.is_empty() && *s != "py");
    let script = SCRIPTS
        .iter()
        .find(|s| short == Some(s.name))
        .ok_or_else(|| {
            format!(
                "{}: expected scripts.base_train, scripts.mid_train or scripts.chat_sft",
                c.script
            )
        })?;
    let mut d = Draft {
        gpus: args::processes(&c.launcher)?,
        precision: Some("bf16-autocast".into()),
        compile: Some(script.compiled),
        ..Draft::default()
    };
    let applied = apply(
        &[TABLE],
        &[],
        &flatten(&Value::Object(c.flags)),
        &mut d,
        ctx,
    )?;
    d.micro_batch.get_or_insert(script.device_batch);
    if script.name == "base_train" {
        d.model = model(&d, ctx);
        d.model_ref = Some("--depth".into());
    } else if d.extra("depth").is_none() {
        d.model_ref = Some(format!(
            "{} loads the base checkpoint, whose depth this command line does not give",
            script.name
        ));
    } else {
        d.model = model(&d, ctx);
    }
    if d.seq_len.is_none() {
        d.seq_len = script.seq_len.or(Some(2048));
        if script.seq_len.is_none() {
            d.assumed.push("seq_len 2048 (chat_sft pads each batch to its longest conversation; the base model's max_seq_len is the bound)".into());
        }
    }
    let accum = match (
        d.global_tokens.or(script.total_tokens),
        d.global_batch.or(script.examples_per_step),
    ) {
        (Some(tokens), _) => {
            let per = d.micro_batch.unwrap_or(1) * d.seq_len.unwrap_or(1) * d.gpus.unwrap_or(1);
            if tokens % per != 0 {
                return Err(format!("total_batch_size = {tokens}: a multiple of device_batch_size × max_seq_len × GPUs = {per} (nanochat asserts it)"));
            }
            tokens / per
        }
        (None, Some(examples)) => {
            d.accum_for(examples, "target_examples_per_step")
                .map_err(|r| match r {
                    Refusal::Bad(s) => s,
                    other => format!("{other:?}"),
                })?
        }
        (None, None) => 1,
    };
    d.grad_accum = Some(accum);
    Ok(finish(Format::Nanochat, d, applied))
}
