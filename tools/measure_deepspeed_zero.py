#!/usr/bin/env python3
"""Ground truth for DeepSpeed ZeRO-1/2/3 on the CPU: the per-process peak of one
steady-state step of DeepSpeed's own engine over the gloo backend, 2 and 4 processes.

Usage:
    DS_ACCELERATOR=cpu python tools/measure_deepspeed_zero.py \
        [--out tests/data/deepspeed_zero_cpu.json] [--only ID_SUBSTRING]

Same method as tools/measure_torch.py (its functions are imported, not copied) and the
process group of tools/measure_fsdp.py: torch.multiprocessing.spawn of `world`
processes, dist.init_process_group("gloo"); in every rank one warm-up step, then exactly
one profiled step under torch.profiler with the memory timeline; the peak is the maximum
over time of export_memory_timeline(device="cpu"); the run's peak_bytes is rank 0's,
rank_peak_bytes lists every rank's.

The step, per run (DeepSpeed 0.19.6, torch 2.15, transformers 5.24):
  the HF model built on every rank from seed 0 (no zero.Init: ZeRO-3 partitions the
  built module in deepspeed.initialize); engine, *_ = deepspeed.initialize(model=model,
  model_parameters=model.parameters(), config=ds) with
    ds = {train_micro_batch_size_per_gpu: b, gradient_accumulation_steps: ga,
          bf16: {enabled: true} under bf16-mixed (fp32: no precision section),
          optimizer: {type: AdamW, params: {lr: 1e-4, weight_decay: 0.1, torch_adam: true}},
          zero_optimization: {stage: 1|2|3, plus the run's bucket keys}}
  torch_adam makes DeepSpeed build torch.optim.AdamW (foreach=None: the single-tensor
  loop on the CPU) over its flat fp32 partitions, instead of FusedAdam (a CUDA/C++
  extension); the ZeRO optimizer wraps it as it wraps FusedAdam. Then for each of the ga
  micro-steps: loss = engine(input_ids=x, labels=x).loss; engine.backward(loss);
  engine.step() (DeepSpeed steps the optimizer at the accumulation boundary only).
  The bucket keys not named take DeepSpeed's defaults (runtime/zero/config.py):
  reduce_bucket_size 5e8, allgather_bucket_size 5e8, stage3_prefetch_bucket_size 5e7,
  stage3_max_live_parameters 1e9, stage3_param_persistence_threshold 1e5,
  stage3_max_reuse_distance 1e9,
  contiguous_gradients true, overlap_comm true under ZeRO-3 only.

What differs on DeepSpeed's CPU accelerator (accelerator/cpu_accelerator.py) from CUDA:
  - is_synchronized_device(), resolves_data_dependency() and
    handles_memory_backpressure() are all True, and Stream / Event are None: ZeRO-1/2
    has no reduction_stream (stage_1_and_2.py L533) and ZeRO-3 no
    reduce_and_partition_stream (stage3.py L336) nor allgather stream
    (parameter_offload.py L189); every collective runs on the main stream, in order, and
    no tensor is held for a side stream (no record_stream, stage_1_and_2.py L1249/L1313;
    partition_parameters.py L78/L107). The prefetch coordinator does not wait on events
    for memory backpressure (partitioned_param_coordinator.py L408).
  - No caching allocator: the peak is live tensor bytes. DeepSpeed's IPG buffers are
    torch.empty of reduce_bucket_size elements; on the CPU their pages are touched only
    where written, but the profiler counts their bytes as allocated, as
    max_memory_allocated would on CUDA.
  - pin_memory is a no-op (cpu_accelerator.py L281-294); no offload here anyway.
  - The collectives are gloo's, not NCCL's: gloo runs each on a worker thread; what
    that costs the profiler and how it is worked around is measure_fsdp.py's
    (time_ordered_leaf_events, ATTEMPTS).
  - available_memory() reports host memory, so stage_1_and_2.py flattens each group on
    the "accelerator" (L399-404), as CUDA does when the group fits.
The parameters and optimizer state the pre-existing check counts are DeepSpeed's own:
ZeRO-1/2's flat 16-bit groups (bit16_groups_flat, the module's parameters are views
into them) and fp32 partitions; ZeRO-3's ds_tensor partitions, the persistent
parameters' data and the fp32 partitions; the wrapped AdamW's state. Under ZeRO-3 it
also counts DeepSpeed's buffers made before the step (the IPG bucket and
grad_partitions_flat_buffer, stage3.py L731-747): the memory profiler sizes a storage that
existed before profiling by the largest view of it an op sees, and the step sees the flat
gradient buffer only through per-parameter views, so the timeline holds it short (2.1 of
7.9 MB for LLAMA_B over 2 ranks); the missing bytes are added to the peak, as the
parameters' are, and are part of added_preexisting_bytes.
"""

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time
import warnings

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as tmp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import measure_fsdp as mf  # noqa: E402
import measure_torch as mt  # noqa: E402

