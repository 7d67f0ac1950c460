"""The same small nanochat GPT trained on the CPU by vramplan's candle engine and by
PyTorch eager, side by side: tokens per second of whole training steps (forward,
backward, gradient clipping, AdamW), same dimensions, batch, sequence and threads.

    python tools/bench_engine_vs_torch.py [--threads 2] [--reps 3] [--out docs/data/cpu_bench.json]

The engine runs as `vramplan train PLAN` (release build) with checkpointing off and the
loss over the whole micro-batch at once (`loss = "float-cast"`), which is what the
PyTorch model computes. PyTorch is written the way its users write it: `F.rms_norm`,
`F.scaled_dot_product_attention(is_causal=True)`, `F.cross_entropy` on fp32 logits,
`torch.optim.AdamW` and `clip_grad_norm_`. Runs alternate engine / torch; the first
steps of each run are skipped; the figure is the median over runs of each run's median
step rate.
"""

import argparse
import json
import os
import platform
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

# name, hidden, layers, heads, head_dim, mlp, vocab, micro_batch, seq_len, steps
CONFIGS = [
    ("built-in size", 64, 2, 2, 32, 256, 256, 16, 64, 40),
    ("d256 × 4 blocks, vocab 4096", 256, 4, 4, 64, 1024, 4096, 4, 256, 12),
    ("d512 × 4 blocks, vocab 8192", 512, 4, 8, 64, 2048, 8192, 2, 512, 8),
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
learning_rate = 0.001

[hardware]
gpu = "cpu"
"""


def engine_run(binary, c, threads, work):
    steps = c[-1]
    plan = work / "plan.toml"
    plan.write_text(plan_toml(c))
    out = work / "out"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    subprocess.run(
        [binary, "train", str(plan), "--steps", str(steps), "--out", str(out),
         "--eval-every", "0", "--save-every", "0", "--log-every", str(steps)],
        check=True, env=env, stdout=subprocess.DEVNULL,
    )
    rates = [json.loads(l)["tokens_per_second"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(rates[SKIP:])


class Gpt(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        _, hidden, layers, heads, hd, mlp, vocab, _, t, _ = c
        self.heads, self.hd = heads, hd
        lin = lambda i, o: torch.nn.Linear(i, o, bias=False)
        self.wte = torch.nn.Embedding(vocab, hidden)
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            blk = torch.nn.Module()
            blk.q, blk.k, blk.v = lin(hidden, heads * hd), lin(hidden, heads * hd), lin(hidden, heads * hd)
            blk.proj = lin(heads * hd, hidden)
            blk.fc, blk.out = lin(hidden, mlp), lin(mlp, hidden)
            self.blocks.append(blk)
        self.head = lin(hidden, vocab)
        freq = ROPE_BASE ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        ang = torch.arange(t, dtype=torch.float64)[:, None] * freq[None, :]
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)

    def rope(self, x):
        d = x.shape[-1] // 2
        x1, x2 = x[..., :d], x[..., d:]
        return torch.cat([x1 * self.cos + x2 * self.sin, x2 * self.cos - x1 * self.sin], -1)

    def forward(self, ids, targets):
        b, t = ids.shape
        norm = lambda z: F.rms_norm(z, (z.shape[-1],), eps=1e-6)
        x = norm(self.wte(ids))
        for blk in self.blocks:
            h = norm(x)
            split = lambda z: z.view(b, t, self.heads, self.hd).transpose(1, 2)
            q = norm(self.rope(split(blk.q(h))))
            k = norm(self.rope(split(blk.k(h))))
            v = split(blk.v(h))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + blk.proj(y.transpose(1, 2).reshape(b, t, -1))
            x = x + blk.out(F.relu(blk.fc(norm(x))).square())
        z = self.head(norm(x))
        z = SOFTCAP * torch.tanh(z / SOFTCAP)
        return F.cross_entropy(z.float().view(-1, z.shape[-1]), targets.reshape(-1))


def torch_run(c, threads):
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    _, _, _, _, _, _, vocab, b, t, steps = c
    model = Gpt(c)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and n != "wte.weight"]
    other = [p for n, p in model.named_parameters() if not (p.dim() == 2 and n != "wte.weight")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.95), eps=1e-8,
    )
    rates = []
    for _ in range(steps):
        ids = torch.randint(0, vocab, (b, t + 1))
        t0 = time.perf_counter()
        loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(b * t / (time.perf_counter() - t0))
    return statistics.median(rates[SKIP:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "docs/data/cpu_bench.json"))
    a = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    binary = str(ROOT / "target/release/vramplan")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for c in CONFIGS:
            eng, tor = [], []
            for r in range(a.reps):
                eng.append(engine_run(binary, c, a.threads, Path(tmp)))
                tor.append(torch_run(c, a.threads))
                print(f"{c[0]}: rep {r + 1}: engine {eng[-1]:.0f} tok/s, torch {tor[-1]:.0f} tok/s",
                      file=sys.stderr)
            e, p = statistics.median(eng), statistics.median(tor)
            rows.append({
                "config": c[0],
                "hidden_size": c[1], "num_layers": c[2], "num_heads": c[3], "head_dim": c[4],
                "intermediate_size": c[5], "vocab_size": c[6], "micro_batch": c[7], "seq_len": c[8],
                "steps_per_run": c[9], "skipped_steps": SKIP,
                "engine_tokens_per_second": round(e, 1), "torch_tokens_per_second": round(p, 1),
                "ratio_engine_over_torch": round(e / p, 3),
                "engine_runs": [round(x, 1) for x in eng], "torch_runs": [round(x, 1) for x in tor],
            })
    doc = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "threads": a.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "rows": rows,
    }
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    for r in rows:
        print(f"{r['config']:<32} engine {r['engine_tokens_per_second']:>9.0f}  "
              f"torch {r['torch_tokens_per_second']:>9.0f}  ratio {r['ratio_engine_over_torch']:.2f}")


if __name__ == "__main__":
    main()
