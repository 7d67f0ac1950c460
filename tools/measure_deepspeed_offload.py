#!/usr/bin/env python3
"""The buffers DeepSpeed's CPU offload keeps, counted on DeepSpeed's CPU accelerator.

Usage:
    DS_ACCELERATOR=cpu python tools/measure_deepspeed_offload.py \
        [--out tests/data/deepspeed_offload_cpu.json]

DeepSpeed's offload copies between a CUDA device and pinned host memory; on a machine
without a GPU it runs on its CPU accelerator (`DS_ACCELERATOR=cpu`), where the "device"
is the host too and pinning does nothing. What that still shows is the inventory: which
buffers the ZeRO optimizer makes under `offload_optimizer` / `offload_param`, their
element counts and dtypes, after one training step (forward, backward, step) of a small
Hugging Face Llama in bf16 on one rank (gloo). It does not show device memory, pinning
or the power-of-two rounding of pinned blocks; those stay modelled from the source.

Cases: ZeRO-2 with the optimizer offloaded (grad_accum 1 and 2), ZeRO-3 with the
optimizer offloaded, ZeRO-3 with the optimizer and the parameters offloaded. Each runs in
a fresh interpreter. DeepSpeed 0.19.6, torch 2.15.0, transformers 5.24 (CPU). The counts
feed planner/src/torch/shard.rs (`host_buffers`), whose test compares them.
"""

import argparse
import json
import os
import subprocess
import sys

# The model: a small Llama (untied head) the planner's test builds inline too.
MODEL = dict(
    hidden_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=512,
    vocab_size=4096,
    tie_word_embeddings=False,
)

CASE = r"""
import json, os, sys
import torch, deepspeed, transformers
stage, params, accum = int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3])
cfg = transformers.LlamaConfig(**json.loads(sys.argv[4]))
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(cfg)
zero = {"stage": stage, "offload_optimizer": {"device": "cpu", "pin_memory": True}}
if params:
    zero["offload_param"] = {"device": "cpu", "pin_memory": True}
ds = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": accum,
    "bf16": {"enabled": True},
    "zero_optimization": zero,
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
}
deepspeed.init_distributed(dist_backend="gloo")
engine, opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
x = torch.randint(0, cfg.vocab_size, (1, 32))
for _ in range(accum):
    loss = engine(input_ids=x, labels=x).loss
    engine.backward(loss)
    engine.step()

def t(x):
    return {"numel": x.numel(), "dtype": str(x.dtype).replace("torch.", "")}

def ts(xs):
    xs = [x for x in xs if x is not None]
    return {"numel": sum(x.numel() for x in xs), "count": len(xs),
            "dtype": sorted({str(x.dtype).replace("torch.", "") for x in xs})}

out = {"params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())}
state = [v for s in opt.optimizer.state.values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq")]
out["adam_moments"] = ts(state)
if stage < 3:
    out["fp32_master"] = ts(opt.single_partition_of_fp32_groups)
    out["fp32_grads"] = ts([p.grad for p in opt.single_partition_of_fp32_groups])
    out["bit16_buffer"] = ts(opt.param_buffer_of_bit16_for_cpu_offload_groups)
    out["staging_host"] = t(opt.temp_grad_buffer_for_cpu_offload)
    out["staging_device"] = t(opt.temp_grad_buffer_for_gpu_offload)
    out["accumulated_grads"] = ts(list(opt.accumulated_grads_in_cpu.values()))
    out["bit16_params"] = ts(opt.bit16_groups_flat)
else:
    out["fp32_master"] = ts(opt.fp32_partitioned_groups_flat)
    out["fp32_grads"] = ts([p.grad for p in opt.fp32_partitioned_groups_flat])
    out["grad_accumulation"] = t(opt.grad_partitions_flat_buffer)
    if params:
        out["bit16_partitions"] = ts(opt.param_groups_fp16_flat_cpu_memory)
print("RESULT " + json.dumps(out))
"""

CASES = {
    "zero2_offload_optimizer": (2, 0, 1),
    "zero2_offload_optimizer_accum2": (2, 0, 2),
    "zero3_offload_optimizer": (3, 0, 1),
    "zero3_offload_both": (3, 1, 1),
}


def run(stage, params, accum):
    env = dict(os.environ, DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="29517", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    r = subprocess.run(
        [sys.executable, "-c", CASE, str(stage), str(params), str(accum), json.dumps(MODEL)],
        capture_output=True, text=True, env=env, timeout=1200,
    )
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    sys.exit(f"case {stage}/{params}/{accum} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/data/deepspeed_offload_cpu.json")
    a = ap.parse_args()
    import deepspeed, torch, transformers
    out = {
        "versions": {"deepspeed": deepspeed.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__},
        "accelerator": "cpu (DS_ACCELERATOR=cpu): element counts only, no pinning",
        "model": MODEL,
        "cases": {name: run(*c) for name, c in CASES.items()},
    }
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
