//! The settings each real launcher config of `tests/data/launch` becomes: the run config
//! (`RawConfig`) its reader writes, with the LoRA, compile, implementation, offload,
//! optimizer-in-backward and sharding keys the launchers spell in their own words.

use super::*;
use vramplan_planner::Targets;

const DIR: &str = "tests/data/launch";

fn read_file(file: &str) -> Result<Launch, String> {
    let path = Path::new(DIR).join(file);
    let text = std::fs::read_to_string(&path).unwrap();
    let presets = Presets::builtin().unwrap();
    let dir = path.parent().unwrap();
    let ctx = Ctx {
        dir,
        presets: &presets,
    };
    let format = detect(file, &text)?;
    read(format, &text, &ctx)
}

fn raw(file: &str) -> RawConfig {
    read_file(file)
        .unwrap_or_else(|e| panic!("{file}: {e}"))
        .raw
}

fn names(v: &[&str]) -> Option<Targets> {
    Some(Targets::Names(v.iter().map(|s| s.to_string()).collect()))
}

#[test]
fn trl_peft_flags_become_lora_with_trls_defaults() {
    let r = raw("hf/trl_sft_lora.sh");
    let l = r.lora.expect("use_peft");
    // --lora_r 32 --lora_alpha 16; TRL's ModelConfig: dropout 0.05, PEFT's default targets.
    assert_eq!(
        (l.rank, l.alpha, l.dropout),
        (Some(32), Some(16.0), Some(0.05))
    );
    assert_eq!(l.target_modules, None);
    assert_eq!(l.quantize, None);
    assert_eq!(r.train.optimizer.as_deref(), Some("adamw-fused"));
}

#[test]
fn axolotl_adapters_lora_and_qlora() {
    let r = raw("axolotl/llama-3_lora-1b.yml");
    let l = r.lora.expect("adapter: lora");
    let all = [
        "gate_proj",
        "down_proj",
        "up_proj",
        "q_proj",
        "v_proj",
        "k_proj",
        "o_proj",
    ];
    assert_eq!(
        (l.rank, l.alpha, l.dropout),
        (Some(16), Some(32.0), Some(0.05))
    );
    assert_eq!(l.target_modules, names(&all));
    assert_eq!(l.quantize, None);
    assert_eq!(r.train.optimizer.as_deref(), Some("adamw-8bit"));
    assert_eq!(r.train.precision.as_deref(), Some("bf16"));
    assert_eq!(r.train.checkpointing.as_deref(), Some("full"));
    let q = raw("axolotl/llama-3_qlora-1b.yml").lora.expect("qlora");
    assert_eq!(q.quantize.as_deref(), Some("nf4"));
    assert_eq!(q.double_quant, Some(true));
    assert_eq!(q.compute_dtype.as_deref(), Some("bf16"));
    assert_eq!((q.rank, q.alpha), (Some(32), Some(16.0)));
}

#[test]
fn axolotl_full_fine_tune_reads_the_paged_optimizer() {
    let r = raw("axolotl/llama-3_fft-8b.yaml");
    assert_eq!(r.train.optimizer.as_deref(), Some("paged-adamw-8bit"));
    assert!(r.lora.is_none());
}

#[test]
fn torchtune_recipes_run_torchtunes_code() {
    let r = raw("torchtune/llama3_2_3B_full.yaml");
    assert_eq!(r.model.preset.as_deref(), Some("llama-3.2-3b"));
    let t = &r.train;
    assert_eq!(t.implementation.as_deref(), Some("torchtune"));
    assert_eq!(t.loss.as_deref(), Some("chunked"));
    assert_eq!(t.optimizer.as_deref(), Some("adamw-fused"));
    assert_eq!(t.precision.as_deref(), Some("bf16"));
    assert_eq!(t.compile, Some(false));
    // Paged 8-bit AdamW stepped in backward are read; LinearCrossEntropyLoss is not modelled.
    let e = read_file("torchtune/llama3_2_1B_full_single_device.yaml").unwrap_err();
    assert!(e.contains("LinearCrossEntropyLoss"), "{e}");
    assert!(!e.contains("optimizer_in_bwd"), "{e}");
}

