#!/usr/bin/env python3
"""Tiny random Hugging Face checkpoints and transformers' logits for them, for the engine's
`--init` test (tests/engine_hf.rs) and its export test.

    python tools/hf_reference.py write [--out tests/data/hf_tiny]
        One folder per case (config.json + model.safetensors, or shards with
        model.safetensors.index.json) and CASE/reference.json: the token sequence and
        transformers' logits at every position (f32, eager attention).

    python tools/hf_reference.py logits DIR [--json OUT]
        Loads DIR with AutoModelForCausalLM.from_pretrained (an exported folder) and
        writes its logits for the same token sequence. tests/data/hf_tiny/exported/CASE.json
        are these for `vramplan train --init tests/data/hf_tiny/CASE --data
        tests/data/peft_sft.jsonl --steps 50 --out RUN` then `vramplan export RUN --out DIR`.

Needs torch and transformers; the test reads only the committed files.
"""

import argparse
import json
import os
import sys

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

# The sequence every reference is computed on (12 tokens of a 256-token vocabulary).
TOKENS = [(i * 37 + 11) % 256 for i in range(12)]

SHAPE = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=96,
    vocab_size=256,
    max_position_embeddings=64,
)

# name -> (config, dtype saved, save kwargs)
CASES = {
    # SmolLM2's family: llama, tied head, its epsilon and RoPE base.
    "llama": (
        lambda: LlamaConfig(
            **SHAPE, tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0
        ),
        torch.float32,
        {},
    ),
    # q/k/v biases, untied head, saved in shards.
    "qwen2": (
        lambda: Qwen2Config(
            **SHAPE, tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=1000000.0
        ),
        torch.float32,
        {"max_shard_size": "200KB"},
    ),
    # Per-head q/k norms and an explicit head_dim that is not hidden/heads.
    "qwen3": (
        lambda: Qwen3Config(
            **SHAPE,
            head_dim=32,
            tie_word_embeddings=True,
            rms_norm_eps=1e-6,
            rope_theta=1000000.0,
        ),
        torch.float32,
        {},
    ),
    # A sliding window shorter than the sequence, weights in bf16.
    "mistral": (
        lambda: MistralConfig(
            **SHAPE, tie_word_embeddings=False, sliding_window=4, rope_theta=10000.0
        ),
        torch.bfloat16,
        {},
    ),
}


def randomize(model, seed):
    """Every parameter random (norm weights around 1, biases around 0), so that each
    one's mapping shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.2 * noise)
            else:
                p.copy_(0.1 * noise)


def logits(model):
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([TOKENS]))
    return out.logits[0].float().tolist()


def write(out):
    for i, (name, (make, dtype, save)) in enumerate(CASES.items()):
        config = make()
        config._attn_implementation = "eager"
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        randomize(model, 100 + i)
        # The reference is computed from the weights as stored (bf16 rounded, then f32);
        # only the parameters are rounded, not the rotary buffers.
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(dtype).to(torch.float32))
        ref = logits(model)
        folder = os.path.join(out, name)
        os.makedirs(folder, exist_ok=True)
        for f in os.listdir(folder):
            os.remove(os.path.join(folder, f))
        model.to(dtype).save_pretrained(folder, **save)
        for f in ("generation_config.json",):
            p = os.path.join(folder, f)
            if os.path.exists(p):
                os.remove(p)
        with open(os.path.join(folder, "reference.json"), "w") as f:
            json.dump(
                {
                    "source": f"tools/hf_reference.py write: transformers {transformers.__version__}, "
                    f"torch {torch.__version__}, eager attention, f32 forward",
                    "tokens": TOKENS,
                    "logits": [[float(f"{v:.7g}") for v in row] for row in ref],
                },
                f,
            )
        print(name, "->", folder, sorted(os.listdir(folder)))


def check(folder, out):
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    )
    doc = {
        "source": f"tools/hf_reference.py logits DIR: AutoModelForCausalLM.from_pretrained, "
        f"transformers {transformers.__version__}, torch {torch.__version__}, eager attention",
        "tokens": TOKENS,
        "logits": [[float(f"{v:.7g}") for v in row] for row in logits(model)],
    }
    text = json.dumps(doc)
    if out:
        with open(out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("--out", default="tests/data/hf_tiny")
    c = sub.add_parser("logits")
    c.add_argument("dir")
    c.add_argument("--json")
    a = ap.parse_args()
    if a.cmd == "write":
        write(a.out)
    else:
        check(a.dir, a.json)


if __name__ == "__main__":
    main()
