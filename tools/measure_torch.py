#!/usr/bin/env python3
"""Ground truth for the torch engine on CPU: peak live memory of ONE steady-state
training step, measured with the PyTorch profiler's memory timeline.

Usage:
    python tools/measure_torch.py [--out tests/data/torch_cpu.json] [--only ID_SUBSTRING]

Method (DESIGN.md, "Ground truth"):
  1. Build the model from a config object with random init (no downloads), seed 0,
     random token ids x of shape (micro_batch, seq_len) in [0, vocab).
  2. Run one warm-up step, so that AdamW's state (exp_avg, exp_avg_sq, step) exists
     and grads have been freed again by zero_grad(set_to_none=True).
  3. Profile exactly one more full step under
       torch.profiler.profile(activities=[CPU], profile_memory=True,
                              record_shapes=True, with_stack=True)
     and export the memory timeline with export_memory_timeline(path.json, device="cpu").
  4. peak_bytes = max over time of the sum over all categories (incl. UNKNOWN).

Pre-existing tensors (verified for torch 2.15.0, see check_preexisting()):
  The timeline DOES include tensors that existed before profiling started, as long as
  they are seen by the profiler during the step: MemoryProfile.timeline emits an
  Action.PREEXISTING event (time -1, i.e. live from the start) for every TensorKey that
  appears as an op input/output or in a module's / optimizer's parameter list (recorded
  through with_stack=True) but has no allocation event inside the profiled window.
  Parameters, AdamW state (exp_avg, exp_avg_sq, step) and the input ids are all touched
  by the step, so they are counted.  The script checks this per run: every parameter and
  optimizer-state storage must appear as a PREEXISTING key in the timeline; storages that
  do not are added explicitly (sum of their storage bytes, deduplicated by storage data
  pointer) and the run's "added_preexisting_bytes" says so.  Buffers that no op reads
  during the step (e.g. an unused rotary cache tail) are outside the timeline, like any
  memory that is not a live tensor touched by the step.

Sanity check: peak_bytes >= params + grads + optimizer state bytes (grads and the whole
AdamW state are live together at opt.step()).
"""

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

# --------------------------------------------------------------------------------------
# nanochat GPT, re-implemented for this measurement.
#
# Follows karpathy/nanochat nanochat/gpt.py as of October 2025:
#   * token embedding `wte` (nn.Embedding, fp32 on CPU: nanochat casts wte to bf16 only
#     when the model lives on CUDA), then a parameter-free RMSNorm of the embedding;
#     `train.embedding_dtype = "bf16"` applies that cast here too (`wte.to(bfloat16)`
#     after the initialisation, before the optimizer exists, as `init_weights` does);
#   * per block: x = x + attn(norm(x)); x = x + mlp(norm(x)), norm = F.rms_norm without
#     weight; a final norm before lm_head;
#   * attention: bias-free c_q, c_k, c_v, c_proj; q/k/v viewed as (B, T, heads, head_dim);
#     rotary embedding on q and k (half-split rotation, cos/sin buffers precomputed for
#     10x sequence_len and stored in bf16, shape (1, T, 1, head_dim/2)), the result cast
#     back to the input dtype; THEN QK-norm (parameter-free rms_norm of q and k);
#     transpose to (B, heads, T, head_dim); F.scaled_dot_product_attention(is_causal=True,
#     enable_gqa when kv < heads); transpose back, contiguous, view, c_proj;
#   * MLP: c_fc (d -> 4d), relu(x).square() (ReLU^2), c_proj (4d -> d), no biases;
#   * untied lm_head (no bias); loss path: logits = lm_head(x); softcap
#     15 * tanh(logits / 15) computed in the logits' own dtype (bf16 under autocast);
#     THEN logits.float(); F.cross_entropy(logits.view(-1, V), targets.view(-1),
#     ignore_index=-1).  The model takes (idx, targets) and returns the loss.
#   * head_dim = model_dim / heads (the nanochat convention heads = ceil(dim / 128)).
# The nanochat optimizers (Muon + AdamW) are replaced by one AdamW over all parameters
# here, as the rest of the ground truth uses.
# --------------------------------------------------------------------------------------


