#!/usr/bin/env python3
"""Ground truth for the torch regimes on CPU: optimizer implementations, checkpointing
policies, the optimizer stepped inside backward, and bf16 compute over fp32 masters.

Usage:
    python tools/measure_regimes.py [--out tests/data/torch_regimes.json] [--only ID_SUBSTRING]

Same method as tools/measure_torch.py (its helpers are imported, not copied): one warm-up
step, then exactly one profiled step under torch.profiler with the memory timeline; the
peak is the maximum over time of export_memory_timeline(device="cpu"). Only the training
step differs, per regime:

  optimizer        adamw-single  torch.optim.AdamW(foreach=False)
                   adamw-foreach torch.optim.AdamW(foreach=True)
                   adamw-fused   torch.optim.AdamW(fused=True)
                   sgd           torch.optim.SGD(momentum=0.9)
                   adafactor     transformers.optimization.Adafactor(lr=1e-3, relative_step=False,
                                 scale_parameter=False, warmup_init=False)
                   muon          torch.optim.Muon over the 2-D block matrices, AdamW over the rest
                                 (the split of nanochat's setup_optimizers)
                   adamw-8bit    bitsandbytes.optim.AdamW8bit
                   torchao-adamw-8bit / -4bit  torchao.optim.AdamW8bit / AdamW4bit
  checkpointing    every-N       model.gradient_checkpointing_enable(every_n_layers=N)
                                 (transformers: layer_index % N == 0 is checkpointed)
                   selective-op  every decoder layer under torch.utils.checkpoint with
                                 context_fn = create_selective_checkpoint_contexts(policy), the
                                 policy of torchtitan's activation_checkpoint.py (_save_list of
                                 aten.mm and the attention kernels; every second mm recomputed)
  optimizer_in_backward  torchtune's optimizer_in_bwd: one optimizer per parameter, stepped
                   and zeroed in a register_post_accumulate_grad_hook
  bf16-mixed       the model in bf16 (compute weights), fp32 master copies owned by the
                   optimizer; after backward every master gets p.grad.float() (reduce in
                   fp32), the bf16 gradients are dropped, the optimizer steps the masters and
                   the bf16 weights are copied from them (DeepSpeed's bf16 optimizer order).
"""

import argparse
import contextlib
import functools
import gc
import json
import os
import platform
import sys
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure_torch as mt  # noqa: E402

LLAMA_A = mt._llama_like("llama", 256, 4, 4, 2, 688, 32000, True)
LLAMA_B = mt._llama_like("llama", 512, 6, 8, 4, 1376, 4096, True)
QWEN_C = mt._llama_like("qwen2", 384, 4, 6, 2, 1024, 8192, False)
# Parameters dominate (short sequences): the optimizer step is the peak.
LLAMA_D = mt._llama_like("llama", 512, 4, 8, 4, 1376, 8192, False)


def _t(b, s, prec, opt="adamw", ckpt="none", in_bwd=False):
    t = mt._train(b, s, prec, "sdpa", ckpt)
    t["optimizer"] = opt
    if in_bwd:
        t["optimizer_in_backward"] = True
    return t


