#!/usr/bin/env python3
"""Ground truth for FSDP2 on the CPU: the per-process peak of one steady-state step of
`fully_shard` over the gloo backend, 2 and 4 processes on one host.

Usage:
    python tools/measure_fsdp.py [--out tests/data/torch_fsdp.json] [--only ID_SUBSTRING]

Same method as tools/measure_torch.py (its helpers are imported, not copied): one warm-up
step, then exactly one profiled step under torch.profiler with the memory timeline; the
peak is the maximum over time of export_memory_timeline(device="cpu"), measured in every
process (rank); the run's peak_bytes is rank 0's, rank_peak_bytes lists all of them.

The step, per run (as torchtitan's parallelize and the FSDP2 docs apply it):
  torch.multiprocessing.spawn of `world` processes, dist.init_process_group("gloo"),
  init_device_mesh("cpu", (world,)); the HF model built on every rank from seed 0;
  fully_shard(layer, mesh=..., reshard_after_forward=R, mp_policy=P) for every decoder
  layer, then fully_shard(model, mesh=..., mp_policy=P) for the root (embedding, final
  norm, head; FSDP2 keeps the root unsharded after forward); torch.optim.AdamW(lr=1e-4,
  weight_decay=0.1) over the sharded parameters (DTensors; the single-tensor loop on
  CPU); loss = model(input_ids=x, labels=x).loss; loss.backward(); opt.step();
  opt.zero_grad(set_to_none=True).
  precision fp32:       no policy (P = MixedPrecisionPolicy() keeps fp32 everywhere)
  precision bf16-mixed: P = MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32|bf16)
  checkpointing full:   model.gradient_checkpointing_enable() before fully_shard
                        (torch.utils.checkpoint, use_reentrant=False, every layer)
  implementation torchtitan: torchtitan 0.3.0's Llama3Model, loss and checkpointing as
  tools/measure_frameworks.py builds them, sharded by torchtitan's own
  `torchtitan.distributed.fsdp.apply_fsdp_to_decoder` (as its llama3 parallelize calls it:
  the embedding, [norm, lm_head] and every block are groups of their own, the root holds
  nothing; reshard_after_forward_policy "default" for R, "never" otherwise).
What gloo and the profiler need (docs/accuracy.md, "FSDP2 on the CPU"): FSDP2's
reduce-scatter is gloo's written out in Python (gloo_reduce_scatter), the profiler's leaf
events are taken in time order (time_ordered_leaf_events), and a run whose profile still
fails the memory profiler's data-flow check is profiled again (ATTEMPTS).
The parameters, gradients and AdamW state the sharded-tensor check counts are the
DTensors' local shards (`_local_tensor`, views into FSDP2's padded shard storage).
"""

import argparse
import contextlib
import gc
import json
import os
import platform
import socket
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure_frameworks as mfw  # noqa: E402
import measure_torch as mt  # noqa: E402

# Sizes of the other ground truth, kept small (hidden <= 512, <= 4 layers, vocab <= 8192).
LLAMA_A = mt._llama_like("llama", 256, 4, 4, 2, 688, 8192, False)
LLAMA_B = mt._llama_like("llama", 512, 4, 8, 4, 1376, 4096, True)
QWEN_C = mt._llama_like("qwen2", 384, 4, 6, 2, 1024, 8192, False)
# Dims that 4 does not divide (intermediate 690, vocab 8190): FSDP2 pads the shards.
LLAMA_P = mt._llama_like("llama", 256, 2, 4, 2, 690, 8190, False)


def _t(b, s, prec, ckpt="none", reduce="fp32"):
    t = mt._train(b, s, prec, "sdpa", ckpt)
    if prec == "bf16-mixed":
        t["reduce_dtype"] = reduce
    return t


def _tt(b, s, prec, ckpt="none", loss="chunked", reduce="fp32"):
    t = _t(b, s, prec, ckpt, reduce)
    t.update(implementation="torchtitan", compile=False, loss=loss)
    return t


