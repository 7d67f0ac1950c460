#!/usr/bin/env python3
"""Census of what autograd keeps for backward, per module, for the torch engine's
implementations (HF llama / qwen2 / gpt2 and nanochat's GPT), plus the memory timeline
around the loss and the first decoder layer's backward.

Usage:
    python tools/saved_tensors.py [--out docs/data/saved_tensors.md]

How:
  * torch.autograd.graph.saved_tensors_hooks around one forward (same model, inputs and
    autocast context as tools/measure_torch.py): every tensor autograd saves goes
    through pack_hook; it is recorded with shape, dtype and storage bytes, deduplicated
    by untyped_storage().data_ptr() (a storage saved twice, e.g. the residual stream
    saved by a norm and by the next add, is counted once, at its first saver).
  * forward pre-hooks / hooks on every module give the module active when the tensor
    was saved ("layers.0.self_attn.q_proj" ...); anything saved by the top-level
    causal-LM module after lm_head returned is the "loss".
  * a TorchDispatchMode records which aten op allocated each storage, so that
    autocast's bf16 copies of parameters (aten._to_copy of a parameter) are told apart
    from activations; storages that are parameters are listed but not counted.
  * after the forward, the autograd graph is walked from loss.grad_fn and every
    `_saved_*` attribute is read, naming the backward node that holds each storage.
"""

import argparse
import collections
import math
import os
import re
import sys
import warnings

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure_torch as mt  # noqa: E402

# Census shapes. "main" is the one shown in full; "alt" only re-checks the per-layer
# formulas at different sizes. T = 96 so that B*T (192) differs from every model
# dimension and shapes read unambiguously.
SHAPES = {
    "main": dict(B=2, T=96, H=256, nh=4, kv=2, I=688, V=4096, L=2),
    "alt": dict(B=1, T=80, H=384, nh=6, kv=2, I=1024, V=3000, L=2),
}


def census_configs(shape="main"):
    d = SHAPES[shape]
    L = mt._llama_like
    out = []

    def add(m, prec, attn):
        t = mt._train(d["B"], d["T"], prec, attn)
        out.append({"id": mt._run_id(m, t), "model": m, "train": t, "hardware": {"gpu": "cpu"}})

    llama = L("llama", d["H"], d["L"], d["nh"], d["kv"], d["I"], d["V"], True)
    qwen2 = L("qwen2", d["H"], d["L"], d["nh"], d["kv"], d["I"], d["V"], True)
    gpt2 = mt._gpt2(d["H"], d["L"], d["nh"], d["V"])
    nano = mt._nanochat(d["H"], d["L"], d["V"])
    for prec in ("fp32", "bf16-autocast"):
        add(llama, prec, "sdpa")
        add(llama, prec, "eager")
        add(qwen2, prec, "sdpa")
        add(gpt2, prec, "sdpa")
        add(nano, prec, "sdpa")
    add(gpt2, "fp32", "eager")
    return out


