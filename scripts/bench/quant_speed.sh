#!/usr/bin/env bash
# Issue 15's table: decode tokens/s at 1 and 16 streams for the base model, one adapter and 8
# distinct merges (check.py medley-speed: each merge a linear merge of two of 8 rank-16 adapters),
# and the shard's resident memory, for a TinyLlama-shaped model (--layers layers) served in f32
# and from GGUF files of it (written by `medley-fixture gguf`, blocks kept quantized: the default
# for GGUF on the CPU); llama.cpp's one-stream decode on the same GGUF files as the anchor (with
# --llama-python). With --smollm2 FILE, the same for SmolLM2-135M-Instruct's Q4_1 file (base
# model only: the adapters have TinyLlama's shape), kept and dequantized (--quantize none).
#
#   cargo build --release -p medley -p medley-shard -p medley-merge --bins --features medley-shard/testing,medley-merge/testing
#   scripts/bench/quant_speed.sh [--formats q8_0,q4_1,q4_0] [--layers 4] [--streams 1,16] \
#       [--new-tokens 32] [--llama-python PY] [--smollm2 FILE]
#
# RSS is the shard process's VmRSS after the runs (steady state) and VmHWM (peak, load included).
# Python: any python3 for check.py; PY needs llama-cpp-python (see llama_cpp_speed.py).
set -euo pipefail

formats=q8_0,q4_1,q4_0
layers=4
streams=1,16
new_tokens=32
llama_py=""
smollm2=""
while [ $# -gt 0 ]; do
    case "$1" in
        --formats) formats=$2; shift 2 ;;
        --layers) layers=$2; shift 2 ;;
        --streams) streams=$2; shift 2 ;;
        --new-tokens) new_tokens=$2; shift 2 ;;
        --llama-python) llama_py=$2; shift 2 ;;
        --smollm2) smollm2=$2; shift 2 ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
done
# shellcheck source=fixtures.sh
source "$(dirname "$0")/fixtures.sh"
bench_fixtures quant-speed "$layers"

# serve NAME CONFIGS MODEL [ARGS...]: serves MODEL, runs check.py medley-speed over CONFIGS,
# records the shard's RSS and stops the server.
n=0
serve() {
    local name=$1 configs=$2 model=$3
    shift 3
    n=$((n + 1))
    local sock="$work/sock-$name" pid
    bench_serve "$name" "$((22000 + n * 10 + ($$ % 500) * 20))" "$model" "$@"
    python3 "$root/scripts/gpu_check/check.py" medley-speed --url "$url" \
        --out "$work/speed-$name.json" --streams "$streams" --new-tokens "$new_tokens" \
        --configs "$configs" --decode-reps 3 --budget-s 1800 2>/dev/null
    pid=$(pgrep -f -- "--uds-path $sock-" | head -n 1)
    # VmRSS (now), then VmHWM (peak).
    echo "$(awk '/VmRSS/ {print $2}' "/proc/$pid/status") $(awk '/VmHWM/ {print $2}' "/proc/$pid/status")" \
        >"$work/rss-$name"
    kill -TERM "$server"
    wait "$server" || true
}

# llama NAME FILE [ARGS...]: llama.cpp's one-stream decode on FILE.
llama() {
    local name=$1 file=$2
    shift 2
    [ -n "$llama_py" ] || return 0
    "$llama_py" "$root/scripts/bench/llama_cpp_speed.py" "$file" --new-tokens "$new_tokens" "$@" \
        >"$work/llama-$name.json" 2>/dev/null || echo '{}' >"$work/llama-$name.json"
}