def _hw(world, raf=True):
    h = {"gpu": "cpu", "gpus": world, "sharding": "fsdp2"}
    if not raf:
        h["reshard_after_forward"] = False
    return h


def configs():
    A, B, C, P = LLAMA_A, LLAMA_B, QWEN_C, LLAMA_P
    mixed = "bf16-mixed"
    runs = [
        (A, _t(2, 256, "fp32"), _hw(2)),
        (A, _t(2, 256, "fp32"), _hw(2, raf=False)),
        (A, _t(2, 256, mixed), _hw(2)),
        (A, _t(2, 256, mixed, reduce="bf16"), _hw(2)),
        (A, _t(2, 256, mixed), _hw(2, raf=False)),
        (A, _t(2, 256, "fp32", "full"), _hw(2)),
        (A, _t(2, 256, mixed, "full"), _hw(2)),
        (B, _t(4, 256, "fp32"), _hw(2)),
        (B, _t(4, 256, mixed, reduce="bf16"), _hw(2)),
        (B, _t(1, 64, "fp32"), _hw(2)),
        (C, _t(2, 512, mixed), _hw(2)),
        (C, _t(2, 512, "fp32", "full"), _hw(2)),
        (A, _t(2, 256, "fp32"), _hw(4)),
        (A, _t(2, 256, mixed), _hw(4)),
        (A, _t(2, 256, mixed), _hw(4, raf=False)),
        (B, _t(4, 256, mixed, "full"), _hw(4)),
        (B, _t(1, 64, "fp32"), _hw(4)),
        (P, _t(2, 128, "fp32"), _hw(4)),
    ]
    # torchtitan's Llama under its own grouping (untied: the embedding and [norm, lm_head]
    # apart; tied: the three together).
    T = mt._llama_like("llama", 256, 3, 4, 2, 688, 16384, False)
    TT = mt._llama_like("llama", 256, 2, 4, 4, 688, 16384, True)
    runs += [
        (T, _tt(2, 256, "fp32"), _hw(2)),
        (T, _tt(2, 256, "fp32"), _hw(2, raf=False)),
        (T, _tt(2, 256, mixed), _hw(2)),
        (T, _tt(2, 256, "fp32", "full"), _hw(2)),
        (T, _tt(2, 256, "fp32", loss="float-cast"), _hw(2)),
        (TT, _tt(2, 256, "fp32"), _hw(2)),
        (T, _tt(2, 256, "fp32"), _hw(4)),
        (T, _tt(2, 256, mixed, "full"), _hw(4)),
    ]
    # Held out from the chunked loss's unsynced head gradient (measured after it was
    # modelled): bf16 reduction, a tied bf16-mixed model, one row (no chunk copies),
    # the float-cast loss under bf16-mixed, and the tied model over 4 processes.
    T2 = mt._llama_like("llama", 384, 2, 6, 2, 1024, 24576, False)
    runs += [
        (T, _tt(2, 256, mixed, reduce="bf16"), _hw(2)),
        (TT, _tt(2, 256, mixed), _hw(2)),
        (T2, _tt(1, 512, mixed), _hw(2)),
        (T, _tt(2, 256, mixed, loss="float-cast"), _hw(2)),
        (TT, _tt(2, 256, "fp32"), _hw(4)),
        (T2, _tt(1, 512, "fp32", "full"), _hw(4)),
    ]
    # Pure bf16 parameters (the models cast to bf16 before sharding).
    runs += [
        (A, _t(2, 256, "bf16"), _hw(2)),
        (T, _tt(2, 256, "bf16"), _hw(2)),
        # Held out from torchtitan's fp32 reduction over pure bf16 (measured after it).
        (TT, _tt(2, 256, "bf16"), _hw(4)),
        (T2, _tt(1, 512, "bf16", "full"), _hw(2)),
    ]
    out = []
    for m, t, h in runs:
        rid = mt._run_id(m, t) + f"-fsdp2-x{h['gpus']}"
        if t.get("implementation"):
            rid += f"-{t['implementation']}-{t['loss']}"
        if t["precision"] == "bf16-mixed":
            rid += f"-reduce-{t['reduce_dtype']}"
        if not h.get("reshard_after_forward", True):
            rid += "-no-reshard"
        out.append({"id": rid, "model": m, "train": t, "hardware": h})
    ids = [c["id"] for c in out]
    assert len(ids) == len(set(ids)), "duplicate run ids"
    return out


