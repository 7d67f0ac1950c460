#!/usr/bin/env python3
"""Tiny random T5 checkpoints (ChatLM-mini-Chinese's structure at small sizes) and
transformers' logits, loss and greedy generation for them, for the engine's T5 tests
(tests/t5.rs).

    python tools/t5_reference.py write [--out tests/data/hf_tiny]
        One folder per case (config.json + model.safetensors) and CASE/reference.json:
        the encoder ids and mask, the labels (-100: ignored), transformers' logits at
        every decoder position (f32, eager attention), the mean loss over the labels, and
        greedy generation from the first example's encoder input.

    python tools/t5_reference.py logits DIR [--json OUT]
        Loads DIR with T5ForConditionalGeneration.from_pretrained (an exported folder) and
        writes its logits for the same inputs. tests/data/hf_tiny/exported/t5.json is this
        for the folder `vramplan export` wrote after `vramplan train --init
        tests/data/hf_tiny/t5` (tests/t5.rs says the command).

Needs torch and transformers; the tests read only the committed files.
"""

import argparse
import json
import os
import sys

import torch
import transformers
from transformers import T5Config, T5ForConditionalGeneration

# ChatLM-mini-Chinese (d_model 768, 10 + 10 layers, 12 heads of 64, d_ff 3072, ReLU, tied)
# at small sizes. max_distance 20 makes the encoder's (24 tokens) and the decoder's
# (20 tokens) relative positions reach the logarithmic buckets and the last one.
SHAPE = dict(
    vocab_size=256,
    d_model=64,
    d_kv=16,
    d_ff=96,
    num_layers=2,
    num_decoder_layers=2,
    num_heads=4,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=20,
    layer_norm_epsilon=1e-6,
    dropout_rate=0.0,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
    tie_word_embeddings=True,
)

CASES = {
    # ChatLM-mini-Chinese's feed-forward: ReLU.
    "t5": dict(feed_forward_proj="relu"),
    # T5 v1.1's: gated GELU (tanh approximation).
    "t5_gated": dict(feed_forward_proj="gated-gelu"),
}

ENC_LEN, DEC_LEN = 24, 20
# Example 0 fills both sides; example 1 has 14 encoder tokens (then pads, masked) and 13
# labels (then -100).
ENC = [
    [(i * 37 + 11) % 254 + 2 for i in range(ENC_LEN)],
    [(i * 53 + 5) % 254 + 2 for i in range(14)] + [0] * (ENC_LEN - 14),
]
MASK = [[1] * ENC_LEN, [1] * 14 + [0] * (ENC_LEN - 14)]
LABELS = [
    [(i * 29 + 3) % 254 + 2 for i in range(DEC_LEN)],
    [(i * 61 + 7) % 254 + 2 for i in range(13)] + [-100] * (DEC_LEN - 13),
]
GENERATE = 8


def randomize(model, seed):
    """Every parameter random (norm weights around 1), so that each one's mapping shows
    in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g)
            if "layer_norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif "relative_attention_bias" in name:
                p.copy_(1.0 * noise)
            else:
                p.copy_(0.1 * noise)


def outputs(model):
    model.eval()
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ENC),
            attention_mask=torch.tensor(MASK),
            labels=torch.tensor(LABELS),
        )
        gen = model.generate(
            input_ids=torch.tensor(ENC[:1]),
            attention_mask=torch.tensor(MASK[:1]),
            max_new_tokens=GENERATE,
            min_new_tokens=GENERATE,
            do_sample=False,
            num_beams=1,
        )
    return out.logits.float(), float(out.loss), gen[0].tolist()


def doc(source, model):
    logits, loss, gen = outputs(model)
    return {
        "source": source,
        "encoder_ids": ENC,
        "encoder_mask": MASK,
        "labels": LABELS,
        "logits": [
            [[float(f"{v:.7g}") for v in row] for row in ex] for ex in logits.tolist()
        ],
        "loss": loss,
        "generated": gen,
    }


def versions():
    return f"transformers {transformers.__version__}, torch {torch.__version__}, eager attention, f32"


def write(out):
    for i, (name, extra) in enumerate(CASES.items()):
        config = T5Config(**SHAPE, **extra)
        config._attn_implementation = "eager"
        torch.manual_seed(i)
        model = T5ForConditionalGeneration(config)
        randomize(model, 200 + i)
        folder = os.path.join(out, name)
        os.makedirs(folder, exist_ok=True)
        for f in os.listdir(folder):
            os.remove(os.path.join(folder, f))
        ref = doc(f"tools/t5_reference.py write: {versions()}", model)
        model.save_pretrained(folder)
        p = os.path.join(folder, "generation_config.json")
        if os.path.exists(p):
            os.remove(p)
        with open(os.path.join(folder, "reference.json"), "w") as f:
            json.dump(ref, f)
        print(name, "->", folder, sorted(os.listdir(folder)), "loss", ref["loss"])


def check(folder, out):
    model = T5ForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager"
    )
    text = json.dumps(
        doc(
            f"tools/t5_reference.py logits DIR: T5ForConditionalGeneration.from_pretrained, {versions()}",
            model,
        )
    )
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
