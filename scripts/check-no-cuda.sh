#!/usr/bin/env bash
# A CPU build has no CUDA in it: without the `cuda` feature, no crate of the `medley` binary's
# dependency tree is CUDA's (cudarc, candle-kernels, cudaforge), and the built binaries load no CUDA
# library. Run by .ci/run after the tests have built the binaries.
#   scripts/check-no-cuda.sh [BIN_DIR]     # default: <target>/debug
set -euo pipefail
cd "$(dirname "$0")/.."
forbidden='^(cudarc|candle-kernels|cudaforge|bindgen_cuda) '
for pkg in medley medley-shard; do
  deps=$(cargo tree -p "$pkg" -e normal,build --prefix none --no-dedupe --offline 2>/dev/null ||
    cargo tree -p "$pkg" -e normal,build --prefix none --no-dedupe)
  if bad=$(grep -E "$forbidden" <<<"$deps" | sort -u) && [ -n "$bad" ]; then
    echo "$pkg without the cuda feature depends on CUDA crates:" >&2
    echo "$bad" >&2
    exit 1
  fi
done
bin_dir="${1:-${CARGO_TARGET_DIR:-$PWD/target}/debug}"
checked=0
for b in medley medley-shard medley-router; do
  [ -x "$bin_dir/$b" ] || continue
  if needed=$(readelf -d "$bin_dir/$b" | grep NEEDED | grep -Ei 'cuda|cublas|curand|nvrtc|nccl'); then
    echo "$bin_dir/$b loads CUDA libraries:" >&2
    echo "$needed" >&2
    exit 1
  fi
  checked=$((checked + 1))
done
[ "$checked" -gt 0 ] || { echo "no binaries in $bin_dir to check" >&2; exit 1; }
echo "CPU build: no CUDA crates, $checked binaries load no CUDA library"
