#!/usr/bin/env bash
# GPU memory limits, checked on the fake GPU (scripts/cuda/fake-gpu.sh, whose device memory
# MEDLEY_FAKE_CUDA_MEMORY sets and whose allocations fail past it as a full GPU's do). Serves a
# 2-layer TinyLlama-shaped bf16 model with 8 rank-64 PEFT adapters (about 18 MiB each on the
# device) and checks:
#   1. with room after the warm-up step for about 3 adapters, the shard caps its adapter budget
#      to it (the 1 GiB default does not fit) and requests over all 8 adapters, 4 at a time,
#      all succeed: the router evicts idle adapters instead of the GPU running out of memory;
#   2. with less room than adapters need, `medley serve` stops at start-up with the reason;
#   3. with less memory than the weights, it stops with "out of GPU memory" naming the tensor;
#   4. without --kv-cache-tokens, the KV cache takes what the weights, the warm-up step and the
#      adapter budget leave of the shard's budget (--gpu-memory-utilization) within the free
#      memory, requests then succeed without running out, a lower utilization keeps more free,
#      and a device with no room for one request stops the start-up with the reason.
#   scripts/cuda/memory-check.sh [--bin target/release-cuda/medley]
set -euo pipefail
source "$(dirname "$0")/fake-session.sh"
fake_server_check memory-check "$@"
fixture="$(dirname "$bin")/medley-fixture"
merge_dev="$(dirname "$bin")/medley-merge-dev"
"$fixture" model --preset tinyllama --layers 2 --dtype bf16 --out "$work/model" >/dev/null
for i in 0 1 2 3 4 5 6 7; do
  "$merge_dev" fixture --preset tinyllama --layers 2 --rank 64 --seed "$((200 + i))" \
    --out "$work/adapters/m$i" >/dev/null
