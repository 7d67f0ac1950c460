"""The same small nanochat GPT trained on the CPU by vramplan's candle engine and by
PyTorch eager, side by side: tokens per second of whole training steps (forward,
backward, gradient clipping, AdamW), same dimensions, batch, sequence and threads.

    python tools/bench_engine_vs_torch.py [--threads 1,2] [--reps 5] [--sizes 0,1,2]
        [--binary target/release/vramplan] [--out docs/data/cpu_bench.json]
        [--baseline-binary OTHER --baseline-commit C] [--runners engine,engine_baseline,torch]

Every configuration (`--sizes`: indices into CONFIGS, default all) runs at each thread
count (default 1 and 2: how each framework scales matters as much as its single-thread
speed). Three runners, alternated within every repetition, each in a child process of
its own:

- engine: `vramplan train PLAN` with checkpointing off and the loss over the whole
  micro-batch at once (`loss = "float-cast"`). The binary is `--binary`, or by default
  `target/release/vramplan` after `cargo build --release`. The step rates are read from
  the run's `metrics.jsonl` (one line per step; the engine times data, forward,
  backward, clipping and AdamW).
- torch: this script in its child mode (`--runner torch --config I --threads N
  --json-out F`): PyTorch eager as its users write it: `F.rms_norm`,
  `F.scaled_dot_product_attention(is_causal=True)`, `F.cross_entropy` on fp32 logits,
  `torch.optim.AdamW` and `clip_grad_norm_`.
- torch_unfused (`--runner torch_unfused`): the engine's own op graph written in
  PyTorch: RMSNorm as `x / sqrt(mean(x^2) + eps)`, explicit `(T, T)` scores plus an
  additive causal mask and a softmax from max/sub/exp/sum/div, the log-sum-exp loss, and
  AdamW as a chain of out-of-place tensor ops per parameter. The engine vs this runner
  compares the frameworks' kernels and per-op costs on the same math; torch vs
  torch-unfused is what PyTorch's fused kernels are worth.

- engine_baseline (with `--baseline-binary B`): the engine runner with another build, to
  measure an engine change side by side with its baseline in the same run (the ratio
  `engine_over_engine_baseline`). `--runners` picks which runners to alternate.

Threads, per child: its CPU affinity is exactly N cores (the first N the harness may
run on, set with `os.sched_setaffinity` between fork and exec, so every thread the
child starts inherits it), and OMP_NUM_THREADS, MKL_NUM_THREADS and RAYON_NUM_THREADS
are N. candle-core 0.11 (`utils.rs`) sizes gemm's parallelism from RAYON_NUM_THREADS and
its barrier pool for elementwise ops (CANDLE_NUM_THREADS - 1 workers) from
CANDLE_NUM_THREADS, which defaults to RAYON_NUM_THREADS; the engine sets it to 1 where
it is not set (`engine::keep_elementwise_on_one_thread`). CANDLE_NUM_THREADS, and CANDLE_CPU_MASK and
CANDLE_CPU_AFFINITY, with which candle would re-pin its threads, are removed from the
child's environment, so every build runs as its users run it. The torch child also calls `torch.set_num_threads(N)` and
checks it. The harness never imports torch (only its children do), so no OpenMP pool
of the harness spins while another runner runs: OMP_WAIT_POLICY=PASSIVE is not needed.

Recorded per run: tokens/s; the child's wall time and user and system CPU time
(`os.wait4`), and CPU time / wall time, whole process with its start-up (at most N on N
cores); the cores it ran on, read back from the running child; the 1-minute load
average before it and the share of the machine's CPU time other processes took during
it. The output names the machine: CPU model, logical CPUs and physical cores, the
vector features from /proc/cpuinfo's flags, torch's version and
`torch.backends.cpu.get_cpu_capability()` (asked of a child), and the engine's commit
(this checkout's for the default binary; `--engine-commit` for a prebuilt one, else
unknown).

Both models: fp32, the same initialization scales, AdamW (0.9, 0.95, eps 1e-8, decay 0.1
on block matrices and the untied head), global-norm clipping at 1.0. The first SKIP steps
of each run are left out; a run's figure is the median of its step rates, a
configuration's the median over runs. Before each run the script waits until other
processes use less than 10 % of the CPU; a run during which they took more is run again
(the discarded one is kept in the output).
"""

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
RUNNERS = ("engine", "torch", "torch_unfused")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS")
# Removed from a child's environment: candle would pin its threads to the first two, and
# the engine sizes candle's elementwise pool itself unless CANDLE_NUM_THREADS is set, so
# each build runs as a user runs it.
REPIN_VARS = ("CANDLE_CPU_MASK", "CANDLE_CPU_AFFINITY", "CANDLE_NUM_THREADS")
SPIN_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "CANDLE_BARRIER_POOL_SPIN_LIMIT")
FLAGS = ("fma", "f16c", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
         "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")