def _rms(x):
    return F.rms_norm(x, (x.size(-1),))


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    out = torch.cat([a * cos + b * sin, a * (-sin) + b * cos], dim=3)
    return out.to(x.dtype)


class NanoAttention(nn.Module):
    def __init__(self, dim, n_head, n_kv_head):
        super().__init__()
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_dim = dim // n_head
        self.c_q = nn.Linear(dim, n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(dim, n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(dim, n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        q = _rms(_rotate(q, cos, sin))
        k = _rms(_rotate(k, cos, sin))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head
        )
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class NanoMLP(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.c_fc = nn.Linear(dim, 4 * dim, bias=False)
        self.c_proj = nn.Linear(4 * dim, dim, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class NanoBlock(nn.Module):
    def __init__(self, dim, n_head, n_kv_head):
        super().__init__()
        self.attn = NanoAttention(dim, n_head, n_kv_head)
        self.mlp = NanoMLP(dim)

    def forward(self, x, cos, sin):
        x = x + self.attn(_rms(x), cos, sin)
        return x + self.mlp(_rms(x))


class NanochatGPT(nn.Module):
    def __init__(self, vocab_size, dim, n_layer, n_head, n_kv_head, sequence_len):
        super().__init__()
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab_size, dim),
                "h": nn.ModuleList(NanoBlock(dim, n_head, n_kv_head) for _ in range(n_layer)),
            }
        )
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        head_dim = dim // n_head
        inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        t = torch.arange(sequence_len * 10, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        self.register_buffer("cos", freqs.cos().bfloat16()[None, :, None, :], persistent=False)
        self.register_buffer("sin", freqs.sin().bfloat16()[None, :, None, :], persistent=False)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                fan_out, fan_in = m.weight.shape
                std = min(1.0, math.sqrt(fan_out / fan_in)) / math.sqrt(fan_in)
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, 1.0)
        nn.init.zeros_(self.lm_head.weight)
        for blk in self.transformer.h:
            nn.init.zeros_(blk.attn.c_proj.weight)
            nn.init.zeros_(blk.mlp.c_proj.weight)

    def forward(self, idx, targets):
        T = idx.size(1)
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        x = _rms(self.transformer.wte(idx))
        for blk in self.transformer.h:
            x = blk(x, cos, sin)
        x = _rms(x)
        logits = self.lm_head(x)
        logits = 15 * torch.tanh(logits / 15)  # softcap in the lm_head's output dtype
        logits = logits.float()  # then upcast for the loss
        return F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1
        )


# --------------------------------------------------------------------------------------
# Configurations
# --------------------------------------------------------------------------------------


def _llama_like(arch, h, l, heads, kv, inter, v, tied):
    return {
        "arch": arch,
        "hidden_size": h,
        "num_layers": l,
        "num_heads": heads,
        "num_kv_heads": kv,
        "intermediate_size": inter,
        "vocab_size": v,
        "tie_embeddings": tied,
    }


def _gpt2(h, l, heads, v):
    return {
        "arch": "gpt2",
        "hidden_size": h,
        "num_layers": l,
        "num_heads": heads,
        "num_kv_heads": heads,
        "intermediate_size": 4 * h,
        "vocab_size": v,
        "tie_embeddings": True,
        "max_position_embeddings": 1024,
    }


