#!/usr/bin/env bash
# Tensor parallelism over NCCL across GPUs, checked on the fake GPU (scripts/cuda/fake-gpu.sh)
# with two fake GPUs (MEDLEY_FAKE_CUDA_DEVICES=2): the lent GPU machines have one GPU, on which
# NCCL refuses two ranks, so this is the only place the multi-GPU path runs end to end. The fake
# NCCL forms its groups as NCCL's bootstrap does (ranks meet on the unique id and the world size,
# or never) but exchanges no data, and no kernel runs: this checks the host side, not numerics.
#   1. `medley serve --device cuda --num-shard 2` picks NCCL (each rank has a GPU of its own),
#      both ranks join one group with the launcher's unique id, agree on a KV cache sized from
#      their GPUs' memory, and serve requests (base, adapter, merge), every decode step calling
#      collectives;
#   2. after SIGKILL of rank 1, the group restarts with a fresh unique id and serves again;
#   3. with one GPU, the same command stops at start-up naming rank 1's missing GPU.
#   scripts/cuda/tp-fake.sh [--bin target/release-cuda/medley]
set -euo pipefail
source "$(dirname "$0")/fake-session.sh"
fake_server_check tp-fake "$@"
export MEDLEY_FAKE_NCCL_DIR="$work/nccl"
export MEDLEY_FAKE_NCCL_LOG="$work/nccl.log" MEDLEY_FAKE_CUDA_LOG="$work/calls.log"
mkdir -p "$MEDLEY_FAKE_NCCL_DIR"
"$(dirname "$bin")/medley-fixture" model --preset tinyllama --layers 2 --dtype bf16 \
  --out "$work/model" >/dev/null
fake_serving tp-fake 300 24000
# serve GPUS: starts 2 ranks on GPUS fake GPUs; 0 once healthy, 1 when the server exits first.
serve() {
  MEDLEY_FAKE_CUDA_DEVICES="$1" "$bin" serve --model "$work/model" --device cuda --num-shard 2 \
    --dtype bf16 --adapter-root "$work/adapters" --port "$port" --grpc-port "$((port + 1))" \
    --shard-uds-path "$work/sock" >"$work/server.log" 2>&1 &
  pid=$!
  healthy && return 0
  wait "$pid" || true
  pid=
  return 1
}
# healthy: 0 once /health answers, 1 when the server exits first; fails after 60 s.
healthy() {
  for _ in $(seq 120); do
    curl -sf "$url/health" >/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || return 1
    sleep 0.5
  done
  fail "the server neither answered nor stopped within 60 s"
}
# requests: base, adapter and merge requests, all answered 200.
requests() {
  local which
  for which in '' '"adapter_id": "a0", "adapter_source": "local",' \
    '"merged_adapters": {"ids": ["a0", "a1"], "weights": [1, 0.5], "merge_strategy": "ties", "density": 0.5}, "adapter_source": "local",'; do
    curl -sf "$url/generate" -H 'Content-Type: application/json' -d "{\"inputs\": \"hello world\",
      \"parameters\": {$which \"max_new_tokens\": 6, \"ignore_eos_token\": true}}" >/dev/null \
      || fail "request {$which} failed"
  done
}
# log: the server's log without colours.
log() { sed 's/\x1b\[[0-9;]*m//g' "$work/server.log"; }
# groups: the unique ids the ranks joined with, one line each: "ID WORLD RANKS".
groups() {
  awk '{ranks[$1 " " $2] = ranks[$1 " " $2] $3} END {for (g in ranks) print g, ranks[g]}' \
    "$MEDLEY_FAKE_NCCL_LOG" | sort
}

# 1. Two GPUs, NCCL.
serve 2 || fail "the server did not start with 2 ranks on 2 GPUs"
log | grep -q "joined the tensor-parallel group backend=Nccl" \
  || fail "--tp-comm auto did not pick NCCL with a GPU per rank"
[ "$(groups | wc -l)" = 1 ] || fail "the ranks joined $(groups | wc -l) groups: $(groups)"
read -r _ world ranks <<<"$(groups)"
[ "$world" = 2 ] && [ "$(echo "$ranks" | grep -o . | sort | tr -d '\n')" = 01 ] \
  || fail "group of world $world with ranks $ranks"
sizes=$(log | grep "KV cache sized from the GPU's memory" | grep -o "kv_cache_tokens=[0-9]*" \
  | sort -u)
[ "$(log | grep -c "KV cache sized from the GPU's memory")" = 2 ] \
  && [ "$(echo "$sizes" | wc -l)" = 1 ] || fail "the ranks sized their KV caches as: $sizes"
requests
# Each rank's read-backs of a decode step's logits follow the step's collectives.
n=$(grep "^dtoh" "$MEDLEY_FAKE_CUDA_LOG" | grep -cv " collective 0 " || true)
[ "$n" -gt 0 ] \
  || fail "no collective between two read-backs of the logits"
echo "tp-fake: 2 ranks on 2 GPUs joined one NCCL group, agreed on $sizes and served ($n read-backs after collectives)"

# 2. A rank killed: the group restarts with a fresh unique id.
rank1=$(log | grep -o "shard started rank=1 pid=[0-9]*" | tail -n 1 | cut -d= -f3)
[ -n "$rank1" ] || fail "no pid of rank 1 in the log"
kill -9 "$rank1"
for _ in $(seq 60); do
  [ "$(groups | wc -l)" = 2 ] && break
  sleep 0.5
done
[ "$(groups | wc -l)" = 2 ] || fail "the group did not rejoin with a new id: $(groups)"
healthy || fail "the server exited after rank 1 was killed"
requests
echo "tp-fake: after SIGKILL of rank 1 the group rejoined with a new NCCL id and served"
kill "$pid"
wait "$pid" || true
pid=

# 3. One GPU for two ranks.
if serve 1; then fail "2 ranks started on 1 GPU"; fi
log | grep -q "cannot open CUDA device 1 (rank 1): there is no GPU with this ordinal" \
  || fail "no reason given for 2 ranks on 1 GPU"
echo "tp-fake: 2 ranks on 1 GPU stop at start-up naming rank 1's missing GPU"