#[test]
fn torchtune_on_several_gpus_is_fsdp2_in_its_dtype() {
    let l = read_file("torchtune/llama3_2_3B_full.yaml").unwrap();
    let mut r = l.raw.clone();
    r.hardware.gpus = Some(4);
    l.shard(&mut r).unwrap();
    assert_eq!(r.hardware.sharding.as_deref(), Some("fsdp2"));
    assert_eq!(r.train.precision.as_deref(), Some("bf16"));
    let mut one = l.raw.clone();
    l.shard(&mut one).unwrap();
    assert_eq!(one.hardware.sharding, None);
}

#[test]
fn torchtitan_compiled_fsdp_with_the_step_in_backward() {
    let r = raw("torchtitan/llama3_8b-8xb200-8k.toml");
    let (t, h) = (&r.train, &r.hardware);
    assert_eq!(t.implementation.as_deref(), Some("torchtitan"));
    assert_eq!(t.compile, Some(true));
    assert_eq!(t.optimizer_in_backward, Some(true));
    assert_eq!(t.optimizer.as_deref(), Some("adamw-fused"));
    assert_eq!(t.precision.as_deref(), Some("bf16"));
    assert_eq!(t.checkpointing.as_deref(), Some("none"));
    assert_eq!((h.gpus, h.sharding.as_deref()), (Some(8), Some("fsdp2")));
    // Its policy reduces in mixed_precision_reduce over the pure bf16 parameters too.
    assert_eq!(t.reduce_dtype.as_deref(), Some("bf16"));
}

#[test]
fn torchtitan_defaults_shard_every_gpu_in_bf16_over_fp32_masters() {
    // debug_model.toml: its eager step (compile.enable = false) is read as such.
    let debug = raw("torchtitan/debug_model.toml");
    assert_eq!(debug.train.compile, Some(false));
    assert_eq!(debug.train.implementation.as_deref(), Some("torchtitan"));
    let text = "[model]\nname = \"llama3\"\nflavor = \"debugmodel\"\n[compile]\nenable = true\n[activation_checkpoint]\nmode = \"selective\"\nselective_ac_option = \"op\"\n[parallelism]\ndata_parallel_replicate_degree = 2\n";
    let presets = Presets::builtin().unwrap();
    let ctx = Ctx {
        dir: Path::new("."),
        presets: &presets,
    };
    let l = read(Format::Torchtitan, text, &ctx).unwrap();
    assert_eq!(l.raw.train.checkpointing.as_deref(), Some("selective-op"));
    assert_eq!(l.raw.train.precision.as_deref(), Some("bf16-autocast"));
    let mut r = l.raw.clone();
    r.hardware.gpus = Some(8);
    l.shard(&mut r).unwrap();
    let h = &r.hardware;
    assert_eq!(
        (h.sharding.as_deref(), h.gpus_per_node),
        (Some("fsdp2"), Some(4))
    );
    assert_eq!(r.train.precision.as_deref(), Some("bf16-mixed"));
    let mut odd = l.raw.clone();
    odd.hardware.gpus = Some(3);
    assert!(l
        .shard(&mut odd)
        .unwrap_err()
        .contains("a divisor of the 3 GPUs"));
    let every = text.replace("\"op\"", "\"3\"");
    let l = read(Format::Torchtitan, &every, &ctx).unwrap();
    assert_eq!(l.raw.train.checkpointing.as_deref(), Some("every-3"));
}

#[test]
fn accelerate_fsdp2_and_deepspeed_bf16_are_bf16_over_fp32_masters() {
    let r = raw("accelerate/trl_fsdp2.yaml");
    assert_eq!(r.hardware.sharding.as_deref(), Some("fsdp2"));
    assert_eq!(r.hardware.reshard_after_forward, Some(true));
    assert_eq!(r.train.precision.as_deref(), Some("bf16-mixed"));
    assert_eq!(r.train.reduce_dtype.as_deref(), Some("bf16"));
    let r = raw("accelerate/trl_deepspeed_zero3.yaml");
    assert_eq!(r.hardware.sharding.as_deref(), Some("zero3"));
    assert_eq!(r.train.precision.as_deref(), Some("bf16-mixed"));
    assert_eq!(r.train.reduce_dtype, None);
    let e = read_file("accelerate/fsdp.yaml").unwrap_err();
    assert!(e.contains("FSDP1's flat parameters"), "{e}");
}

