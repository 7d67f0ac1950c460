#!/usr/bin/env python3
"""Ground truth for the torch engine's implementation profiles and for torch.compile:
peak live memory of ONE steady-state training step of each framework's own model code,
eager and compiled, measured on the CPU with the profiler's memory timeline.

Usage:
    python tools/measure_frameworks.py [--set frameworks|torchtitan] [--out FILE] [--only ID_SUBSTRING]

The method is tools/measure_torch.py's (warm-up step, then one profiled step; peak = max
of export_memory_timeline(device="cpu") summed over categories): this script imports its
measurement (`measure`) and its model builders and only supplies a different `setup`, the
one that builds each framework's model and loss and compiles them as that framework does.

Implementations (train.implementation):
  * hf: transformers' LlamaForCausalLM / Qwen2ForCausalLM (`loss = model(x, labels=x).loss`,
    ForCausalLMLoss inside the model's forward), as measure_torch.py builds it.
    Compiled like a user script does: `model.compile()` (the whole forward, loss included).
  * nanochat: measure_torch.py's re-implementation of nanochat/gpt.py (October 2025).
    Compiled as nanochat's base_train does: `torch.compile(model, dynamic=False)`.
    The `wte-bf16` runs (`train.embedding_dtype = "bf16"`) cast the token embedding to
    bf16 as nanochat's `init_weights` does on CUDA, so its gradient and its AdamW state
    are bf16 and the residual stream is bf16 from the embedding on (CPU autocast: the
    parameter-free `F.rms_norm` keeps its input's dtype, as CUDA's autocast of torch 2.8
    does; see docs/model.md for what CUDA's autocast does differently).
  * torchtune (0.6.1): `torchtune.models.llama3._component_builders.llama3` (a
    TransformerDecoder of TransformerSelfAttentionLayer), the loss
    `torchtune.modules.loss.CEWithChunkedOutputLoss` (8 output chunks, the model's
    `set_num_output_chunks`) as its recipes configure it. Compiled with its own
    `torchtune.training.compile_model` (each layer) and `compile_loss` (the chunk's
    upcast + cross-entropy), as the recipes do under `compile: True`.
  * torchtitan (0.3.0): `torchtitan.models.llama3.Llama3Model` built from its own layer
    builder (`_build_llama3_layers`: fused `wqkv`, ComplexRoPE, SiLU-gated MLP, its
    initialisation), the loss its training configs use: `ChunkedLossWrapper` (8 chunks of
    the sequence, `lm_head` and a per-chunk backward inside the loss call; loss `chunked`)
    over `CrossEntropyLoss`, or `CrossEntropyLoss` over the whole logits (loss
    `float-cast`, its `llama3_debugmodel_ce_loss`). Checkpointing with its own
    `FullAC` (`full`) and `SelectiveAC` (`selective-op`: its op save list, every second
    matmul recomputed). Compiled as its `apply_compile` does (each block,
    `fullgraph=True`) with the loss function compiled through `CompileConfig`. One
    substitution: its language-model attention is flex attention, whose backward does
    not run on the CPU, so the inner attention is torchtitan's own
    `ScaledDotProductAttention` module (causal SDPA; the same q, k, v, output and
    log-sum-exp are saved; flex's block mask, a few index tensors, is not made).

torch.compile runs inductor's C++ backend on the CPU; its generated kernels allocate
through the same allocator, so the memory timeline sees every buffer. The first (warm-up)
step compiles; the profiled step runs the compiled code.
"""

import argparse
import contextlib
import gc
import importlib.metadata
import json
import os
import platform
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure_torch as mt  # noqa: E402


def _train(b, s, prec, impl, compiled, loss="float-cast", wte=None):
    t = mt._train(b, s, prec)
    t["loss"] = loss
    t["implementation"] = impl
    t["compile"] = compiled
    if wte:
        t["embedding_dtype"] = wte
    return t