def configs():
    A = (LLAMA_A, 2, 256)
    B = (LLAMA_B, 4, 512)
    C = (QWEN_C, 2, 512)
    D = (LLAMA_D, 1, 64)
    runs = []
    for opt in ["adamw-single", "adamw-foreach", "adamw-fused", "sgd", "adafactor", "muon",
                "adamw-8bit", "torchao-adamw-8bit", "torchao-adamw-4bit"]:
        runs.append((A, _t(A[1], A[2], "fp32", opt)))
    for opt in ["adamw-foreach", "adamw-fused", "sgd", "adafactor", "muon", "adamw-8bit",
                "torchao-adamw-8bit"]:
        runs.append((C, _t(C[1], C[2], "bf16-autocast", opt)))
    for m in (A, B, C):
        for ck in ["every-2", "every-3"]:
            runs.append((m, _t(m[1], m[2], "fp32", ckpt=ck)))
    for ck in ["every-2", "every-3"]:
        runs.append((B, _t(B[1], B[2], "bf16-autocast", ckpt=ck)))
    for m in (A, B):
        runs.append((m, _t(m[1], m[2], "fp32", ckpt="selective-op")))
        runs.append((m, _t(m[1], m[2], "bf16-autocast", ckpt="selective-op")))
    for m in (A, B, C):
        runs.append((m, _t(m[1], m[2], "fp32", in_bwd=True)))
    runs.append((B, _t(B[1], B[2], "bf16-autocast", in_bwd=True)))
    runs.append((A, _t(A[1], A[2], "fp32", "adamw-fused", in_bwd=True)))
    for m in (A, B, C):
        runs.append((m, _t(m[1], m[2], "bf16-mixed")))
    for opt in ["adamw-single", "adamw-foreach", "adamw-fused", "sgd", "adafactor", "muon",
                "adamw-8bit", "torchao-adamw-8bit", "torchao-adamw-4bit"]:
        runs.append((D, _t(D[1], D[2], "fp32", opt)))
    runs.append((D, _t(D[1], D[2], "fp32", in_bwd=True)))
    runs.append((D, _t(D[1], D[2], "fp32", "adamw-foreach", in_bwd=True)))
    runs.append((D, _t(D[1], D[2], "bf16-mixed")))
    # Held out from the torchao CPU step buffers (measured after they were modelled): a
    # wider model whose step is its peak, and qwen2 under autocast with 4-bit states.
    E = (mt._llama_like("llama", 384, 2, 6, 2, 1024, 12288, False), 1, 32)
    for opt in ["torchao-adamw-8bit", "torchao-adamw-4bit"]:
        runs.append((E, _t(E[1], E[2], "fp32", opt)))
    runs.append((C, _t(C[1], C[2], "bf16-autocast", "torchao-adamw-4bit")))
    out = []
    for (m, _, _), t in runs:
        rid = mt._run_id(m, t) + "-" + t["optimizer"] + ("-inbwd" if t.get("optimizer_in_backward") else "")
        out.append({"id": rid, "model": m, "train": t, "hardware": {"gpu": "cpu"}})
    ids = [c["id"] for c in out]
    assert len(ids) == len(set(ids)), "duplicate run ids"
    return out


# --------------------------------------------------------------------------------------
# torchtitan's op-level selective checkpointing policy (torchtitan
# torchtitan/distributed/activation_checkpoint.py, _apply_op_sac / _get_custom_policy)
# --------------------------------------------------------------------------------------

def _save_list():
    ops = torch.ops.aten
    names = [
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_attention_math",
        "_scaled_dot_product_fused_attention_overrideable",
    ]
    s = {ops.mm.default, ops.max.default}
    s |= {getattr(ops, n).default for n in names if hasattr(ops, n)}
    return s


def selective_op_context():
    from collections import defaultdict

    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    save = _save_list()
    meta = defaultdict(int)

    def policy(ctx, func, *args, **kwargs):
        mode = "recompute" if ctx.is_recompute else "forward"
        key = f"{mode}_mm_count"
        if func == torch.ops.aten.mm.default:
            meta[key] += 1
        to_save = func in save and not (func == torch.ops.aten.mm.default and meta[key] % 2 == 0)
        return CheckpointPolicy.MUST_SAVE if to_save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


# --------------------------------------------------------------------------------------
# The step per regime
# --------------------------------------------------------------------------------------

class Opts:
    """Several optimizers stepped as one; `.state` is what check_preexisting reads (the
    plain tensors inside torchao's quantized states)."""

    def __init__(self, opts, masters=()):
        self.opts = list(opts)
        self.masters = list(masters)

    @property
    def state(self):
        out = {}
        for o in self.opts:
            for p, st in o.state.items():
                flat = {}
                for k, v in st.items():
                    if torch.is_tensor(v) and type(v) is not torch.Tensor and hasattr(v, "__tensor_flatten__"):
                        names, _ = v.__tensor_flatten__()
                        for n in names:
                            flat[f"{k}.{n}"] = getattr(v, n)
                    else:
                        flat[k] = v
                out[id(p), id(o)] = flat
        for i, m in enumerate(self.masters):
            out["master", i] = {"master": m}
        return out

    def step(self):
        for o in self.opts:
            o.step()

    def zero_grad(self, set_to_none=True):
        for o in self.opts:
            o.zero_grad(set_to_none=set_to_none)


def make_optimizer(name, params):
    params = list(params)
    A = torch.optim.AdamW
    kw = dict(lr=1e-4, weight_decay=0.1)
    if name in ("adamw", "adamw-single"):
        return A(params, foreach=False, **kw)
    if name == "adamw-foreach":
        return A(params, foreach=True, **kw)
    if name == "adamw-fused":
        return A(params, fused=True, **kw)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=1e-3, relative_step=False, scale_parameter=False,
                         warmup_init=False)
    if name == "adamw-8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kw)
    if name in ("torchao-adamw-8bit", "torchao-adamw-4bit"):
        import torchao.optim as ao

        cls = ao.AdamW8bit if name.endswith("8bit") else ao.AdamW4bit
        return cls(params, **kw)
    raise ValueError(name)