# --------------------------------------------------------------------------------------
# The sharded model and its step
# --------------------------------------------------------------------------------------


def _local(t):
    """A DTensor's local shard (a view into FSDP2's padded shard storage), else `t`."""
    return getattr(t, "_local_tensor", t)


class LocalModel:
    """What measure_torch.measure reads of the model: the local parameter shards."""

    def __init__(self, model):
        self.model = model

    def parameters(self):
        return [_local(p) for p in self.model.parameters()]


class LocalOpt:
    """What measure_torch.measure reads of the optimizer: its state's local shards."""

    def __init__(self, opt):
        self.opt = opt

    @property
    def state(self):
        return {k: {n: _local(v) for n, v in st.items()} for k, st in self.opt.state.items()}


def gloo_reduce_scatter():
    """Gloo's reduce-scatter written out in Python: a copy of the whole flat input, an
    all-reduce of the copy in place, the average, and this rank's chunk copied to the
    output. Gloo itself does this inside the collective and drops its copy on its worker
    thread, where the profiler (enabled per thread) sees no free: the copy's key then
    collides with the next tensor at that address and the memory profiler's data-flow
    check fails. Written here, the copy is freed on the main thread, where it is seen."""
    from torch.distributed.fsdp._fully_shard._fsdp_api import ReduceScatter
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllocMixin

    class GlooReduceScatter(DefaultAllocMixin, ReduceScatter):
        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            world = group.size()
            copy = input_tensor.clone()
            dist.all_reduce(copy, op=dist.ReduceOp.SUM, group=group)
            if op == dist.ReduceOp.AVG:
                copy.div_(world)
            output_tensor.copy_(copy.chunk(world)[group.rank()])
            return None

    return GlooReduceScatter()


def setup(cfg):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    torch.manual_seed(0)
    m, t, h = cfg["model"], cfg["train"], cfg["hardware"]
    titan = t.get("implementation") == "torchtitan"
    model, fwd = mfw.build_torchtitan(cfg) if titan else mt.build_model(cfg)
    model.train()
    mesh = init_device_mesh("cpu", (h["gpus"],))
    if t["precision"] == "bf16-mixed":
        reduce = {"fp32": torch.float32, "bf16": torch.bfloat16}[t["reduce_dtype"]]
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce)
    elif t["precision"] == "fp32":
        mp = MixedPrecisionPolicy()
    elif t["precision"] == "bf16":
        # Pure bf16: the model's own parameters are bf16 (torchtitan's training.dtype;
        # its MixedPrecisionPolicy still reduces in mixed_precision_reduce, fp32).
        model.to(torch.bfloat16)
        mp = MixedPrecisionPolicy(reduce_dtype=torch.float32 if titan else None)
    else:
        raise ValueError(t["precision"])
    raf = h.get("reshard_after_forward", True)
    if titan:
        from torch.distributed.fsdp import FSDPModule
        from torchtitan.distributed.fsdp import apply_fsdp_to_decoder

        own = next(model.parameters()).dtype
        apply_fsdp_to_decoder(model, mesh, param_dtype=mp.param_dtype or own,
                              reduce_dtype=mp.reduce_dtype or torch.float32,
                              pp_enabled=False,
                              reshard_after_forward_policy="default" if raf else "never")
        sharded = [x for x in model.modules() if isinstance(x, FSDPModule)]
    else:
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=raf, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        sharded = [*model.model.layers, model]
    comm = gloo_reduce_scatter()
    for module in sharded:
        module.set_custom_reduce_scatter(comm)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    xs = [torch.randint(0, m["vocab_size"], (t["micro_batch"], t["seq_len"]))]

    def step():
        for x in xs:
            loss = fwd(x)
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"model": LocalModel(model), "opt": LocalOpt(opt), "xs": xs, "step": step,
            "fwd": fwd, "autocast_ctx": contextlib.nullcontext}