def _run_id(m, t):
    parts = [mt._run_id(m, t)]
    if t["implementation"] != ("nanochat" if m["arch"] == "nanochat" else "hf"):
        parts.append(t["implementation"])
    parts += [t["loss"], "compiled" if t["compile"] else "eager"]
    return "-".join(parts)


def configs():
    L, Q = "llama", "qwen2"
    runs = []
    for compiled in (True,):
        for prec in ("fp32", "bf16-autocast", "bf16"):
            runs += [
                (mt._nanochat(256, 4, 32768), _train(2, 256, prec, "nanochat", compiled)),
                (mt._llama_like(L, 256, 4, 4, 2, 688, 32000, True), _train(2, 256, prec, "hf", compiled)),
            ]
        runs += [
            (mt._nanochat(512, 6, 4096), _train(4, 512, "bf16-autocast", "nanochat", compiled)),
            (mt._nanochat(384, 3, 16384), _train(1, 512, "fp32", "nanochat", compiled)),
            (mt._nanochat(128, 2, 50000), _train(4, 256, "bf16-autocast", "nanochat", compiled)),
            (mt._llama_like(L, 512, 6, 8, 4, 1376, 4096, True), _train(4, 512, "bf16-autocast", "hf", compiled)),
            (mt._llama_like(L, 384, 3, 6, 6, 1024, 16000, False), _train(2, 512, "fp32", "hf", compiled)),
            (mt._llama_like(L, 128, 2, 4, 2, 344, 50000, False), _train(4, 512, "bf16-autocast", "hf", compiled)),
            (mt._llama_like(Q, 256, 4, 4, 2, 688, 32000, True), _train(2, 256, "bf16-autocast", "hf", compiled)),
            (mt._llama_like(Q, 384, 4, 6, 2, 1024, 8192, False), _train(2, 512, "fp32", "hf", compiled)),
            (mt._nanochat(128, 2, 8192), _train(2, 256, "fp32", "nanochat", compiled)),
            (mt._llama_like(L, 256, 2, 4, 4, 688, 8192, True), _train(2, 256, "bf16-autocast", "hf", compiled)),
            (mt._llama_like(Q, 256, 2, 4, 2, 688, 8192, False), _train(1, 512, "bf16", "hf", compiled)),
        ]
    # nanochat with the token embedding in bf16 (its init_weights on CUDA), eager and compiled.
    for compiled in (False, True):
        for m, b, s in ((mt._nanochat(256, 4, 32768), 2, 256), (mt._nanochat(512, 6, 4096), 4, 512),
                        (mt._nanochat(128, 2, 50000), 4, 256)):
            runs.append((m, _train(b, s, "bf16-autocast", "nanochat", compiled, wte="bf16")))
    tune = mt._llama_like(L, 256, 4, 4, 2, 688, 32000, False)
    tune_big = mt._llama_like(L, 512, 4, 8, 8, 1376, 8192, False)
    for compiled in (False, True):
        for prec in ("fp32", "bf16-autocast", "bf16"):
            runs.append((tune, _train(2, 256, prec, "torchtune", compiled, "chunked")))
        runs.append((tune_big, _train(2, 512, "bf16-autocast", "torchtune", compiled, "chunked")))
    # Held out from the chunked loss's backward order (measured after it was modelled).
    tune_mid = mt._llama_like(L, 384, 2, 6, 2, 1024, 16384, False)
    for prec in ("fp32", "bf16"):
        runs.append((tune_mid, _train(4, 128, prec, "torchtune", False, "chunked")))
    return _with_ids(runs)


def _with_ids(runs):
    out = []
    for m, t in runs:
        out.append({"id": _run_id(m, t), "model": m, "train": t, "hardware": {"gpu": "cpu"}})
    ids = [c["id"] for c in out]
    assert len(ids) == len(set(ids)), "duplicate run ids"
    return out


