# shellcheck shell=bash
# Shared by the bench scripts: `bench_fixtures NAME LAYERS` checks the release binaries, makes
# a work directory (removed, with any server still running, on exit) and writes the
# TinyLlama-shaped f32 model (LAYERS layers) to $work/model and 8 rank-16 PEFT adapters to
# $work/adapters/a0..a7. Sets root, bin and work.
bench_fixtures() {
    local name=$1 layers=$2 b i
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
    bin=${MEDLEY_BIN_DIR:-$root/target/release}
    for b in medley medley-fixture medley-merge-dev; do
        [ -x "$bin/$b" ] || { echo "missing $bin/$b: build it first (see the header)" >&2; exit 1; }
    done
    work=$(mktemp -d "/tmp/medley-$name.XXXXXX")
    trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
    "$bin/medley-fixture" model --preset tinyllama --layers "$layers" --dtype f32 --out "$work/model" >/dev/null
    for i in 0 1 2 3 4 5 6 7; do
        "$bin/medley-merge-dev" fixture --preset tinyllama --layers "$layers" --rank 16 --alpha 32 \
            --seed "$((100 + i))" --out "$work/adapters/a$i" >/dev/null
    done
}

# `bench_serve NAME PORT MODEL [ARGS...]`: starts `medley serve` on MODEL with the adapters of
# `bench_fixtures` (HTTP on PORT, gRPC on PORT + 1, shard sockets $work/sock-NAME-*, log
# $work/server-NAME.log) and waits until /health answers. Sets server (its pid) and url.
bench_serve() {
    local name=$1 port=$2 model=$3
    shift 3
    "$bin/medley" serve --model "$model" --adapter-root "$work/adapters" "$@" \
        --port "$port" --grpc-port "$((port + 1))" --shard-uds-path "$work/sock-$name" \
        >"$work/server-$name.log" 2>&1 &
    server=$!
    url="http://127.0.0.1:$port"
    for _ in $(seq 1 600); do
        python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
            "$url/health" 2>/dev/null && return 0
        kill -0 "$server" 2>/dev/null || { tail -n 20 "$work/server-$name.log"; exit 1; }
        sleep 0.5
    done
    echo "server $name not ready" >&2
    exit 1
}
