#!/usr/bin/env bash
# The GPU check's kernel step (`medley-lora-check --device cuda --bench`) on the fake GPU
# (scripts/cuda/fake-gpu.sh): its CUDA host side, every case through every BGMV kernel set, the
# GPU timer and every table, runs to its end, so that it cannot rot between GPU runs. No kernel
# computes on the fake, so the cases' numbers are meaningless and fail: exit 1 is what the check
# expects. An error (exit 2, e.g. a launch the fake refuses as a GPU would), a crash or a missing
# table fails it.
#   scripts/cuda/lora-check-fake.sh [--bin target/release-cuda/medley-lora-check] [--out FILE]
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="$root/target/release-cuda/medley-lora-check"
out=
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    *) echo "lora-check-fake: unknown argument $1" >&2; exit 2 ;;
  esac
done
source "$root/scripts/cuda/fake-session.sh"
fake_session "$bin"
out="${out:-$work/lora-check.md}"
rc=0
LD_LIBRARY_PATH="$work/fake" "$bin" --device cuda --bench --iters 5 >"$out" 2>"$work/stderr" || rc=$?
fail() {
  echo "lora-check-fake: $1" >&2
  tail -n 20 "$work/stderr" >&2
  exit 1
}
[ "$rc" = 1 ] || fail "medley-lora-check exited with $rc on the fake GPU (expected 1: its cases fail there)"
for table in "## LoRA kernels vs the reference" "## Paged attention, fused and greedy kernels" \
    "## LoRA bandwidth at decode" "## Decode-step ops" "result: FAIL"; do
  grep -q "^$table" "$out" || fail "no '$table' in its output"
done
# Every BGMV kernel set reached the bandwidth table.
for set in row grouped fused fused-grouped; do
  grep -q "^| $set | BF16 | down" "$out" || fail "no bandwidth row of the '$set' kernels"
done
if grep -q "refused launch" "$work/stderr"; then fail "the fake GPU refused a launch"; fi
echo "lora-check-fake: medley-lora-check ran every case and table on the fake GPU ($(grep -c '^| ' "$out") table rows)"
