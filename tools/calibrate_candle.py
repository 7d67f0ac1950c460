#!/usr/bin/env python3
"""Measures the candle engine's working sets stage by stage and fits the planner's
`candle` inventory to them (planner/data/candle_*.toml, read by planner/src/candle_engine/).

    python3 tools/calibrate_candle.py measure --dtype f16 --tensors --count 400 --out docs/data/candle_f16_stages.tsv
    python3 tools/calibrate_candle.py measure --dtype f16 --tensors --count 300 --seed 2 --checkpointed 0 \
        --append --out docs/data/candle_f16_stages.tsv
    python3 tools/calibrate_candle.py fit docs/data/candle_f16_stages.tsv --write planner/data/candle_f16.toml
    python3 tools/calibrate_candle.py check docs/data/candle_f16_stages.tsv --binary target/release/vramplan
    (the same with --dtype f32, without --tensors, for docs/data/candle_f32_stages.tsv and candle_f32.toml;
    measured with a binary built without feature avx512, gemm's AVX2 kernels, for
    docs/data/candle_f32_avx2_stages.tsv and candle_f32_avx2.toml)
    python3 tools/calibrate_candle.py remeasure docs/data/candle_f32_stages.tsv --out NEW.tsv --note "..."
        (the same configurations measured again, e.g. after an engine change)
    python3 tools/calibrate_candle.py measure --arch t5 --dtype f16 --tensors --count 400 --seed 12 \
        --append --out docs/data/candle_f16_stages.tsv     (T5's configurations, the same files)

`measure` draws random small configurations (nanochat and llama, or with `--arch t5` T5
encoder-decoders, with and without checkpointing, at least 256 rows per micro-batch), runs `vramplan calibrate-candle` (a
hidden subcommand) on them (two steps each; the second is measured with the counting allocator) and
writes one line per configuration: the configuration, then `stage:working_set:live` for
every stage (bytes; the working set is the stage's high-water mark above the live bytes
before it). `--tensors` counts tensors alone, leaving out gemm's 64-byte-aligned packing
scratch: what the same graph allocates on a GPU. `fit` fits each stage's working set as
a linear form in the step's tensor sizes, or the largest of two or three where the
stage's peak moves between ops, by least squares on the relative error (the optimizer's
from the parameters' sizes in update order), and prints the fit quality; `--write`
writes the planner's data file: the planes, their quality and the calibrated domain (each
unit's min and max over the set), which the planner embeds and interprets. `check`
compares `vramplan estimate` with every measured step. Needs numpy, and scipy for the
loss stage's non-negative fits.
"""

import argparse
import os
import random
import subprocess
import sys
import tempfile

FIELDS = "arch ckpt layers hidden heads kv head_dim ffn vocab batch seq chunk".split()
# A t5 line adds its decoder layers and whether its feed-forward is gated GELU (1) or ReLU (0).
T5_FIELDS = ["dec", "gated"]


