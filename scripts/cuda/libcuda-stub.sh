#!/usr/bin/env bash
# Builds a link-time stand-in for the NVIDIA driver library: every `cu*` function that cudarc's
# driver bindings declare, each returning CUDA_ERROR_NO_DEVICE (100), with soname libcuda.so.1.
#   scripts/cuda/libcuda-stub.sh OUT.so
# Binaries linked against it load the real driver's libcuda.so.1 on a GPU machine.
set -euo pipefail
out="$1"
src="$(cargo metadata --format-version 1 --features medley/cuda --manifest-path "$(dirname "$0")/../../Cargo.toml" \
  | python3 -c 'import json,sys; m=json.load(sys.stdin); print(next(p["manifest_path"] for p in m["packages"] if p["name"]=="cudarc"))')"
sys_rs="$(dirname "$src")/src/driver/sys/mod.rs"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
grep -o 'pub unsafe fn cu[A-Za-z0-9_]*' "$sys_rs" | awk '{print $4}' | sort -u \
  | awk '{printf "int %s(void) { return 100; }\n", $1}' >"$tmp/stub.c"
n="$(wc -l <"$tmp/stub.c")"
[ "$n" -gt 100 ] || { echo "libcuda-stub: only $n functions found in $sys_rs" >&2; exit 1; }
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$out" "$tmp/stub.c"
echo "libcuda-stub: $n functions -> $out" >&2
