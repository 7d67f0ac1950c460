#!/usr/bin/env bash
# Builds vramplan with the `cuda` feature where there is no CUDA toolkit and no GPU.
#
# nvcc and the CUDA 13 libraries come from PyPI's nvidia-* wheels, installed into a
# virtual environment. The driver's library (libcuda.so.1, shipped only with an NVIDIA
# driver) is replaced at link time by a stub that defines the same symbols; at run time
# the real one is loaded. The binary needs, where it runs, an NVIDIA driver and the CUDA 13
# libraries libcublas, libcublasLt, libcurand, libnvrtc and libcudart on LD_LIBRARY_PATH
# (a CUDA 13 PyTorch has them under site-packages/nvidia/cu13/lib).
#
#   tools/build_cuda.sh [VENV]        (default VENV: target/cuda-venv)
#   CUDA_COMPUTE_CAP=80 tools/build_cuda.sh   # for an A100; default 90 (H100, H200)
#
# Writes target/cuda/release/vramplan (stripped; CARGO_TARGET_DIR overrides target/cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-target/cuda-venv}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
# The kernels are compiled by CUDA 13.0's nvcc so that any CUDA 13 driver can load them.
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-crt==13.0.88" \
  "nvidia-nvvm==13.0.88" "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-cccl==13.3.5.0.6" \
  "nvidia-cublas==13.0.2.14" "nvidia-curand==10.4.5.25" "nvidia-cuda-nvrtc==13.0.88"
CU=$(echo "$(cd "$VENV" && pwd)"/lib/python3*/site-packages/nvidia/cu13)
[ -x "$CU/bin/nvcc" ] || { echo "no nvcc under $CU" >&2; exit 1; }

# The link folder: unversioned names for the linker, and the driver stub.
LINK=$PWD/target/cuda-link
mkdir -p "$LINK"
for l in cublas.so.13 cublasLt.so.13 curand.so.10 nvrtc.so.13 cudart.so.13; do
  ln -sf "$CU/lib/lib$l" "$LINK/lib${l%%.so*}.so"
done
cargo fetch -q
CUDARC=$(cargo metadata --format-version 1 --features cuda 2>/dev/null |
  python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc").rsplit("/",1)[0])')
grep -ho '^\s*fn cu[A-Za-z0-9_]*(' "$CUDARC/src/driver/sys/mod.rs" | sed 's/^\s*fn //; s/($//' | sort -u |
  awk '{print "void " $1 "(void) {}"}' > "$LINK/libcuda_stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/libcuda.so" "$LINK/libcuda_stub.c"

OUT=${CARGO_TARGET_DIR:-target/cuda}
PATH=$CU/bin:$PATH CUDA_HOME=$CU CUDARC_CUDA_VERSION=13000 RUSTFLAGS="-L $LINK" \
  CARGO_TARGET_DIR=$OUT cargo build --release --features cuda
strip "$OUT/release/vramplan"
ls -la "$OUT/release/vramplan"
