#!/usr/bin/env python3
"""Writes a training log with many CUDA out-of-memory reports, to time `diagnose`.

Usage: tools/oom_log.py N [--nonsense] > big.log
       time vramplan diagnose big.log --config presets/examples/nanochat-d16-failed.toml --json >/dev/null

Reports cycle through the PyTorch 1.x and 2.x message formats with varied sizes; with
--nonsense every other report asks for a negative amount or holds more than the capacity.
"""
import sys

V1 = ("  File \"gpt.py\", line 301, in forward\n    logits = logits.float()\n"
      "RuntimeError: CUDA out of memory. Tried to allocate {req} (GPU 0; 31.84 GiB total capacity; "
      "{alloc} already allocated; 3.20 GiB free; 14.00 GiB reserved in total by PyTorch)\n")
V2 = ("[rank{rank}]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {req}. GPU {rank} has a "
      "total capacity of 31.36 GiB of which 2.93 GiB is free. Including non-PyTorch memory, this process "
      "has 27.42 GiB memory in use. Of the allocated memory {alloc} is allocated by PyTorch, and "
      "412.00 MiB is reserved by PyTorch but unallocated.\n")


def main():
    n = int(sys.argv[1])
    nonsense = "--nonsense" in sys.argv[2:]
    out = sys.stdout
    for i in range(n):
        req = f"{(i % 1600) / 100 + 0.01:.2f} GiB"
        alloc = f"{(i % 1200) / 100:.2f} GiB"
        if nonsense and i % 2:
            req = f"-{req}" if i % 4 == 1 else req
            alloc = "900.00 GiB"
        out.write(f"step {i} | loss 2.31\n")
        out.write((V1 if i % 2 == 0 else V2).format(req=req, alloc=alloc, rank=i % 8))


if __name__ == "__main__":
    main()