# --------------------------------------------------------------------------------------
# One group of processes per world size
# --------------------------------------------------------------------------------------


def time_ordered_leaf_events():
    """The memory profiler builds its data-flow graph from the leaf events in the op tree's
    depth-first order, thread after thread (torch/profiler/_memory_profiler.py,
    DataFlowGraph._extract_leaf_events), and asserts that versions grow in that order.
    Gloo runs a collective on its own thread, which writes into the all-gather and
    reduce-scatter buffers the main thread allocated; visited thread by thread, the
    write can come before the allocation and the assertion fails. The same events in
    the order of their start time keep the graph's meaning and pass it."""
    from torch.profiler import _memory_profiler as memp

    dfs_order = memp.DataFlowGraph._extract_leaf_events

    def by_time(op_tree):
        return tuple(sorted(dfs_order(op_tree), key=lambda e: e.start_time_ns))

    memp.DataFlowGraph._extract_leaf_events = staticmethod(by_time)


# A free that gloo's worker thread makes now and then still escapes the profiler (the
# data-flow check then fails as above); such a run is profiled again, all ranks together.
ATTEMPTS = 3


def worker(rank, world, port, cfgs, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mt.setup = setup  # measure_torch.profile_one_step builds each run with this step
    time_ordered_leaf_events()
    runs = []
    for cfg in cfgs:
        t0 = time.time()
        for _attempt in range(ATTEMPTS):
            try:
                r = mt.measure(cfg, check_floor=False)
                err = None
            except Exception as e:  # reported with the run, not kept
                r, err = None, f"{type(e).__name__}: {str(e)[:300]}"
            every = [None] * world
            dist.all_gather_object(every, (r["peak_bytes"] if r else None, err))
            if not any(e for _, e in every):
                break
            gc.collect()
        if rank == 0:
            errs = [e for _, e in every if e]
            if errs:
                print(f"{cfg['id']}: FAILED {errs[0]}", flush=True)
            else:
                r["rank_peak_bytes"] = [p for p, _ in every]
                r["world_size"] = world
                r["seconds"] = round(time.time() - t0, 1)
                runs.append(r)
                print(f"{r['id']:<84} peak {r['peak_bytes']:>11} B ranks "
                      f"{r['rank_peak_bytes']} near {r['peak_near_op']} [{r['seconds']} s]",
                      flush=True)
        gc.collect()
        dist.barrier()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(runs, f)
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/data/torch_fsdp.json")
    ap.add_argument("--only", default=None, help="run only configs whose id contains this")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args()

    cfgs = configs()
    if args.only:
        cfgs = [c for c in cfgs if args.only in c["id"]]
    if args.list:
        for c in cfgs:
            print(c["id"])
        return
    runs = []
    for world in sorted({c["hardware"]["gpus"] for c in cfgs}):
        group = [c for c in cfgs if c["hardware"]["gpus"] == world]
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "runs.json")
            tmp.spawn(worker, args=(world, free_port(), group, path), nprocs=world)
            with open(path) as f:
                runs += json.load(f)

    import transformers

    out = {
        "tool": {"torch": torch.__version__.split("+")[0],
                 "transformers": transformers.__version__,
                 "python": platform.python_version(), "backend": "gloo"},
        "method": (
            "tools/measure_torch.py's method (one steady-state step after a warm-up step, "
            "profiler memory timeline, peak over all categories) in every process of a "
            "torch.multiprocessing group over gloo, the step of tools/measure_fsdp.py's "
            "docstring (fully_shard per decoder layer and the root); peak_bytes is rank 0's, "
            "rank_peak_bytes every rank's; CPU, torch.set_num_threads(1) per process."
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
