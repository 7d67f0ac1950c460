"""The same small nanochat GPT trained on the CPU by vramplan's candle engine and by
PyTorch eager, side by side: tokens per second of whole training steps (forward,
backward, gradient clipping, AdamW), same dimensions, batch, sequence and threads.

    python tools/bench_engine_vs_torch.py [--threads 1,2] [--reps 5] [--out docs/data/cpu_bench.json]

Every configuration runs at each thread count (default 1 and 2: how each framework scales
matters as much as its single-thread speed). Three runners, alternated within every
repetition (engine, torch, torch-unfused):

- engine: `vramplan train PLAN` (release build, `cargo build --release` first) with
  checkpointing off and the loss over the whole micro-batch at once
  (`loss = "float-cast"`), `RAYON_NUM_THREADS=N` (candle-core's `utils.rs` sizes both its
  rayon pool and its barrier pool from it). The step rates are read from the run's
  `metrics.jsonl` (one line per step; the engine times data, forward, backward, clipping
  and AdamW).
- torch: PyTorch eager as its users write it: `F.rms_norm`,
  `F.scaled_dot_product_attention(is_causal=True)`, `F.cross_entropy` on fp32 logits,
  `torch.optim.AdamW` and `clip_grad_norm_`, `torch.set_num_threads(N)`.
- torch-unfused: the engine's own op graph written in PyTorch: RMSNorm as
  `x / sqrt(mean(x^2) + eps)`, explicit `(T, T)` scores plus an additive causal mask and
  a softmax from max/sub/exp/sum/div, the log-sum-exp loss, and AdamW as a chain of
  out-of-place tensor ops per parameter. The engine vs this runner compares the
  frameworks' kernels and per-op costs on the same math; torch vs torch-unfused is what
  PyTorch's fused kernels are worth.

Both models: fp32, the same initialization scales, AdamW (0.9, 0.95, eps 1e-8, decay 0.1
on block matrices and the untied head), global-norm clipping at 1.0. The first SKIP steps
of each run are left out; a run's figure is the median of its step rates, a
configuration's the median over runs. Before each run the script waits until other
processes use less than 10 % of the CPU; a run during which they took more is run again
(the discarded one is kept in the output). Every run records the 1-minute load average
before it and the share of the machine's CPU time other processes took during it.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
SOFTCAP = 15.0
ROPE_BASE = 10_000.0
EPS = 1e-6
BETAS = (0.9, 0.95)
ADAM_EPS = 1e-8
DECAY = 0.1
LR = 1e-3

# name, hidden, layers, heads, head_dim, mlp, vocab, micro_batch, seq_len, steps
CONFIGS = [
    ("built-in size", 64, 2, 2, 32, 256, 256, 16, 64, 100),
    ("d256 x 4 blocks, vocab 4096", 256, 4, 4, 64, 1024, 4096, 4, 256, 16),
    ("d512 x 4 blocks, vocab 8192", 512, 4, 8, 64, 2048, 8192, 2, 512, 10),
]
SKIP = 2  # warm-up steps left out of each run


def plan_toml(c):
    name, hidden, layers, heads, hd, mlp, vocab, b, t, steps = c
    return f"""[model]
name = "bench"
arch = "nanochat"
hidden_size = {hidden}
num_layers = {layers}
num_heads = {heads}
num_kv_heads = {heads}
head_dim = {hd}
intermediate_size = {mlp}
vocab_size = {vocab}
tie_embeddings = false

[train]
micro_batch = {b}
seq_len = {t}
grad_accum = 1
precision = "fp32"
checkpointing = "none"
loss = "float-cast"
optimizer = "adamw"
engine = "candle"
learning_rate = {LR}