done
port=$((22000 + ($$ % 4000) * 2))
fail() {
  echo "memory-check: $1" >&2
  grep -E "ERROR|WARN" "$work/server.log" | tail -n 8 >&2 || true
  exit 1
}
# serve MEMORY [FLAG...]: starts the server on a device of MEMORY bytes (with a 4096-token KV
# cache unless FLAGs are given); returns 0 once it answers health, 1 when it exits first (its log
# in $work/server.log).
serve() {
  local memory="$1"
  shift
  [ $# -gt 0 ] || set -- --kv-cache-tokens 4096
  MEDLEY_FAKE_CUDA_MEMORY="$memory" "$bin" serve --model "$work/model" --device cuda --dtype bf16 \
    "$@" --adapter-root "$work/adapters" --port "$port" \
    --grpc-port "$((port + 1))" --shard-uds-path "$work/sock" >"$work/server.log" 2>&1 &
  pid=$!
  for _ in $(seq 120); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || { wait "$pid" || true; pid=; return 1; }
    sleep 0.5
  done
  fail "the server neither answered nor stopped within 60 s"
}
# requests_over_8_adapters: 32 requests over the 8 adapters, 4 at a time; fails unless all succeed.
requests_over_8_adapters() {
python3 - "http://127.0.0.1:$port" <<'PY'
import concurrent.futures, json, sys, urllib.request
url = sys.argv[1]
def one(i):
    body = {"inputs": "hello world " * (1 + i % 5),
            "parameters": {"max_new_tokens": 6, "ignore_eos_token": True,
                           "adapter_id": f"m{i % 8}", "adapter_source": "local"}}
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, ""
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()[:300]
with concurrent.futures.ThreadPoolExecutor(4) as pool:
    results = list(pool.map(one, range(32)))
bad = [r for r in results if r[0] != 200]
for r in bad[:3]:
    print("memory-check:", r, file=sys.stderr)
with urllib.request.urlopen(url + "/v1/adapters") as r:
    listing = json.load(r)
print(f"memory-check: 32 requests over 8 adapters, {len(results) - len(bad)} succeeded; "
      f"adapter memory {listing['memory']}")
sys.exit(1 if bad else 0)
PY
}
stop() { kill "$pid"; wait "$pid" || true; pid=; }
field() { # field NAME: the last value of NAME=... in the server's log
  grep -o "$1=[0-9]*" "$work/server.log" | tail -n 1 | cut -d= -f2
}
mib=$((1 << 20))

# What the weights, the KV cache and the warm-up step take: measured on an 80 GiB device.
serve 0 || fail "the server did not start on an 80 GiB device"
total=$(field total_mib) free=$(field free_mib)
[ -n "$total" ] && [ -n "$free" ] || fail "no 'GPU memory after the warm-up step' in the log"
used=$(((total - free) * mib))
stop
echo "memory-check: the weights, the KV cache and the warm-up step take $((used / mib)) MiB"

# 1. Room for about 3 adapters beyond the 256 MiB of headroom.
serve $((used + 256 * mib + 56 * mib)) || fail "the server did not start with 56 MiB for adapters"
grep -q "adapter memory budget does not fit" "$work/server.log" || fail "the budget was not capped"
budget=$(field adapter_budget_mib)
[ "$budget" -ge 40 ] && [ "$budget" -le 56 ] || fail "adapter budget $budget MiB, expected 40-56"
requests_over_8_adapters || fail "requests over 8 adapters failed"
! grep -q "OUT_OF_MEMORY" "$work/server.log" || fail "the fake GPU ran out of memory while serving"
stop
echo "memory-check: a budget capped to $budget MiB served 8 adapters of ~18 MiB without running out"

# 2. Too little room for adapters: a clear stop at start-up.
if serve $((used + 256 * mib + 4 * mib)); then fail "the server started with 4 MiB for adapters"; fi
grep -q "less than the .* MiB of headroom" "$work/server.log" \
  || fail "no reason given for stopping with 4 MiB for adapters"
echo "memory-check: 4 MiB for adapters stops the start-up with the reason"

# 3. Less memory than the weights.
if serve $((used / 2)); then fail "the server started on half the memory its weights need"; fi
grep -q "out of GPU memory (loading \`" "$work/server.log" \
  || fail "no 'out of GPU memory (loading ...' when the weights do not fit"
echo "memory-check: weights that do not fit stop the start-up with 'out of GPU memory'"

# 4. The KV cache sized from the device's memory (no --kv-cache-tokens).
kv_fit() { # kv_fit NAME: NAME=... on the "KV cache sized" line
  grep "KV cache sized from the GPU's memory" "$work/server.log" | grep -o "$1=[0-9]*" | tail -n 1 \
    | cut -d= -f2
}
# Room for the 1 GiB adapter budget, the 256 MiB of headroom and about 64 MiB of KV cache beyond
# what case 1 measured (whose 4096-token cache took 8 MiB of it).
serve $((used + 1280 * mib + 64 * mib)) --adapter-memory-budget 1GiB \
  || fail "the server did not start with 64 MiB for a KV cache sized from memory"
kv=$(kv_fit kv_cache_mib)
[ -n "$kv" ] || fail "no 'KV cache sized from the GPU's memory' in the log"
[ "$kv" -ge 48 ] && [ "$kv" -le 80 ] || fail "KV cache of $kv MiB, expected 48-80"
! grep -q "adapter memory budget does not fit" "$work/server.log" \
  || fail "the KV cache left no room for the adapter budget"
requests_over_8_adapters || fail "requests over 8 adapters failed with a KV cache sized from memory"
! grep -q "OUT_OF_MEMORY" "$work/server.log" || fail "the fake GPU ran out of memory while serving"
stop
echo "memory-check: a KV cache sized from memory ($kv MiB) left the adapter budget room and served"

# ... and what the shard may use follows --gpu-memory-utilization (of 8 GiB: 7372 MiB at 0.9,
# 4096 MiB at 0.5), the cache taking that budget less the weights, the step and the adapters.
# budget_check UTILIZATION BUDGET_MIB: the server's budget, and its cache filling it.
budget_check() {
  [ "$(kv_fit budget_mib)" = "$2" ] || fail "budget $(kv_fit budget_mib) MiB at $1, expected $2"
  local used_mib=$(($(kv_fit weights_mib) + $(kv_fit step_peak_mib) + $(kv_fit adapter_budget_mib)))
  local left=$(($2 - used_mib - $(kv_fit kv_cache_mib)))
  [ "$left" -ge 0 ] && [ "$left" -le 2 ] || fail "at $1 the cache left $left MiB of the budget"
}
serve $((8 << 30)) --gpu-memory-utilization 0.9 || fail "the server did not start on 8 GiB"
budget_check 0.9 7372
tokens_default=$(kv_fit kv_cache_tokens)
stop
serve $((8 << 30)) --gpu-memory-utilization 0.5 || fail "the server did not start at 0.5"
budget_check 0.5 4096
tokens_half=$(kv_fit kv_cache_tokens)
stop
[ "$tokens_half" -lt "$tokens_default" ] || fail "0.5 gave $tokens_half tokens, 0.9 $tokens_default"
echo "memory-check: 8 GiB, utilization 0.9: $tokens_default KV tokens; 0.5: $tokens_half"

# ... and no room for one request stops the start-up with the reason.
if serve $((used + 1280 * mib - 16 * mib)) --adapter-memory-budget 1GiB; then fail "the server started with no room for a KV cache"; fi
grep -q "less than one request of --max-total-tokens" "$work/server.log" \
  || fail "no reason given for stopping with no room for a KV cache"
echo "memory-check: no room for a KV cache stops the start-up with the reason"
