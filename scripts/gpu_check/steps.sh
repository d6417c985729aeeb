# shellcheck shell=bash
# The steps of scripts/gpu-check.sh that run in child shells under a time limit. They read the
# variables the driver exports: work res py check mode preset layers new_tokens medley model
# adapters.

# Writes the f32 checkpoint (medley-fixture) and 8 rank-16 PEFT adapters (medley-merge-dev).
make_fixtures() {
  local shape=(--preset "$preset")
  [ "$preset" = tiny ] || shape+=(--layers "$layers")
  "$work/bin/medley-fixture" model "${shape[@]}" --dtype f32 --out "$model" || return 1
  local i
  for i in 0 1 2 3 4 5 6 7; do
    "$work/bin/medley-merge-dev" fixture --preset "$preset" --layers "$layers" --rank 16 \
      --alpha 32 --seed "$((100 + i))" --out "$adapters/a$i" >/dev/null || return 1
  done
  du -sh "$model" "$adapters"
}

# lora_kernels ITERS FILE [ARGS...]: the batched LoRA kernels against the reference loops, and
# their bandwidth (ITERS timed calls per row), medley-lora-check's other ARGS passed on -> FILE.
lora_kernels() {
  local iters="$1" file="$2"
  shift 2
  "$work/bin/medley-lora-check" --device "$device" --bench --iters "$iters" "$@" \
    >"$res/$file.tmp"
  local rc=$?
  mv "$res/$file.tmp" "$res/$file"
  cat "$res/$file"
  return $rc
}

# Stops every server a step started (pid files: steps run in child shells).
stop_servers() {
  local f pid
  for f in "$work"/pids/*; do
    [ -e "$f" ] || continue
    pid="$(cat "$f")"
    kill -TERM "$pid" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null
    rm -f "$f"
  done
}

# start_server NAME DEVICE DTYPE [SHARDS [COMM]]: starts `medley serve` (SHARDS tensor-parallel
# ranks, default 1; collectives COMM = --tp-comm, default auto) on ports of its own and waits
# until /health answers; sets server_url. Serves $server_model with $server_adapters when set
# (default $model, $adapters).
start_server() {
  local name="$1" dev="$2" dtype="$3" shards="${4:-1}" comm="${5:-auto}"
  local n port
  n="$(find "$res" -name 'server-*.log' | wc -l)"
  # Below Linux's ephemeral range (32768+), so no outgoing connection holds it (CI once failed
  # with "address already in use" on a port up there).
  port=$((20000 + (($$ % 2000) * 2 + 100 * n) % 12000))
  "$medley" serve --model "${server_model:-$model}" --device "$dev" --dtype "$dtype" \
    --num-shard "$shards" --tp-comm "$comm" \
    --adapter-root "${server_adapters:-$adapters}" \
    --port "$port" --grpc-port "$((port + 1))" --shard-uds-path "$work/sock-$name" \
    >"$res/server-$name.log" 2>&1 &
  local pid=$!
  mkdir -p "$work/pids"
  echo "$pid" >"$work/pids/$name"
  server_url="http://127.0.0.1:$port"
  for _ in $(seq 1 1200); do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "server $name exited:"
      tail -n 20 "$res/server-$name.log"
      return 1
    fi
    "$py" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/health", timeout=2)' \
      "$server_url" 2>/dev/null && { echo "server $name ready at $server_url"; return 0; }
    sleep 0.5
  done
  echo "server $name not ready"
  return 1
}

# medley_tokens NAME DEVICE DTYPE [SHARDS [COMM]]: greedy tokens of every case ->
# tokens-medley-NAME.json (the merge of the first $merge_adapters adapters, default 3).
medley_tokens() {
  start_server "$@" || return 1
  "$py" "$check" medley-tokens --url "$server_url" --out "$res/tokens-medley-$1.json" \
    --merge-adapters "${merge_adapters:-3}"
}

# medley_tokens_and_batch NAME DEVICE DTYPE: the tokens, then the same requests all at once on
# that server (one batch) -> tokens-medley-NAME-batch.json.
medley_tokens_and_batch() {
  medley_tokens "$@" || return 1
  "$py" "$check" medley-tokens --url "$server_url" --out "$res/tokens-medley-$1-batch.json" \
    --merge-adapters "${merge_adapters:-3}" --at-once
}

# medley_tokens_and_speed NAME DEVICE DTYPE: the tokens, then the speed table, on one server
# (-> $speed_file, default speed-medley.json; configs $speed_configs, default all four).
medley_tokens_and_speed() {
  medley_tokens "$@" || return 1
  "$py" "$check" medley-speed --url "$server_url" --out "$res/${speed_file:-speed-medley.json}" \
    --configs "${speed_configs:-base,1 adapter,8 merges,8 merges staggered}" --new-tokens "$new_tokens" --budget-s 150
}

# compare NAME REFERENCE CANDIDATE [--require K]: token comparison -> compare-NAME.json.
compare() {
  local name="$1" ref="$2" cand="$3"
  shift 3
  "$py" "$check" compare --name "$name" --reference "$res/$ref" --candidate "$res/$cand" "$@" \
    --out "$res/compare-$(echo "$name" | tr -c 'a-zA-Z0-9\n' '-').json"
}