def torchtitan_configs():
    """torchtitan's Llama (`--set torchtitan`): eager and compiled, its losses,
    checkpointing and precisions."""
    L = "llama"
    small = mt._llama_like(L, 256, 3, 4, 2, 688, 4096, False)
    wide = mt._llama_like(L, 512, 2, 8, 8, 1376, 8192, False)
    tied = mt._llama_like(L, 256, 2, 4, 4, 688, 32000, True)

    def tt(b, s, prec, compiled, loss="chunked", ckpt="none"):
        t = _train(b, s, prec, "torchtitan", compiled, loss)
        t["checkpointing"] = ckpt
        return t

    runs = []
    for prec in ("fp32", "bf16"):
        for ckpt in ("none", "full", "selective-op"):
            runs.append((small, tt(8, 512, prec, False, ckpt=ckpt)))
        runs.append((small, tt(8, 512, prec, True)))
        runs.append((small, tt(8, 512, prec, False, "float-cast")))
        runs.append((small, tt(8, 512, prec, True, "float-cast")))
    runs += [
        (wide, tt(4, 512, "bf16", False)),
        (wide, tt(4, 512, "bf16", True)),
        (wide, tt(4, 512, "bf16", False, ckpt="selective-op")),
        (tied, tt(2, 1024, "fp32", False)),
        (tied, tt(2, 1024, "fp32", True)),
        (tied, tt(8, 256, "bf16", False, ckpt="full")),
    ]
    # Compiled over its full checkpoint wrapper, as torchtitan's configs can combine them.
    for prec in ("fp32", "bf16"):
        runs.append((small, tt(8, 512, prec, True, ckpt="full")))
    # Compiled over SelectiveAC: the partitioner saves the policy's kept mm outputs only
    # where backward reads them.
    for prec in ("fp32", "bf16"):
        runs.append((small, tt(8, 512, prec, True, ckpt="selective-op")))
    runs += [
        (wide, tt(4, 512, "bf16", True, ckpt="selective-op")),
        (small, tt(8, 512, "fp32", True, "float-cast", ckpt="selective-op")),
        (tied, tt(2, 1024, "fp32", True, ckpt="selective-op")),
    ]
    # Held out from the rule that backward recomputes the normalized block input last.
    mlp = mt._llama_like(L, 384, 2, 6, 2, 1536, 4096, False)
    mha = mt._llama_like(L, 256, 2, 4, 4, 1024, 2048, False)
    runs += [
        (mlp, tt(4, 512, "bf16", True, ckpt="selective-op")),
        (mha, tt(4, 1024, "fp32", True, ckpt="selective-op")),
    ]
    return _with_ids(runs)


def build_torchtitan(cfg):
    """torchtitan's Llama 3 and its loss, as its trainer wires them; returns (model, fwd)."""
    import torchtitan.models.llama3 as tl
    from torchtitan.components.loss import ChunkedLossWrapper, CrossEntropyLoss
    from torchtitan.config import CompileConfig
    from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC
    from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
    from torchtitan.models.common.attention import ScaledDotProductAttention

    m, t = cfg["model"], cfg["train"]
    h, v, heads = m["hidden_size"], m["vocab_size"], m["num_heads"]
    layers = tl._build_llama3_layers(
        n_layers=m["num_layers"], dim=h, n_heads=heads, n_kv_heads=m["num_kv_heads"],
        hidden_dim=m["intermediate_size"], attn_backend="flex",
        rope=ComplexRoPE.Config(dim=h // heads, max_seq_len=t["seq_len"], theta=500000,
                                scaling="llama"),
    )
    for layer in layers:
        # Flex attention's backward does not run on the CPU (see the module docstring).
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    config = tl.Llama3Model.Config(
        dim=h, vocab_size=v, enable_weight_tying=m["tie_embeddings"],
        tok_embeddings=Embedding.Config(num_embeddings=v, embedding_dim=h,
                                        param_init=tl._EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=h, param_init=tl._NORM_INIT),
        lm_head=Linear.Config(in_features=h, out_features=v,
                              param_init=tl._output_linear_init(h)),
        layers=layers,
    )
    model = config.build()
    model.init_states()
    ac = {"none": None, "full": FullAC.Config(), "selective-op": SelectiveAC.Config()}
    if ac[t["checkpointing"]] is not None:
        ac[t["checkpointing"]].build().apply(model)
    compile_config = CompileConfig(enable=t["compile"], components=["model", "loss"])
    if t["compile"]:
        from types import SimpleNamespace

        from torchtitan.distributed.compile import apply_compile

        apply_compile(model, compile_config=compile_config,
                      parallel_dims=SimpleNamespace(tp_enabled=False))
    ce = CrossEntropyLoss.Config(global_vocab_size=v)
    if t["loss"] == "chunked":
        loss_fn = ChunkedLossWrapper.Config(loss_fn=ce).build(compile_config=compile_config)
        loss_fn.set_lm_head(model.lm_head)
        model._skip_lm_head = True
    elif t["loss"] == "float-cast":
        loss_fn = ce.build(compile_config=compile_config)
    else:
        raise ValueError("torchtitan runs are measured with loss chunked or float-cast")
    b, s = t["micro_batch"], t["seq_len"]
    valid = torch.tensor(b * s)

    def fwd(x):
        pred = model(x)
        loss, _ = loss_fn(pred, x, valid)
        return loss

    return model, fwd