# Small sizes, as the FSDP2 ground truth's (hidden <= 512, 2 layers, vocab <= 8192).
LLAMA_A = mt._llama_like("llama", 256, 2, 4, 2, 688, 8192, False)
# Every block matrix above ZeRO-3's default persistence threshold (1e5 elements).
LLAMA_B = mt._llama_like("llama", 512, 2, 8, 4, 1376, 4096, True)
QWEN_C = mt._llama_like("qwen2", 384, 2, 6, 2, 1024, 8192, False)
# Three blocks: a block between the first and the last.
LLAMA_D = mt._llama_like("llama", 256, 3, 4, 2, 688, 8192, False)

# Buckets small enough to matter for these models (the defaults hold the whole model).
SMALL_REDUCE = {"reduce_bucket_size": 500_000, "allgather_bucket_size": 500_000}
SMALL_STAGE3 = {
    "reduce_bucket_size": 500_000,
    "stage3_prefetch_bucket_size": 200_000,
    "stage3_max_live_parameters": 1_000_000,
}
NO_PERSIST = {"stage3_param_persistence_threshold": 0}
# Every module's parameters released after its forward and gathered again for backward
# (the defaults keep them: a small model is used again within 1e9 elements).
RELEASE = {"stage3_max_reuse_distance": 0}


def _t(b, s, prec, ga=1):
    return mt._train(b, s, prec, "sdpa", "none", ga)


def _hw(world, stage, buckets=None):
    h = {"gpu": "cpu", "gpus": world, "sharding": f"zero{stage}"}
    h.update(buckets or {})
    return h