def _nanochat(h, l, v):
    heads = max(1, (h + 127) // 128)
    return {
        "arch": "nanochat",
        "hidden_size": h,
        "num_layers": l,
        "num_heads": heads,
        "num_kv_heads": heads,
        "intermediate_size": 4 * h,
        "vocab_size": v,
        "tie_embeddings": False,
    }


def _train(b, s, prec, attn="sdpa", ckpt="none", ga=1):
    return {
        "micro_batch": b,
        "seq_len": s,
        "grad_accum": ga,
        "precision": prec,
        "optimizer": "adamw",
        "checkpointing": ckpt,
        "attention": attn,
        "loss": "float-cast",
    }


def _run_id(m, t):
    parts = [m["arch"], f"h{m['hidden_size']}", f"l{m['num_layers']}"]
    if m["arch"] in ("llama", "qwen2"):
        parts.append(f"kv{m['num_kv_heads']}")
    parts += [f"v{m['vocab_size']}", f"b{t['micro_batch']}", f"s{t['seq_len']}", t["precision"]]
    parts += [t["attention"], t["checkpointing"]]
    if t.get("embedding_dtype"):
        parts.append(f"wte-{t['embedding_dtype']}")
    if t["grad_accum"] != 1:
        parts.append(f"ga{t['grad_accum']}")
    if m["arch"] in ("llama", "qwen2") and not m["tie_embeddings"]:
        parts.append("untied")
    return "-".join(parts)


def configs():
    L, Q = "llama", "qwen2"
    runs = [
        # llama: tied, GQA (kv < heads)
        (_llama_like(L, 256, 4, 4, 2, 688, 32000, True), _train(2, 256, "fp32")),
        (_llama_like(L, 256, 4, 4, 2, 688, 32000, True), _train(2, 256, "bf16-autocast")),
        (_llama_like(L, 256, 4, 4, 2, 688, 32000, True), _train(2, 256, "fp32", "eager")),
        (_llama_like(L, 256, 4, 4, 2, 688, 32000, True), _train(2, 256, "fp32", "sdpa", "full")),
        # llama: layers dominate (hidden 512, 6 layers, vocab 4096)
        (_llama_like(L, 512, 6, 8, 4, 1376, 4096, True), _train(4, 512, "fp32")),
        (_llama_like(L, 512, 6, 8, 4, 1376, 4096, True), _train(4, 512, "bf16-autocast")),
        (_llama_like(L, 512, 6, 8, 4, 1376, 4096, True), _train(4, 512, "bf16-autocast", "sdpa", "full")),
        # llama: logits dominate (hidden 128, vocab 50000, untied)
        (_llama_like(L, 128, 2, 4, 2, 344, 50000, False), _train(4, 512, "fp32")),
        (_llama_like(L, 128, 2, 4, 2, 344, 50000, False), _train(4, 512, "bf16-autocast")),
        # llama: pure bf16, eager under autocast, MHA with grad accumulation
        (_llama_like(L, 384, 3, 6, 2, 1024, 16000, False), _train(1, 512, "bf16")),
        (_llama_like(L, 384, 3, 6, 2, 1024, 16000, False), _train(1, 512, "bf16-autocast", "eager")),
        (_llama_like(L, 256, 2, 4, 4, 688, 8000, True), _train(2, 128, "fp32", "sdpa", "none", 2)),
        # qwen2 (qkv bias)
        (_llama_like(Q, 256, 4, 4, 2, 688, 32000, True), _train(2, 256, "fp32")),
        (_llama_like(Q, 256, 4, 4, 2, 688, 32000, True), _train(2, 256, "bf16-autocast")),
        (_llama_like(Q, 384, 4, 6, 2, 1024, 8192, False), _train(2, 512, "fp32", "eager")),
        (_llama_like(Q, 384, 4, 6, 2, 1024, 8192, False), _train(2, 512, "bf16-autocast", "sdpa", "full")),
        (_llama_like(Q, 512, 2, 8, 2, 1376, 50000, False), _train(1, 256, "bf16")),
        # gpt2 (learned positions, LayerNorm, GELU, tied)
        (_gpt2(256, 4, 4, 50257), _train(2, 256, "fp32")),
        (_gpt2(256, 4, 4, 50257), _train(2, 256, "bf16-autocast")),
        (_gpt2(384, 6, 6, 8192), _train(4, 256, "fp32", "eager")),
        (_gpt2(384, 6, 6, 8192), _train(4, 256, "bf16-autocast", "eager")),
        (_gpt2(512, 4, 8, 4096), _train(2, 512, "fp32", "sdpa", "full")),
        (_gpt2(256, 2, 4, 16384), _train(1, 128, "bf16")),
        (_gpt2(256, 3, 4, 8192), _train(2, 256, "bf16-autocast", "sdpa", "none", 2)),
        # nanochat
        (_nanochat(256, 4, 32768), _train(2, 256, "fp32")),
        (_nanochat(256, 4, 32768), _train(2, 256, "bf16-autocast")),
        (_nanochat(512, 6, 4096), _train(4, 512, "fp32")),
        (_nanochat(512, 6, 4096), _train(4, 512, "bf16-autocast")),
        (_nanochat(384, 3, 16384), _train(1, 512, "bf16")),
        (_nanochat(128, 2, 50000), _train(4, 256, "bf16-autocast")),
    ]
    out = []
    for m, t in runs:
        out.append({"id": _run_id(m, t), "model": m, "train": t, "hardware": {"gpu": "cpu"}})
    ids = [c["id"] for c in out]
    assert len(ids) == len(set(ids)), "duplicate run ids"
    return out


# --------------------------------------------------------------------------------------
# Model construction and the training step
# --------------------------------------------------------------------------------------


def build_model(cfg):
    """Returns (model, forward_loss(x) -> loss tensor)."""
    m, t = cfg["model"], cfg["train"]
    arch = m["arch"]
    if arch == "nanochat":
        if t["checkpointing"] != "none":
            raise ValueError("nanochat has no activation checkpointing")
        model = NanochatGPT(
            m["vocab_size"], m["hidden_size"], m["num_layers"], m["num_heads"],
            m["num_kv_heads"], t["seq_len"],
        )
        if t.get("embedding_dtype") == "bf16":
            # nanochat's init_weights on CUDA: `self.transformer.wte.to(dtype=torch.bfloat16)`.
            model.transformer.wte.to(dtype=torch.bfloat16)
        return model, (lambda x: model(x, x))

    import transformers

    if arch in ("llama", "qwen2"):
        common = dict(
            vocab_size=m["vocab_size"],
            hidden_size=m["hidden_size"],
            intermediate_size=m["intermediate_size"],
            num_hidden_layers=m["num_layers"],
            num_attention_heads=m["num_heads"],
            num_key_value_heads=m["num_kv_heads"],
            max_position_embeddings=max(2048, t["seq_len"]),
            tie_word_embeddings=m["tie_embeddings"],
            attention_dropout=0.0,
            use_cache=False,
        )
        if "head_dim" in m:
            common["head_dim"] = m["head_dim"]
        if arch == "llama":
            config = transformers.LlamaConfig(**common)
            cls = transformers.LlamaForCausalLM
        else:
            config = transformers.Qwen2Config(**common, use_sliding_window=False)
            cls = transformers.Qwen2ForCausalLM
    elif arch == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=m["vocab_size"],
            n_positions=m.get("max_position_embeddings", 1024),
            n_embd=m["hidden_size"],
            n_layer=m["num_layers"],
            n_head=m["num_heads"],
            n_inner=m["intermediate_size"],
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            use_cache=False,
        )
        cls = transformers.GPT2LMHeadModel
    else:
        raise ValueError(f"unknown arch {arch}")
    config._attn_implementation = t["attention"]
    model = cls(config)
    model.config.use_cache = False
    got = model.config._attn_implementation
    if got != t["attention"]:
        raise RuntimeError(f"asked for attention {t['attention']}, model uses {got}")
    if t["checkpointing"] == "full":
        # transformers 5.23: gradient_checkpointing_enable() is a deprecated alias of
        # activation_checkpointing_enable(); with no kwargs it uses
        # torch.utils.checkpoint with use_reentrant=False, and calls
        # enable_input_require_grads() (the embedding output requires grad).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            model.gradient_checkpointing_enable()
    return model, (lambda x: model(input_ids=x, labels=x).loss)