def build_torchtune(cfg):
    """torchtune's Llama 3 decoder and its chunked loss; returns (model, loss_fn, fwd)."""
    from torchtune.models.llama3._component_builders import llama3
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    m, t = cfg["model"], cfg["train"]
    if m["tie_embeddings"]:
        raise ValueError("torchtune's llama3 builder has an untied output projection")
    if t["loss"] != "chunked":
        raise ValueError("torchtune runs are measured with CEWithChunkedOutputLoss")
    model = llama3(
        vocab_size=m["vocab_size"],
        num_layers=m["num_layers"],
        num_heads=m["num_heads"],
        num_kv_heads=m["num_kv_heads"],
        embed_dim=m["hidden_size"],
        max_seq_len=max(2048, t["seq_len"]),
        intermediate_dim=m["intermediate_size"],
    )
    loss_fn = CEWithChunkedOutputLoss()
    model.set_num_output_chunks(loss_fn.num_output_chunks)
    return model, loss_fn


def setup(cfg):
    """measure_torch.setup with each framework's model, loss and compile."""
    torch.manual_seed(0)
    m, t = cfg["model"], cfg["train"]
    impl, compiled = t["implementation"], t["compile"]
    # A fresh dynamo cache per run: past its recompile limit dynamo would silently run a
    # later run's loss eagerly.
    torch._dynamo.reset()
    if impl == "torchtune":
        from torchtune import training

        model, loss_fn = build_torchtune(cfg)
        if compiled:
            training.compile_model(model, verbose=False)
            loss_fn = training.compile_loss(loss_fn, verbose=False)

        def fwd(x):
            return loss_fn(model(x), x)

    elif impl == "torchtitan":
        # Compiled inside the builder, as torchtitan's parallelize_llama does it.
        model, fwd = build_torchtitan(cfg)
    else:
        model, fwd = mt.build_model(cfg)
        if compiled:
            # nanochat's base_train: torch.compile(model, dynamic=False); for HF the same
            # call on the causal-LM module (its forward includes ForCausalLMLoss).
            model.compile(dynamic=False)
    if t["precision"] == "bf16":
        model.to(torch.bfloat16)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    xs = [torch.randint(0, m["vocab_size"], (t["micro_batch"], t["seq_len"]))]
    if t["precision"] == "bf16-autocast":
        autocast_ctx = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    else:
        autocast_ctx = contextlib.nullcontext

    def step():
        for x in xs:
            with autocast_ctx():
                loss = fwd(x)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"model": model, "opt": opt, "xs": xs, "step": step, "fwd": fwd,
            "autocast_ctx": autocast_ctx}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--set", choices=sorted(SETS), default="frameworks",
                    help="which runs: frameworks (tests/data/torch_frameworks.json) or "
                         "torchtitan (tests/data/torch_torchtitan.json)")
    ap.add_argument("--out", default=None, help="default: the set's file")
    ap.add_argument("--only", default=None, help="run only configs whose id contains this")
    ap.add_argument("--list", action="store_true", help="list run ids and exit")
    args = ap.parse_args()

    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    # measure_torch.measure builds each run through the module's `setup`.
    mt.setup = setup

    configs_of, default_out = SETS[args.set]
    args.out = args.out or default_out
    cfgs = configs_of()
    if args.only:
        cfgs = [c for c in cfgs if args.only in c["id"]]
    if args.list:
        for c in cfgs:
            print(c["id"])
        return
    old, versions = [], {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            data = json.load(f)
        old, tool = data.get("runs", []), data.get("tool", {})
        versions = {k: tool.get(k) for k in ("torchtune", "torchtitan")}
    for name in ("torchtune", "torchtitan"):
        if any(c["train"]["implementation"] == name for c in cfgs):
            versions[name] = __import__(name).__version__ if name == "torchtune" else (
                importlib.metadata.version(name))
    runs = []
    for cfg in cfgs:
        r = mt.measure(cfg)
        runs.append(r)
        print(
            f"{r['id']:<90} peak {r['peak_bytes']:>12} B ({r['peak_bytes'] / 2**20:8.1f} MiB)"
            f"  at {r['peak_time_fraction']:.2f} near {r['peak_near_op']}  [{r['seconds']} s]",
            flush=True,
        )
        gc.collect()
        _write(args.out, old, runs, transformers.__version__, versions, configs_of)


def _write(path, old, runs, tf_version, versions, configs_of):
    """Writes after every run (a long measurement keeps what it has), merging by id."""
    order = [c["id"] for c in configs_of()]
    new_ids = {r["id"] for r in runs}
    merged = [r for r in old if r["id"] not in new_ids and r["id"] in order] + runs
    merged.sort(key=lambda r: order.index(r["id"]))
    out = {
        "tool": {
            "torch": torch.__version__.split("+")[0],
            "transformers": tf_version,
            "torchtune": versions.get("torchtune"),
            "torchtitan": versions.get("torchtitan"),
            "python": platform.python_version(),
        },
        "method": (
            "tools/measure_torch.py's measurement (one steady-state step after a warm-up step, "
            "profiler memory timeline on the CPU, peak over all categories) of each "
            "framework's own model and loss: hf = transformers LlamaForCausalLM / "
            "Qwen2ForCausalLM with labels (ForCausalLMLoss); nanochat = measure_torch.py's "
            "nanochat GPT; torchtune = torchtune 0.6.1 llama3 component builder with "
            "CEWithChunkedOutputLoss (8 chunks); torchtitan = torchtitan 0.3.0 Llama3Model "
            "from its layer builder with its ScaledDotProductAttention module as the inner "
            "attention (flex attention's backward does not run on the CPU), ChunkedLossWrapper "
            "(8 chunks, loss chunked) or CrossEntropyLoss (float-cast), FullAC / SelectiveAC. The wte-bf16 nanochat runs cast the token "
            "embedding to bf16 before the optimizer is made (nanochat's init_weights on CUDA). "
            "compile: hf and nanochat "
            "model.compile(dynamic=False) (inductor, C++ backend on the CPU); torchtune "
            "training.compile_model (per layer) and training.compile_loss; torchtitan "
            "apply_compile (per block, fullgraph) and the loss through CompileConfig. The warm-up step "
            "compiles. AdamW(lr=1e-4, weight_decay=0.1), torch.set_num_threads(2), seed 0."
        ),
        "runs": merged,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


SETS = {
    "frameworks": (configs, "tests/data/torch_frameworks.json"),
    "torchtitan": (torchtitan_configs, "tests/data/torch_torchtitan.json"),
}


if __name__ == "__main__":
    main()