torch = F = None  # bound by import_torch, in a torch child only


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


def self_cpu_seconds():
    s = resource.getrusage(resource.RUSAGE_SELF)
    return s.ru_utime + s.ru_stime


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


# ---------------------------------------------------------------- child processes


def cores_for(n):
    """The first n cores this process may run on."""
    allowed = sorted(os.sched_getaffinity(0))
    if n > len(allowed):
        sys.exit(f"{n} threads asked for, but this process may run on {len(allowed)} cores only")
    return allowed[:n]


def child_env(n):
    env = {k: v for k, v in os.environ.items() if k not in REPIN_VARS}
    env.update({k: str(n) for k in THREAD_VARS})
    return env


def run_child(argv, n):
    """Runs argv pinned to n cores, its thread variables at n. Returns its wall and CPU
    times, the cores read back from it, and the machine's load before and during it."""
    cores = cores_for(n)
    la, busy0, self0 = load1(), cpu_busy_seconds(), self_cpu_seconds()
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, env=child_env(n), stdout=subprocess.DEVNULL,
                         preexec_fn=lambda: os.sched_setaffinity(0, cores))
    try:
        pinned = sorted(os.sched_getaffinity(p.pid))
    except OSError:
        pinned = None
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise subprocess.CalledProcessError(p.returncode, argv)
    busy1, self1 = cpu_busy_seconds(), self_cpu_seconds()
    cpu = ru.ru_utime + ru.ru_stime
    others = None
    if busy0 is not None:
        others = round(max(0.0, busy1 - busy0 - (self1 - self0) - cpu) / (wall * os.cpu_count()), 3)
    return {
        "wall_seconds": round(wall, 3), "user_seconds": round(ru.ru_utime, 3),
        "system_seconds": round(ru.ru_stime, 3), "cpu_per_wall": round(cpu / wall, 3),
        "cores": pinned, "load1_before": la, "others_cpu_share": others,
    }


