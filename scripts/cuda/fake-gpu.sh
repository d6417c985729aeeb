#!/usr/bin/env bash
# Builds the fake GPU (scripts/cuda/fake-gpu/): host-only stand-ins for libcuda, the CUDA
# runtime, cuBLAS, cuRAND and NCCL, so that a `cuda` build of Medley runs its host side on a
# machine without a GPU (no kernel runs; see fake_cuda.c), to count and profile what the host does
# per step.
#   scripts/cuda/fake-gpu.sh OUT_DIR [BINARY]
# then run BINARY with LD_LIBRARY_PATH=OUT_DIR. With BINARY, checks that the fakes define every
# CUDA entry point it imports (so a new import fails here, not at load time).
set -euo pipefail
out="$1"
bin="${2:-}"
src="$(cd "$(dirname "$0")/fake-gpu" && pwd)"
mkdir -p "$out"
cc=(gcc -shared -fPIC -O2 -Wall -Wextra -Werror)
"${cc[@]}" -Wl,-soname,libcuda.so.1 -o "$out/libcuda.so.1" "$src/fake_cuda.c"
ln -sf libcuda.so.1 "$out/libcuda.so"
lib() { # lib SONAME DEFINE [VERSION_NODE]
  local flags=()
  if [ -n "${3:-}" ]; then
    printf '%s { global: *; };\n' "$3" >"$out/$1.map"
    flags+=("-Wl,--version-script=$out/$1.map")
  fi
  "${cc[@]}" -D"$2" -Wl,-soname,"$1" "${flags[@]}" -o "$out/$1" "$src/fake_libs.c" \
    -L"$out" -lcuda
  rm -f "$out/$1.map"
}
lib libcudart.so.13 FAKE_RUNTIME libcudart.so.13
lib libcublas.so.13 FAKE_CUBLAS libcublas.so.13
lib libcurand.so.10 FAKE_CURAND libcurand.so.10
lib libnccl.so.2 FAKE_NCCL
if [ -n "$bin" ]; then
  missing=0
  for s in $(nm -D --undefined-only "$bin" | awk '{print $2}' | sed 's/@.*//' \
      | grep -E '^(cu|__cuda|nccl)' | sort -u); do
    if ! nm -D --defined-only "$out"/lib*.so.* | awk '{print $3}' | sed 's/@.*//' | grep -qx "$s"; then
      echo "fake-gpu: $bin imports $s, which the fakes do not define" >&2
      missing=1
    fi
  done
  [ "$missing" = 0 ] || exit 1
fi
echo "fake-gpu: $out" >&2