def optimizer_for(model, name):
    if name != "muon":
        return Opts([make_optimizer(name, model.parameters())])
    # nanochat's split: Muon for the block matrices, AdamW for embeddings, head and vectors.
    emb = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    head = {id(p) for p in model.get_output_embeddings().parameters()}
    mats = [p for p in model.parameters() if p.ndim == 2 and id(p) not in emb | head]
    rest = [p for p in model.parameters() if all(p is not q for q in mats)]
    return Opts([
        torch.optim.Muon(mats, lr=0.02, momentum=0.95),
        make_optimizer("adamw", rest),
    ])


def build(cfg):
    """The model and its forward; mt.build_model with this script's checkpointing."""
    t = dict(cfg["train"])
    ck = t["checkpointing"]
    inner = dict(cfg, train=dict(t, checkpointing="none"))
    model, fwd = mt.build_model(inner)
    if ck.startswith("every-"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(every_n_layers=int(ck[6:]))
    elif ck == "selective-op":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={
                    "use_reentrant": False,
                    "context_fn": selective_op_context,
                }
            )
    elif ck == "full":
        model.gradient_checkpointing_enable()
    return model, fwd


def setup(cfg):
    torch.manual_seed(0)
    m, t = cfg["model"], cfg["train"]
    model, fwd = build(cfg)
    prec = t["precision"]
    if prec in ("bf16", "bf16-mixed"):
        model.to(torch.bfloat16)
    model.train()
    xs = [torch.randint(0, m["vocab_size"], (t["micro_batch"], t["seq_len"]))
          for _ in range(t["grad_accum"])]
    autocast_ctx = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if prec == "bf16-autocast" else contextlib.nullcontext
    )
    opt_name = t["optimizer"]
    if prec == "bf16-mixed":
        params = list(model.parameters())
        masters = [p.detach().float().requires_grad_(True) for p in params]
        opt = Opts([make_optimizer(opt_name, masters)], masters)

        def step():
            for x in xs:
                loss = fwd(x)
                loss.backward()
            for p, w in zip(params, masters):
                w.grad = p.grad.float()
            for p in params:
                p.grad = None
            opt.step()
            with torch.no_grad():
                for p, w in zip(params, masters):
                    p.copy_(w)
            opt.zero_grad(set_to_none=True)
    elif t.get("optimizer_in_backward"):
        per = {p: make_optimizer(opt_name, [p]) for p in model.parameters()}

        def hook(p):
            per[p].step()
            per[p].zero_grad(set_to_none=True)

        for p in model.parameters():
            p.register_post_accumulate_grad_hook(hook)
        opt = Opts(per.values())

        def step():
            for x in xs:
                with autocast_ctx():
                    loss = fwd(x)
                loss.backward()
    else:
        opt = optimizer_for(model, opt_name)

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
    ap.add_argument("--out", default="tests/data/torch_regimes.json")
    ap.add_argument("--only", default=None, help="run only configs whose id contains this")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(2)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    mt.setup = setup  # measure_torch.profile_one_step builds each run with this script's step

    cfgs = configs()
    if args.only:
        cfgs = [c for c in cfgs if args.only in c["id"]]
    if args.list:
        for c in cfgs:
            print(c["id"])
        return
    runs = []
    for cfg in cfgs:
        try:
            r = mt.measure(cfg, check_floor=False)
        except Exception as e:  # a regime whose code does not run here is reported, not kept
            print(f"{cfg['id']}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        runs.append(r)
        print(f"{r['id']:<78} peak {r['peak_bytes']:>12} B ({r['peak_bytes'] / 2**20:8.1f} MiB)"
              f" at {r['peak_time_fraction']:.2f} near {r['peak_near_op']} [{r['seconds']} s]",
              flush=True)
        gc.collect()

    versions = {"torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
                "python": platform.python_version()}
    for mod in ("bitsandbytes", "torchao"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    out = {
        "tool": versions,
        "method": (
            "tools/measure_torch.py's method (one steady-state step after a warm-up step, "
            "profiler memory timeline, peak over all categories), with the step of each regime "
            "as tools/measure_regimes.py's docstring states; CPU, torch.set_num_threads(2)."
        ),
        "runs": runs,
    }
    if args.only and os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
        new_ids = {r["id"] for r in runs}
        order = [c["id"] for c in configs()]
        merged = [r for r in old.get("runs", []) if r["id"] not in new_ids] + runs
        merged.sort(key=lambda r: order.index(r["id"]) if r["id"] in order else len(order))
        out["runs"] = merged
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