def engine_run(binary, i, n, work):
    c = CONFIGS[i]
    steps = c[-1]
    plan = work / "plan.toml"
    plan.write_text(plan_toml(c))
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    proc = run_child(
        [binary, "train", str(plan), "--steps", str(steps), "--out", str(out),
         "--eval-every", "0", "--save-every", "0", "--log-every", str(steps)], n)
    rates = [json.loads(l)["tokens_per_second"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {"tokens_per_second": statistics.median(rates[SKIP:])}, proc


def torch_run(runner, i, n, work):
    res = work / "torch.json"
    res.unlink(missing_ok=True)
    proc = run_child([sys.executable, str(Path(__file__).resolve()), "--runner", runner,
                      "--config", str(i), "--threads", str(n), "--json-out", str(res)], n)
    return json.loads(res.read_text()), proc


# ---------------------------------------------------------------- the machine


def machine():
    """CPU model, logical CPUs, physical cores and vector features (/proc/cpuinfo)."""
    info = {"cpu": platform.processor() or platform.machine(), "logical_cpus": os.cpu_count(),
            "physical_cores": None, "cpus_allowed": len(os.sched_getaffinity(0)),
            "vector_features": None}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    cores, flags, phys, named = set(), set(), None, False
    for line in text.splitlines():
        key, _, val = (s.strip() for s in line.partition(":"))
        if key == "model name" and not named:
            info["cpu"], named = val, True
        elif key == "physical id":
            phys = val
        elif key == "core id":
            cores.add((phys, val))
        elif key == "flags":
            flags = set(val.split())
    info["physical_cores"] = len(cores) or None
    info["vector_features"] = {f: f in flags for f in FLAGS}
    return info


def torch_info(work):
    """torch's version, CPU capability and parallel backend, asked of a child process."""
    out = work / "torch_info.json"
    subprocess.run([sys.executable, str(Path(__file__).resolve()), "--runner", "torch-info",
                    "--json-out", str(out)], check=True, env=child_env(1))
    return json.loads(out.read_text())


def git_rev():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "planner", "Cargo.toml",
                                "Cargo.lock"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


# ---------------------------------------------------------------- PyTorch (child processes only)


def rope_tables(t, hd):
    freq = ROPE_BASE ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(t, dtype=torch.float64)[:, None] * freq[None, :]
    return ang.cos().float(), ang.sin().float()


class GptBody:
    """nanochat as the engine trains it; `fused` picks PyTorch's fused kernels or the
    engine's elementwise formulation. A `torch.nn.Module` once `import_torch` has mixed
    the two (the harness never imports torch)."""

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

    def step(self):
        with torch.no_grad():
            self.update()

    def update(self):
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


def import_torch():
    """Imports PyTorch into this (child) process; returns the model class."""
    global torch, F
    import torch as torch_module
    import torch.nn.functional as functional

    torch, F = torch_module, functional
    return type("Gpt", (GptBody, torch.nn.Module), {})


def torch_steps(gpt, c, fused):
    """Trains `c` for its steps; the median step rate and phase times after SKIP."""
    torch.manual_seed(0)
    _, _, _, _, _, _, vocab, b, t, steps = c
    model = gpt(c, fused)
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


def torch_child(runner, i, n, json_out):
    """Child mode: one run of a torch runner on n cores (pinned here too if started
    without the harness, before torch starts any thread)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) > n:
        cores = cores[:n]
        os.sched_setaffinity(0, cores)
    gpt = import_torch()
    torch.set_num_threads(n)
    assert torch.get_num_threads() == n
    cpu0, t0 = self_cpu_seconds(), time.perf_counter()
    res = torch_steps(gpt, CONFIGS[i], fused=runner == "torch")
    res["steps_cpu_per_wall"] = (self_cpu_seconds() - cpu0) / (time.perf_counter() - t0)
    res["torch_threads"] = torch.get_num_threads()
    res["child_cores"] = cores
    Path(json_out).write_text(json.dumps(res) + "\n")


def torch_info_child(json_out):
    import_torch()
    backend = [l.split(":", 1)[1].strip() for l in torch.__config__.parallel_info().splitlines()
               if l.startswith("ATen parallel backend")]
    Path(json_out).write_text(json.dumps({
        "version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "parallel_backend": backend[0] if backend else None,
        "mkldnn": torch.backends.mkldnn.is_available(),
        "mkl": torch.backends.mkl.is_available(),
    }) + "\n")


# ---------------------------------------------------------------- driver


def spread(xs):
    return [round(min(xs), 1), round(max(xs), 1)]


def rounded(res):
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}


def run_kept(name, fn, a, discarded):
    """One run of a runner, run again (at most `--retries` times) while others took
    `--quiet-below` or more of the CPU during it; the discarded runs go to `discarded`."""
    for attempt in range(a.retries + 1):
        idle = wait_quiet(a.quiet_below, a.patience)
        res, proc = fn()
        run = {**rounded(res), **proc, "others_cpu_share_before": idle}
        busy = proc["others_cpu_share"]
        if busy is None or busy < a.quiet_below or attempt == a.retries:
            return run
        discarded.append({"runner": name, **run})
        print(f"  {name}: others took {busy:.0%} of the CPU during the run; again", file=sys.stderr)


def bench_row(i, n, a, binary, work):
    """All repetitions of size i at n threads, the runners alternated; the row's summary."""
    fns = {
        "engine": lambda: engine_run(binary, i, n, work),
        "engine_baseline": lambda: engine_run(a.baseline_binary, i, n, work),
        "torch": lambda: torch_run("torch", i, n, work),
        "torch_unfused": lambda: torch_run("torch_unfused", i, n, work),
    }
    runs, discarded = {k: [] for k in a.runners}, []
    for r in range(a.reps):
        for k in a.runners:
            runs[k].append(run_kept(k, fns[k], a, discarded))
        line = ", ".join(f"{k} {v[-1]['tokens_per_second']:.0f} ({v[-1]['cpu_per_wall']:.2f} CPU)"
                         for k, v in runs.items())
        loads = ", ".join(f"{v[-1]['others_cpu_share']}" for v in runs.values())
        print(f"{CONFIGS[i][0]}, {n} threads: rep {r + 1}: tok/s {line} (others' CPU share {loads})",
              file=sys.stderr)
    return summary(i, n, a.reps, runs, discarded)


def summary(i, n, reps, runs, discarded):
    c = CONFIGS[i]
    tps = {k: [x["tokens_per_second"] for x in v] for k, v in runs.items()}
    med = {k: statistics.median(v) for k, v in tps.items()}
    return {
        "config": c[0], "size_index": i, "threads": n,
        "hidden_size": c[1], "num_layers": c[2], "num_heads": c[3], "head_dim": c[4],
        "intermediate_size": c[5], "vocab_size": c[6], "micro_batch": c[7], "seq_len": c[8],
        "steps_per_run": c[9], "skipped_steps": SKIP, "repetitions": reps,
        **{f"{k}_tokens_per_second": round(v, 1) for k, v in med.items()},
        **{f"{k}_min_max": spread(v) for k, v in tps.items()},
        **{f"{k}_cpu_per_wall": round(statistics.median(x["cpu_per_wall"] for x in v), 3)
           for k, v in runs.items()},
        **{f"ratio_{x}_over_{y}": round(med[x] / med[y], 3)
           for x, y in (("engine", "torch"), ("engine", "torch_unfused"),
                        ("torch_unfused", "torch"), ("engine", "engine_baseline"))
           if x in med and y in med},
        "runs": runs,
        "discarded_runs": discarded,
    }


def print_table(doc):
    m, t = doc["machine"], doc["torch"]
    feats = " ".join(f for f, on in (m["vector_features"] or {}).items() if on) or "unknown"
    print(f"machine: {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['physical_cores']} cores, "
          f"{m['cpus_allowed']} allowed); features: {feats}")
    print(f"torch {t['version']} (CPU capability {t['cpu_capability']}, {t['parallel_backend']}); "
          f"engine {doc['engine_commit'] or 'unknown commit'}"
          + (f", baseline {doc['baseline_commit'] or 'unknown commit'}" if doc.get("baseline_commit") else ""))
    runners = doc["runners"]
    ratios = [k[len("ratio_"):] for k in doc["rows"][0] if k.startswith("ratio_")] if doc["rows"] else []
    print(f"{'size':<28} {'thr':>3} {'cores':>5}  " + "  ".join(f"{k:>16}" for k in runners) + "  "
          + "  ".join(ratios))
    for r in doc["rows"]:
        cores = ",".join(str(x) for x in r["runs"][runners[0]][0]["cores"] or [])
        cells = "  ".join(f"{r[f'{k}_tokens_per_second']:>9.0f} ({r[f'{k}_cpu_per_wall']:.2f})"
                          for k in runners)
        print(f"{r['config']:<28} {r['threads']:>3} {cores:>5}  {cells}  "
              + "  ".join(f"{r['ratio_' + k]:>{len(k)}.2f}" for k in ratios))
    print("tokens/s, median over runs (CPU time / wall time of the run's process in brackets)")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--sizes", "--configs", dest="sizes", default=None,
                    help="comma-separated indices into CONFIGS (default: all)")
    ap.add_argument("--binary", default=None,
                    help="a prebuilt engine (default: target/release/vramplan, built first)")
    ap.add_argument("--engine-commit", default=None, help="the commit a prebuilt --binary was built from")
    ap.add_argument("--baseline-binary", default=None,
                    help="another engine build, run as the runner engine_baseline beside the others")
    ap.add_argument("--baseline-commit", default=None, help="the commit --baseline-binary was built from")
    ap.add_argument("--runners", default=None,
                    help="comma-separated runners to alternate (default: engine, torch, torch_unfused, "
                         "and engine_baseline with --baseline-binary)")
    ap.add_argument("--out", default=str(ROOT / "docs/data/cpu_bench.json"))
    ap.add_argument("--quiet-below", type=float, default=0.10,
                    help="before each run, wait until other processes use less than this CPU share")
    ap.add_argument("--patience", type=float, default=300, help="seconds to wait for that at most")
    ap.add_argument("--retries", type=int, default=2,
                    help="runs again (at most this often) when others took that share during a run")
    ap.add_argument("--runner", choices=("torch", "torch_unfused", "torch-info"),
                    help="child mode: one run of a torch runner (or torch's description)")
    ap.add_argument("--config", type=int, help="child mode: the size, an index into CONFIGS")
    ap.add_argument("--json-out", help="child mode: where the child writes its result")
    return ap.parse_args()


def bench(a):
    sizes = range(len(CONFIGS)) if a.sizes is None else [int(i) for i in a.sizes.split(",")]
    if a.baseline_binary:
        a.baseline_binary = str(Path(a.baseline_binary).resolve())
    default = RUNNERS + (("engine_baseline",) if a.baseline_binary else ())
    a.runners = tuple(a.runners.split(",")) if a.runners else default
    unknown = [k for k in a.runners if k not in RUNNERS + ("engine_baseline",)]
    if unknown or ("engine_baseline" in a.runners and not a.baseline_binary):
        sys.exit(f"--runners: {','.join(unknown) or 'engine_baseline'}: expected some of "
                 f"{', '.join(RUNNERS)}, engine_baseline (with --baseline-binary)")
    thread_counts = [int(x) for x in a.threads.split(",")]
    if a.binary is None:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
        binary, commit = str(ROOT / "target/release/vramplan"), git_rev()
    else:
        binary, commit = str(Path(a.binary).resolve()), a.engine_commit
    doc = {
        "machine": machine(), "threads": thread_counts, "python": platform.python_version(),
        "engine_commit": commit, "engine_binary": "prebuilt" if a.binary else "target/release/vramplan",
        "runners": list(a.runners),
        "baseline_commit": a.baseline_commit if a.baseline_binary else None,
        "child_thread_variables": list(THREAD_VARS),
        "inherited_spin_variables": {k: os.environ[k] for k in SPIN_VARS if k in os.environ},
    }
    with tempfile.TemporaryDirectory() as tmp:
        doc["torch"] = torch_info(Path(tmp))
        doc["rows"] = [bench_row(i, n, a, binary, Path(tmp)) for i in sizes for n in thread_counts]
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    print_table(doc)


def main():
    a = parse_args()
    if a.runner == "torch-info":
        torch_info_child(a.json_out)
    elif a.runner:
        torch_child(a.runner, a.config, int(a.threads), a.json_out)
    else:
        bench(a)


if __name__ == "__main__":
    main()
