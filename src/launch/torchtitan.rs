//! A torchtitan train config TOML (`torchtitan/models/llama3/train_configs/*.toml`): the
//! llama3 flavor, `local_batch_size`, `seq_len`, the global batch, activation checkpointing,
//! `compile`, the optimizer's implementation and the parallel degrees. Defaults are
//! torchtitan's `config/job_config.py` (February 2026): local batch 8, sequence 2048,
//! selective checkpointing of every 2nd block, the fused AdamW, FSDP over every GPU.
//! Without FSDP (one GPU) torchtitan autocasts to `mixed_precision_param`
//! (`distributed/utils.py`, `maybe_enable_amp`).

use super::*;
use vramplan_planner::RawModel;

/// torchtitan's llama3 flavors (`models/llama3/__init__.py`): dim, layers, heads, kv heads,
/// ffn multiplier (×10), multiple_of, vocabulary.
type Flavor = (&'static str, u64, u64, u64, u64, u64, u64, u64);

const FLAVORS: &[Flavor] = &[
    ("debugmodel", 256, 6, 16, 16, 0, 256, 2048),
    ("8B", 4096, 32, 32, 8, 13, 1024, 128256),
    ("70B", 8192, 80, 64, 8, 13, 4096, 128256),
    ("405B", 16384, 126, 128, 8, 12, 4096, 128256),
];

/// The SwiGLU width of `FeedForward.__init__`: 2/3 of 4·dim, times the multiplier,
/// rounded up to `multiple_of`.
fn ffn_width(dim: u64, mult_x10: u64, multiple_of: u64) -> u64 {
    let mut h = 2 * (4 * dim) / 3;
    if mult_x10 > 0 {
        h = h * mult_x10 / 10;
    }
    h.div_ceil(multiple_of) * multiple_of
}

fn flavor(name: &str) -> Option<RawModel> {
    let &(n, dim, layers, heads, kv, mult, multiple_of, vocab) =
        FLAVORS.iter().find(|f| f.0 == name)?;
    Some(RawModel {
        name: Some(format!("torchtitan-llama3-{n}")),
        arch: Some("llama".into()),
        hidden_size: Some(dim),
        num_layers: Some(layers),
        num_heads: Some(heads),
        num_kv_heads: Some(kv),
        head_dim: Some(dim / heads),
        intermediate_size: Some(ffn_width(dim, mult, multiple_of)),
        vocab_size: Some(vocab),
        tie_embeddings: Some(false),
        ..RawModel::default()
    })
}

pub(super) const TABLE: &[Row] = &[
    (
        "model.name",
        Rule::Set(|_, v, _| {
            pick(v, &[("llama3", ())]).map_err(|_| {
                Refusal::Unmodelled("only torchtitan's llama3 flavors are known".into())
            })
        }),
    ),
    (
        "model.flavor",
        Rule::Set(|d, v, _| {
            let f = text(v)?;
            d.model_ref = Some(format!("model.flavor = \"{f}\""));
            d.model = flavor(f);
            Ok(())
        }),
    ),
    (
        "model.converters",
        Rule::Unmodelled("float8 / MX linear layers"),
    ),
    ("model.*", Rule::Ignore),
    ("training.local_batch_size", Rule::Set(set_micro_batch)),
    ("training.batch_size", Rule::Set(set_micro_batch)),
    ("training.seq_len", Rule::Set(set_seq_len)),
    (
        "training.global_batch_size",
        Rule::Set(|d, v, _| {
            if int(v)? > 0 {
                d.global_batch = Some(count(v)?);
            }
            Ok(())
        }),
    ),
    (
        "training.mixed_precision_param",
        Rule::Set(|d, v, _| {
            let p = pick(v, &[("bfloat16", "bf16-autocast"), ("float32", "fp32")])?;
            d.precision = Some(p.into());
            Ok(())
        }),
    ),
    // Pure bf16 training: parameters, gradients and optimizer state in bf16.
    (
        "training.dtype",
        Rule::Set(|d, v, _| {
            if pick(v, &[("float32", false), ("bfloat16", true)])? {
                keep(d, "pure bf16", v)?;
            }
            Ok(())
        }),
    ),
    (
        "training.mixed_precision_reduce",
        Rule::Set(|d, v, _| {
            let r = pick(v, &[("float32", "fp32"), ("bfloat16", "bf16")])?;
            keep(d, "reduce", &Value::from(r))
        }),
    ),
    ("training.enable_cpu_offload", Rule::Waits("cpu offload")),
    ("training.*", Rule::Ignore),
    (
        "parallelism.data_parallel_shard_degree",
        Rule::Set(|d, v, _| match int(v)? {
            -1 | 1.. => keep(d, "shard", v),
            _ => Err(Refusal::Bad(
                "-1 (every GPU) or a whole number above 0".into(),
            )),
        }),
    ),
    (
        "parallelism.data_parallel_replicate_degree",
        Rule::Set(|d, v, _| {
            count(v)?;
            keep(d, "replicate", v)
        }),
    ),
    (
        "parallelism.fsdp_reshard_after_forward",
        Rule::Set(|d, v, _| {
            let r = pick(v, &[("default", true), ("always", true), ("never", false)])?;
            d.reshard_after_forward = (!r).then_some(false);
            Ok(())
        }),
    ),
    (
        "parallelism.tensor_parallel_degree",
        Rule::Set(|_, v, _| degree(v, "tensor parallelism")),
    ),
    (
        "parallelism.pipeline_parallel_degree",
        Rule::Set(|_, v, _| degree(v, "pipeline parallelism")),
    ),
    (
        "parallelism.context_parallel_degree",
        Rule::Set(|_, v, _| degree(v, "context parallelism")),
    ),
    (
        "parallelism.expert_parallel_degree",
        Rule::Set(|_, v, _| degree(v, "expert parallelism")),
    ),
    ("parallelism.*", Rule::Ignore),
    (
        "activation_checkpoint.mode",
        Rule::Set(|d, v, _| {
            d.extra.push(("ac.mode".into(), v.clone()));
            Ok(())
        }),
    ),
    (
        "activation_checkpoint.selective_ac_option",
        Rule::Set(|d, v, _| {
            d.extra.push(("ac.option".into(), v.clone()));
            Ok(())
        }),
    ),
    ("activation_checkpoint.*", Rule::Ignore),
    (
        "compile.enable",
        Rule::Set(|d, v, _| {
            d.compile = Some(flag(v)?);
            Ok(())
        }),
    ),
    ("compile.*", Rule::Ignore),
    (
        "optimizer.name",
        Rule::Set(|_, v, _| {
            pick(v, &[("AdamW", ()), ("Adam", ())])
                .map_err(|_| Refusal::Unmodelled("only torchtitan's AdamW is modelled".into()))
        }),
    ),
    (
        "optimizer.implementation",
        Rule::Set(|d, v, _| {
            let o = pick(
                v,
                &[
                    ("fused", "adamw-fused"),
                    ("foreach", "adamw-foreach"),
                    ("for-loop", "adamw-single"),
                ],
            )?;
            d.optimizer = Some(o.into());
            Ok(())
        }),
    ),
    (
        "optimizer.early_step_in_backward",
        Rule::Set(|d, v, _| switch(v, &mut d.optimizer_in_backward)),
    ),
    ("optimizer.*", Rule::Ignore),
    ("quantize.*", Rule::Ignore),
    ("job.*", Rule::Ignore),
    ("profiling.*", Rule::Ignore),
    ("metrics.*", Rule::Ignore),
    ("lr_scheduler.*", Rule::Ignore),
    ("checkpoint.*", Rule::Ignore),
    ("validation.*", Rule::Ignore),
    ("comm.*", Rule::Ignore),
    ("debug.*", Rule::Ignore),
    ("experimental.*", Rule::Ignore),
    ("fault_tolerance.*", Rule::Ignore),
    ("memory_estimation.*", Rule::Ignore),
    ("dataloader.*", Rule::Ignore),
];

/// torchtitan's `job_config.py` defaults that change memory.
const DEFAULTS: &[KeyDefault] = &[
    ("activation_checkpoint.mode", "\"selective\""),
    ("training.local_batch_size", "8"),
    ("training.seq_len", "2048"),
    ("parallelism.data_parallel_shard_degree", "-1"),
    ("compile.enable", "false"),
];

fn degree(v: &Value, what: &str) -> Result<(), Refusal> {
    if int(v)? > 1 {
        return Err(Refusal::Unmodelled(format!(
            "{what}: vramplan plans data parallelism"
        )));
    }
    Ok(())
}

/// `activation_checkpoint`: none, full, or selective with `"op"` (an op policy) or an
/// integer N (every N-th block; 1 is every block, which is full).
fn checkpointing(d: &mut Draft) -> Result<(), String> {
    let mode = d
        .extra("ac.mode")
        .and_then(Value::as_str)
        .unwrap_or("selective");
    let option = d.extra("ac.option").cloned().unwrap_or(Value::from("2"));
    let key = match d.extra("ac.option") {
        Some(_) => "activation_checkpoint.selective_ac_option",
        None => "activation_checkpoint.selective_ac_option (not set: the launcher's default)",
    };
    let ckpt = match mode {
        "none" => "none".to_string(),
        "full" => "full".to_string(),
        // Layer mode: torchtitan checkpoints every N-th block (N = 1: every block).
        "selective" => match option.as_str().unwrap_or_default() {
            "1" => "full".to_string(),
            "op" => "selective-op".to_string(),
            n => match n.parse::<u64>() {
                Ok(n @ 2..=4096) => format!("every-{n}"),
                _ => {
                    return Err(format!(
                        "{key} = {}: \"op\" or a whole number of blocks from 1 to 4096",
                        show(&option)
                    ))
                }
            },
        },
        other => {
            let r = Refusal::Unmodelled("a memory budget for torch.compile's min-cut".into());
            return Err(refusal_text(
                "activation_checkpoint.mode",
                &Value::from(other),
                &r,
            ));
        }
    };
    d.checkpointing = Some(ckpt);
    Ok(())
}

pub fn read(text: &str, ctx: &Ctx) -> Result<Launch, String> {
    let v: Value = toml::from_str(text).map_err(|e| format!("not valid TOML: {}", e.message()))?;
    let mut d = Draft::default();
    let keys = flatten(&v);
    let applied = match (
        apply(&[TABLE], DEFAULTS, &keys, &mut d, ctx),
        checkpointing(&mut d),
    ) {
        (Ok(a), Ok(())) => a,
        (Err(e), Ok(())) | (Ok(_), Err(e)) => return Err(e),
        (Err(a), Err(b)) => return Err(format!("{a}; {b}")),
    };
    d.precision.get_or_insert("bf16-autocast".into());
    if d.extra("pure bf16").is_some() {
        d.precision = Some("bf16".into());
    }
    d.implementation = Some("torchtitan".into());
    default_fused(&mut d, &keys, "optimizer.implementation", "torchtitan");
    let fsdp = degrees(&mut d)?;
    if let Some(g) = d.global_batch {
        d.grad_accum = Some(
            d.accum_for(g, "training.global_batch_size")
                .map_err(|r| refusal_text("training.global_batch_size", &Value::from(g), &r))?,
        );
    }
    let mut launch = finish(Format::Torchtitan, d, applied);
    launch.fsdp = fsdp;
    Ok(launch)
}

/// The data-parallel degrees: replicas without shards (`data_parallel_shard_degree = 1`)
/// are plain DDP over that many GPUs; shards (-1: every GPU the launch gives, or N) are
/// FSDP2 with `MixedPrecisionPolicy(param_dtype, reduce_dtype)` over fp32 masters instead
/// of autocast (`distributed/utils.py`, `maybe_enable_amp`), replicated across groups
/// (HSDP) when the replicate degree is above 1.
fn degrees(d: &mut Draft) -> Result<Option<Fsdp>, String> {
    let get = |k: &str| d.extra(k).and_then(|v| int(v).ok());
    let (shard, replicas) = (get("shard").unwrap_or(-1), get("replicate").unwrap_or(1));
    let replicas = replicas.max(1) as u64;
    let mixed = d.precision.as_deref() == Some("bf16-autocast");
    let fsdp = Fsdp {
        replicas,
        precision: mixed.then(|| "bf16-mixed".to_string()),
        reduce_dtype: d.extra("reduce").and_then(Value::as_str).map(String::from),
    };
    match shard {
        1 => {
            if replicas > 1 {
                d.gpus = Some(replicas);
            }
            Ok(None)
        }
        -1 => Ok(Some(fsdp)),
        n => {
            let n = n as u64;
            d.gpus = Some(n * replicas);
            if n * replicas > 1 {
                d.sharding = Some("fsdp2".into());
                d.gpus_per_node = (replicas > 1).then_some(n);
                d.precision = fsdp.precision.or(d.precision.take());
                d.reduce_dtype = fsdp.reduce_dtype;
            }
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ffn_widths_match_the_llama_3_checkpoints() {
        // Llama 3.1 8B and 70B config.json: intermediate_size 14336 and 28672; 405B 53248.
        assert_eq!(ffn_width(4096, 13, 1024), 14336);
        assert_eq!(ffn_width(8192, 13, 4096), 28672);
        assert_eq!(ffn_width(16384, 12, 4096), 53248);
        assert_eq!(ffn_width(256, 0, 256), 768);
    }
}