def configs():
    A, B, C, D = LLAMA_A, LLAMA_B, QWEN_C, LLAMA_D
    mixed = "bf16-mixed"
    runs = [
        (A, _t(2, 128, "fp32"), _hw(2, 1)),
        (A, _t(2, 128, mixed), _hw(2, 1)),
        (A, _t(2, 128, mixed), _hw(2, 1, SMALL_REDUCE)),
        (A, _t(2, 128, "fp32"), _hw(2, 2)),
        (A, _t(2, 128, mixed), _hw(2, 2)),
        (A, _t(1, 128, mixed), _hw(2, 2)),
        (A, _t(2, 128, mixed, 2), _hw(2, 2)),
        (A, _t(2, 128, mixed), _hw(2, 2, SMALL_REDUCE)),
        (A, _t(2, 128, "fp32"), _hw(2, 2, SMALL_REDUCE)),
        (C, _t(2, 128, mixed), _hw(2, 2)),
        (B, _t(2, 128, mixed), _hw(2, 3)),
        (B, _t(2, 128, "fp32"), _hw(2, 3)),
        (B, _t(1, 128, mixed, 2), _hw(2, 3)),
        (B, _t(2, 128, mixed), _hw(2, 3, SMALL_STAGE3)),
        (A, _t(2, 128, mixed), _hw(2, 3)),
        (A, _t(2, 128, mixed), _hw(2, 3, NO_PERSIST)),
        (C, _t(2, 128, mixed), _hw(2, 3)),
        (A, _t(2, 128, "fp32"), _hw(4, 1)),
        (A, _t(2, 128, mixed), _hw(4, 2)),
        (A, _t(2, 128, mixed), _hw(4, 2, SMALL_REDUCE)),
        (B, _t(2, 128, mixed), _hw(4, 3)),
        (B, _t(1, 128, "fp32", 2), _hw(4, 3, SMALL_STAGE3)),
        (B, _t(2, 128, mixed), _hw(2, 3, {**SMALL_STAGE3, **RELEASE})),
        (A, _t(2, 128, "fp32"), _hw(2, 3, {**NO_PERSIST, **RELEASE})),
        (B, _t(2, 128, "fp32"), _hw(4, 3, RELEASE)),
        (D, _t(2, 128, mixed, 2), _hw(2, 1, SMALL_REDUCE)),
        (D, _t(2, 128, "fp32"), _hw(2, 2, SMALL_REDUCE)),
        (D, _t(2, 128, mixed), _hw(2, 3, {**SMALL_STAGE3, **RELEASE})),
    ]
    out = []
    for m, t, h in runs:
        rid = mt._run_id(m, t) + f"-{h['sharding']}-x{h['gpus']}"
        if "stage3_prefetch_bucket_size" in h:
            rid += "-small-buckets"
        elif "reduce_bucket_size" in h:
            rid += "-small-bucket"
        if h.get("stage3_param_persistence_threshold") == 0:
            rid += "-no-persist"
        if h.get("stage3_max_reuse_distance") == 0:
            rid += "-release"
        out.append({"id": rid, "model": m, "train": t, "hardware": h})
    ids = [c["id"] for c in out]
    assert len(ids) == len(set(ids)), "duplicate run ids"
    return out


# --------------------------------------------------------------------------------------
# DeepSpeed's engine and its step
# --------------------------------------------------------------------------------------

ZERO_KEYS = (
    "reduce_bucket_size",
    "allgather_bucket_size",
    "stage3_prefetch_bucket_size",
    "stage3_max_live_parameters",
    "stage3_param_persistence_threshold",
    "stage3_max_reuse_distance",
)


def ds_config(cfg):
    t, h = cfg["train"], cfg["hardware"]
    zero = {"stage": int(h["sharding"][-1])}
    zero.update({k: h[k] for k in ZERO_KEYS if k in h})
    ds = {
        "train_micro_batch_size_per_gpu": t["micro_batch"],
        "gradient_accumulation_steps": t["grad_accum"],
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 1e-4, "weight_decay": 0.1, "torch_adam": True},
        },
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t["precision"] == "bf16-mixed":
        ds["bf16"] = {"enabled": True}
    elif t["precision"] != "fp32":
        raise ValueError(t["precision"])
    return ds


class ZeroModel:
    """What measure_torch.measure reads of the model: the storages DeepSpeed keeps."""

    def __init__(self, model, opt, stage):
        self.model, self.opt, self.stage = model, opt, stage

    def parameters(self):
        if self.stage < 3:
            return [*self.opt.bit16_groups_flat, *self.opt.single_partition_of_fp32_groups]
        out = [p.ds_tensor for p in self.model.parameters()]
        out += [p for p in self.model.parameters() if getattr(p, "ds_persist", False)]
        return out + list(self.opt.fp32_partitioned_groups_flat)


    def buffers(self):
        """ZeRO-3's own buffers made before the step: the IPG bucket and the flat gradient
        partitions (stage3.py L731-747). The step touches the flat gradient buffer only
        through per-parameter views (narrow), and the memory profiler sizes a storage that
        existed before profiling by the largest view it sees (torch/profiler/
        _memory_profiler.py, SizeMap._update_values), so it counts this buffer short."""
        if self.stage < 3:
            return []
        out = [self.opt.grad_partitions_flat_buffer]
        for bucket in self.opt.ipg_buckets.values():
            if torch.is_tensor(bucket.buffer):
                out.append(bucket.buffer)
        return out


_check_preexisting = mt.check_preexisting


