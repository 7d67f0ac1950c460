#!/usr/bin/env python3
"""Parameter counts of the committed Hugging Face configs, as transformers builds them.

Usage:
    python tools/param_counts.py [--dir tests/data/hf_configs] [--out tests/data/hf_configs/param_counts.json]

Each `*.json` in the folder (except the output) is read with `AutoConfig.for_model`, the
causal-LM class of its `model_type` is built on the meta device (no memory, no
downloads), and `sum(p.numel() for p in model.parameters())` is recorded. Tied
embeddings count once, as `parameters()` yields a shared tensor once. A Gemma 3
image-text config (`model_type` "gemma3" with a `text_config`) is counted as its
language model, `Gemma3ForCausalLM(text_config)`: the vision tower is outside what the
planner models.
"""

import argparse
import glob
import json
import os
import warnings

import torch


def build(cfg):
    import transformers

    model_type = cfg["model_type"]
    if model_type == "gemma3" and "text_config" in cfg:
        cfg = dict(cfg["text_config"], model_type="gemma3_text")
        model_type = "gemma3_text"
    fields = {k: v for k, v in cfg.items() if k != "model_type"}
    config = transformers.AutoConfig.for_model(model_type, **fields)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="tests/data/hf_configs")
    ap.add_argument("--out", default="tests/data/hf_configs/param_counts.json")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    counts = {}
    for path in sorted(glob.glob(os.path.join(args.dir, "*.json"))):
        if os.path.abspath(path) == os.path.abspath(args.out):
            continue
        with open(path) as f:
            cfg = json.load(f)
        model = build(cfg)
        name = os.path.splitext(os.path.basename(path))[0]
        counts[name] = sum(p.numel() for p in model.parameters())
        print(f"{name:<20} {type(model).__name__:<28} {counts[name]:>15,}", flush=True)
    out = {
        "tool": {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__},
        "method": "AutoModelForCausalLM.from_config on the meta device; sum(p.numel() for p in model.parameters())",
        "counts": counts,
    }
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
