#!/usr/bin/env python3
"""Held-out check of the candle engine's LoRA inventory on random plans.

Draws plans (architecture, widths, heads, rows, blocks, precision, checkpointing, rank,
target modules) from a seeded generator, trains each for 3 steps with `vramplan train`
and compares the summary's predicted peak with the counting allocator's (f32) or the
tensor peak (16-bit compute), as tests/train.rs does. Also records whether `estimate`
warns that the plan is outside the calibrated LoRA inventory (`[lora] ...`) or outside
the calibrated rows. The plans were not used to derive the terms in
planner/src/candle_engine/mod.rs (`lora_extras`).

    python3 tools/check_lora_inventory.py --binary target/release/vramplan \
        --seed 11 --plans 30 --min-rows 256 --out docs/data/lora_heldout_11.tsv
"""
import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

TARGETS = [
    ["q_proj", "v_proj"],
    ["q_proj", "k_proj", "v_proj", "o_proj"],
    "all-linear",
    ["k_proj"],
    ["v_proj"],
    ["o_proj", "up_proj"],
    ["gate_proj", "up_proj", "down_proj"],
    ["q_proj", "down_proj"],
    ["v_proj", "gate_proj"],
    ["up_proj"],
    ["down_proj"],
]


def draw(rng, min_rows):
    """One random plan as a dict of its settings."""
    while True:
        heads = rng.choice([2, 4])
        p = {
            "arch": rng.choice(["llama", "qwen2", "qwen3"]),
            "hidden": rng.choice([64, 96, 128]),
            "heads": heads,
            "kv": rng.choice([k for k in [1, 2, 4] if heads % k == 0]),
            "head_dim": rng.choice([16, 24, 32]),
            "ffn": rng.choice([128, 192, 256, 384]),
            "vocab": rng.choice([256, 512, 1024]),
            "batch": rng.choice([4, 8, 16]),
            "seq": rng.choice([32, 64, 128]),
            "checkpointing": rng.choice(["full", "none"]),
            "layers": rng.choice([1, 2, 3]),
            "precision": rng.choice(["fp32", "fp16-autocast"]),
            "targets": rng.choice(TARGETS),
            "rank": rng.choice([4, 8, 16]),
        }
        if p["batch"] * p["seq"] >= min_rows:
            return p


def toml(p):
    return (
        f'[model]\nname = "heldout"\narch = "{p["arch"]}"\nhidden_size = {p["hidden"]}\n'
        f'num_layers = {p["layers"]}\nnum_heads = {p["heads"]}\nnum_kv_heads = {p["kv"]}\n'
        f'head_dim = {p["head_dim"]}\nintermediate_size = {p["ffn"]}\n'
        f'vocab_size = {p["vocab"]}\ntie_embeddings = {str(p["arch"] == "llama").lower()}\n'
        f'[train]\nmicro_batch = {p["batch"]}\nseq_len = {p["seq"]}\n'
        f'precision = "{p["precision"]}"\ncheckpointing = "{p["checkpointing"]}"\n'
        f'loss = "chunked"\nloss_chunk = 256\nengine = "candle"\n[hardware]\ngpu = "cpu"\n'
        f'[lora]\nrank = {p["rank"]}\ntarget_modules = {json.dumps(p["targets"])}\n'
    )


def measure(binary, plan_toml, work):
    path = work / "plan.toml"
    path.write_text(plan_toml)
    out = work / "out"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    run = subprocess.run(
        [binary, "train", str(path), "--out", str(out), "--steps", "3",
         "--eval-every", "0", "--save-every", "0"],
        capture_output=True, text=True)
    if run.returncode != 0:
        sys.exit(f"train failed: {run.stderr.strip()[-300:]}")
    s = json.loads((out / "summary.json").read_text())
    est = json.loads(subprocess.run([binary, "estimate", str(path), "--json"],
                                    capture_output=True, text=True, check=True).stdout)
    lora_warned = any(w.startswith("[lora]") for w in est["warnings"])
    rows_warned = any("calibrated for rows" in w for w in est["warnings"])
    return s, lora_warned, rows_warned


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--binary", required=True)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--plans", type=int, default=30)
    ap.add_argument("--min-rows", type=int, default=256)
    ap.add_argument("--out", help="TSV to write (default: stdout only)")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    lines = ["plan\tarch\thidden\theads\tkv\thead_dim\tffn\tvocab\tbatch\tseq\tlayers\t"
             "checkpointing\tprecision\trank\ttargets\tpredicted\tmeasured\terror_pct\t"
             "lora_warned\trows_warned"]
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.plans):
            p = draw(rng, a.min_rows)
            s, lw, rw = measure(a.binary, toml(p), Path(tmp))
            field = "measured_peak_bytes" if p["precision"] == "fp32" else "measured_tensor_peak_bytes"
            pred, meas = s["predicted_peak_bytes"], s[field]
            err = 100.0 * (pred - meas) / meas
            tg = p["targets"] if isinstance(p["targets"], str) else "+".join(p["targets"])
            row = [i, p["arch"], p["hidden"], p["heads"], p["kv"], p["head_dim"], p["ffn"],
                   p["vocab"], p["batch"], p["seq"], p["layers"], p["checkpointing"],
                   p["precision"], p["rank"], tg, pred, meas, f"{err:+.2f}", int(lw), int(rw)]
            lines.append("\t".join(map(str, row)))
            print(lines[-1], flush=True)
    inside = [float(l.split("\t")[17]) for l in lines[1:]
              if l.endswith("\t0\t0")]
    if inside:
        print(f"{len(inside)} of {a.plans} without a warning: {min(inside):+.2f} % to "
              f"{max(inside):+.2f} %")
    if a.out:
        Path(a.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
