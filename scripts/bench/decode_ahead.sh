#!/usr/bin/env bash
# Decode ahead on the CPU: decode tokens/s of the same server with MEDLEY_DECODE_AHEAD=false and
# true (the shard runs a batch's next decode step before the router asks for it; see the README's
# "Decode ahead"), in alternating rounds, for a TinyLlama-shaped f32 model (--layers layers, 8
# rank-16 adapters): the base model and 8 distinct merges at 1, 8 and 32 streams (check.py
# medley-speed, each row the best of its runs), with the router's wait and the shard's step per
# decode step from /metrics.
#
#   cargo build --release -p medley -p medley-shard -p medley-merge --bins --features medley-shard/testing,medley-merge/testing
#   scripts/bench/decode_ahead.sh [LAYERS] [STREAMS] [NEW_TOKENS] [ROUNDS]
#
# Python: any python3 (check.py's medley-speed needs only the standard library).
set -euo pipefail

layers=${1:-2}
streams=${2:-1,8,32}
new_tokens=${3:-64}
rounds=${4:-2}
# shellcheck source=fixtures.sh
source "$(dirname "$0")/fixtures.sh"
bench_fixtures decode-ahead "$layers"

for round in $(seq 1 "$rounds"); do
    for ahead in false true; do
        name="$ahead-$round"
        MEDLEY_DECODE_AHEAD=$ahead bench_serve "$name" \
            "$((22000 + round * 10 + ($$ % 500) * 40))" "$work/model"
        python3 "$root/scripts/gpu_check/check.py" medley-speed --url "$url" \
            --out "$work/speed-$name.json" --streams "$streams" --new-tokens "$new_tokens" \
            --configs "base,8 merges" --budget-s 1200 2>/dev/null
        kill -TERM "$server"
        wait "$server" || true
    done
done

python3 - "$work" "$layers" "$new_tokens" "$rounds" <<'PY'
import json, sys
work, layers, new_tokens, rounds = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
runs = {(a, r): json.load(open(f"{work}/speed-{a}-{r}.json"))["rows"]
        for a in ("false", "true") for r in range(1, rounds + 1)}
print(f"TinyLlama-shaped f32, {layers} layers, {new_tokens} new tokens per stream; tokens/s per "
      f"round (best of its runs), and the router's wait / the shard's step per decode step (ms)\n")
heads = [f"off, round {r}" for r in range(1, rounds + 1)] + [f"on, round {r}" for r in range(1, rounds + 1)]
print("| adapters | streams | " + " | ".join(heads) + " | best on / best off |")
print("|---|---:|" + "---:|" * (len(heads) + 1))
for i, row in enumerate(runs[("false", 1)]):
    cells, best = [], {}
    for a in ("false", "true"):
        for r in range(1, rounds + 1):
            x = runs[(a, r)][i]
            cells.append(f"{x['tokens_per_s']} ({x.get('step_ms_per_step', '')} / "
                         f"{x.get('shard_ms_per_step', '')})")
            best[a] = max(best.get(a, 0), x["tokens_per_s"])
    print(f"| {row['config']} | {row['streams']} | " + " | ".join(cells)
          + f" | {best['true'] / best['false']:.2f}× |")
PY
