#!/usr/bin/env python3
"""The live set of one measured LoRA run at its peak and at the highest point after the
loss (the last block's backward, where a checkpointed run recomputes it), measured as
tools/measure_lora.py measures (one steady-state step, the profiler's memory timeline).

Usage:
    python tools/live_at_peaks.py RUN_ID     # an id of tools/measure_lora.py --list

Prints, for both points, the total, the op running then and every tensor of 64 KiB or
more (bytes, profiler category, shape, dtype, the op that made it), then the step's
curve (the maximum over each 2 % of its time, MiB). docs/accuracy.md quotes it for the
fp32 LoRA run with full checkpointing.
"""
import json
import os
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import measure_lora as ml
import measure_torch as mt
from torch.profiler._memory_profiler import MemoryProfileTimeline

torch.set_num_threads(2)
warnings.filterwarnings("ignore")
mt.build_model = ml.build_model
mt.setup = ml.setup
want = sys.argv[1]
cfg = [c for c in ml.configs() if c["id"] == want][0]
prof, s = mt.profile_one_step(cfg)
mp = prof._memory_profile()
tl = MemoryProfileTimeline(mp)
with tempfile.TemporaryDirectory() as d:
    p = os.path.join(d, "t.json")
    tl.export_memory_timeline(p, "cpu")
    times, sizes = json.load(open(p))
tot = [sum(r) for r in sizes]
ip = max(range(len(tot)), key=tot.__getitem__)
# after the global peak: first row 6 MiB below it, then the max of the rest
j = next(i for i in range(ip, len(tot)) if tot[i] < tot[ip] - 6 * 2**20)
iq = max(range(j, len(tot)), key=tot.__getitem__)
roots = mp._op_tree._root_nodes
for name, i in (("global", ip), ("after-loss", iq)):
    live, unk = mt.live_tensors_at(mp, times[i])
    print(f"== {name} peak {tot[i]} ({tot[i]/2**20:.2f} MiB) frac {(times[i]-times[0])/(times[-1]-times[0]):.3f} op {mt._innermost_op(roots, times[i]*1000+999)} unknown {unk}")
    for r in live:
        if r["bytes"] >= 64 * 1024:
            print(f"  {r['bytes']:>10} {r['category']:<16} {str(r['shape']):<18} {r['dtype']} {r['made_by']}")
# coarse profile of the step: total every 2 % of time
n = len(tot)
print("curve", [round(max(tot[k:k + max(1, n // 50)]) / 2**20, 1) for k in range(0, n, max(1, n // 50))])