[hardware]
gpu = "cpu"
"""


# ---------------------------------------------------------------- machine load


def cpu_busy_seconds():
    """Busy CPU time of the whole machine (all cores) from /proc/stat, in seconds."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return None
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    return (sum(f[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds():
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def load1():
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return None


def wait_quiet(limit, patience):
    """Before a run: waits (up to `patience` seconds) until other processes use less than
    `limit` of the machine's CPU over 2 s. Returns the share seen last."""
    deadline = time.monotonic() + patience
    while True:
        b0 = cpu_busy_seconds()
        if b0 is None:
            return None
        time.sleep(2.0)
        share = (cpu_busy_seconds() - b0) / (2.0 * os.cpu_count())
        if share < limit or time.monotonic() > deadline:
            return round(share, 3)
        print(f"  others use {share:.0%} of the CPU; waiting", file=sys.stderr)


def measured(fn):
    """Runs fn(), returning its result and the run's load: the 1-minute load average
    before it and the fraction of the machine's CPU time other processes used during it."""
    la, busy0, own0, t0 = load1(), cpu_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    out = fn()
    wall = time.perf_counter() - t0
    busy1, own1 = cpu_busy_seconds(), own_cpu_seconds()
    others = None
    if busy0 is not None:
        others = max(0.0, (busy1 - busy0) - (own1 - own0)) / (wall * os.cpu_count())
    return out, {"load1_before": la, "others_cpu_share": None if others is None else round(others, 3)}


# ---------------------------------------------------------------- engine


def engine_run(binary, c, threads, work):
    steps = c[-1]
    plan = work / "plan.toml"
    plan.write_text(plan_toml(c))
    out = work / "out"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    env.pop("CANDLE_NUM_THREADS", None)  # would override the barrier pool's size
    subprocess.run(
        [binary, "train", str(plan), "--steps", str(steps), "--out", str(out),
         "--eval-every", "0", "--save-every", "0", "--log-every", str(steps)],
        check=True, env=env, stdout=subprocess.DEVNULL,
    )
    rates = [json.loads(l)["tokens_per_second"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {"tokens_per_second": statistics.median(rates[SKIP:])}


# ---------------------------------------------------------------- PyTorch


def rope_tables(t, hd):
    freq = ROPE_BASE ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * freq[None, :]
    return ang.cos().float(), ang.sin().float()


class Gpt(torch.nn.Module):
    """nanochat as the engine trains it; `fused` picks PyTorch's fused kernels or the
    engine's elementwise formulation."""

    def __init__(self, c, fused):
        super().__init__()
        _, hidden, layers, heads, hd, mlp, vocab, _, t, _ = c
        self.heads, self.hd, self.fused = heads, hd, fused
        g = torch.Generator().manual_seed(0)

        def lin(i, o, std):
            m = torch.nn.Linear(i, o, bias=False)
            with torch.no_grad():
                m.weight.normal_(0.0, std, generator=g)
            return m

        self.wte = torch.nn.Embedding(vocab, hidden)
        with torch.no_grad():
            self.wte.weight.normal_(0.0, 1.0, generator=g)
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            blk = torch.nn.Module()
            s = hidden ** -0.5
            blk.q, blk.k, blk.v = lin(hidden, heads * hd, s), lin(hidden, heads * hd, s), lin(hidden, heads * hd, s)
            blk.proj = lin(heads * hd, hidden, 0.5 * (heads * hd) ** -0.5)
            blk.fc, blk.out = lin(hidden, mlp, s), lin(mlp, hidden, 0.5 * mlp ** -0.5)
            self.blocks.append(blk)
        self.head = lin(hidden, vocab, 0.1 * hidden ** -0.5)
        cos, sin = rope_tables(t, hd)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        mask = torch.full((t, t), -1e9).triu(1)
        self.register_buffer("mask", mask, persistent=False)

    def norm(self, z):
        if self.fused:
            return F.rms_norm(z, (z.shape[-1],), eps=EPS)
        return z / (z.square().mean(-1, keepdim=True) + EPS).sqrt()

    def rope(self, x):
        d = x.shape[-1] // 2
        x1, x2 = x[..., :d], x[..., d:]
        return torch.cat([x1 * self.cos + x2 * self.sin, x2 * self.cos - x1 * self.sin], -1)

    def attend(self, q, k, v):
        if self.fused:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        att = (q @ k.transpose(-1, -2)) * self.hd ** -0.5 + self.mask
        m = att.amax(-1, keepdim=True)
        e = (att - m).exp()
        return (e / e.sum(-1, keepdim=True)) @ v

    def forward(self, ids, targets):
        b, t = ids.shape
        x = self.norm(self.wte(ids))
        for blk in self.blocks:
            h = self.norm(x)
            split = lambda z: z.view(b, t, self.heads, self.hd).transpose(1, 2)
            q = self.norm(self.rope(split(blk.q(h))))
            k = self.norm(self.rope(split(blk.k(h))))
            v = split(blk.v(h))
            y = self.attend(q, k, v)
            x = x + blk.proj(y.transpose(1, 2).reshape(b, t, -1))
            x = x + blk.out(F.relu(blk.fc(self.norm(x))).square())
        z = self.head(self.norm(x))
        z = (SOFTCAP * torch.tanh(z / SOFTCAP)).float().view(-1, z.shape[-1])
        tg = targets.reshape(-1)
        if self.fused:
            return F.cross_entropy(z, tg)
        m = z.amax(1, keepdim=True).detach()
        lse = (z - m).exp().sum(1, keepdim=True).log() + m
        return (lse - z.gather(1, tg[:, None])).sum() / tg.numel()


def decays(name):
    return name != "wte.weight"  # block matrices and the untied head; no norms carry weights


class EngineAdamW:
    """The engine's update (src/engine/optim.rs) as out-of-place tensor ops, with its
    global-norm clipping folded in."""

    def __init__(self, named):
        self.named, self.state, self.t = named, {}, 0

    @torch.no_grad()
    def step(self):
        gs = {n: p.grad for n, p in self.named}
        norm = sum(float(g.square().sum()) for g in gs.values()) ** 0.5
        clip = 1.0 / norm if norm > 1.0 else 1.0
        self.t += 1
        bc1, bc2 = 1 - BETAS[0] ** self.t, 1 - BETAS[1] ** self.t
        for n, p in self.named:
            g = gs[n] * clip
            m, v = self.state.get(n, (torch.zeros_like(g), torch.zeros_like(g)))
            m = m * BETAS[0] + g * (1 - BETAS[0])
            v = v * BETAS[1] + g.square() * (1 - BETAS[1])
            upd = (m / bc1) / ((v / bc2).sqrt() + ADAM_EPS)
            wd = DECAY if decays(n) else 0.0
            p.copy_(p * (1 - LR * wd) - upd * LR)
            self.state[n] = (m, v)
            p.grad = None


def torch_run(c, threads, fused):
    torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads
    torch.manual_seed(0)
    _, _, _, _, _, _, vocab, b, t, steps = c
    model = Gpt(c, fused)
    named = list(model.named_parameters())
    if fused:
        opt = torch.optim.AdamW(
            [{"params": [p for n, p in named if decays(n)], "weight_decay": DECAY},
             {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0}],
            lr=LR, betas=BETAS, eps=ADAM_EPS,
        )
    else:
        opt = EngineAdamW(named)
    rates, fwd, bwd, upd = [], [], [], []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (b, t + 1))
        t0 = time.perf_counter()
        loss = model(ids[:, :-1], ids[:, 1:])
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if fused:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            opt.step()
        t3 = time.perf_counter()
        rates.append(b * t / (t3 - t0))
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        upd.append(t3 - t2)
    med = lambda xs: statistics.median(xs[SKIP:])
    return {
        "tokens_per_second": med(rates),
        "seconds_forward": med(fwd), "seconds_backward": med(bwd), "seconds_optimizer": med(upd),
    }


# ---------------------------------------------------------------- driver


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count()}


def git_rev():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "planner", "Cargo.toml",
                                "Cargo.lock"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def spread(xs):
    return [round(min(xs), 1), round(max(xs), 1)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "docs/data/cpu_bench.json"))
    ap.add_argument("--quiet-below", type=float, default=0.10,
                    help="before each run, wait until other processes use less than this CPU share")
    ap.add_argument("--patience", type=float, default=300, help="seconds to wait for that at most")
    ap.add_argument("--retries", type=int, default=2,
                    help="runs again (at most this often) when others took that share during a run")
    ap.add_argument("--configs", default=None,
                    help="comma-separated indices into CONFIGS (default: all)")
    a = ap.parse_args()
    configs = CONFIGS if a.configs is None else [CONFIGS[int(i)] for i in a.configs.split(",")]
    thread_counts = [int(x) for x in a.threads.split(",")]
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    binary = str(ROOT / "target/release/vramplan")
    runners = {
        "engine": lambda c, n, work: engine_run(binary, c, n, work),
        "torch": lambda c, n, work: torch_run(c, n, fused=True),
        "torch_unfused": lambda c, n, work: torch_run(c, n, fused=False),
    }
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for c, n in [(c, n) for c in configs for n in thread_counts]:
            runs, discarded = {k: [] for k in runners}, []
            for r in range(a.reps):
                for k, fn in runners.items():
                    for attempt in range(a.retries + 1):
                        idle = wait_quiet(a.quiet_below, a.patience)
                        res, load = measured(lambda: fn(c, n, Path(tmp)))
                        run = {**{x: round(y, 4) for x, y in res.items()}, **load,
                               "others_cpu_share_before": idle}
                        busy = load["others_cpu_share"]
                        if busy is None or busy < a.quiet_below or attempt == a.retries:
                            runs[k].append(run)
                            break
                        discarded.append({"runner": k, **run})
                        print(f"  {k}: others took {busy:.0%} of the CPU during the run; again",
                              file=sys.stderr)
                line = ", ".join(f"{k} {v[-1]['tokens_per_second']:.0f}" for k, v in runs.items())
                loads = ", ".join(f"{v[-1]['others_cpu_share']}" for v in runs.values())
                print(f"{c[0]}, {n} threads: rep {r + 1}: tok/s {line} (others' CPU share {loads})", file=sys.stderr)
            tps = {k: [x["tokens_per_second"] for x in v] for k, v in runs.items()}
            med = {k: statistics.median(v) for k, v in tps.items()}
            rows.append({
                "config": c[0], "threads": n,
                "hidden_size": c[1], "num_layers": c[2], "num_heads": c[3], "head_dim": c[4],
                "intermediate_size": c[5], "vocab_size": c[6], "micro_batch": c[7], "seq_len": c[8],
                "steps_per_run": c[9], "skipped_steps": SKIP, "repetitions": a.reps,
                **{f"{k}_tokens_per_second": round(v, 1) for k, v in med.items()},
                **{f"{k}_min_max": spread(v) for k, v in tps.items()},
                "ratio_engine_over_torch": round(med["engine"] / med["torch"], 3),
                "ratio_engine_over_torch_unfused": round(med["engine"] / med["torch_unfused"], 3),
                "ratio_torch_unfused_over_torch": round(med["torch_unfused"] / med["torch"], 3),
                "runs": runs,
                "discarded_runs": discarded,
            })
    doc = {
        "machine": machine(),
        "threads": thread_counts,
        "torch": torch.__version__,
        "torch_parallel_backend": "OpenMP" if "OpenMP" in torch.__config__.parallel_info() else "other",
        "python": platform.python_version(),
        "engine_commit": git_rev(),
        "rows": rows,
    }
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    for r in rows:
        print(f"{r['config']:<28} {r['threads']} thr  engine {r['engine_tokens_per_second']:>9.0f}  "
              f"torch {r['torch_tokens_per_second']:>9.0f}  unfused {r['torch_unfused_tokens_per_second']:>9.0f}  "
              f"engine/torch {r['ratio_engine_over_torch']:.2f}  "
              f"engine/unfused {r['ratio_engine_over_torch_unfused']:.2f}")


if __name__ == "__main__":
    main()
