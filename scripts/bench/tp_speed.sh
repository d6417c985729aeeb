#!/usr/bin/env bash
# Tensor-parallel decode speed and memory on this machine: the same TinyLlama-shaped model (f32,
# --layers layers, 8 rank-16 adapters) served with --num-shard 1 and 2 (the launcher gives each
# rank cpus / ranks forward threads, so both runs use the same total), decode tokens/s at 1 and
# 16 streams for the base model, one adapter and 8 distinct merges (check.py medley-speed), the
# forward and collective time per decode step from /metrics, and each rank's peak RSS.
#
#   cargo build --release -p medley -p medley-shard -p medley-merge --bins --features medley-shard/testing,medley-merge/testing
#   scripts/bench/tp_speed.sh [LAYERS] [STREAMS] [NEW_TOKENS]
#
# Python: any python3 (check.py's medley-speed needs only the standard library).
set -euo pipefail

layers=${1:-4}
streams=${2:-1,16}
new_tokens=${3:-32}
# shellcheck source=fixtures.sh
source "$(dirname "$0")/fixtures.sh"
bench_fixtures tp-speed "$layers"

# Peak RSS (kB) of the shard processes of the server whose sockets start with $1.
peak_rss() {
    local pid out=""
    for pid in $(pgrep -f -- "--uds-path $1-"); do
        out+="$(awk '/VmHWM/ {print $2}' "/proc/$pid/status") "
    done
    echo "$out"
}

for shards in 1 2; do
    sock="$work/sock-tp$shards"
    bench_serve "tp$shards" "$((21000 + (shards * 10) + ($$ % 500) * 20))" "$work/model" \
        --num-shard "$shards"
    python3 "$root/scripts/gpu_check/check.py" medley-speed --url "$url" \
        --out "$work/speed$shards.json" --streams "$streams" --new-tokens "$new_tokens" \
        --budget-s 1200 2>/dev/null
    echo "$(peak_rss "$sock")" >"$work/rss$shards"
    kill -TERM "$server"
    wait "$server" || true
done

python3 - "$work" "$layers" "$new_tokens" <<'PY'
import json, sys
work, layers, new_tokens = sys.argv[1], sys.argv[2], sys.argv[3]
runs = {n: json.load(open(f"{work}/speed{n}.json"))["rows"] for n in (1, 2)}
rss = {n: [int(x) for x in open(f"{work}/rss{n}").read().split()] for n in (1, 2)}
print(f"TinyLlama-shaped f32, {layers} layers, {new_tokens} new tokens per stream\n")
print("| adapters | streams | tok/s 1 rank | tok/s 2 ranks | 2 / 1 | forward ms/step 1 → 2 | collectives ms/step (2 ranks) |")
print("|---|---:|---:|---:|---:|---|---:|")
for one, two in zip(runs[1], runs[2]):
    ratio = two["tokens_per_s"] / one["tokens_per_s"]
    print(f"| {one['config']} | {one['streams']} | {one['tokens_per_s']} | {two['tokens_per_s']} | "
          f"{ratio:.0%} | {one.get('forward_ms_per_step', '')} → {two.get('forward_ms_per_step', '')} | "
          f"{two.get('comm_ms_per_step', '')} |")
print(f"\npeak RSS per rank: 1 rank {max(rss[1]) / 1024:.0f} MiB; 2 ranks "
      + ", ".join(f"{r / 1024:.0f} MiB" for r in rss[2])
      + f" ({max(rss[2]) / max(rss[1]):.0%} of one rank)")
PY
