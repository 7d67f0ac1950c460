#!/usr/bin/env python3
"""Writes a training log with many out-of-memory reports, to time `diagnose`.

Usage: tools/oom_log.py N [--nonsense] [--noise K] [--mb M] > big.log
       /usr/bin/time -v vramplan diagnose big.log --json >/dev/null

Reports cycle through the message formats `diagnose` reads (PyTorch 1.x and 2.x, ROCm's
HIP, MPS, the CUDA runtime's sizeless error, the kernel's OOM killer) with varied sizes;
with --nonsense every other report asks for a negative amount or holds more than the
capacity. --noise K writes K training-step lines before each report (a sparse log);
--mb M keeps writing reports until the log is M MiB (N is then ignored).
"""
import sys

V1 = ("  File \"gpt.py\", line 301, in forward\n    logits = logits.float()\n"
      "RuntimeError: CUDA out of memory. Tried to allocate {req} (GPU 0; 31.84 GiB total capacity; "
      "{alloc} already allocated; 3.20 GiB free; 14.00 GiB reserved in total by PyTorch)\n")
V2 = ("[rank{rank}]: torch.OutOfMemoryError: CUDA out of memory. Tried to allocate {req}. GPU {rank} has a "
      "total capacity of 31.36 GiB of which 2.93 GiB is free. Including non-PyTorch memory, this process "
      "has 27.42 GiB memory in use. Of the allocated memory {alloc} is allocated by PyTorch, and "
      "412.00 MiB is reserved by PyTorch but unallocated.\n")
HIP = ("torch.OutOfMemoryError: HIP out of memory. Tried to allocate {req}. GPU 0 has a total capacity of "
       "63.98 GiB of which 1.40 GiB is free. Process 4242 has 20.00 GiB memory in use. Of the allocated "
       "memory {alloc} is allocated by PyTorch, and 152.50 MiB is reserved by PyTorch but unallocated.\n")
MPS = ("RuntimeError: MPS backend out of memory (MPS allocated: {alloc}, other allocations: 2.41 MiB, "
       "max allowed: 18.13 GiB). Tried to allocate {req} on private pool.\n")
SIZELESS = ("  File \"train.py\", line 40, in <module>\n    model.to(device)\n"
            "RuntimeError: CUDA error: out of memory\n")
KILL = ("[{i}.491542] Out of memory: Killed process {pid} (python3) total-vm:53312244kB, "
        "anon-rss:31451456kB, file-rss:74816kB\n")
FORMATS = [V1, V2, HIP, MPS, SIZELESS, KILL]


def main():
    args = sys.argv[1:]
    n = int(args[0])
    nonsense = "--nonsense" in args
    noise = int(args[args.index("--noise") + 1]) if "--noise" in args else 0
    limit = int(args[args.index("--mb") + 1]) << 20 if "--mb" in args else None
    out = sys.stdout
    written = 0
    i = 0
    while (written < limit) if limit is not None else (i < n):
        req = f"{(i % 1600) / 100 + 0.01:.2f} GiB"
        alloc = f"{(i % 1200) / 100:.2f} GiB"
        if nonsense and i % 2:
            req = f"-{req}" if i % 4 == 1 else req
            alloc = "900.00 GiB"
        text = "".join(f"step {i} | micro {k} | loss 2.31 | lr 3e-4 | 61,204 tok/s\n" for k in range(noise))
        text += f"step {i} | loss 2.31\n"
        text += FORMATS[i % len(FORMATS)].format(req=req, alloc=alloc, rank=i % 8, i=i, pid=1000 + i)
        # A report 60+ lines from the previous kill is a kill of its own.
        text += "\n" * 61 if i % len(FORMATS) == len(FORMATS) - 1 else ""
        out.write(text)
        written += len(text)
        i += 1


if __name__ == "__main__":
    main()
