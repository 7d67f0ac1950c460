#!/usr/bin/env bash
# The engine on a GPU: tokens/s, MFU and the planner's predicted vs the CUDA pool's
# measured peak memory of a step, for the plans in tools/gpu_plans (bf16 compute over f32
# master weights), plus the built-in run. Run it where the GPU is, from the repository
# root, with a binary built by tools/build_cuda.sh:
#
#   tools/gpu_check.sh BINARY OUTDIR [STEPS]
#
# Writes OUTDIR/gpu_check.jsonl (one summary.json per line, with the plan's name) and
# OUTDIR/*.log. Where no CUDA toolkit is installed, the CUDA 13 libraries are taken from
# the CUDA 13 PyTorch of `python3`, if any.
set -uo pipefail
BIN=$1
OUT=$2
STEPS=${3:-30}
mkdir -p "$OUT"
if LIB=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))' 2>/dev/null) && [ -d "$LIB" ]; then
  export LD_LIBRARY_PATH=$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
"$BIN" gpus > "$OUT/gpus.log" 2>&1
: > "$OUT/gpu_check.jsonl"
run() {
  local name=$1; shift
  echo "== $name" >&2
  "$BIN" train "$@" --out "$OUT/$name" --steps "$STEPS" --eval-every 0 --save-every 0 \
    --log-every 10 > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -4 "$OUT/$name.log" >&2
  if [ -f "$OUT/$name/summary.json" ]; then
    python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); d["plan"]=sys.argv[2]; d["exit"]=int(sys.argv[3]); print(json.dumps(d))' \
      "$OUT/$name/summary.json" "$name" "$rc" >> "$OUT/gpu_check.jsonl"
  else
    echo "{\"plan\": \"$name\", \"exit\": $rc}" >> "$OUT/gpu_check.jsonl"
  fi
  rm -rf "$OUT/$name"
}
run builtin --device cuda
for p in tools/gpu_plans/*.toml; do
  run "$(basename "$p" .toml)" "$p"
done
