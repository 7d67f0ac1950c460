//! Launchers' own configs (tests/data/launch, each file from its project's repository; see
//! the README there): the RunSpec each becomes, printed as `estimate`'s three summary
//! lines (model and GPUs; micro-batch, sequence, accumulation; precision, optimizer,
//! checkpointing, loss, attention, sharding), the one warning line, and the one error
//! line with exit code 2 for what is not modelled.

use crate::cli::vramplan;

const DIR: &str = "tests/data/launch";

/// `estimate FILE ARGS`: (exit code, stdout's first three lines, stderr).
fn estimate(file: &str, args: &[&str]) -> (i32, String, String) {
    let path = format!("{DIR}/{file}");
    let mut all = vec!["estimate", path.as_str()];
    all.extend_from_slice(args);
    let o = vramplan(&all);
    let out = String::from_utf8_lossy(&o.stdout);
    let head: Vec<&str> = out.lines().take(3).collect();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    (o.status.code().unwrap_or(-1), head.join("\n"), err)
}

/// `estimate FILE ARGS`'s regime line (the fourth).
fn regime(file: &str, args: &[&str]) -> String {
    let path = format!("{DIR}/{file}");
    let mut all = vec!["estimate", path.as_str()];
    all.extend_from_slice(args);
    let o = vramplan(&all);
    assert!(
        o.status.success(),
        "{file}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    out.lines().nth(3).unwrap_or_default().to_string()
}

/// A config that plans: its summary, and (part of) its warning line.
fn plans(file: &str, args: &[&str], summary: &str, warning: &str) {
    let (code, head, err) = estimate(file, args);
    assert_eq!(code, 0, "{file}: {err}");
    assert_eq!(head, summary, "{file}");
    assert_eq!(
        err.lines().count(),
        usize::from(!warning.is_empty()),
        "{file}: {err}"
    );
    assert!(err.contains(warning), "{file}: {err}");
    if !warning.is_empty() {
        assert!(
            err.starts_with(&format!("warning: {DIR}/{file} (")),
            "{err}"
        );
    }
}

/// A config refused: exit 2 and one line, `error: FILE: ...` containing `what`.
fn refused(file: &str, args: &[&str], what: &str) {
    let (code, head, err) = estimate(file, args);
    assert_eq!(code, 2, "{file}: {head} {err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with(&format!("error: {DIR}/{file}: ")), "{err}");
    assert!(last.contains(what), "{file}: {last}");
}

const A100: &[&str] = &["--gpu", "a100-80gb"];
const QWEN: &str = "tests/data/hf/qwen2.5-0.5b-config.json";

/// `estimate FILE ARGS --json`'s allocated peak.
fn peak(file: &str, args: &[&str]) -> u64 {
    let path = format!("{DIR}/{file}");
    let mut all = vec!["estimate", path.as_str(), "--json"];
    all.extend_from_slice(args);
    let o = vramplan(&all);
    assert!(
        o.status.success(),
        "{file}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["peak_allocated_bytes"].as_u64().unwrap()
}

fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = A100.to_vec();
    v.extend_from_slice(extra);
    v
}

#[test]
fn hf_training_arguments_dicts_and_command_lines() {
    plans(
        "hf/alignment-handbook_smollm2_sft.yaml",
        A100,
        "smollm2-1.7b on 1 × a100-80gb (A100 80 GB), torch engine (hf, eager)\n\
         micro-batch 4 × seq 8192 × accumulation 4 × 1 GPU(s) = 131072 tokens per step\n\
         bf16, adamw-fused, checkpointing full, loss float-cast, attention sdpa, ddp",
        "assumed: optimizer adamw-fused (optim is not set: transformers 5's default, the fused AdamW)",
    );
    plans(
        "hf/run_clm_gpt2.sh",
        A100,
        "gpt2 on 1 × a100-80gb (A100 80 GB), torch engine (hf, eager)\n\
         micro-batch 8 × seq 1024 × accumulation 1 × 1 GPU(s) = 8192 tokens per step\n\
         fp32, adamw-fused, checkpointing none, loss float-cast, attention sdpa, ddp",
        "not modelled, no effect on GPU memory: dataset_config_name, dataset_name, do_eval, do_train, output_dir, per_device_eval_batch_size; assumed: optimizer adamw-fused (optim is not set",
    );
    // Seed 004's PowerShell command: fp16, 1024 tokens, batch 1 × 64, checkpointing.
    plans(
        "hf/seed004_smollm2_135m.ps1",
        &["--gpu", "rtx4060-laptop-8gb"],
        "smollm2-135m on 1 × rtx4060-laptop-8gb (GeForce RTX 4060 Laptop 8 GB), torch engine (hf, eager)\n\
         micro-batch 1 × seq 1024 × accumulation 64 × 1 GPU(s) = 65536 tokens per step\n\
         fp16-autocast, adamw-fused, checkpointing full, loss float-cast, attention sdpa, ddp",
        "unknown to vramplan, not read: data_path, max_rounds",
    );
    // TRL's configs turn bf16 on when neither bf16 nor fp16 is set.
    plans(
        "hf/trl_cli_example_config.yaml",
        A100,
        "qwen2.5-0.5b on 1 × a100-80gb (A100 80 GB), torch engine (hf, eager)\n\
         micro-batch 1 × seq 1024 × accumulation 1 × 1 GPU(s) = 1024 tokens per step\n\
         bf16-autocast, adamw-fused, checkpointing none, loss float-cast, attention sdpa, ddp",
        "dataset_name, learning_rate, lr_scheduler_type, report_to",
    );
    // Qwen2-0.5B has no preset: one line saying what to pass, then --model.
    refused(
        "hf/trl_sft_full.sh",
        A100,
        "model_name_or_path = \"Qwen/Qwen2-0.5B\": no vramplan preset or local config.json of that name; pass --model PRESET",
    );
    plans(
        "hf/trl_sft_full.sh",
        &with(&["--model", "tests/data/hf/qwen2.5-0.5b-config.json"]),
        "qwen2 (config.json) on 1 × a100-80gb (A100 80 GB), torch engine (hf, eager)\n\
         micro-batch 2 × seq 1024 × accumulation 8 × 1 GPU(s) = 16384 tokens per step\n\
         bf16-autocast, adamw-fused, checkpointing none, loss float-cast, attention sdpa, ddp",
        "packing, push_to_hub",
    );
    // TRL's --use_peft --lora_r 32 --lora_alpha 16: LoRA adapters (read in src/launch's
    // tests); the frozen base and its adapters take less than full fine-tuning.
    let full = peak("hf/trl_sft_full.sh", &with(&["--model", QWEN]));
    let lora = peak("hf/trl_sft_lora.sh", &with(&["--model", QWEN]));
    assert!(lora < full, "{lora} vs {full}");
}

#[test]
fn accelerate_configs() {
    plans(
        "accelerate/multi_gpu.yaml",
        &with(&["--model", "smollm2-360m"]),
        "smollm2-360m on 2 × a100-80gb (A100 80 GB), torch engine (hf, eager)\n\
         micro-batch 1 × seq 2048 × accumulation 1 × 2 GPU(s) = 4096 tokens per step\n\
         bf16-autocast, adamw-fused, checkpointing none, loss float-cast, attention sdpa, ddp",
        "assumed: micro-batch, sequence length and accumulation: the script's",
    );
    plans(
        "accelerate/trl_single_gpu.yaml",
        &with(&["--model", "smollm2-360m"]),
        "smollm2-360m on 1 × a100-80gb (A100 80 GB), torch engine (hf, eager)\n\
         micro-batch 1 × seq 2048 × accumulation 1 × 1 GPU(s) = 2048 tokens per step\n\
         bf16-autocast, adamw-fused, checkpointing none, loss float-cast, attention sdpa, ddp",
        "not modelled, no effect on GPU memory: compute_environment, debug, downcast_bf16, gpu_ids",
    );
    refused(
        "accelerate/trl_single_gpu.yaml",
        A100,
        "the accelerate config names no model; pass --model PRESET (see `vramplan models`) or --model path/to/config.json",
    );
    refused(
        "accelerate/fsdp.yaml",
        &with(&["--model", "smollm2-360m"]),
        "fsdp_config.fsdp_version (not set: the launcher's default) = 1 changes memory and is not modelled: FSDP1's flat parameters",
    );
    // accelerate's FSDP2 and DeepSpeed under bf16: bf16 parameters over fp32 masters.
    plans(
        "accelerate/trl_fsdp2.yaml",
        &with(&["--model", "smollm2-360m"]),
        "smollm2-360m on 8 × a100-80gb (A100 80 GB), torch engine (hf, eager)\n\
         micro-batch 1 × seq 2048 × accumulation 1 × 8 GPU(s) = 16384 tokens per step\n\
         bf16-mixed, adamw-fused, checkpointing none, loss float-cast, attention sdpa, fsdp2",
        "assumed: micro-batch, sequence length and accumulation: the script's",
    );
    assert_eq!(
        regime("accelerate/trl_fsdp2.yaml", &with(&["--model", "smollm2-360m"])),
        "regime: optimizer adamw-fused, bf16 compute over fp32 masters, gradients reduced in bf16, FSDP2 over 8 GPU(s)"
    );
    plans(
        "accelerate/trl_deepspeed_zero3.yaml",
        &with(&["--model", "smollm2-360m"]),
        "smollm2-360m on 8 × a100-80gb (A100 80 GB), torch engine (hf, eager)\n\
         micro-batch 1 × seq 2048 × accumulation 1 × 8 GPU(s) = 16384 tokens per step\n\
         bf16-mixed, adamw-fused, checkpointing none, loss float-cast, attention sdpa, zero3",
        "deepspeed_config.zero3_init_flag",
    );
    // The DeepSpeed file it names is read, relative to the YAML.
    refused(
        "accelerate/deepspeed.yaml",
        &with(&["--model", "smollm2-360m"]),
        "../deepspeed_config_templates/zero_stage1_config.json: fp16.enabled = true changes memory and is not modelled: DeepSpeed's fp16 mode",
    );
}

#[test]
fn deepspeed_configs() {
    plans(
        "deepspeed/ds_config_z3.json",
        &with(&["--model", "llama-3.2-1b", "--gpus", "4"]),
        "llama-3.2-1b on 4 × a100-80gb (A100 80 GB), torch engine (hf, eager)\n\
         micro-batch 1 × seq 2048 × accumulation 1 × 4 GPU(s) = 8192 tokens per step\n\
         fp32, adamw, checkpointing none, loss float-cast, attention sdpa, zero3",
        "assumed: micro-batch 1 (train_micro_batch_size_per_gpu is \"auto\": the Trainer's)",
    );
    // Adam without torch_adam is DeepSpeed's FusedAdam; 256 = 8 × 32 on one GPU.
    plans(
        "deepspeed/pipeline_ds_config.json",
        &with(&["--model", "gpt2"]),
        "gpt2 on 1 × a100-80gb (A100 80 GB), torch engine (hf, eager)\n\
         micro-batch 8 × seq 1024 × accumulation 32 × 1 GPU(s) = 262144 tokens per step\n\
         fp32, adamw-fused, checkpointing none, loss float-cast, attention sdpa, ddp",
        "optimizer.params, steps_per_print, wall_clock_breakdown",
    );
    for f in ["zero_stage1_config.json", "zero_stage2_config.json"] {
        refused(
            &format!("deepspeed/{f}"),
            &with(&["--model", "gpt2", "--gpus", "2"]),
            "fp16.enabled = true changes memory and is not modelled: DeepSpeed's fp16 mode (fp16 weights over fp32 masters, loss scaling)",
        );
    }
    // Its offload is read; its fp16 mode is what is refused.
    refused(
        "deepspeed/zero_stage3_offload_config.json",
        &with(&["--model", "gpt2", "--gpus", "2"]),
        "fp16.enabled = true changes memory and is not modelled: DeepSpeed's fp16 mode",
    );
}

/// transformers' ZeRO-2 and ZeRO-3 offload configs (tests/deepspeed): the offload devices
/// become `offload_optimizer` / `offload_params`, on one GPU too, and the regime line
/// names them; "nvme" is refused in one line.
#[test]
fn deepspeed_offload_configs() {
    let llama = &with(&["--model", "llama-3.2-1b"]);
    plans(
        "deepspeed/hf_ds_config_zero2_offload.json",
        llama,
        "llama-3.2-1b on 1 × a100-80gb (A100 80 GB), torch engine (hf, eager)\n\
         micro-batch 1 × seq 2048 × accumulation 1 × 1 GPU(s) = 2048 tokens per step\n\
         fp32, adamw-fused, checkpointing none, loss float-cast, attention sdpa, zero2",
        "assumed: micro-batch 1",
    );
    assert_eq!(
        regime("deepspeed/hf_ds_config_zero2_offload.json", llama),
        "regime: optimizer adamw-fused, DeepSpeed ZeRO-2 over 1 GPU(s), optimizer offloaded to host (ZeRO-Offload: fp32 masters, moments and gradients, Adam on the CPU)"
    );
    let two = &with(&["--model", "llama-3.2-1b", "--gpus", "2"]);
    assert_eq!(
        regime("deepspeed/hf_ds_config_zero3_offload.json", two),
        "regime: optimizer adamw-fused, DeepSpeed ZeRO-3 over 2 GPU(s), optimizer and parameters offloaded to host (ZeRO-Infinity, Adam on the CPU)"
    );
    // The state leaves the device for the host: the JSON's host bytes are the offload's.
    let json = |file: &str, args: &[&str]| {
        let path = format!("{DIR}/{file}");
        let mut all = vec!["estimate", path.as_str(), "--json"];
        all.extend_from_slice(args);
        let o = vramplan(&all);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()
    };
    let v = json("deepspeed/hf_ds_config_zero3_offload.json", two);
    assert_eq!(v["host_bytes"], v["offloaded_state_bytes"]);
    let p = v["params"].as_u64().unwrap();
    assert!(v["host_bytes"].as_u64().unwrap() >= 18 * p / 2, "{v}");
    let terms = v["host"]["terms"].as_array().unwrap();
    assert!(terms
        .iter()
        .any(|t| t["name"] == "offload: 16-bit parameter partitions"));
    let dir = std::env::temp_dir().join(format!("vramplan-nvme-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let nvme = dir.join("ds_nvme.json");
    std::fs::write(
        &nvme,
        r#"{"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme", "nvme_path": "/local_nvme"}}}"#,
    )
    .unwrap();
    let o = vramplan(&[
        "estimate",
        nvme.to_str().unwrap(),
        "--model",
        "gpt2",
        "--gpu",
        "a100-80gb",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("zero_optimization.offload_param.device = \"nvme\" changes memory and is not modelled: ZeRO-Infinity's NVMe offload"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn torchtune_recipes() {
    plans(
        "torchtune/llama2_7B_full_2024-06.yaml",
        A100,
        "torchtune-llama2_7b on 1 × a100-80gb (A100 80 GB), torch engine (torchtune, eager)\n\
         micro-batch 2 × seq 2048 × accumulation 1 × 1 GPU(s) = 4096 tokens per step\n\
         bf16, adamw, checkpointing full, loss float-cast, attention sdpa, ddp",
        "assumed: seq_len 2048 (tokenizer.max_seq_len is null: samples are not truncated)",
    );
    plans(
        "torchtune/llama3_8B_full_2024-06.yaml",
        A100,
        "torchtune-llama3_8b on 1 × a100-80gb (A100 80 GB), torch engine (torchtune, eager)\n\
         micro-batch 2 × seq 2048 × accumulation 1 × 1 GPU(s) = 4096 tokens per step\n\
         bf16, adamw, checkpointing full, loss float-cast, attention sdpa, ddp",
        "checkpointer, dataset, device, epochs",
    );
    // `tune run --nproc_per_node 2 full_finetune_distributed`: FSDP2 in bf16.
    plans(
        "torchtune/llama3_8B_full_2024-06.yaml",
        &with(&["--gpus", "2"]),
        "torchtune-llama3_8b on 2 × a100-80gb (A100 80 GB), torch engine (torchtune, eager)\n\
         micro-batch 2 × seq 2048 × accumulation 1 × 2 GPU(s) = 8192 tokens per step\n\
         bf16, adamw, checkpointing full, loss float-cast, attention sdpa, fsdp2",
        "checkpointer",
    );
    // CEWithChunkedOutputLoss, the fused AdamW, on the 4 GPUs its comment launches.
    plans(
        "torchtune/llama3_2_3B_full.yaml",
        &with(&["--gpus", "4"]),
        "llama-3.2-3b on 4 × a100-80gb (A100 80 GB), torch engine (torchtune, eager)\n\
         micro-batch 4 × seq 2048 × accumulation 4 × 4 GPU(s) = 131072 tokens per step\n\
         bf16, adamw-fused, checkpointing full, loss chunked, attention sdpa, fsdp2",
        "assumed: seq_len 2048",
    );
    assert_eq!(
        regime("torchtune/llama3_2_3B_full.yaml", &with(&["--gpus", "4"])),
        "regime: optimizer adamw-fused, FSDP2 over 4 GPU(s)"
    );
    // Paged 8-bit AdamW and optimizer_in_bwd are read; the loss is not modelled.
    refused(
        "torchtune/llama3_2_1B_full_single_device.yaml",
        A100,
        "loss._component_ = \"torchtune.modules.loss.LinearCrossEntro… changes memory and is not modelled: LinearCrossEntropyLoss",
    );
    refused(
        "torchtune/qwen2_5_0.5B_full_single_device.yaml",
        A100,
        "loss._component_ = \"torchtune.modules.loss.LinearCrossEntro… changes memory and is not modelled: LinearCrossEntropyLoss",
    );
    refused(
        "torchtune/llama3_2_1B_lora_single_device.yaml",
        A100,
        "model.apply_lora_to_mlp = true, model.lora_alpha = 128, model.lora_attn_modules = [\"q_proj\",\"v_proj\",\"output_proj\"], model.lora_rank = 64 change memory and are not modelled: torchtune's LoRALinear keeps bf16 adapters",
    );
}

#[test]
fn torchtitan_train_configs() {
    // Its train configs run its Llama eager (compile.enable = false), one GPU autocast.
    plans(
        "torchtitan/debug_model.toml",
        A100,
        "torchtitan-llama3-debugmodel on 1 × a100-80gb (A100 80 GB), torch engine (torchtitan, eager)\n\
         micro-batch 8 × seq 2048 × accumulation 1 × 1 GPU(s) = 16384 tokens per step\n\
         bf16-autocast, adamw-fused, checkpointing every-2, loss float-cast, attention sdpa, ddp",
        "not modelled, no effect on GPU memory: checkpoint, compile, job, lr_scheduler",
    );
    plans(
        "torchtitan/llama3_8b.toml",
        A100,
        "torchtitan-llama3-8B on 1 × a100-80gb (A100 80 GB), torch engine (torchtitan, eager)\n\
         micro-batch 1 × seq 8192 × accumulation 1 × 1 GPU(s) = 8192 tokens per step\n\
         bf16-autocast, adamw-fused, checkpointing selective-op, loss float-cast, attention sdpa, ddp",
        "not modelled, no effect on GPU memory: checkpoint, compile, job, lr_scheduler",
    );
    refused(
        "torchtitan/llama3_70b.toml",
        A100,
        "parallelism.tensor_parallel_degree = 8 changes memory and is not modelled: tensor parallelism",
    );
    // A B200 benchmark config: compiled, pure bf16, FSDP over 8, the step in backward.
    plans(
        "torchtitan/llama3_8b-8xb200-8k.toml",
        &["--gpu", "h200-141gb"],
        "torchtitan-llama3-8B on 8 × h200-141gb (H200 141 GB), torch engine (torchtitan, compiled)\n\
         micro-batch 3 × seq 8192 × accumulation 1 × 8 GPU(s) = 196608 tokens per step\n\
         bf16, adamw-fused, checkpointing none, loss float-cast, attention sdpa, fsdp2",
        "not modelled, no effect on GPU memory: checkpoint, compile, job",
    );
    assert_eq!(
        regime("torchtitan/llama3_8b-8xb200-8k.toml", A100),
        "regime: optimizer adamw-fused, stepped in backward, FSDP2 over 8 GPU(s), gradients reduced in bf16"
    );
}

#[test]
fn axolotl_configs() {
    plans(
        "axolotl/llama-3_fft-8b.yaml",
        &with(&["--model", "llama-3.1-8b"]),
        "llama-3.1-8b on 1 × a100-80gb (A100 80 GB), torch engine (hf, eager)\n\
         micro-batch 1 × seq 8192 × accumulation 8 × 1 GPU(s) = 65536 tokens per step\n\
         bf16, paged-adamw-8bit, checkpointing full, loss float-cast, attention sdpa, ddp",
        "assumed: bf16: auto is bf16",
    );
    plans(
        "axolotl/llama-3_lora-1b.yml",
        A100,
        "llama-3.2-1b on 1 × a100-80gb (A100 80 GB), torch engine (hf, eager)\n\
         micro-batch 2 × seq 2048 × accumulation 2 × 1 GPU(s) = 8192 tokens per step\n\
         bf16, adamw-8bit, checkpointing full, loss float-cast, attention sdpa, ddp",
        "lora_model_dir",
    );
    plans(
        "axolotl/llama-3_qlora-1b.yml",
        A100,
        "llama-3.2-1b on 1 × a100-80gb (A100 80 GB), torch engine (hf, eager)\n\
         micro-batch 2 × seq 2048 × accumulation 4 × 1 GPU(s) = 16384 tokens per step\n\
         bf16, adamw-8bit, checkpointing full, loss float-cast, attention sdpa, ddp",
        "lora_model_dir",
    );
    // The 4-bit base of QLoRA takes less than LoRA's bf16 base (both rank 16 / 32 on
    // the same linears; the QLoRA run has twice the accumulation, which adds nothing).
    let lora = peak("axolotl/llama-3_lora-1b.yml", A100);
    let qlora = peak("axolotl/llama-3_qlora-1b.yml", A100);
    assert!(qlora < lora, "{qlora} vs {lora}");
}

#[test]
fn nanochat_command_lines() {
    plans(
        "nanochat/speedrun_base_train_d20.sh",
        A100,
        "nanochat-d20 on 8 × a100-80gb (A100 80 GB), torch engine (nanochat, compiled)\n\
         micro-batch 32 × seq 2048 × accumulation 1 × 8 GPU(s) = 524288 tokens per step\n\
         bf16-autocast, muon, checkpointing none, loss float-cast, attention sdpa, ddp",
        "not modelled, no effect on GPU memory: run",
    );
    // Seed 002's stable run: 10 × 1536 on two GPUs is its 30,720 tokens per step.
    plans(
        "nanochat/seed002_d16_stable.sh",
        &["--gpu", "rtx5090d-32gb"],
        "nanochat-d16 on 2 × rtx5090d-32gb (GeForce RTX 5090D 32 GB), torch engine (nanochat, compiled)\n\
         micro-batch 10 × seq 1536 × accumulation 1 × 2 GPU(s) = 30720 tokens per step\n\
         bf16-autocast, muon, checkpointing none, loss float-cast, attention sdpa, ddp",
        "run",
    );
    plans(
        "nanochat/runcpu_base_train.sh",
        A100,
        "nanochat-d6 on 1 × a100-80gb (A100 80 GB), torch engine (nanochat, compiled)\n\
         micro-batch 32 × seq 512 × accumulation 1 × 1 GPU(s) = 16384 tokens per step\n\
         bf16-autocast, muon, checkpointing none, loss float-cast, attention sdpa, ddp",
        "window_pattern",
    );
    refused(
        "nanochat/speedrun_mid_train.sh",
        A100,
        "mid_train loads the base checkpoint, whose depth this command line does not give",
    );
    plans(
        "nanochat/speedrun_chat_sft.sh",
        &with(&["--model", "nanochat-d20"]),
        "nanochat-d20 on 8 × a100-80gb (A100 80 GB), torch engine (nanochat, eager)\n\
         micro-batch 4 × seq 2048 × accumulation 1 × 8 GPU(s) = 65536 tokens per step\n\
         bf16-autocast, muon, checkpointing none, loss float-cast, attention sdpa, ddp",
        "assumed: seq_len 2048 (chat_sft pads each batch",
    );
    refused(
        "nanochat/speedrun_base_train_d24_fp8.sh",
        A100,
        "fp8 = true changes memory and is not modelled: FP8 matmuls",
    );
}

/// Bad input in each format: one line naming the file, the key and what is accepted.
#[test]
fn bad_input_names_the_file_the_key_and_what_is_accepted() {
    let dir = std::env::temp_dir().join(format!("vramplan-launch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("bad.json", "{\"train_micro_batch_size_per_gpu\": 0}", "train_micro_batch_size_per_gpu = 0: a whole number above 0, or \"auto\""),
        ("bad-stage.json", "{\"zero_optimization\": {\"stage\": 4}}", "zero_optimization.stage = 4: one of 0 | 1 | 2 | 3"),
        ("acc.yaml", "distributed_type: MULTI_GPU\nnum_processes: two\n", "num_processes = \"two\": a whole number above 0"),
        ("acc-mp.yaml", "distributed_type: NO\nmixed_precision: fp4\n", "mixed_precision = \"fp4\": one of no | bf16 | fp16 | fp8"),
        ("tune.yaml", "model:\n  _component_: torchtune.models.llama3_2.llama3_2_1b\ndtype: fp16\n", "dtype = \"fp16\": one of bf16 | fp32"),
        ("titan.toml", "[training]\nlocal_batch_size = -2\n", "training.local_batch_size = -2: a whole number above 0"),
        ("axo.yml", "base_model: HuggingFaceTB/SmolLM2-135M\nsequence_len: long\n", "sequence_len = \"long\": a whole number above 0"),
        ("hf.json", "{\"per_device_train_batch_size\": 4, \"optim\": \"lion\"}", "optim = \"lion\": one of adamw_torch | adamw_hf"),
        ("hf.sh", "python run_clm.py --model_name_or_path gpt2 --per_device_train_batch_size=x", "per_device_train_batch_size = \"x\": a whole number above 0"),
        ("nano.sh", "torchrun --nproc_per_node=3 -m scripts.base_train -- --depth=20", "total_batch_size = 524288: a multiple of device_batch_size × max_seq_len × GPUs = 196608"),
        ("nano-n.sh", "torchrun --nproc_per_node=$NPROC -m scripts.base_train -- --depth=20", "--nproc_per_node = \"$NPROC\": a whole number above 0"),
        ("notes.txt", "just some words", "cannot tell the format"),
        ("lora.yaml", "model_name_or_path: gpt2\nuse_peft: true\nlora_r: many\n", "lora_r = \"many\": a whole number above 0"),
        ("fsdp.yaml", "model_name_or_path: gpt2\nfsdp: full_shard\nfsdp_config:\n  fsdp_version: 3\n", "fsdp_config.fsdp_version = 3: one of 1 | 2"),
        ("acc-dyn.yaml", "distributed_type: NO\ndynamo_config:\n  dynamo_backend: TVM\n", "dynamo_config.dynamo_backend = \"TVM\": one of NO | INDUCTOR"),
        ("tune-fused.yaml", "model:\n  _component_: torchtune.models.llama3_2.llama3_2_1b\noptimizer:\n  _component_: torch.optim.SGD\n  fused: true\n", "optimizer.fused = true: true only with torch.optim.AdamW or Adam"),
        ("titan-ac.toml", "[model]\nname = \"llama3\"\nflavor = \"debugmodel\"\n[compile]\nenable = true\n[activation_checkpoint]\nmode = \"selective\"\nselective_ac_option = \"every\"\n", "activation_checkpoint.selective_ac_option = \"every\": \"op\" or a whole number of blocks from 1 to 4096"),
        ("titan-dp.toml", "[parallelism]\ndata_parallel_shard_degree = 0\n", "parallelism.data_parallel_shard_degree = 0: -1 (every GPU) or a whole number above 0"),
        ("axo-adapter.yml", "base_model: HuggingFaceTB/SmolLM2-135M\nadapter: dora\n", "adapter = \"dora\": one of lora | qlora"),
    ];
    for (name, text, what) in cases {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let p = path.to_str().unwrap();
        let o = vramplan(&["estimate", p, "--gpu", "a100-80gb"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{name}: {err}");
        assert_eq!(err.lines().count(), 1, "{name}: {err}");
        assert!(err.starts_with(&format!("error: {p}: ")), "{name}: {err}");
        assert!(err.contains(what), "{name}: {err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn compare_and_fit_read_launchers_too() {
    let a = format!("{DIR}/nanochat/speedrun_base_train_d20.sh");
    let b = format!("{DIR}/nanochat/seed002_d16_stable.sh");
    let o = vramplan(&["compare", &a, &b, "--gpu", "rtx5090d-32gb", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = vramplan(&["fit", "--from", &b, "--gpu", "rtx5090d-32gb", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let best = &v["best"];
    // The file's global batch (10 × 1 × 2 = 20 sequences) and length are kept.
    let (m, acc) = (
        best["micro_batch"].as_u64().unwrap(),
        best["grad_accum"].as_u64().unwrap(),
    );
    assert_eq!(m * acc * 2, 20, "{best}");
    assert_eq!(best["seq_len"], 1536, "{best}");
}

/// (input, its extra flags, format, flags to read the output back, extension)
type Case<'a> = (&'a str, &'a [&'a str], &'a str, &'a [&'a str], &'a str);

/// `estimate FILE --emit X`, then `estimate` of what it wrote: the same plan, the whole
/// report compared (summary, regime, every component's bytes). accelerate's file holds
/// only processes, precision and sharding (the batch is on the script's command line it
/// prints) and DeepSpeed's no sequence length, so for them the model, settings and regime
/// lines are compared.
#[test]
fn emitted_plans_read_back_the_same() {
    let dir = std::env::temp_dir().join(format!("vramplan-emit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let qwen = "hf/trl_cli_example_config.yaml";
    let smol: &[&str] = &["--model", "smollm2-360m"];
    let q: &[&str] = &["--model", QWEN];
    let ds2 = "deepspeed/hf_ds_config_zero2_offload.json";
    let ds3 = "deepspeed/hf_ds_config_zero3_offload.json";
    let llama: &[&str] = &["--model", "llama-3.2-1b"];
    let llama2: &[&str] = &["--model", "llama-3.2-1b", "--gpus", "2"];
    let cases: [Case; 23] = [
        (ds2, llama, "deepspeed", llama, "json"),
        (ds2, llama, "accelerate", llama, "yaml"),
        (ds2, llama, "hf-args", llama, "yaml"),
        (ds3, llama2, "axolotl", llama2, "yml"),
        (ds3, llama2, "hf-args", llama2, "yaml"),
        (ds3, llama2, "deepspeed", llama, "json"),
        (ds3, llama2, "accelerate", llama, "yaml"),
        (qwen, &[], "hf-args", &[], "yaml"),
        ("hf/run_clm_gpt2.sh", &[], "hf-args", &[], "sh"),
        ("hf/trl_sft_lora.sh", q, "hf-args", q, "sh"),
        ("axolotl/llama-3_lora-1b.yml", &[], "hf-args", &[], "yaml"),
        (
            qwen,
            &[],
            "accelerate",
            &["--model", "qwen2.5-0.5b"],
            "yaml",
        ),
        (
            "accelerate/trl_fsdp2.yaml",
            smol,
            "accelerate",
            smol,
            "yaml",
        ),
        (
            "accelerate/trl_deepspeed_zero3.yaml",
            smol,
            "accelerate",
            smol,
            "yaml",
        ),
        (
            "accelerate/trl_deepspeed_zero3.yaml",
            smol,
            "deepspeed",
            smol,
            "json",
        ),
        (
            "hf/run_clm_gpt2.sh",
            &[],
            "deepspeed",
            &["--model", "gpt2"],
            "json",
        ),
        (
            "hf/alignment-handbook_smollm2_sft.yaml",
            &[],
            "axolotl",
            &[],
            "yml",
        ),
        ("axolotl/llama-3_qlora-1b.yml", &[], "axolotl", &[], "yml"),
        (
            "torchtune/llama3_8B_full_2024-06.yaml",
            &[],
            "torchtune",
            &[],
            "yaml",
        ),
        (
            "torchtune/llama3_2_3B_full.yaml",
            &["--gpus", "4"],
            "torchtune",
            &["--gpus", "4"],
            "yaml",
        ),
        (
            "torchtitan/llama3_8b-8xb200-8k.toml",
            &[],
            "torchtitan",
            &[],
            "toml",
        ),
        ("axolotl/llama-3_lora-1b.yml", &[], "axolotl", &[], "yml"),
        ("nanochat/seed002_d16_stable.sh", &[], "nanochat", &[], "sh"),
    ];
    for (i, (file, args, format, back_args, ext)) in cases.into_iter().enumerate() {
        let gpu = match format {
            "nanochat" => "rtx5090d-32gb",
            "torchtitan" => "h200-141gb",
            _ => "a100-80gb",
        };
        let path = format!("{DIR}/{file}");
        let mut first = vec!["estimate", path.as_str(), "--gpu", gpu];
        first.extend_from_slice(args);
        let before = vramplan(&first);
        assert!(
            before.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&before.stderr)
        );
        first.extend_from_slice(&["--emit", format]);
        let o = vramplan(&first);
        let emitted = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(
            o.status.success(),
            "{file} → {format}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let out = dir.join(format!("plan{i}.{ext}"));
        std::fs::write(&out, &o.stdout).unwrap();
        let mut again = vec!["estimate", out.to_str().unwrap(), "--gpu", gpu];
        again.extend_from_slice(back_args);
        let back = vramplan(&again);
        assert!(
            back.status.success(),
            "{file} → {format}: {}\n{emitted}",
            String::from_utf8_lossy(&back.stderr)
        );
        let (before, after) = (
            String::from_utf8_lossy(&before.stdout).to_string(),
            String::from_utf8_lossy(&back.stdout).to_string(),
        );
        if format == "accelerate" || format == "deepspeed" {
            let pick = |t: &str| -> Vec<String> {
                let l: Vec<&str> = t.lines().collect();
                vec![l[0].into(), l[2].into(), l[3].into()]
            };
            assert_eq!(pick(&before), pick(&after), "{file} → {format}\n{emitted}");
        } else {
            assert_eq!(before, after, "{file} → {format}\n{emitted}");
        }
        if format == "deepspeed" && file.starts_with("accelerate/") {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(err.contains("launch: deepspeed --num_gpus 8 train.py --deepspeed THIS_FILE --per_device_train_batch_size 1"), "{err}");
            assert!(emitted.contains("\"stage\": 3"), "{emitted}");
        }
        if format == "accelerate" && file == qwen {
            assert!(emitted.contains("--per_device_train_batch_size 1 --gradient_accumulation_steps 1 --max_length 1024"), "{emitted}");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn emit_refuses_what_the_launcher_cannot_run() {
    let path = format!("{DIR}/hf/run_clm_gpt2.sh");
    let o = vramplan(&[
        "estimate",
        &path,
        "--gpu",
        "a100-80gb",
        "--emit",
        "nanochat",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.lines()
            .last()
            .unwrap()
            .starts_with("error: --emit nanochat: the plan's implementation = \"hf\" (nanochat runs nanochat model code) has no nanochat setting"),
        "{err}"
    );
    // TRL trains bf16 autocast over fp32 weights by default; axolotl and DeepSpeed cannot.
    for (format, why) in [
        ("axolotl", "(axolotl loads the weights in bf16 whenever bf16 is on; bf16 there is precision = \"bf16\")"),
        ("deepspeed", "(DeepSpeed's bf16 keeps bf16 weights over fp32 masters: precision = \"bf16-mixed\")"),
    ] {
        let path = format!("{DIR}/hf/trl_sft_lora.sh");
        let mut args = vec!["estimate", &path, "--gpu", "a100-80gb", "--emit", format];
        args.extend_from_slice(&["--model", QWEN]);
        let o = vramplan(&args);
        assert_eq!(o.status.code(), Some(2));
        let err = String::from_utf8_lossy(&o.stderr);
        let want = format!("error: --emit {format}: the plan's precision = \"bf16-autocast\" {why} has no {format} setting");
        assert_eq!(err.lines().last().unwrap(), want, "{err}");
    }
    // DeepSpeed's offload has no setting in torchtune's, torchtitan's or nanochat's files.
    let path = format!("{DIR}/deepspeed/hf_ds_config_zero2_offload.json");
    {
        let format = "torchtune";
        let o = vramplan(&[
            "estimate",
            &path,
            "--gpu",
            "a100-80gb",
            "--model",
            "llama-3.2-1b",
            "--emit",
            format,
        ]);
        assert_eq!(o.status.code(), Some(2), "{format}");
        let err = String::from_utf8_lossy(&o.stderr);
        let last = err.lines().last().unwrap();
        assert!(
            last.starts_with(&format!("error: --emit {format}: the plan's ")),
            "{err}"
        );
    }
    // A multi-GPU nanochat plan is the whole torchrun command.
    let path = format!("{DIR}/nanochat/speedrun_base_train_d20.sh");
    let o = vramplan(&[
        "estimate",
        &path,
        "--gpu",
        "h100-80gb",
        "--emit",
        "nanochat",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.starts_with("torchrun --standalone --nproc_per_node=8 -m scripts.base_train -- \\\n    --depth=20 \\\n"), "{out}");
}

/// Seed 004 through `fit --from ... --emit hf-args`: the fastest plan the Trainer can run
/// (fit's fastest uses a chunked loss the script does not have, said on stderr), written
/// over the seed's own command with its script's flags and sequence key kept; read back,
/// it is the same plan and keeps the global batch of 64.
#[test]
fn fit_emits_the_fastest_plan_the_launcher_runs() {
    let path = format!("{DIR}/hf/seed004_smollm2_135m.ps1");
    let gpu = ["--gpu", "rtx4060-laptop-8gb"];
    let o = vramplan(&["fit", "--from", &path, gpu[0], gpu[1], "--emit", "hf-args"]);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{err}");
    assert!(err.contains("note: fit's fastest plan cannot be written (--emit hf-args: the plan's loss = \"chunked\""), "{err}");
    for kept in [
        "python train_hw_parallel.py \\",
        "--data_path smol-smoltalk-6k.json",
        "--max_rounds 6",
        "--model_max_length 1024",
        "--fp16 true",
        "--optim adamw_torch_fused",
    ] {
        assert!(out.contains(kept), "{kept}: {out}");
    }
    let dir = std::env::temp_dir().join(format!("vramplan-fit-emit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plan = dir.join("plan.sh");
    std::fs::write(&plan, out.as_bytes()).unwrap();
    let back = vramplan(&["estimate", plan.to_str().unwrap(), gpu[0], gpu[1], "--json"]);
    assert!(
        back.status.success(),
        "{}",
        String::from_utf8_lossy(&back.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&back.stdout).unwrap();
    let global = v["micro_batch"].as_u64().unwrap() * v["grad_accum"].as_u64().unwrap();
    assert_eq!(global, 64, "{v}");
    assert_eq!(v["seq_len"], 1024);
    assert_eq!(v["fits"], true);
    std::fs::remove_dir_all(&dir).ok();
}

/// `fit --gpus 8 --sharding fsdp2 --emit accelerate`: the search runs as accelerate runs
/// FSDP2 (the Trainer's fused AdamW, bf16 over fp32 masters reduced in bf16: said on
/// stderr), skips the chunked
/// loss it has no setting for, and writes a config whose launch is its first line; read
/// back, it is the same plan.
#[test]
fn fit_emits_an_fsdp2_accelerate_config_and_its_launch() {
    let args = [
        "fit",
        "--gpu",
        "rtx4090-24gb",
        "--model",
        "llama-3.2-1b",
        "--seq-len",
        "2048",
        "--global-batch",
        "32",
        "--gpus",
        "8",
        "--sharding",
        "fsdp2",
        "--emit",
        "accelerate",
    ];
    let o = vramplan(&args);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{err}");
    assert!(err.contains("note: --emit accelerate: searched as accelerate runs it: optimizer adamw-fused, precision bf16-mixed, reduce_dtype bf16"), "{err}");
    assert!(out.contains(" --optim adamw_torch_fused "), "{out}");
    assert!(
        out.starts_with(
            "# accelerate launch --config_file THIS_FILE train.py --per_device_train_batch_size "
        ),
        "{out}"
    );
    for line in [
        "distributed_type: FSDP",
        "  fsdp_version: 2",
        "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP",
        "mixed_precision: bf16",
        "num_processes: 8",
    ] {
        assert!(out.lines().any(|l| l == line), "{line}: {out}");
    }
    let dir = std::env::temp_dir().join(format!("vramplan-fit-acc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plan = dir.join("accelerate.yaml");
    std::fs::write(&plan, out.as_bytes()).unwrap();
    let p = plan.to_str().unwrap();
    let back = vramplan(&[
        "estimate",
        p,
        "--gpu",
        "rtx4090-24gb",
        "--model",
        "llama-3.2-1b",
    ]);
    let text = String::from_utf8_lossy(&back.stdout);
    assert!(
        back.status.success(),
        "{}",
        String::from_utf8_lossy(&back.stderr)
    );
    let settings = text.lines().nth(2).unwrap_or_default();
    assert!(
        settings.starts_with("bf16-mixed, adamw-fused, checkpointing "),
        "{text}"
    );
    assert!(
        settings.ends_with("loss float-cast, attention sdpa, fsdp2"),
        "{text}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Issue 12's case: Llama-3.1-8B full fine-tuning on one RTX 4090 at 2048 × 32 fits
/// nothing; the ladder has the ZeRO-Offload rung after more GPUs and before activation
/// offload, with its device bytes and its host bytes (the offloaded state, at least 16 B a
/// parameter) and what it costs.
#[test]
fn fit_ladder_has_the_offload_rung_with_device_and_host_figures() {
    let args = [
        "fit",
        "--gpu",
        "rtx4090-24gb",
        "--model",
        "llama-3.1-8b",
        "--seq-len",
        "2048",
        "--global-batch",
        "32",
    ];
    let o = vramplan(&args);
    assert_eq!(o.status.code(), Some(3));
    let table = String::from_utf8_lossy(&o.stdout);
    // The row: its lever, its plan's device bytes, and (in "gives up") its host bytes.
    let row = table
        .lines()
        .position(|l| l.contains("--sharding zero2"))
        .unwrap_or_else(|| panic!("{table}"));
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[row + 1].contains("--offload-optimizer"), "{table}");
    assert!(
        lines[row].contains(" GiB ┆") && lines[row].contains("speed: Adam"),
        "{table}"
    );
    assert!(
        lines[row..row + 6].iter().any(|l| l.contains("host:")),
        "{table}"
    );
    let mut json = args.to_vec();
    json.push("--json");
    let o = vramplan(&json);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let alts = v["alternatives"].as_array().unwrap();
    let kinds: Vec<&str> = alts
        .iter()
        .map(|a| a["levers"][0]["kind"].as_str().unwrap())
        .collect();
    let at = |k: &str| kinds.iter().position(|x| *x == k).unwrap();
    assert!(at("more-gpus") < at("offload-optimizer"), "{kinds:?}");
    assert!(
        at("offload-optimizer") < at("offload-activations"),
        "{kinds:?}"
    );
    let row = &alts[at("offload-optimizer")];
    let shown = if row["fits"] == true {
        &row["best"]
    } else {
        &row["miss"]["smallest"]
    };
    let r = &shown["report"];
    let params = r["params"].as_u64().unwrap();
    assert!(r["device_bytes"].as_u64().unwrap() > 0);
    assert!(
        r["offloaded_state_bytes"].as_u64().unwrap() >= 16 * params,
        "{r}"
    );
    assert!(
        r["regime"].as_str().unwrap().contains("offloaded to host"),
        "{r}"
    );
    let gives = row["gives_up"].as_str().unwrap();
    assert!(
        gives.contains("over PCIe") && gives.contains("host:"),
        "{gives}"
    );
}
