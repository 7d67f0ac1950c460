#!/usr/bin/env python3
"""What nanochat's GPT saves for backward with its token embedding in bf16, on the CPU and
on CUDA, without a GPU: the check behind docs/model.md, "nanochat on CUDA".

Usage:
    python tools/nanochat_cuda_census.py [--device cpu|cuda] [--wte fp32|bf16] [--compiled]

The model is tools/measure_torch.py's re-implementation of nanochat/gpt.py (October 2025)
at a census size (B 2, T 96, H 256, 2 layers, vocab 4096).

  * eager (default): the forward runs under `torch.autograd.graph.saved_tensors_hooks`;
    every saved storage is listed once (by storage), parameters left out, with the module
    that saved it and the autograd node that made it.
  * `--device cuda`: the same forward on fake CUDA tensors (`FakeTensorMode`), with CUDA's
    autocast switched on through `torch.set_autocast_enabled("cuda", True)` (the context
    manager refuses without a GPU): the dispatcher runs CUDA's autocast lists
    (aten/src/ATen/autocast_mode.cpp), so the dtypes are CUDA's. nanochat pins torch 2.8,
    whose autocast lists `rms_norm` on no device; torch 2.12+ lists it fp32 on CUDA, so
    the norm runs outside autocast here, as it does on 2.8. Fake tensors cannot pick a
    fused attention kernel, so sdpa shows its math path there (ignore the attention rows).
  * `--compiled` (CPU): the forward graph AOTAutograd's min-cut partitioner makes
    (`aot_module_simplified` with inductor's decomposition table), whose outputs beyond
    the loss are what the compiled step keeps for backward. On fake CUDA tensors
    AOTAutograd cannot trace the backward without a CUDA context, so the compiled census
    is the CPU's.
"""

import argparse
import collections
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure_torch as mt  # noqa: E402

B, T, H, L, V = 2, 96, 256, 2, 4096


def _rms_outside_autocast(x):
    """torch 2.8's `F.rms_norm` under CUDA autocast: not on any list, the input's dtype."""
    with torch.autocast("cuda", enabled=False):
        return F.rms_norm(x, (x.size(-1),))


def build(device, wte):
    heads = max(1, (H + 127) // 128)
    with torch.device(device):
        model = mt.NanochatGPT(V, H, L, heads, heads, T)
    if wte == "bf16":
        # nanochat: `self.transformer.wte.to(dtype=torch.bfloat16)` (fake tensors cannot
        # be swapped in place, so the parameter is replaced).
        w = model.transformer.wte.weight.detach().to(torch.bfloat16)
        model.transformer.wte.weight = torch.nn.Parameter(w)
    return model


def autocast_on(device):
    if device == "cuda":
        torch.set_autocast_enabled("cuda", True)
        torch.set_autocast_dtype("cuda", torch.bfloat16)
        torch.autocast_increment_nesting()
        return torch.autocast("cpu", enabled=False)
    return torch.autocast("cpu", dtype=torch.bfloat16)


def autocast_off(device):
    if device == "cuda":
        torch.autocast_decrement_nesting()
        torch.set_autocast_enabled("cuda", False)


def eager(device, wte):
    """(module, autograd node, shape, dtype, bytes) of every saved storage."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    saved, where = collections.OrderedDict(), ["embedding"]
    fake = FakeTensorMode(allow_non_fake_inputs=False) if device == "cuda" else None
    if fake:
        fake.__enter__()
        mt._rms = _rms_outside_autocast
    try:
        model = build(device, wte)
        params = {id(p.untyped_storage()) for p in model.parameters()}
        params |= {p.untyped_storage().data_ptr() for p in model.parameters() if not fake}
        for i, blk in enumerate(model.transformer.h):
            blk.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, f"block {i}"))
        model.lm_head.register_forward_pre_hook(lambda m, a: where.__setitem__(0, "head"))

        def pack(t):
            st = t.untyped_storage()
            key = id(st) if fake else st.data_ptr()
            if key not in saved and key not in params:
                node = type(t.grad_fn).__name__ if t.grad_fn else "leaf"
                saved[key] = (where[0], node, tuple(t.shape), t.dtype, st.nbytes())
            return t

        x = torch.randint(0, V, (B, T), device=device)
        with autocast_on(device), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x, x)
        autocast_off(device)
    finally:
        if fake:
            mt._rms = lambda x: F.rms_norm(x, (x.size(-1),))
            fake.__exit__(None, None, None)
    return list(saved.values())


def compiled(wte):
    """(graph node, shape, dtype, bytes) of the compiled forward's saved outputs (CPU)."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import min_cut_rematerialization_partition
    from torch._inductor.decomposition import select_decomp_table

    out = []

    def fw(gm, _inputs):
        node = next(n for n in gm.graph.nodes if n.op == "output")
        for a in node.args[0]:
            v = getattr(a, "meta", {}).get("val")
            if v is not None:
                out.append((a.name, tuple(v.shape), v.dtype, v.numel() * v.element_size()))
        return make_boxed_func(gm)

    def backend(gm, inputs):
        return aot_module_simplified(
            gm, inputs, fw_compiler=fw, bw_compiler=lambda g, _i: make_boxed_func(g),
            partition_fn=min_cut_rematerialization_partition,
            decompositions=select_decomp_table(),
        )

    torch._dynamo.reset()
    model = build("cpu", wte)
    step = torch.compile(model, backend=backend, dynamic=False)
    x = torch.randint(0, V, (B, T))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        step(x, x)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--wte", choices=["fp32", "bf16"], default="bf16")
    ap.add_argument("--compiled", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    n_h = B * T * H
    if args.compiled:
        if args.device != "cpu":
            sys.exit("--compiled runs on the CPU only (see the module doc)")
        rows = [("forward graph", name, s, d, b) for name, s, d, b in compiled(args.wte)]
    else:
        rows = eager(args.device, args.wte)
    total = 0
    print(f"# {args.device}, wte {args.wte}, {'compiled' if args.compiled else 'eager'}; "
          f"N·H = {n_h} elements")
    for where, node, shape, dtype, nbytes in rows:
        total += nbytes
        print(f"{where:14} {node:46} {str(shape):22} {str(dtype):16} {nbytes:>9} "
              f"{nbytes / n_h:6.3f} B/(N·H)")
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
