#!/usr/bin/env bash
# Builds the CUDA release binaries on a machine without CUDA or a GPU:
#   scripts/cuda/build.sh   # -> <target>/release-cuda/{medley,medley-fixture,medley-merge-dev,
#                           #    medley-lora-check}{,.xz}
# Installs the pinned CUDA 13.0 build tools from PyPI (scripts/cuda/env.sh), builds `medley`
# with the `cuda` feature, and the fixture generators scripts/gpu-check.sh runs (`medley-fixture`
# for models, `medley-merge-dev` for PEFT adapters, `medley-lora-check` for the kernels),
# stripped (profile `release-cuda`) and
# compressed with xz for the trip to a GPU machine.
# A clean build takes about 20 minutes on 2 cores (1189 s on 2026-12-07), ~10 of them nvcc compiling
# candle's kernels for CUDA_COMPUTE_CAP (default 90) beside the Rust build: both cores stay busy,
# so more nvcc jobs (CUDAFORGE_THREADS=2) do not shorten it; later builds reuse the target directory.
#
# The binaries need, at run time, the NVIDIA driver (libcuda.so.1) and the CUDA 13 libraries
# cuBLAS/cuBLASLt, cuRAND and the runtime (e.g. the `nvidia-*-cu13` wheels, via LD_LIBRARY_PATH).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=env.sh
source scripts/cuda/env.sh
target="${CARGO_TARGET_DIR:-$PWD/target}"
echo "cuda build: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), sm_${CUDA_COMPUTE_CAP}, target $target" >&2
cargo build --locked --profile release-cuda \
  --features medley/cuda,medley-shard/testing,medley-merge/testing \
  -p medley -p medley-shard -p medley-merge --bin medley --bin medley-fixture --bin medley-merge-dev \
  --bin medley-lora-check
out="$target/release-cuda"
for b in medley medley-fixture medley-merge-dev medley-lora-check; do
  xz -T0 -6 -c "$out/$b" >"$out/$b.xz.tmp" && mv "$out/$b.xz.tmp" "$out/$b.xz"
done
ls -l "$out"/medley "$out"/medley-fixture "$out"/medley-merge-dev "$out"/medley-lora-check \
  "$out"/*.xz >&2