CHECKPOINT_NOTE = (
    "checkpointing=full: model.gradient_checkpointing_enable() with default kwargs "
    "(transformers 5.23: torch.utils.checkpoint, use_reentrant=False, every decoder layer, "
    "input embeddings made to require grad)"
)


def setup(cfg):
    """Builds model, optimizer, inputs and the step function for one config."""
    torch.manual_seed(0)
    m, t = cfg["model"], cfg["train"]
    model, fwd = build_model(cfg)
    if t["precision"] == "bf16":
        model.to(torch.bfloat16)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    xs = [
        torch.randint(0, m["vocab_size"], (t["micro_batch"], t["seq_len"]))
        for _ in range(t["grad_accum"])
    ]
    if t["precision"] == "bf16-autocast":
        autocast_ctx = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    elif t["precision"] in ("fp32", "bf16"):
        autocast_ctx = contextlib.nullcontext
    else:
        raise ValueError(t["precision"])

    def step():
        for x in xs:
            with autocast_ctx():
                loss = fwd(x)  # the output object is dropped at once, only .loss is kept
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"model": model, "opt": opt, "xs": xs, "step": step, "fwd": fwd,
            "autocast_ctx": autocast_ctx}


# --------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------

CATEGORY_NAMES = [
    # order of torch.profiler._memory_profiler._CATEGORY_TO_INDEX (+1 in the json rows)
    "PARAMETER", "OPTIMIZER_STATE", "INPUT", "TEMPORARY", "ACTIVATION",
    "GRADIENT", "AUTOGRAD_DETAIL", "UNKNOWN",
]