all="base,1 adapter,8 merges"
names="f32"
serve f32 "$all" "$work/model" --quantize none
for q in ${formats//,/ }; do
    "$bin/medley-fixture" gguf --model "$work/model" --type "$q" --out "$work/model.$q.gguf" >/dev/null
    serve "$q" "$all" "$work/model.$q.gguf"
    llama "$q" "$work/model.$q.gguf"
    names+=" $q"
done
if [ -n "$smollm2" ]; then
    serve smollm2-none base "$smollm2" --quantize none
    serve smollm2-keep base "$smollm2"
    llama smollm2-keep "$smollm2" --chat
    names+=" smollm2-none smollm2-keep"
fi

python3 - "$work" "$layers" "$new_tokens" "$streams" $names <<'PY'
import json, os, sys
work, layers, new_tokens, streams, names = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
streams = [int(s) for s in streams.split(",")]
speed = {n: json.load(open(f"{work}/speed-{n}.json"))["rows"] for n in names}
rss = {n: [int(x) for x in open(f"{work}/rss-{n}").read().split()] for n in names}
llama = {}
for n in names:
    p = f"{work}/llama-{n}.json"
    if os.path.exists(p):
        llama[n] = json.load(open(p))
def row(n, config, s):
    return next((r for r in speed[n] if r["config"] == config and r["streams"] == s), {})
def tps(n, config, s):
    return row(n, config, s).get("tokens_per_s")
print(f"TinyLlama-shaped model, {layers} layers, {new_tokens} new tokens per stream (HTTP /generate); "
      "GGUF blocks kept quantized; 8 merges = linear merges of two rank-16 adapters, stream i uses merge i mod 8\n")
head = " | ".join(f"{c} x{s}" for c in ("base", "1 adapter", "8 merges") for s in streams)
print(f"| model | {head} | base x{streams[0]} vs f32 | 8 merges / base x{streams[-1]} | shard RSS MiB (peak) | RSS vs f32 |")
print("|---|" + "---:|" * (3 * len(streams) + 4))
fmt = lambda v: "" if v is None else f"{v}"
for n in names:
    cells = [tps(n, c, s) for c in ("base", "1 adapter", "8 merges") for s in streams]
    b1 = tps(n, "base", streams[0])
    base_ref = tps("smollm2-none" if n.startswith("smollm2") else "f32", "base", streams[0])
    m, b = tps(n, "8 merges", streams[-1]), tps(n, "base", streams[-1])
    rss_now, rss_peak = rss[n][0] / 1024, rss[n][1] / 1024
    ref_rss = rss["smollm2-none" if n.startswith("smollm2") else "f32"][0] / 1024
    print(f"| {n} | " + " | ".join(fmt(c) for c in cells)
          + f" | {b1 / base_ref:.2f}x | " + (f"{m / b:.0%}" if m and b else "")
          + f" | {rss_now:.0f} ({rss_peak:.0f}) | {rss_now / ref_rss:.0%} |")
print("\nOne stream against llama.cpp: *request* = new tokens / whole request, prompt included "
      "(Medley: the x1 HTTP /generate run above; llama.cpp: eval of the prompt, then the tokens, best "
      "of 3); *decode* = best of 3 runs of "
      "tokens / time between the first and the last new token (Medley: /generate_stream events; "
      "llama.cpp: the single-token evals)\n")
print("| model | Medley request | llama.cpp request | ratio | Medley decode | llama.cpp decode | ratio | Medley decode vs f32 |")
print("|---|---:|---:|---:|---:|---:|---:|---:|")
ratio = lambda a, b: f"{a / b:.2f}x" if a and b else ""
for n in names:
    mr = tps(n, "base", 1)
    md = row(n, "base", 1).get("decode_tokens_per_s")
    ref_d = row("smollm2-none" if n.startswith("smollm2") else "f32", "base", 1).get("decode_tokens_per_s")
    lr, ld = llama.get(n, {}).get("request_tokens_per_s"), llama.get(n, {}).get("decode_tokens_per_s")
    print(f"| {n} | {fmt(mr)} | {fmt(lr)} | {ratio(mr, lr)} | {fmt(md)} | {fmt(ld)} | {ratio(md, ld)} | {ratio(md, ref_d)} |")
for n, v in llama.items():
    if "capital_answer" in v:
        print(f"\nllama.cpp's answer on {n} (chat template, greedy): {v['capital_answer']!r}")
PY
