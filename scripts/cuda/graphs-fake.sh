#!/usr/bin/env bash
# Decode steps replayed from CUDA graphs (`--cuda-graphs on`), checked on the fake GPU
# (scripts/cuda/fake-gpu.sh), whose stream capture refuses what a real one refuses (a copy from
# or to host memory, a synchronisation, a free of memory the graph did not allocate) and whose
# graphs must free what they allocate. No kernel runs: this checks the host side (what is
# recorded, when, and that the replays serve), not numerics; the GPU check compares the tokens.
# For each dtype (bf16, f16, f32), a 2-layer TinyLlama-shaped model serves, at once, 4 streams
# on the base model, 4 on one adapter and 4 on a TIES merge (one step mixes all three), twice,
# then one stream of 48 tokens alone, then 12 streams at once of 8, 12, ... 52 tokens (one
# leaves the batch every 4 steps):
#   - every request is answered with all its tokens;
#   - no capture was refused and no recording failed (server log);
#   - decode steps of the mixed batches were replayed from graphs (the fake's count of graph
#     launches), at least 40 of the lone stream's 47 (a composition is recorded after 3 eager
#     steps), and at least 3/4 of the churning batch's steps (prefill included): its rows are
#     padded to 16, 8, 4, 2, 1 and the row-to-adapter mapping is an input, so the graphs of a few
#     sizes serve it while its rows leave (a graph per composition replayed about half of them).
#   scripts/cuda/graphs-fake.sh [--bin target/release-cuda/medley]
set -euo pipefail
source "$(dirname "$0")/fake-session.sh"
fake_server_check graphs-fake "$@"
fake_serving graphs-fake 400 28000
# round [STREAMS [TOKENS [STEP]]]: STREAMS streams (base, adapter, merge in turn; default 12) at
# once, stream i of TOKENS + i * STEP tokens (default 24, 0), each answered with all of them.
round() {
  python3 - "$url" "${1:-12}" "${2:-24}" "${3:-0}" <<'EOF' || fail "a request failed or ended early"
import concurrent.futures, json, sys, urllib.request
url = sys.argv[1]
merge = {"ids": ["a0", "a1"], "weights": [1.0, 0.5], "merge_strategy": "ties", "density": 0.5}
kinds = [{}, {"adapter_id": "a0", "adapter_source": "local"},
         {"merged_adapters": merge, "adapter_source": "local"}]
streams, tokens, step = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
def one(i):
    params = dict(kinds[i % 3], max_new_tokens=tokens + i * step, ignore_eos_token=True,
                  details=True)
    body = json.dumps({"inputs": f"stream {i} says", "parameters": params}).encode()
    req = urllib.request.Request(url + "/generate", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)["details"]["generated_tokens"]
with concurrent.futures.ThreadPoolExecutor(streams) as pool:
    got = list(pool.map(one, range(streams)))
if got != [tokens + i * step for i in range(streams)]:
    sys.exit(f"generated tokens: {got}")
EOF
}
# graph_launches: graph launches in the fake's log so far.
graph_launches() {
  awk '{for (i = 1; i < NF; i++) if ($i == "graph_launch") n += $(i + 1)} END {print n + 0}' \
    "$work/calls.log"
}
# steps_since LINES: "STEPS GRAPHED" over the fake's log after its first LINES lines: the
# steps (one line per read-back) and those that launched a graph.
steps_since() {
  awk -v from="$1" 'NR > from && !/^ / {n++; for (i = 1; i < NF; i++)
    if ($i == "graph_launch" && $(i + 1) > 0) g++} END {print n + 0, g + 0}' "$work/calls.log"
}
# serve DTYPE: `medley serve --cuda-graphs on` of the DTYPE model on the fake GPU, its calls
# logged to $work/calls.log; returns once healthy.
serve() {
  rm -f "$work/calls.log"
  MEDLEY_FAKE_CUDA_LOG="$work/calls.log" "$bin" serve --model "$work/model-$1" \
    --device cuda --dtype "$1" --cuda-graphs on --adapter-root "$work/adapters" \
    --port "$port" --grpc-port "$((port + 1))" --shard-uds-path "$work/sock" \
    >"$work/server.log" 2>&1 &
  pid=$!
  for _ in $(seq 120); do
    curl -sf "$url/health" >/dev/null && return 0
    kill -0 "$pid" 2>/dev/null || fail "$1: the server exited"
    sleep 0.5
  done
  fail "$1: the server did not answer within 60 s"
}
for dtype in bf16 f16 f32; do
  "$(dirname "$bin")/medley-fixture" model --preset tinyllama --layers 2 --dtype "$dtype" \
    --out "$work/model-$dtype" >/dev/null
  serve "$dtype"
  round
  round
  mixed=$(graph_launches)
  round 1 48
  alone=$(( $(graph_launches) - mixed ))
  churn_from=$(wc -l <"$work/calls.log")
  round 12 8 4
  read -r churn_steps churn < <(steps_since "$churn_from")
  if grep -q "fake-gpu: .*refused" "$work/server.log"; then
    fail "$dtype: a stream capture was refused"
  fi
  if grep -q "CUDA graph: it runs eagerly" "$work/server.log"; then
    fail "$dtype: a decode step's graph failed (recording or replay)"
  fi
  [ "$mixed" -gt 0 ] || fail "$dtype: no decode step of the mixed batches was replayed"
  grep -q "decode steps replayed from CUDA graphs" "$work/server.log" \
    || fail "$dtype: the shard never logged its graph counts"
  [ "$alone" -ge 40 ] || fail "$dtype: only $alone of the lone stream's 47 decode steps were replayed"
  [ $((4 * churn)) -ge $((3 * churn_steps)) ] ||
    fail "$dtype: only $churn of the churning batch's $churn_steps steps were replayed"
  echo "graphs-fake: $dtype: $mixed decode steps of the mixed batches and $alone of the lone stream's 47 replayed; $churn of the churning batch's $churn_steps steps" >&2
  kill "$pid"
  wait "$pid" 2>/dev/null || true
  pid=
done
# With the fused kernels off (MEDLEY_CUDA_FUSED=off), attention goes through candle's rotary
# path, which uploads shapes: no step is recordable, none is tried, and every request is served.
MEDLEY_CUDA_FUSED=off serve bf16
round
if grep -qE "fake-gpu: .*refused|CUDA graph: it runs eagerly" "$work/server.log"; then
  fail "fused off: a recording was tried"
fi
[ "$(graph_launches)" = 0 ] || fail "fused off: steps were replayed from graphs"
echo "graphs-fake: fused kernels off: nothing recorded, every request served" >&2
echo "graphs-fake: ok" >&2