def storage_bytes(tensors):
    """Sum of storage bytes, deduplicated by storage data pointer."""
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values()), seen


def optimizer_state_tensors(opt):
    out = []
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                out.append(v)
    return out


def check_preexisting(mem_tl, model, opt, xs):
    """Which parameter / optimizer-state / input storages are in the timeline as
    PREEXISTING keys; returns the bytes of those missing (deduplicated by storage)."""
    from torch.profiler._memory_profiler import Action, TensorKey

    pre_ptrs = set()
    for _t, action, (key, _v), _n in mem_tl.timeline:
        if action == Action.PREEXISTING and isinstance(key, TensorKey):
            pre_ptrs.add(key.storage.ptr)
    groups = {
        "parameters": list(model.parameters()),
        "optimizer_state": optimizer_state_tensors(opt),
        "inputs": list(xs),
    }
    missing = {}
    for name, ts in groups.items():
        _, by_ptr = storage_bytes(ts)
        missing[name] = {p: n for p, n in by_ptr.items() if p not in pre_ptrs}
    return missing


def _innermost_op(roots, t_ns):
    """Name of the innermost torch op whose [start, end] contains t_ns."""
    best = None
    stack = list(roots)
    while stack:
        ev = stack.pop()
        if ev.start_time_ns <= t_ns <= ev.end_time_ns:
            if ev.typed[0].name == "TorchOp":
                best = ev
            stack.extend(ev.children)
    return best.name if best is not None else None


def _op_chain(ev):
    """(outermost, innermost) torch-op names enclosing a profiler event."""
    names = []
    e = ev.parent
    while e is not None:
        if e.typed[0].name == "TorchOp":
            names.append(e.name)
        e = e.parent
    if not names:
        return None
    return names[-1] if len(names) == 1 else f"{names[-1]} > {names[0]}"


def live_tensors_at(mp, t_us):
    """Tensors live at the end of the timeline row with time t_us (microseconds), as
    [{bytes, category, shape, dtype, made_by}], largest first.  Shapes come from the
    op inputs the profiler recorded (record_shapes=True); made_by from the op
    enclosing the allocation."""
    from torch.profiler._memory_profiler import Action, TensorKey, _EventType

    meta, made_by = {}, {}
    for ev in mp._op_tree.dfs():
        kind = ev.typed[0]
        if kind == _EventType.TorchOp:
            for i in ev.typed[1].inputs:
                for t in i if isinstance(i, list) else [i]:
                    if isinstance(t, torch._C._profiler._TensorMetadata):
                        k = TensorKey.from_tensor(t)
                        if k is not None and k not in meta:
                            meta[k] = (list(t.sizes), str(t.dtype).replace("torch.", ""))
        elif kind == _EventType.Allocation and ev.typed[1].alloc_size > 0:
            k = TensorKey.from_allocation(ev.typed[1])
            if k is not None:
                made_by[k] = _op_chain(ev)
    live = {}
    unknown = 0
    for t, action, (key, version), nbytes in mp.timeline:
        if key.device.type != "cpu":
            continue
        if t != -1 and int(t / 1000) > t_us:
            break
        if not isinstance(key, TensorKey):
            unknown += -nbytes if action == Action.DESTROY else nbytes
            continue
        if action in (Action.PREEXISTING, Action.CREATE):
            live[key] = (nbytes, version)
        elif action == Action.INCREMENT_VERSION:
            live[key] = (nbytes, version + 1)
        elif action == Action.DESTROY:
            live.pop(key, None)
    out = []
    for key, (nbytes, version) in live.items():
        cat = mp._categories.get(key, version)
        shape, dtype = meta.get(key, (None, None))
        out.append(
            {
                "bytes": int(nbytes),
                "category": cat.name if cat is not None else "UNKNOWN",
                "shape": shape,
                "dtype": dtype,
                "made_by": made_by.get(key),
            }
        )
    out.sort(key=lambda r: -r["bytes"])
    return out, unknown