def check_preexisting(mem_tl, model, opt, xs):
    """measure_torch.check_preexisting, and for DeepSpeed's buffers (ZeroModel.buffers)
    the bytes the timeline's PREEXISTING entry lacks against the storage's real size
    (the whole storage when it is not in the timeline); they are live for the whole step."""
    from torch.profiler._memory_profiler import Action, TensorKey

    missing = _check_preexisting(mem_tl, model, opt, xs)
    seen = {}
    for _t, action, (key, _v), n in mem_tl.timeline:
        if action == Action.PREEXISTING and isinstance(key, TensorKey):
            seen[key.storage.ptr] = max(seen.get(key.storage.ptr, 0), n)
    short = {}
    for t in model.buffers():
        st = t.untyped_storage()
        if seen.get(st.data_ptr(), 0) < st.nbytes():
            short[st.data_ptr()] = st.nbytes() - seen.get(st.data_ptr(), 0)
    missing["deepspeed_buffers"] = short
    return missing


class ZeroOpt:
    """What measure_torch.measure reads of the optimizer: the wrapped AdamW's state."""

    def __init__(self, opt):
        self.opt = opt

    @property
    def state(self):
        return self.opt.optimizer.state


def setup(cfg):
    import deepspeed

    torch.manual_seed(0)
    m, t = cfg["model"], cfg["train"]
    model, _ = mt.build_model(cfg)
    model.train()
    engine, opt, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config(cfg)
    )
    xs = [
        torch.randint(0, m["vocab_size"], (t["micro_batch"], t["seq_len"]))
        for _ in range(t["grad_accum"])
    ]

    def step():
        for x in xs:
            loss = engine(input_ids=x, labels=x).loss
            engine.backward(loss)
            engine.step()

    stage = int(cfg["hardware"]["sharding"][-1])
    return {"model": ZeroModel(model, opt, stage), "opt": ZeroOpt(opt), "xs": xs,
            "step": step, "engine": engine}


# --------------------------------------------------------------------------------------
# One group of processes per world size
# --------------------------------------------------------------------------------------


def measure_all_ranks(cfg, rank, world):
    t0 = time.time()
    for _attempt in range(mf.ATTEMPTS):
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
    errs = [e for _, e in every if e]
    if errs:
        if rank == 0:
            print(f"{cfg['id']}: FAILED {errs[0]}", flush=True)
        return None
    r["rank_peak_bytes"] = [p for p, _ in every]
    r["world_size"] = world
    r["deepspeed_config"] = ds_config(cfg)
    r["seconds"] = round(time.time() - t0, 1)
    return r


def no_shm_comm():
    """DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce (comm/torch.py,
    build_shm_op) used only by inference_all_reduce; training's collectives are
    torch.distributed's. Marked incompatible, it is not built and gloo does them all."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def worker(rank, world, port, cfgs, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.ERROR)
    no_shm_comm()
    deepspeed.init_distributed(dist_backend="gloo")
    mt.setup = setup  # measure_torch.profile_one_step builds each run with this step
    mt.check_preexisting = check_preexisting
    mf.time_ordered_leaf_events()
    runs = []
    for cfg in cfgs:
        r = measure_all_ranks(cfg, rank, world)
        if rank == 0 and r is not None:
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/data/deepspeed_zero_cpu.json")
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
            tmp.spawn(worker, args=(world, mf.free_port(), group, path), nprocs=world)
            with open(path) as f:
                runs += json.load(f)

    import deepspeed
    import transformers

    out = {
        "tool": {"deepspeed": deepspeed.__version__,
                 "torch": torch.__version__.split("+")[0],
                 "transformers": transformers.__version__,
                 "python": platform.python_version(), "backend": "gloo",
                 "accelerator": "cpu (DS_ACCELERATOR=cpu)"},
        "method": (
            "tools/measure_torch.py's method (one steady-state step after a warm-up step, "
            "profiler memory timeline, peak over all categories) in every process of a "
            "torch.multiprocessing group over gloo, the step of "
            "tools/measure_deepspeed_zero.py's docstring (deepspeed.initialize, ZeRO stage "
            "1/2/3, torch AdamW inside DeepSpeed's ZeRO optimizer); peak_bytes is rank 0's, "
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
