#!/usr/bin/env python3
"""PEFT's logits for a LoRA run of the engine, for tests/engine_hf.rs.

    python tools/peft_reference.py CASE EXPORT_DIR [--out tests/data/peft_CASE]

EXPORT_DIR is `vramplan export RUN --out EXPORT_DIR` of a LoRA run that started from
`--init tests/data/hf_tiny/CASE`: the merged weights, and PEFT's adapter files in
EXPORT_DIR/adapter. The script loads the base from tests/data/hf_tiny/CASE, applies the
adapter with `PeftModel.from_pretrained`, checks that PEFT found every tensor of the file
under its own names (and nothing else), and writes to OUT:

    adapter_config.json, adapter_model.safetensors   copies of the engine's adapter files
    reference.json   the token sequence of tools/hf_reference.py and the logits at every
                     position of: the PEFT model (`peft`), its `merge_and_unload()`
                     (`merged`), and transformers' `from_pretrained(EXPORT_DIR)` (`export`)

Needs torch, transformers and peft; the test reads only the committed files.
"""

import argparse
import json
import os
import shutil

import peft
import torch
import transformers
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_reference import TOKENS

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def load(folder):
    return AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    )


def logits(model):
    model.eval()
    with torch.no_grad():
        out = model(torch.tensor([TOKENS]))
    return [[float(f"{v:.7g}") for v in row] for row in out.logits[0].float().tolist()]


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("case")
    ap.add_argument("export")
    ap.add_argument("--out")
    a = ap.parse_args()
    out = a.out or os.path.join("tests", "data", f"peft_{a.case}")
    adapter = os.path.join(a.export, "adapter")
    model = PeftModel.from_pretrained(load(os.path.join("tests", "data", "hf_tiny", a.case)), adapter)
    # Every tensor of the engine's file is one PEFT would save, and PEFT loaded it.
    saved = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    state = get_peft_model_state_dict(model)
    assert sorted(saved) == sorted(state), (sorted(saved), sorted(state))
    for name, t in saved.items():
        assert torch.equal(state[name].float(), t.float()), name
    doc = {
        "source": f"tools/peft_reference.py {a.case}: peft {peft.__version__}, "
        f"transformers {transformers.__version__}, torch {torch.__version__}, eager attention, f32",
        "tokens": TOKENS,
        "peft": logits(model),
    }
    doc["merged"] = logits(model.merge_and_unload())
    doc["export"] = logits(load(a.export))
    os.makedirs(out, exist_ok=True)
    for f in ADAPTER_FILES:
        shutil.copy(os.path.join(adapter, f), os.path.join(out, f))
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump(doc, f)
    print(a.case, "->", out, sorted(os.listdir(out)))


if __name__ == "__main__":
    main()