#[test]
fn deepspeed_adam_without_torch_adam_is_the_fused_kernel() {
    // DeepSpeedExamples' pipeline config: Adam, no torch_adam, fp32.
    let r = raw("deepspeed/pipeline_ds_config.json");
    assert_eq!(r.train.optimizer.as_deref(), Some("adamw-fused"));
    assert_eq!(r.train.precision.as_deref(), Some("fp32"));
    assert_eq!(
        (r.train.micro_batch, r.train.grad_accum),
        (Some(8), Some(32))
    );
    let e = read_file("deepspeed/zero_stage2_config.json").unwrap_err();
    assert!(e.contains("DeepSpeed's fp16 mode"), "{e}");
    let presets = Presets::builtin().unwrap();
    let ctx = Ctx {
        dir: Path::new("."),
        presets: &presets,
    };
    let text = r#"{"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW"}, "bf16": {"enabled": true}, "zero_optimization": {"stage": 2}}"#;
    let l = read(Format::DeepSpeed, text, &ctx).unwrap();
    assert_eq!(l.raw.train.optimizer.as_deref(), Some("adamw-fused"));
    assert_eq!(l.raw.train.precision.as_deref(), Some("bf16-mixed"));
}

#[test]
fn hf_fsdp2_and_qlora_keys() {
    let presets = Presets::builtin().unwrap();
    let ctx = Ctx {
        dir: Path::new("."),
        presets: &presets,
    };
    let text = "model_name_or_path: HuggingFaceTB/SmolLM2-360M\nbf16: true\nfsdp: shard_grad_op auto_wrap\nfsdp_config:\n  fsdp_version: 2\n";
    let l = read(Format::HfArgs, text, &ctx).unwrap();
    let (t, h) = (&l.raw.train, &l.raw.hardware);
    assert_eq!(h.sharding.as_deref(), Some("fsdp2"));
    assert_eq!(h.reshard_after_forward, Some(false));
    assert_eq!(
        (t.precision.as_deref(), t.reduce_dtype.as_deref()),
        (Some("bf16-mixed"), Some("bf16"))
    );
    let v1 = read(Format::HfArgs, "fsdp: full_shard\n", &ctx).unwrap_err();
    assert!(v1.contains("FSDP1's flat parameters"), "{v1}");
    let q = "model_name_or_path: HuggingFaceTB/SmolLM2-360M\ntorch_dtype: bfloat16\nuse_peft: true\nload_in_4bit: true\nlora_target_modules: all-linear\n";
    let l = read(Format::HfArgs, q, &ctx).unwrap().raw.lora.unwrap();
    assert_eq!(l.quantize.as_deref(), Some("nf4"));
    assert_eq!(l.double_quant, Some(false));
    assert_eq!(l.compute_dtype.as_deref(), Some("bf16"));
    assert_eq!(l.target_modules, Some(Targets::All("all-linear".into())));
    let e = read(
        Format::HfArgs,
        "per_device_train_batch_size: 1\nload_in_4bit: true\n",
        &ctx,
    )
    .unwrap_err();
    assert!(e.contains("without use_peft"), "{e}");
}

/// nanochat's scripts at fe5aed9: `base_train.py` (line 102) and `mid_train.py` (line 69)
/// compile the model, `chat_sft.py` trains it eager (its `torch.compile` is commented out).
#[test]
fn nanochat_base_and_mid_train_compile_chat_sft_does_not() {
    assert_eq!(
        raw("nanochat/speedrun_base_train_d20.sh").train.compile,
        Some(true)
    );
    assert_eq!(
        raw("nanochat/seed002_d16_stable.sh").train.compile,
        Some(true)
    );
    assert_eq!(
        raw("nanochat/speedrun_chat_sft.sh").train.compile,
        Some(false)
    );
    let presets = Presets::builtin().unwrap();
    let ctx = Ctx {
        dir: Path::new(DIR),
        presets: &presets,
    };
    let mid = "torchrun --standalone --nproc_per_node=8 -m scripts.mid_train -- --depth=20";
    let r = read(Format::Nanochat, mid, &ctx).unwrap().raw;
    assert_eq!(r.train.compile, Some(true));
    assert_eq!(r.model.preset.as_deref(), Some("nanochat-d20"));
}