def formulas(cfg):
    """Closed forms read off the census: (bytes saved per decoder layer, bytes saved
    outside the layers, formula text for the layer).  None where not derived."""
    m, t = cfg["model"], cfg["train"]
    B, T = t["micro_batch"], t["seq_len"]
    H, I, nh, kv, V = (m[k] for k in ("hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "vocab_size"))
    hd = H // nh
    Hkv = kv * hd
    BT = B * T
    arch, prec, attn = m["arch"], t["precision"], t["attention"]
    key = (arch if arch != "qwen2" else "llama", prec, attn)
    # HF shifts labels with pad + [..., 1:].contiguous(); at B = 1 the slice is already
    # contiguous, so the saved target is a view of the padded (B, T+1) int64 tensor.
    lab = 8 * B if B == 1 else 0
    table = {
        ("llama", "fp32", "sdpa"): (
            32 * BT * H + 16 * BT * I + 8 * BT * Hkv + 4 * BT * nh + 8 * BT,
            4 * BT * V + 12 * BT * H + 20 * BT + lab + 4,
            "32·BTH + 16·BTI + 8·BT·Hkv + 4·BT·nh + 8·BT",
        ),
        ("llama", "bf16-autocast", "sdpa"): (
            30 * BT * H + 8 * BT * I + 4 * BT * Hkv + 4 * BT * nh + 8 * BT,
            4 * BT * V + 10 * BT * H + 20 * BT + lab + 4,
            "30·BTH + 8·BTI + 4·BT·Hkv + 4·BT·nh + 8·BT",
        ),
        ("llama", "fp32", "eager"): (
            40 * BT * H + 16 * BT * I + 4 * B * nh * T * T + 8 * BT,
            4 * BT * V + 12 * BT * H + 20 * BT + lab + 4,
            "40·BTH + 16·BTI + 4·B·nh·T² + 8·BT",
        ),
        ("llama", "bf16-autocast", "eager"): (
            34 * BT * H + 8 * BT * I + 6 * B * nh * T * T + 8 * BT,
            4 * BT * V + 10 * BT * H + 20 * BT + lab + 4,
            "34·BTH + 8·BTI + 6·B·nh·T² + 8·BT",
        ),
        ("gpt2", "fp32", "sdpa"): (
            32 * BT * H + 20 * BT * I + 4 * BT * nh + 16 * BT,
            4 * BT * V + 8 * BT * H + 24 * BT + 8 * T + lab + 4,
            "32·BTH + 20·BTI + 4·BT·nh + 16·BT",
        ),
        ("gpt2", "bf16-autocast", "sdpa"): (
            20 * BT * H + 10 * BT * I + 4 * BT * nh + 16 * BT,
            4 * BT * V + 6 * BT * H + 24 * BT + 8 * T + lab + 4,
            "20·BTH + 10·BTI + 4·BT·nh + 16·BT",
        ),
        ("gpt2", "fp32", "eager"): (
            32 * BT * H + 20 * BT * I + 4 * B * nh * T * T + 16 * BT,
            4 * BT * V + 8 * BT * H + 24 * BT + 8 * T + lab + 4,
            "32·BTH + 20·BTI + 4·B·nh·T² + 16·BT",
        ),
        ("nanochat", "fp32", "sdpa"): (
            28 * BT * H + 8 * BT * I + 12 * BT * Hkv + 4 * BT * (2 * nh + kv) + 8 * BT + 2 * T * hd,
            8 * BT * V + 12 * BT * H + 16 * BT + 4,
            "28·BTH + 8·BTI + 12·BT·Hkv + 4·BT·(2·nh + kv) + 8·BT + 2·T·hd",
        ),
        ("nanochat", "bf16-autocast", "sdpa"): (
            24 * BT * H + 4 * BT * I + 8 * BT * Hkv + 4 * BT * (2 * nh + kv) + 8 * BT + 2 * T * hd,
            6 * BT * V + 10 * BT * H + 16 * BT + 4,
            "24·BTH + 4·BTI + 8·BT·Hkv + 4·BT·(2·nh + kv) + 8·BT + 2·T·hd",
        ),
    }
    return table.get(key)


_LAYER = re.compile(r"^(?:model\.|transformer\.)?(?:layers|h)\.(\d+)(?:\.([^.]+))?(?:\.(.*))?$")


def group_of(name, after_lm_head):
    """Module name -> (group, layer index or None)."""
    if name == "" or name is None:
        return ("loss" if after_lm_head else "model (top)"), None
    m = _LAYER.match(name)
    if m:
        i, child = int(m.group(1)), m.group(2)
        return (f"layers.{i}.{child}" if child else f"layers.{i} (residual/block)"), i
    short = re.sub(r"^(model|transformer)\.", "", name)
    return short, None


class Producers(TorchDispatchMode):
    """Remembers, per storage data pointer, the aten op that allocated it."""

    def __init__(self, param_names_by_ptr):
        super().__init__()
        self.param_names_by_ptr = param_names_by_ptr
        self.by_ptr = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        in_ptrs = {a.untyped_storage().data_ptr() for a in ins}
        name = str(func.overloadpacket.__name__)
        if func.overloadpacket is torch.ops.aten._to_copy and ins:
            src = ins[0].untyped_storage().data_ptr()
            if src in self.param_names_by_ptr:
                name = "autocast copy of " + self.param_names_by_ptr[src]
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor):
                p = o.untyped_storage().data_ptr()
                if p not in in_ptrs:
                    self.by_ptr[p] = name
        return out


def census(cfg):
    torch.manual_seed(0)
    s = mt.setup(cfg)
    model, fwd, xs, ctx = s["model"], s["fwd"], s["xs"], s["autocast_ctx"]
    names = {m: n for n, m in model.named_modules()}
    param_names = {}
    for n, p in model.named_parameters():
        param_names.setdefault(p.untyped_storage().data_ptr(), re.sub(r"^(model|transformer)\.", "", n))

    stack = []
    state = {"after_lm_head": False}
    lm_head = getattr(model, "lm_head")

    def pre(mod, _inp):
        stack.append(names[mod])

    def post(mod, _inp, _out):
        stack.pop()
        if mod is lm_head:
            state["after_lm_head"] = True

    handles = []
    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))

    saved = collections.OrderedDict()  # ptr -> record
    order = [0]
    prod = Producers(param_names)

    def pack(t):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        mod = stack[-1] if stack else ""
        if ptr not in saved:
            saved[ptr] = {
                "module": mod,
                "group": group_of(mod, state["after_lm_head"]),
                "shape": tuple(t.shape),
                "dtype": str(t.dtype).replace("torch.", ""),
                "bytes": st.nbytes(),
                "param": param_names.get(ptr),
                "made_by": prod.by_ptr.get(ptr),
                "order": order[0],
                "holders": [],
                "times_saved": 0,
            }
            order[0] += 1
        saved[ptr]["times_saved"] += 1
        return t

    def unpack(t):
        return t

    with prod, torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        with ctx():
            loss = fwd(xs[0])
    for h in handles:
        h.remove()

    # Which backward node holds each storage
    seen = set()
    todo = [loss.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for attr in dir(node):
            if not attr.startswith("_saved_"):
                continue
            try:
                v = getattr(node, attr)
            except Exception:  # noqa: BLE001 - undefined optional saved values
                continue
            for tt in v if isinstance(v, (tuple, list)) else [v]:
                if isinstance(tt, torch.Tensor):
                    p = tt.untyped_storage().data_ptr()
                    if p in saved:
                        h = f"{node.name()}.{attr[len('_saved_'):]}"
                        if h not in saved[p]["holders"]:
                            saved[p]["holders"].append(h)
        todo.extend(fn for fn, _ in node.next_functions)
    del loss
    return list(saved.values())


def kind_of(r):
    if r["param"] is not None:
        return "param"
    if r["made_by"] and r["made_by"].startswith("autocast copy of"):
        return "weight-copy"
    return "act"


def fmt_shape(shape):
    return "(" + ",".join(str(d) for d in shape) + ")"


def census_markdown(cfg, recs):
    m, t = cfg["model"], cfg["train"]
    B, T = t["micro_batch"], t["seq_len"]
    H = m["hidden_size"]
    unit = B * T * H
    lines = []
    lines.append(f"### {m['arch']} · {t['precision']} · {t['attention']}")
    lines.append("")
    lines.append(
        f"`{cfg['id']}` — B={B}, T={T}, H={H}, I={m['intermediate_size']}, "
        f"heads={m['num_heads']}, kv={m['num_kv_heads']}, V={m['vocab_size']}, "
        f"layers={m['num_layers']}; unit B·T·H = {unit} elements."
    )
    lines.append("")
    lines.append("| module | saved tensor: shape dtype bytes — made by → held by | act bytes | /(B·T·H) |")
    lines.append("|---|---|---:|---:|")
    groups = collections.OrderedDict()
    for r in recs:
        groups.setdefault(r["group"][0], []).append(r)
    per_layer = collections.defaultdict(lambda: collections.Counter())
    for g, rs in groups.items():
        items = []
        act = 0
        for r in rs:
            k = kind_of(r)
            held = ", ".join(r["holders"]) or "?"
            tag = {"param": " **[param, not counted]**", "weight-copy": " **[autocast weight copy]**"}.get(k, "")
            leaf = r["module"].rsplit(".", 1)[-1] if r["module"] else r["group"][0]
            items.append(
                f"{leaf}: {fmt_shape(r['shape'])} {r['dtype']} {r['bytes']} — "
                f"{r['made_by'] or '?'} → {held}{tag}"
            )
            if k == "act":
                act += r["bytes"]
            li = r["group"][1]
            if li is not None:
                per_layer[li][k] += r["bytes"]
        lines.append(f"| {g} | " + "<br>".join(items) + f" | {act} | {act / unit:.3f} |")
    lines.append("")
    tot = collections.Counter()
    for r in recs:
        tot[kind_of(r)] += r["bytes"]
    nonlayer = sum(r["bytes"] for r in recs if kind_of(r) == "act" and r["group"][1] is None)
    lines.append("Per layer (activations only; parameters and autocast weight copies apart):")
    lines.append("")
    for li in sorted(per_layer):
        c = per_layer[li]
        lines.append(
            f"- layer {li}: activations {c['act']} B = {c['act'] / unit:.3f} × B·T·H bytes"
            + (f"; autocast weight copies {c['weight-copy']} B" if c["weight-copy"] else "")
        )
    lines.append(
        f"- outside the layers (embedding, final norm, lm_head, loss): {nonlayer} B "
        f"= {nonlayer / unit:.3f} × B·T·H = {nonlayer / (B * T * m['vocab_size']):.3f} × B·T·V bytes"
    )
    lines.append(
        f"- totals: activations {tot['act']} B, autocast weight copies {tot['weight-copy']} B, "
        f"parameters referenced {tot['param']} B"
    )
    lines.append("")
    return "\n".join(lines), per_layer, nonlayer


# --------------------------------------------------------------------------------------
# Memory timeline around the loss and the first layer's backward
# --------------------------------------------------------------------------------------


def timeline_markdown(cfg):
    from torch.profiler._memory_profiler import Action, TensorKey, _EventType

    prof, s = mt.profile_one_step(cfg)
    mp = prof._memory_profile()
    m, t = cfg["model"], cfg["train"]
    btv = t["micro_batch"] * t["seq_len"] * m["vocab_size"]

    # tensor metadata / producer, as in measure_torch.live_tensors_at
    meta, made_by = {}, {}
    for ev in mp._op_tree.dfs():
        if ev.typed[0] == _EventType.TorchOp:
            for i in ev.typed[1].inputs:
                for tm in i if isinstance(i, list) else [i]:
                    if isinstance(tm, torch._C._profiler._TensorMetadata):
                        k = TensorKey.from_tensor(tm)
                        if k is not None and k not in meta:
                            meta[k] = (tuple(tm.sizes), str(tm.dtype).replace("torch.", ""))
        elif ev.typed[0] == _EventType.Allocation and ev.typed[1].alloc_size > 0:
            k = TensorKey.from_allocation(ev.typed[1])
            if k is not None:
                made_by[k] = mt._op_chain(ev)

    # top-level ops in time order
    tops = []
    for root in mp._op_tree._root_nodes:
        stack = [root]
        while stack:
            ev = stack.pop()
            if ev.typed[0] == _EventType.TorchOp:
                tops.append(ev)
            else:
                stack.extend(ev.children)
    tops.sort(key=lambda e: e.start_time_ns)

    def is_btv(k):
        shape = meta.get(k, (None,))[0]
        return shape is not None and math.prod(shape) == btv

    events = [e for e in mp.timeline if e[2][0].device.type == "cpu"]
    live, total, j = {}, 0, 0
    best = [0, {}, 0]  # step peak: bytes, live map at that moment, op index
    rows = []  # (name, total after, created, freed, B·T·V live, live map, max during op)
    for op in tops:
        created, freed = [], []
        hi_water = total
        while j < len(events) and (events[j][0] == -1 or events[j][0] <= op.end_time_ns):
            tm, action, (key, version), nbytes = events[j]
            j += 1
            if action in (Action.PREEXISTING, Action.CREATE):
                total += nbytes
                if isinstance(key, TensorKey):
                    live[key] = (nbytes, version)
                    if action == Action.CREATE and is_btv(key):
                        created.append(key)
            elif action == Action.INCREMENT_VERSION:
                if isinstance(key, TensorKey):
                    live[key] = (nbytes, version + 1)
            elif action == Action.DESTROY:
                total -= nbytes
                if isinstance(key, TensorKey):
                    live.pop(key, None)
                    if is_btv(key):
                        freed.append(key)
            hi_water = max(hi_water, total)
            if total > best[0]:
                best[0], best[1], best[2] = total, dict(live), len(rows)
        bigs = [k for k in live if is_btv(k)]
        rows.append((op.name, total, created, freed, bigs, dict(live), hi_water))

    i_peak = best[2]
    assert rows[i_peak][6] == best[0]
    first_big = next(i for i, r in enumerate(rows) if r[2])
    last_big = max(i for i, r in enumerate(rows) if r[3])
    # the first decoder layer to run backward is the last one: its backward ends at the
    # first AccumulateGrad-free stretch after the lm_head / final-norm backward; showing
    # a fixed number of autograd nodes after the last B×T×V free covers it.
    n_layer_nodes = 70
    lo, hi = max(0, first_big - 2), min(len(rows), last_big + n_layer_nodes)

    def desc(k, live_map):
        shape, dtype = meta.get(k, (None, None))
        n = live_map.get(k, (None,))[0]
        cat = mp._categories.get(k, live_map.get(k, (0, 0))[1]) if k in live_map else None
        catn = cat.name if cat is not None else "?"
        return f"{fmt_shape(shape) if shape else '?'} {dtype or '?'} {n if n else ''} {catn} [{made_by.get(k) or 'pre-existing'}]".strip()

    def short(k):
        shape, dtype = meta.get(k, (None, None))
        return f"{fmt_shape(shape) if shape else '?'} {dtype or '?'}"

    out = [f"### Timeline: `{cfg['id']}`", ""]
    out.append(
        f"B·T·V = {btv} elements ({btv * 4} B in fp32, {btv * 2} B in bf16). Top-level ops from just "
        f"before the first B·T·V allocation to {n_layer_nodes} ops after the last B·T·V free "
        f"(covers the last decoder layer's backward, the first layer to run backward); rows "
        f"where nothing B·T·V-sized is created or freed and the total moves by less than 1 MiB "
        f"are elided. Step peak (highest live total inside any op): {rows[i_peak][6]} B during op "
        f"#{i_peak} `{rows[i_peak][0]}`."
    )
    out.append("")
    out.append(
        "| # | op | max live during op (MiB) | live after (MiB) | B·T·V-sized created / freed "
        "| B·T·V-sized live after |"
    )
    out.append("|---:|---|---:|---:|---|---|")
    prev = None
    for i in range(lo, hi):
        name, total, created, freed, bigs, _, hw = rows[i]
        if i != i_peak and not created and not freed and prev is not None and abs(total - prev) < 2**20:
            continue
        prev = total
        cf = ", ".join(["+" + short(k) for k in created] + ["−" + short(k) for k in freed])
        mark = " **(peak)**" if i == i_peak else ""
        out.append(
            f"| {i} | `{name}`{mark} | {hw / 2**20:.1f} | {total / 2**20:.1f} | {cf} | "
            + "; ".join(short(k) for k in bigs)
            + " |"
        )
    out.append("")
    out.append("Live at the step peak (largest first, ≥ 1 MiB):")
    out.append("")
    peak_live = best[1]
    for k, (n, v) in sorted(peak_live.items(), key=lambda kv: -kv[1][0]):
        if n < 2**20:
            break
        out.append(f"- {desc(k, peak_live)}")
    out.append("")
    return "\n".join(out)


def fmt_dims(name):
    d = SHAPES[name]
    return ", ".join(f"{k}={v}" for k, v in d.items() if k != "L")


FINDINGS = """## Findings

Outside the layers (bytes; ids/labels are int64):
- llama/qwen2 fp32: 4·BTV (log_softmax output, fp32) + 12·BTH (final norm input and
  normalized x, lm_head input) + 20·BT; bf16-autocast: 4·BTV + 10·BTH + 20·BT, plus the
  bf16 copy of the (tied) lm_head weight 2·V·H.  Shared rotary cos/sin (2·T·hd fp32 values
  = 8·T·hd bytes) are saved once, in layer 0.
- gpt2 fp32: 4·BTV + 8·BTH + 24·BT + 8·T; bf16-autocast: 4·BTV + 6·BTH + 24·BT + 8·T.
- nanochat fp32: 8·BTV (softcap tanh output + log_softmax output) + 12·BTH + 16·BT;
  bf16-autocast: 6·BTV (tanh output in bf16, log_softmax in fp32) + 10·BTH + 16·BT.

What is surprising, or easy to get wrong:
1. sdpa on CPU runs `_scaled_dot_product_flash_attention_for_cpu`; its backward keeps
   query, key, value, output and a fp32 logsumexp of shape (B, nh, T) — no T² term.
2. GQA with sdpa: transformers 5.23 passes `enable_gqa=True` when there is no mask, so
   k and v are saved at kv heads (Hkv), with no repeat_kv copies.  With eager attention
   repeat_kv + reshape materialises k and v at all nh heads and those copies are what
   bmm saves (2·H per token each instead of Hkv); q and the attention output are also
   saved as contiguous copies (clone), and the softmax probabilities (B, nh, T, T) in
   fp32 (plus a bf16 copy under autocast, hence 6·B·nh·T²).
3. The residual stream stays fp32 under bf16 autocast: the embedding weights are fp32
   and `add` of a bf16 branch output to the fp32 residual promotes to fp32.  The norms
   run in fp32 and save fp32 tensors: HF RMSNorm input, normalized x and rsqrt
   (8·BTH + 4·BT), nanochat's parameter-free rms_norm input and rsqrt (4·BTH + 4·BT),
   gpt2's LayerNorm input, mean and rstd (4·BTH + 8·BT).
4. Autocast only caches casts of leaf weights.  The fp32 norm output is cast to bf16
   separately by each consumer: q_proj, k_proj and v_proj each save their own bf16
   copy (3·2·BTH), gate_proj and up_proj two more (2·2·BTH).  gpt2's fused c_attn
   saves one.
5. Autocast's bf16 weight copies are saved by mm/addmm for backward, so they live from
   the forward until that layer's backward: 2 bytes × (linear weights) per layer, and
   2·V·H for lm_head (for tied embeddings, a bf16 copy of the embedding matrix).
6. Under autocast HF RoPE runs in fp32 (its cos/sin follow the fp32 hidden states): q
   and k leave RoPE in fp32 and are cast to bf16 by sdpa; the bf16 casts are what sdpa
   saves.  In nanochat RoPE stays bf16 (bf16 cos/sin) and rms_norm (QK-norm) upcasts to
   fp32, so the fp32 RoPE output is saved and sdpa saves bf16 casts of the normed q/k.
7. HF's loss does `logits.float()`; under autocast the bf16 logits (2·BTV) are not
   saved by autograd (ToCopyBackward keeps nothing) but stay alive until the model
   output object is dropped, i.e. through the end of the forward.  In fp32 `.float()`
   is a no-op and the fp32 logits (4·BTV) likewise live until the output is dropped.
8. The step peak is inside `LogSoftmaxBackward0`: the saved log_softmax output, the
   gradient from `NllLossBackward0` and the new gradient of the logits are three fp32
   B·T·V tensors (12·BTV bytes) on top of all saved activations; under autocast the
   bf16 lm_head weight copy is live too, and `ToCopyBackward0` then briefly holds the
   fp32 and the bf16 logits gradient (6·BTV).
9. nanochat saves the tanh output of the softcap (B·T·V in the logits dtype) on top
   of log_softmax's fp32 output; RMSNorm without weight saves only input and rsqrt; QK-norm
   saves the RoPE output and a (B, T, heads, 1) rsqrt for q and for k, and the normed q/k
   again as sdpa inputs; `(-sin)` is recomputed and saved in every layer (2·T·hd bytes, bf16).
10. gpt2's gelu_new (tanh approximation written in Python) saves four B·T·I tensors
    (x, tanh, 1 + tanh, 0.5·x) besides c_proj's input: 5·BTI in the compute dtype.
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="docs/data/saved_tensors.md")
    ap.add_argument("--only", default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import transformers

    transformers.logging.set_verbosity_error()

    parts = []
    summary = []
    for cfg in census_configs("main"):
        if args.only and args.only not in cfg["id"]:
            continue
        recs = census(cfg)
        md, per_layer, nonlayer = census_markdown(cfg, recs)
        parts.append(md)
        summary.append((cfg, per_layer, nonlayer))
        print(f"{cfg['id']:<60} layer1 {per_layer[1]['act']:>9} B", flush=True)
    checks = []
    for cfg in census_configs("alt"):
        if args.only and args.only not in cfg["id"]:
            continue
        recs = census(cfg)
        _md, per_layer, nonlayer = census_markdown(cfg, recs)
        checks.append((cfg, per_layer, nonlayer))
    n_ok = 0
    for cfg, per_layer, nonlayer in summary + checks:
        f = formulas(cfg)
        got = (per_layer[1]["act"], nonlayer)
        if f is None or (f[0], f[1]) != got:
            raise SystemExit(f"formula mismatch for {cfg['id']}: census {got}, formula {f}")
        n_ok += 1
    print(f"formulas match the census for {n_ok} configurations", flush=True)

    tl_parts = []
    if not args.only:
        # two of the measured runs of tools/measure_torch.py, where the logits matter
        by_id = {c["id"]: c for c in mt.configs()}
        for rid in (
            "llama-h256-l4-kv2-v32000-b2-s256-fp32-sdpa-none",
            "llama-h256-l4-kv2-v32000-b2-s256-bf16-autocast-sdpa-none",
        ):
            tl_parts.append(timeline_markdown(by_id[rid]))

    head = [
        "# What autograd keeps: saved-tensor census (torch engine, CPU)",
        "",
        f"Generated by `tools/saved_tensors.py` (torch {torch.__version__.split('+')[0]}, "
        f"transformers {transformers.__version__}). One forward per configuration, same model "
        "construction, inputs and autocast context as `tools/measure_torch.py`; every tensor "
        "passed to autograd's pack hook is recorded once per storage (deduplicated by "
        "`untyped_storage().data_ptr()`), attributed to the module active when it was first "
        "saved. \"made by\" is the aten op that allocated the storage; \"held by\" the backward "
        "node(s) whose `_saved_*` fields reference it. Parameters are listed but not counted; "
        "autocast's bf16 weight copies are counted apart. Bytes are storage bytes.",
        "",
        "## Summary: activation bytes saved per decoder layer",
        "",
        "Layer 1 of 2 (layer 0 also holds the few tensors all layers share, e.g. rotary "
        "cos/sin, which are attributed to their first saver). BT = B·T, H hidden, I "
        "intermediate, nh heads, kv KV heads, hd = H/nh, Hkv = kv·hd, V vocab; bytes. Every "
        f"formula below reproduces the census exactly at two shapes ({fmt_dims('main')}; "
        f"{fmt_dims('alt')}).",
        "",
        "| config | per layer (B) | × B·T·H | per-layer formula (bytes) | autocast weight copies / layer (B) | outside layers (B) |",
        "|---|---:|---:|---|---:|---:|",
    ]
    for cfg, per_layer, nl in summary:
        a = per_layer[1]["act"]
        u = a / (cfg["train"]["micro_batch"] * cfg["train"]["seq_len"] * cfg["model"]["hidden_size"])
        head.append(
            f"| `{cfg['id']}` | {a} | {u:.3f} | {formulas(cfg)[2]} | {per_layer[1]['weight-copy']} | {nl} |"
        )
    head += ["", FINDINGS, ""]
    body = head + ["## Census per configuration", ""] + parts
    if tl_parts:
        body += ["## Memory timeline around the loss (llama, one profiled step)", ""] + tl_parts
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(body).rstrip() + "\n")


if __name__ == "__main__":
    main()