def profile_one_step(cfg):
    """Warm-up step, then one profiled step. Returns (profiler, setup dict)."""
    from torch.profiler import ProfilerActivity, profile

    s = setup(cfg)
    s["step"]()  # warm-up: creates AdamW state
    gc.collect()
    with profile(
        activities=[ProfilerActivity.CPU],
        profile_memory=True,
        record_shapes=True,
        with_stack=True,
    ) as prof:
        s["step"]()
    return prof, s


def measure(cfg, keep_timeline=None, top=8, check_floor=True):
    """check_floor=False for steps that never hold all gradients at once (optimizer in backward)."""
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    t0 = time.time()
    prof, s = profile_one_step(cfg)
    model, opt, xs = s["model"], s["opt"], s["xs"]
    params = sum(p.numel() for p in model.parameters())

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "timeline.json")
        # Same as prof.export_memory_timeline(path, device="cpu") (json branch), keeping
        # the MemoryProfile so that its op tree can name the op at the peak.
        mp = prof._memory_profile()
        prof.mem_tl = MemoryProfileTimeline(mp)
        prof.mem_tl.export_memory_timeline(path, "cpu")
        with open(path) as f:
            times, sizes = json.load(f)
        if keep_timeline:
            with open(keep_timeline, "w") as f:
                json.dump([times, sizes], f)

    totals = [sum(row) for row in sizes]
    i_peak = max(range(len(totals)), key=totals.__getitem__)
    peak = totals[i_peak]
    row = sizes[i_peak]
    at_peak = {name: row[i + 1] for i, name in enumerate(CATEGORY_NAMES)}
    assert row[0] == 0
    span = (times[-1] - times[0]) or 1
    frac = (times[i_peak] - times[0]) / span

    # The timeline rows are coalesced per microsecond; the peak row is the state at the
    # end of that microsecond.  Name the innermost op running then.
    peak_op = _innermost_op(mp._op_tree._root_nodes, times[i_peak] * 1000 + 999)

    # The same timeline replayed event by event (nanosecond stamps, creations before
    # frees at equal stamps) instead of per-microsecond rows: an upper bound that shows
    # whether the row coalescing hid a short-lived spike.
    from torch.profiler._memory_profiler import Action

    cur = unbinned = 0
    for _t, action, (key, _v), nbytes in mp.timeline:
        if key.device.type != "cpu":
            continue
        if action in (Action.PREEXISTING, Action.CREATE):
            cur += nbytes
        elif action == Action.DESTROY:
            cur -= nbytes
        unbinned = max(unbinned, cur)

    live, _unknown = live_tensors_at(mp, times[i_peak])
    live_sum = sum(r["bytes"] for r in live) + _unknown
    if live_sum != totals[i_peak]:
        raise RuntimeError(f"{cfg['id']}: live-set replay {live_sum} != timeline {totals[i_peak]}")

    missing = check_preexisting(prof.mem_tl, model, opt, xs)
    added = sum(sum(v.values()) for v in missing.values())
    peak += added

    p_bytes, _ = storage_bytes(model.parameters())
    s_bytes, _ = storage_bytes(optimizer_state_tensors(opt))
    g_bytes, _ = storage_bytes(p for p in model.parameters() if p.requires_grad)
    floor = p_bytes + g_bytes + s_bytes  # params + grads of the trainable ones + AdamW state
    ok = peak >= floor
    res = {
        "id": cfg["id"],
        "config": {"model": cfg["model"], "train": cfg["train"], "hardware": cfg["hardware"]},
        "peak_bytes": int(peak),
        "at_peak": at_peak,
        "peak_bytes_unbinned": int(unbinned + added),
        "peak_time_fraction": round(frac, 4),
        "peak_near_op": peak_op,
        "largest_live_at_peak": live[:top],
        "params": int(params),
        "param_bytes": int(p_bytes),
        "optimizer_state_bytes": int(s_bytes),
        "added_preexisting_bytes": int(added),
        "sanity_floor_bytes": int(floor),
        "seconds": round(time.time() - t0, 1),
    }
    if check_floor and not ok:
        raise RuntimeError(f"{cfg['id']}: peak {peak} < params+grads+state {floor}")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/data/torch_cpu.json")
    ap.add_argument("--only", default=None, help="run only configs whose id contains this")
    ap.add_argument("--list", action="store_true", help="list run ids and exit")
    args = ap.parse_args()

    torch.set_num_threads(2)
    warnings.filterwarnings("ignore", category=FutureWarning)
    import transformers

    transformers.logging.set_verbosity_error()

    cfgs = configs()
    if args.only:
        cfgs = [c for c in cfgs if args.only in c["id"]]
    if args.list:
        for c in cfgs:
            print(c["id"])
        return

    runs = []
    for cfg in cfgs:
        r = measure(cfg)
        runs.append(r)
        print(
            f"{r['id']:<62} peak {r['peak_bytes']:>12} B ({r['peak_bytes'] / 2**20:8.1f} MiB)"
            f"  at {r['peak_time_fraction']:.2f} near {r['peak_near_op']}  [{r['seconds']} s]",
            flush=True,
        )
        gc.collect()

    added_any = any(r["added_preexisting_bytes"] for r in runs)
    out = {
        "tool": {
            "torch": torch.__version__.split("+")[0],
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "method": (
            "one steady-state step after a warm-up step (AdamW state exists, grads freed by "
            "zero_grad(set_to_none=True)); torch.profiler.profile(activities=[CPU], "
            "profile_memory=True, record_shapes=True, with_stack=True) around exactly one full "
            "step (all grad_accum micro-steps, opt.step, zero_grad); peak = max over time of "
            "export_memory_timeline(device=cpu) summed over all categories incl. UNKNOWN "
            "(rows coalesced per microsecond); at_peak = the categories of that row; "
            "peak_bytes_unbinned = the same events replayed one by one (a check on the "
            "coalescing). "
            "Pre-existing tensors (parameters, AdamW exp_avg/exp_avg_sq/step, input ids) are "
            "included by the timeline itself as PREEXISTING events; verified per run by "
            "storage pointer"
            + (
                "; storages it missed were added explicitly (added_preexisting_bytes)"
                if added_any
                else " (none missing, added_preexisting_bytes = 0 everywhere)"
            )
            + ". torch.manual_seed(0), torch.set_num_threads(2), random token ids in [0, vocab), "
            "labels = input ids (HF shifts internally; nanochat targets = idx). "
            "AdamW(lr=1e-4, weight_decay=0.1), default implementation (for-loop on CPU). "
            "bf16-autocast: torch.autocast('cpu', dtype=torch.bfloat16) around the forward; "
            "bf16: model.to(torch.bfloat16), no autocast. " + CHECKPOINT_NOTE + ". "
            "HF models built from config objects with random init, use_cache=False, dropout 0; "
            "nanochat is a re-implementation of nanochat/gpt.py (Oct 2025) in this script. "
            "sanity_floor_bytes = param_bytes + trainable param bytes + optimizer_state_bytes <= peak_bytes."
        ),
        "runs": runs,
    }
    if args.only and os.path.exists(args.out):
        # merge into the existing file, replacing runs with the same id
        with open(args.out) as f:
            old = json.load(f)
        new_ids = {r["id"] for r in runs}
        order = [c["id"] for c in configs()]
        merged = [r for r in old.get("runs", []) if r["id"] not in new_ids] + runs
        merged.sort(key=lambda r: order.index(r["id"]) if r["id"] in order else len(order))
        out["runs"] = merged
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
