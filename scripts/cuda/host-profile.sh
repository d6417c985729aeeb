#!/usr/bin/env bash
# The host side of a GPU decode step, measured on a machine without a GPU: serves a
# TinyLlama-shaped bf16 model (22 layers, vocab 32000) with the CUDA build on the fake GPU
# (scripts/cuda/fake-gpu.sh: no kernel runs, every call is counted) and prints, per stream count,
# the step's times and its calls (kernel launches, GEMMs, allocations, copies) as a markdown table,
# for the base model, one adapter and 8 distinct merges (8 rank-16 PEFT adapters, the GPU
# check's speed configurations). Before the table, a `cat` merge whose rank passes the LoRA
# kernels' 128 must be served beside other requests (see host_profile.py).
#   scripts/cuda/host-profile.sh [--bin target/release-cuda/medley] [--layers N] [--out FILE]
#                                [--kernels]   # also list the launches per kernel name
#                                [--configs "base,1 adapter,8 merges"] [--streams 1,8,32]
#                                [--new-tokens 64]
#                                [--perf FILE] # where the shard's engine thread spends its time
# The binary comes from scripts/cuda/build.sh. The times are this machine's host alone; on a GPU
# machine each call also costs the driver a few microseconds, and the kernels run.
# --perf records the server with `perf record --call-graph dwarf` during the measured runs (after
# a warm-up of the same configurations) and writes the engine thread's functions by inclusive
# share to FILE. It needs `perf` and a binary with symbols, which build.sh strips:
#   (source scripts/cuda/env.sh && CARGO_PROFILE_RELEASE_CUDA_STRIP=false cargo build --locked \
#     --profile release-cuda --features medley/cuda,medley-shard/testing,medley-merge/testing \
#     -p medley -p medley-shard -p medley-merge --bin medley --bin medley-fixture \
#     --bin medley-merge-dev --bin medley-lora-check)
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
bin="$root/target/release-cuda/medley"
layers=22 out=/dev/stdout kernels= configs="base,1 adapter,8 merges" streams=1,8,32 perf_out=
new_tokens=64
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin="$2"; shift 2 ;;
    --layers) layers="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --kernels) kernels=1; shift ;;
    --configs) configs="$2"; shift 2 ;;
    --streams) streams="$2"; shift 2 ;;
    --new-tokens) new_tokens="$2"; shift 2 ;;
    --perf) perf_out="$2"; shift 2 ;;
    *) echo "host-profile: unknown argument $1" >&2; exit 2 ;;
  esac
done
source "$root/scripts/cuda/fake-session.sh"
fake_session "$bin"
fixture="$(dirname "$bin")/medley-fixture"
[ -x "$fixture" ] || fixture="$root/target/release/medley-fixture"
LD_LIBRARY_PATH="$work/fake" "$fixture" model --preset tinyllama --layers "$layers" --dtype bf16 \
  --out "$work/model" >/dev/null
merge_dev="$(dirname "$fixture")/medley-merge-dev"
for i in 0 1 2 3 4 5 6 7; do
  LD_LIBRARY_PATH="$work/fake" "$merge_dev" fixture --preset tinyllama --layers "$layers" \
    --rank 16 --alpha 32 --seed "$((100 + i))" --out "$work/adapters/a$i" >/dev/null
done
# Rank 144 on q_proj: a `cat` merge with a0 passes the LoRA kernels' rank 128 (host_profile.py's
# first check).
LD_LIBRARY_PATH="$work/fake" "$merge_dev" fixture --preset tinyllama --layers "$layers" \
  --rank 144 --targets q_proj --seed 99 --out "$work/adapters/wide" >/dev/null
port=$((20000 + ($$ % 5000) * 2))
env MEDLEY_FAKE_CUDA_LOG="$work/fake.log" ${kernels:+MEDLEY_FAKE_CUDA_KERNELS=1} \
  LD_LIBRARY_PATH="$work/fake" "$bin" serve --model "$work/model" --device cuda --dtype bf16 \
  --adapter-root "$work/adapters" --port "$port" --grpc-port "$((port + 1))" \
  --shard-uds-path "$work/sock" >"$work/server.log" 2>&1 &
pid=$!
for _ in $(seq 120); do
  curl -sf "http://127.0.0.1:$port/health" >/dev/null && break
  kill -0 "$pid" 2>/dev/null || { tail -n 20 "$work/server.log" >&2; exit 1; }
  sleep 1
done
perf_pid=
if [ -n "$perf_out" ]; then
  # Warm-up (merges computed, tables uploaded), then record every server process.
  python3 "$root/scripts/cuda/host_profile.py" --url "http://127.0.0.1:$port" \
    --log "$work/fake.log" --vocab 32000 --configs "$configs" --streams "$streams" \
    --new-tokens 16 >/dev/null
  perf record -F 1000 --call-graph dwarf,16384 -o "$work/perf.data" \
    -p "$(pgrep -d, -f "^$bin ")" >/dev/null 2>&1 &
  perf_pid=$!
  sleep 1
fi
{
  echo "Host side of decode steps on the fake GPU: TinyLlama shape, $layers layers, bf16, $new_tokens new tokens per stream, rank-16 adapters (8 merges: linear merges of two, stream i uses merge i mod 8), $(nproc) CPUs ($(date -u +%F), git $(git -C "$root" rev-parse --short HEAD))."
  echo
  python3 "$root/scripts/cuda/host_profile.py" --url "http://127.0.0.1:$port" \
    --log "$work/fake.log" --vocab 32000 --configs "$configs" --streams "$streams" \
    --new-tokens "$new_tokens"
  echo
  echo "wall: the requests' time over the tokens per stream. forward: the shard's forward pass, logits read-back included; queueing: its part until the model returned (issuing the calls). step as the router sees it: the call to the shard and its answer; shard's step: from its engine starting the step to its answer (a step run ahead starts before the router asks, so the router may wait less); sampling: the shard's sampling, stopping criteria and detokenization. Host µs and the calls: medians over the decode steps of the whole batch, between two reads of the logits (the fake's log)."
  if [ -n "$kernels" ]; then
    echo
    echo "Launches per kernel in the last decode step:"
    echo
    awk '/^[a-z]/ {n = 0; delete k} /^  kernel/ {k[++n] = "- " $2 ": " $3} END {for (i = 1; i <= n; i++) print k[i]}' "$work/fake.log"
  fi
} >"$out"
if [ -n "$perf_pid" ]; then
  kill -INT "$perf_pid" 2>/dev/null
  wait "$perf_pid" 2>/dev/null || true
  {
    echo "perf, the shard's engine thread (medley-engine), functions by inclusive share of its samples ($configs; streams $streams):"
    echo
    echo '```'
    perf report -i "$work/perf.data" --children --comm medley-engine --sort symbol --stdio -g none \
      --percent-limit 1 2>/dev/null | grep -v '^#' | grep '%' | cut -c1-160
    echo '```'
  } >"$perf_out"
fi