def draw(rng, ckpt):
    arch = rng.choice(["nanochat", "llama"])
    heads = rng.choice([1, 2, 4])
    kv = heads if arch == "nanochat" else rng.choice([h for h in (1, 2, 4) if heads % h == 0])
    head_dim = rng.choice([8, 16, 24, 32, 48])
    hidden = rng.choice([32, 48, 64, 96, 128, 192])
    ffn = rng.choice([64, 128, 192, 256, 384, 512])
    vocab = rng.choice([256, 512, 1024, 2048, 4096])
    seq = rng.choice([16, 32, 64, 128, 256])
    batch = rng.choice([b for b in (1, 2, 4, 8, 16, 32) if 256 <= b * seq <= 4096] or [256 // seq])
    chunk = rng.choice([32, 64, 128, 256, 512, 1024, 4096])
    layers = rng.choice([1, 2, 3])
    return [arch, int(ckpt), layers, hidden, heads, kv, head_dim, ffn, vocab, batch, seq, chunk]


def draw_t5(rng, ckpt):
    """A T5 (encoder-decoder) configuration: both stacks read `seq` positions."""
    heads = rng.choice([1, 2, 4])
    head_dim = rng.choice([8, 16, 24, 32, 48])
    hidden = rng.choice([32, 48, 64, 96, 128, 192])
    ffn = rng.choice([64, 128, 192, 256, 384, 512])
    vocab = rng.choice([256, 512, 1024, 2048, 4096])
    seq = rng.choice([16, 32, 64, 128, 256])
    batch = rng.choice([b for b in (1, 2, 4, 8, 16, 32) if 256 <= b * seq <= 4096] or [256 // seq])
    chunk = rng.choice([32, 64, 128, 256, 512, 1024, 4096])
    layers, dec = rng.choice([1, 2, 3]), rng.choice([1, 2, 3])
    gated = int(rng.random() < 0.3)
    return ["t5", int(ckpt), layers, hidden, heads, heads, head_dim, ffn, vocab, batch, seq, chunk, dec, gated]


def run_calibrate(binary, configs, dtype, tensors):
    """`vramplan calibrate-candle` on configuration lines: one measurement line each."""
    with tempfile.TemporaryDirectory() as tmp:
        path, measured = os.path.join(tmp, "configs.txt"), os.path.join(tmp, "measured.txt")
        with open(path, "w") as f:
            f.write("\n".join(configs) + "\n")
        run = [binary] if binary else ["cargo", "run", "--release", "--quiet", "--"]
        cmd = run + ["calibrate-candle", path, "--out", measured, "--dtype", dtype] + (["--tensors"] if tensors else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = open(measured).read().splitlines() if out.returncode == 0 else []
    if len(lines) != len(configs):
        sys.exit(f"calibrate-candle failed ({len(lines)} of {len(configs)} lines):\n{out.stderr[-3000:]}")
    return lines


def measure(args):
    rng = random.Random(args.seed)
    pick = draw_t5 if args.arch == "t5" else draw
    configs = [pick(rng, rng.random() < args.checkpointed) for _ in range(args.count)]
    lines = run_calibrate(args.binary, [" ".join(map(str, c)) for c in configs], args.dtype, args.tensors)
    with open(args.out, "a" if args.append else "w") as f:
        if not args.append:
            f.write("# " + " ".join(FIELDS) + " | stage:working_set:live ... | STEP peak\n")
        f.write(f"# compute dtype {args.dtype}; seed {args.seed}; checkpointed share {args.checkpointed}; "
                f"{'tensors only (no matmul scratch)' if args.tensors else 'the whole heap'}\n")
        for l in lines:
            f.write(l + "\n")
    print(f"{len(lines)} configurations {'added to' if args.append else 'written to'} {args.out}")


def remeasure(args):
    """Measures every configuration of an existing file again (with another build, or
    after an engine change), keeping its comment lines; `--note` is added to each
    section's comment."""
    src = open(args.path).read().splitlines()
    configs = [l.split("|")[0].strip() for l in src if l.strip() and not l.startswith("#")]
    tensors = any(l.startswith("#") and "tensors only" in l for l in src)
    dtype = "f16" if any(l.startswith("# compute dtype f16") for l in src) else "f32"
    lines = run_calibrate(args.binary, configs, dtype, tensors)
    rows = iter(lines)
    with open(args.out, "w") as f:
        for i, l in enumerate(src):
            if not l.strip():
                continue
            if not l.startswith("#"):
                l = next(rows)
            elif i > 0 and args.note and args.note not in l:
                l = f"{l}; {args.note}"
            f.write(l + "\n")
    print(f"{len(lines)} configurations measured again into {args.out}")


# gemm's f32 kernel rows (MR): the loss's head-gradient product packs its block of the
# logits' gradient when the width is above twice them (`hpack` below).
KERNEL_ROWS = {"avx2": 16, "avx512": 64}


def kernels(text):
    """The f32 file's gemm kernels, from its header; None for 16-bit (tensors alone)."""
    if "compute dtype f16" in text[:2000]:
        return None
    return "avx2" if "gemm's AVX2 kernels" in text[:2000] else "avx512"


def parse(path):
    rows = []
    k = kernels(open(path).read(4000))
    for line in open(path):
        if line.startswith("#") or not line.strip():
            continue
        cfg, stages, step = [p.strip() for p in line.split("|")]
        f = cfg.split()
        c = {k: (f[i] if k == "arch" else int(f[i])) for i, k in enumerate(FIELDS)}
        c.update({k: int(f[len(FIELDS) + i]) if len(f) > len(FIELDS) else 0 for i, k in enumerate(T5_FIELDS)})
        st = {}
        for s in stages.split():
            name, ws, live = s.rsplit(":", 2)
            st[name] = (int(ws), int(live))
        c["stages"] = st
        c["step"] = int(step.split()[1])
        c["mr"] = KERNEL_ROWS.get(k, 0)
        rows.append(c)
    return rows


def units(c):
    """The planner's units (`Units` in candle_engine), in f32-equivalent bytes."""
    F = 4.0
    n = c["batch"] * c["seq"]
    rows = min(c["chunk"], n)
    u = dict(
        nc=n * c["hidden"] * F,
        nq=n * c["heads"] * c["head_dim"] * F,
        nkv=n * c["kv"] * c["head_dim"] * F,
        ni=n * c["ffn"] * F,
        s=c["batch"] * c["heads"] * c["seq"] ** 2 * F,
        rv=rows * c["vocab"] * F,
        rc=rows * c["hidden"] * F,
        vc=c["vocab"] * c["hidden"] * F,
        n=n * F,
        bht=c["batch"] * c["heads"] * c["seq"] * F,
        td=c["seq"] * c["head_dim"] * F,
        cq=c["hidden"] * c["heads"] * c["head_dim"] * F,
        ckv=c["hidden"] * c["kv"] * c["head_dim"] * F,
        ci=c["hidden"] * c["ffn"] * F,
        one=1.0,
    )
    u["mvc"] = u["vc"] if rows < n else 0.0
    # The head-gradient product (src/engine/head_grad.rs) packs each call's block of the
    # logits' gradient (at most 128 rows × 4096 entries) where the width is above twice
    # the kernel's rows (gemm-common 0.19, `gemm_basic_generic`'s `do_pack_rhs` after it
    # transposes the product): f32 on the CPU only.
    packs = c.get("mr", 0) and c["hidden"] > 2 * c["mr"]
    u["hpack"] = min(rows, 128) * min(c["vocab"], 4096) * F if packs else 0.0
    # T5: gated GELU's second MLP projection and its output; the query width again when
    # there is one head (candle then skips the heads' transposed copies); the position
    # biases and masks built once (`tables` in planner/src/candle_engine/t5.rs: per stack
    # the bucket indices T² and the gathered bias H·T², transposed into a copy when H > 1;
    # the causal mask T², the key mask B·T; f32).
    u["gni"] = u["ni"] if c["gated"] else 0.0
    u["gci"] = u["ci"] if c["gated"] else 0.0
    u["nq1"] = u["nq"] if c["heads"] == 1 else 0.0
    u["nkv1"] = u["nkv"] if c["kv"] == 1 else 0.0
    h, t2 = c["heads"], c["seq"] ** 2
    u["tab"] = (2 * t2 * (1 + h + (h if h > 1 else 0)) + t2 + n) * F
    return u


# The measured working set of each stage (bytes above the live bytes before it).
def targets(c):
    if c["arch"] == "t5":
        return targets_t5(c)
    st = c["stages"]
    L = c["layers"]
    t = {}
    if c["ckpt"]:
        t["fwd_attn"] = st["fwd0attn"][0]
        t["fwd_mlp"] = st["fwd0"][0]
        t["loss"] = st["loss"][0]
        t["bwd_mlp"] = st[f"bwd{L - 1}mlp"][0]
        t["bwd_attn"] = st[f"bwd{L - 1}"][0]
        t["emb"] = st["emb"][0]
    else:
        t.update(whole_graph_targets(st))
    t["opt"] = st["opt"][0]
    return t


def whole_graph_targets(st):
    """Without checkpointing, every arch: the graph kept, the forward's peak, the loss,
    the backward's peak."""
    return {"graph": st["fwd"][1] - st["start"][1], "fwd_peak": st["fwd"][0],
            "loss": st["loss"][0], "bwd_peak": st["bwd"][0]}


def targets_t5(c):
    """T5's stages: with checkpointing each stack's first block forward and backward (the
    position-bias tables and the first embedding are their own stage, modelled exactly),
    each stack's end (final norm, and the next embedding or the encoder-gradient buffer);
    without, the whole graph as the decoder-only step's."""
    st = c["stages"]
    L, D = c["layers"], c["dec"]
    t = {}
    if c["ckpt"]:
        t["fwd_enc"] = st["fwd0"][0]
        t["enc_out"] = st["enc"][0]
        t["fwd_dec"] = st[f"fwd{L}"][0]
        t["dec_out"] = st["fwd"][0]
        t["loss"] = st["loss"][0]
        t["bwd_dec_out"] = st["bwddec"][0]
        t["bwd_dec"] = st[f"bwd{L + D - 1}"][0]
        t["bwd_enc_out"] = st["bwdenc"][0]
        t["bwd_enc"] = st[f"bwd{L - 1}"][0]
        t["emb"] = st["emb"][0]
    else:
        t.update(whole_graph_targets(st))
    t["opt"] = st["opt"][0]
    return t


def basis_t5(stage, c, u):
    L, D = c["layers"], c["dec"]
    block = ["nc", "nq", "nq1", "ni", "gni", "s", "n", "bht", "cq", "ci", "gci"]
    if stage in ("fwd_enc", "fwd_dec", "bwd_enc", "bwd_dec"):
        return {k: u[k] for k in block}
    if stage in ("enc_out", "dec_out", "bwd_dec_out", "bwd_enc_out"):
        return {k: u[k] for k in ["nc", "n"]}
    if stage == "loss":
        return {k: u[k] for k in ["rv", "rc", "vc", "mvc", "nc", "n"] + (["hpack"] if c["mr"] else [])}
    if stage == "emb":
        return {k: u[k] for k in ["vc", "nc", "n"]}
    per_block = ["nc", "nq", "nq1", "ni", "gni", "s", "bht", "n", "cq", "ci", "gci"]
    if stage in ("graph", "fwd_peak"):
        b = {f"L*{k}": L * u[k] for k in per_block}
        b.update({f"D*{k}": D * u[k] for k in per_block})
        b.update({k: u[k] for k in ["nc", "tab"]})
        return b
    if stage == "bwd_peak":
        b = {k: u[k] for k in per_block + ["vc", "tab"]}
        b.update({f"L*{k}": L * u[k] for k in per_block})
        b.update({f"D*{k}": D * u[k] for k in per_block})
        return b
    if stage == "opt":
        return {"adam": adam_peak(c)}
    raise KeyError(stage)


def basis(stage, c, u):
    if c["arch"] == "t5":
        return basis_t5(stage, c, u)
    b = basis_all(stage, c, u)
    if c["arch"] == "nanochat":  # keys and values have the queries' width
        b = {k: v for k, v in b.items() if "kv" not in k}
    return b


def basis_all(stage, c, u):
    L = c["layers"]
    l1 = max(L - 1, 0)
    att = ["nc", "nq", "nkv", "nq1", "nkv1", "s", "n", "bht", "td", "cq", "ckv"]
    if stage in ("fwd_attn", "bwd_attn"):
        return {k: u[k] for k in att}
    if stage in ("fwd_mlp", "bwd_mlp"):
        return {k: u[k] for k in ["nc", "ni", "ci"]}
    if stage == "loss":
        return {k: u[k] for k in ["rv", "rc", "vc", "mvc", "nc", "n"] + (["hpack"] if c["mr"] else [])}
    if stage == "emb":
        return {k: u[k] for k in ["vc", "nc", "n"]}
    # Without checkpointing the graph keeps every block's weights (cast to 16 bits, if so).
    per_block = ["nc", "nq", "nkv", "ni", "s", "cq", "ckv", "ci"]
    if stage in ("graph", "fwd_peak"):
        b = {f"L*{k}": L * u[k] for k in per_block + ["nq1", "nkv1"]}
        b["nc"] = u["nc"]
        return b
    if stage == "bwd_peak":
        b = {k: u[k] for k in per_block + ["nq1", "nkv1", "vc", "n"]}
        b.update({f"L1*{k}": l1 * u[k] for k in per_block + ["nq1", "nkv1"]})
        return b
    if stage == "opt":
        return {"adam": adam_peak(c)}
    raise KeyError(stage)


PLANES = {"fwd_attn": 2, "fwd_mlp": 2, "bwd_mlp": 2, "bwd_attn": 3, "loss": 3, "emb": 2, "bwd_peak": 3,
          "fwd_enc": 2, "fwd_dec": 2, "bwd_enc": 3, "bwd_dec": 3}
ARCHS = ["nanochat", "llama", "t5"]
# T5's whole-graph backward peak has more terms than points for four planes. The decoders'
# whole-graph backward peaks at four different ops over the calibration set (nanochat's fit
# with three planes: 2.8 % rms, worst 18 %; llama's under 16-bit compute 1.8 %, worst 15 %).
ARCH_PLANES = {"nanochat": dict(PLANES, bwd_peak=4), "llama": dict(PLANES, bwd_peak=4),
               "t5": dict(PLANES, bwd_peak=3)}


# Stages whose planes are fitted with non-negative coefficients: every unit of the loss
# grows with the step, and least squares over its noise (gemm's scratch for the head's
# matmuls, blocked by cache sizes) gave planes that fell as the rows grew (-309 bytes a
# row in one, and a peak 2.6 % lower at 272 rows than at 256; planner/tests/properties.rs).
NONNEG = {"loss"}
ARCH_NONNEG = {("t5", "bwd_peak")}


def fit(args):
    import numpy as np

    rows = parse(args.path)
    fits, quality = {}, {}
    for arch in [a for a in ARCHS if any(c["arch"] == a for c in rows)]:
        fits[arch], quality[arch] = {}, {}
        print(f"== {arch}")
        stages = sorted({s for c in rows if c["arch"] == arch for s in targets(c)})
        for stage in stages:
            data = [(basis(stage, c, units(c)), targets(c)[stage]) for c in rows
                    if c["arch"] == arch and stage in targets(c)]
            keys = list(data[0][0].keys()) + ["one"]
            X = np.array([[b.get(k, 1.0) for k in keys] for b, _ in data])
            y = np.array([float(t) for _, t in data])
            planes = ARCH_PLANES[arch].get(stage, 1)
            coef, pred = fit_planes(np, X, y, planes, nonneg=stage in NONNEG or (arch, stage) in ARCH_NONNEG)
            fits[arch][stage] = (keys, coef)
            rel = (pred - y) / y
            quality[arch][stage] = (100 * np.sqrt(np.mean(rel ** 2)), 100 * np.max(np.abs(rel)))
            print(f"  {stage:<12} n={len(y):>3} rms {100 * np.sqrt(np.mean(rel ** 2)):.2f} % worst {100 * np.max(np.abs(rel)):.2f} %")
            for cf in coef:
                print("    " + toml_plane(keys, cf))
    if args.write:
        open(args.write, "w").write(data_file(fits, quality, rows, args))
        print(f"written to {args.write}")


STAGE_NAMES = {"fwd_attn": "a half's forward, attention", "fwd_mlp": "a half's forward, MLP",
               "bwd_attn": "a half's recompute and backward, attention",
               "bwd_mlp": "a half's recompute and backward, MLP",
               "loss": "the loss stage", "emb": "the embedding's backward",
               "graph": "without checkpointing, the graph kept", "fwd_peak": "the forward's peak",
               "bwd_peak": "the whole graph's backward", "opt": "AdamW"}
T5_STAGE_NAMES = {"fwd_enc": "an encoder block's forward", "enc_out": "the encoder's final norm and the decoder's embedding",
                  "fwd_dec": "a decoder block's forward", "dec_out": "the decoder's final norm and scale",
                  "loss": "the loss stage", "bwd_dec_out": "the decoder's final norm backward, the encoder-gradient buffer",
                  "bwd_dec": "a decoder block's recompute and backward",
                  "bwd_enc_out": "the encoder's final norm backward",
                  "bwd_enc": "an encoder block's recompute and backward", "emb": "the shared embedding's backward",
                  "graph": "without checkpointing, the graph kept", "fwd_peak": "the forward's peak",
                  "bwd_peak": "the whole graph's backward", "opt": "AdamW"}

# The variables whose calibrated range the data file records, in f32 elements (the
# units' bytes / 4): the planner warns when a run falls outside it.
DOMAIN = ["n", "nc", "nq", "nkv", "nq1", "nkv1", "ni", "s", "rv", "rc", "vc", "bht", "td", "cq", "ckv", "ci", "adam", "hpack"]
T5_DOMAIN = ["n", "nc", "nq", "nq1", "ni", "gni", "s", "rv", "rc", "vc", "bht", "cq", "ci", "gci", "tab", "adam", "hpack"]


def domain(rows, arch):
    """Min and max of each unit (and of the layer counts) over one arch's calibration set."""
    cs = [c for c in rows if c["arch"] == arch]
    vals = {"layers": [c["layers"] for c in cs]}
    if arch == "t5":
        vals["dec_layers"] = [c["dec"] for c in cs]
    for k in T5_DOMAIN if arch == "t5" else DOMAIN:
        vals[k] = [(adam_peak(c) if k == "adam" else units(c)[k]) / 4.0 for c in cs]
    return {k: (min(v), max(v)) for k, v in vals.items()}


def toml_plane(keys, cf):
    """One plane: the intercept and its (coefficient, unit) terms, rounded as the planner
    has always used them (three decimals, four for AdamW's, the intercept to 0.1 byte)."""
    terms = ", ".join(f'[{v:.4f}, "{k}"]' if k == "adam" else f'[{v:.3f}, "{k}"]'
                      for k, v in zip(keys, cf) if k != "one")
    return f"{{ intercept = {cf[-1]:.1f}, terms = [{terms}] }}"


def data_file(fits, quality, rows, args):
    """The planner's data file for one precision (planner/data/candle_{f32,f16}.toml)."""
    text = open(args.path).read()
    half = kernels(text) is None
    data = os.path.relpath(args.path)
    if half:
        head = ["The candle engine's working sets with 16-bit compute over f32 master weights",
                '(precision = "bf16-autocast" on CUDA, "fp16-autocast"), fitted to the engine run in',
                "f16 on the CPU (candle's CPU matmul has no bf16; both are 2-byte dtypes through the",
                f"same graph) over {len(rows)} configurations, counting tensors alone: gemm's CPU packing",
                "scratch is left out, since a GPU's matmul has none."]
    else:
        k = kernels(text)
        head = ['The candle engine\'s working sets in f32 (precision = "fp32"), fitted to the engine',
                f"on the CPU over {len(rows)} configurations, counting the whole heap: on the CPU gemm's",
                f"packing scratch is real memory, and differs with its kernels (these: {dict(avx2='AVX2', avx512='AVX-512')[k]},",
                f'`cpu_kernels = "{k}"`).']
    head += [f"Written by `python3 tools/calibrate_candle.py fit {data} --write <this file>`.",
             "Each stage's working set (bytes above the live bytes before it) is the largest of its",
             "planes; a plane is an intercept plus (coefficient, unit) terms over the step's sizes",
             "in f32 bytes (`Units` in planner/src/candle_engine/working_sets.rs); `L*x` is the",
             "layer count times x, `L1*x` (layers - 1) times x, `mvc` the head matrix when the loss",
             "runs in more than one chunk, `adam` AdamW's peak from the parameters' sizes in update",
             "order. rms and worst: the fit's relative error over the calibration set, in percent.",
             "domain: each unit's min and max over the calibration set, in f32 elements (bytes / 4)."]
    out = ["# " + l for l in head]
    out += ["", f'compute = "{"f16" if half else "f32"}"']
    out += [] if half else [f'kernels = "{kernels(text)}"']
    out += [f'data = "{data}"', f"configurations = {len(rows)}"]
    for arch in fits:
        out += ["", f"[{arch}.domain]"]
        for k, (lo, hi) in domain(rows, arch).items():
            out.append(f"{k} = [{lo:.0f}, {hi:.0f}]")
        names = T5_STAGE_NAMES if arch == "t5" else STAGE_NAMES
        for stage in names:
            keys, planes = fits[arch][stage]
            rms, worst = quality[arch][stage]
            out += ["", f"# {names[stage]}", f"[{arch}.{stage}]", f"rms = {rms:.2f}", f"worst = {worst:.2f}",
                    "planes = ["]
            out += [f"    {toml_plane(keys, cf)}," for cf in planes]
            out.append("]")
    return "\n".join(out) + "\n"


def fit_planes(np, X, y, planes, restarts=400, nonneg=False):
    """The larger of `planes` linear forms, by alternating assignment (each point to the
    plane that is largest there, each plane refitted on its points) from seeded random
    starts; relative least squares. With `nonneg` every coefficient but the intercept (the
    last column) is at least 0 (scipy's `nnls`)."""
    w = 1.0 / y

    def lsq(idx):
        A = X[idx] * w[idx, None]
        b = np.ones(idx.sum())
        if not nonneg:
            return np.linalg.lstsq(A, b, rcond=None)[0]
        from scipy.optimize import nnls
        # The intercept as the difference of two non-negative columns.
        c = nnls(np.hstack([A, -A[:, -1:]]), b, maxiter=50 * A.shape[1])[0]
        return np.concatenate([c[:-2], [c[-2] - c[-1]]])

    if planes == 1:
        c = lsq(np.ones(len(y), bool))
        return [c], X @ c
    rng = np.random.default_rng(0)
    best = None
    for _ in range(restarts):
        assign = rng.integers(0, planes, len(y))
        for _ in range(50):
            if any((assign == j).sum() < X.shape[1] for j in range(planes)):
                break
            cs = [lsq(assign == j) for j in range(planes)]
            P = np.stack([X @ c for c in cs])
            pred = P.max(0)
            err = np.sqrt(np.mean(((pred - y) / y) ** 2))
            if best is None or err < best[0]:
                best = (err, cs, pred)
            new = P.argmax(0)
            if (new == assign).all():
                break
            assign = new
    if best is None:  # too few points for this many planes
        return fit_planes(np, X, y, planes - 1, restarts, nonneg)
    return best[1], best[2]


def adam_peak(c):
    """AdamW's update built from tensor ops (the engine's off the CPU) runs over the
    parameters in name order, making about four f32 copies of each while the gradients
    before it are already freed: the largest `4·bytes(p) − bytes(gradients before p)`, or
    the gradient norm's square of the largest gradient if that is more (what the planner
    computes off the CPU). On the CPU the update is in place: the measured `opt` stage is
    a constant of about 0.5 KiB, and the fit's coefficient of this unit comes out near 0."""
    C, H, KV, D, I, V, L = (c[k] for k in ["hidden", "heads", "kv", "head_dim", "ffn", "vocab", "layers"])
    q, kv = H * D, KV * D
    if c["arch"] == "t5":
        p = t5_params(c)
    elif c["arch"] == "nanochat":
        p = [("wte.weight", V * C), ("lm_head.weight", V * C)]
        for l in range(L):
            p += [(f"layers.{l}.attn.c_q.weight", q * C), (f"layers.{l}.attn.c_k.weight", kv * C),
                  (f"layers.{l}.attn.c_v.weight", kv * C), (f"layers.{l}.attn.c_proj.weight", C * q),
                  (f"layers.{l}.mlp.c_fc.weight", I * C), (f"layers.{l}.mlp.c_proj.weight", C * I)]
    else:
        p = [("embed_tokens.weight", V * C), ("norm.weight", C)]
        for l in range(L):
            p += [(f"layers.{l}.self_attn.q_proj.weight", q * C), (f"layers.{l}.self_attn.k_proj.weight", kv * C),
                  (f"layers.{l}.self_attn.v_proj.weight", kv * C), (f"layers.{l}.self_attn.o_proj.weight", C * q),
                  (f"layers.{l}.mlp.gate_proj.weight", I * C), (f"layers.{l}.mlp.up_proj.weight", I * C),
                  (f"layers.{l}.mlp.down_proj.weight", C * I), (f"layers.{l}.input_layernorm.weight", C),
                  (f"layers.{l}.post_attention_layernorm.weight", C)]
    done, peak = 0, float("-inf")
    for _, n in sorted(p):
        peak = max(peak, 4 * 4 * n - done)
        done += 4 * n
    # The gradient norm squares each gradient while all of them are live.
    return float(max(peak, 4 * max(n for _, n in p)))


def t5_params(c):
    """(name, numel) of a T5 as the planner lists them (planner/src/params.rs, `t5`)."""
    C, H, D, I, V = (c[k] for k in ["hidden", "heads", "head_dim", "ffn", "vocab"])
    q = H * D
    p = [("shared.weight", V * C), ("encoder.final_layer_norm.weight", C), ("decoder.final_layer_norm.weight", C)]
    for l in range(c["layers"] + c["dec"]):
        stacks = ["self_attn"] + (["cross_attn"] if l >= c["layers"] else [])
        for a in stacks:
            p += [(f"layers.{l}.{a}.{w}.weight", q * C) for w in "qkvo"]
            p.append((f"layers.{l}.{a}.layer_norm.weight", C))
        if l in (0, c["layers"]):
            p.append((f"layers.{l}.self_attn.relative_attention_bias", 32 * H))
        wi = ["wi_0", "wi_1"] if c["gated"] else ["wi"]
        p += [(f"layers.{l}.ffn.{w}.weight", I * C) for w in wi + ["wo"]]
        p.append((f"layers.{l}.ffn.layer_norm.weight", C))
    return p


def plan_toml(c, precision):
    """The plan `vramplan estimate` reads for configuration c (T5: its decoder layers,
    gated feed-forward and tied head)."""
    if c["arch"] == "t5":
        model = (f"num_decoder_layers = {c['dec']}\n"
                 f"tie_embeddings = true\ngated_ffn = {'true' if c['gated'] else 'false'}\n")
    else:
        model = (f"num_kv_heads = {c['kv']}\n"
                 f"tie_embeddings = {'true' if c['arch'] == 'llama' else 'false'}\n")
    return f"""[model]
name = "calibration"
arch = "{c['arch']}"
hidden_size = {c['hidden']}
num_layers = {c['layers']}
num_heads = {c['heads']}
head_dim = {c['head_dim']}
intermediate_size = {c['ffn']}
vocab_size = {c['vocab']}
{model}[train]
micro_batch = {c['batch']}
seq_len = {c['seq']}
precision = "{precision}"
checkpointing = "{'full' if c['ckpt'] else 'none'}"
loss = "chunked"
loss_chunk = {c['chunk']}
optimizer = "adamw"
engine = "candle"
[hardware]
gpu = "cpu"
"""


def check(args):
    """The planner's step peak (`vramplan estimate`) against each configuration's measured
    step (its high-water mark above the model, plus the f32 weights)."""
    import json

    rows = parse(args.path)
    dtype = "f16" if "compute dtype f16" in open(args.path).read(400) else "f32"
    precision = "fp16-autocast" if dtype == "f16" else "fp32"
    errs = {True: [], False: []}
    with tempfile.TemporaryDirectory() as d:
        for i, c in enumerate(rows):
            path = os.path.join(d, f"p{i}.toml")
            open(path, "w").write(plan_toml(c, precision))
            out = subprocess.run([args.binary, "estimate", "--json", path], capture_output=True, text=True)
            if out.returncode != 0:
                sys.exit(out.stderr)
            pred = json.loads(out.stdout)["peak_allocated_bytes"]
            weights = json.loads(out.stdout)["components"].get("weights", 0)
            meas = c["step"] + weights
            errs[bool(c["ckpt"])].append((pred - meas) / meas)
    for ck, e in errs.items():
        a = [abs(x) for x in e]
        rms = (sum(x * x for x in e) / len(e)) ** 0.5
        print(f"{'with' if ck else 'without'} checkpointing: {sum(x <= 0.02 for x in a)} of {len(a)} within 2 %, "
              f"rms {100 * rms:.2f} %, worst {100 * max(e, key=abs):+.2f} %")


def main():
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--dtype", default="f32", choices=["f32", "f16"])
    m.add_argument("--count", type=int, default=300)
    m.add_argument("--seed", type=int, default=1)
    m.add_argument("--checkpointed", type=float, default=0.5, help="share of checkpointed configurations")
    m.add_argument("--arch", default="decoder", choices=["decoder", "t5"],
                   help="draw decoder-only configurations (nanochat and llama) or T5 ones")
    m.add_argument("--append", action="store_true", help="add to --out rather than replace it")
    m.add_argument("--out", required=True)
    m.add_argument("--binary", help="a built vramplan to run (default: cargo run --release); "
                   "the allocations do not depend on the build profile")
    m.add_argument("--tensors", action="store_true",
                   help="count tensors only, leaving out gemm's 64-byte-aligned packing scratch (what a GPU allocates)")
    r = sub.add_parser("remeasure")
    r.add_argument("path")
    r.add_argument("--out", required=True)
    r.add_argument("--binary", help="a built vramplan to run (default: cargo run --release)")
    r.add_argument("--note", help="added to each section's comment, e.g. the build that measured it")
    f = sub.add_parser("fit")
    f.add_argument("path")
    f.add_argument("--write", metavar="FILE", help="write the planner's data file (planner/data/candle_f32.toml or candle_f16.toml)")
    k = sub.add_parser("check")
    k.add_argument("path")
    k.add_argument("--binary", default="target/release/vramplan")
    args = ap.parse_args()
    {"measure": measure, "remeasure": remeasure, "fit": fit, "check": check}[args.cmd](args)


if __name__ == "__main__":
    main()
