#!/usr/bin/env bash
# Wall time of the whole `medley merge` process (start, read three adapters, merge, write the
# PEFT directory, exit) per strategy: the median of --runs runs, next to the process's own
# read/merge/write breakdown from its last run.
#
#   cargo build --release --bin medley
#   RAYON_NUM_THREADS=2 cargo bench -p medley-merge --bench merge -- --cache-dir /tmp/mmb --only ties
#   scripts/bench/merge_process.sh /tmp/mmb [runs] [strategies]
#
# The first argument is the merge benchmark's cache directory (it holds the three TinyLlama-shaped
# rank-16 f32 adapters tinyllama_r16_seed{1,2,3}); weights [2.0, 0.3, 0.7] and density 0.2 as in
# that benchmark and in scripts/bench/peft_merge_bench.py, whose PEFT times are the reference.
# The output directory is on /tmp (page cache), as the benchmark's are.
set -euo pipefail

cache=${1:?usage: merge_process.sh CACHE_DIR [RUNS] [STRATEGIES]}
runs=${2:-7}
strategies=${3:-linear,ties,cat}
root=$(cd "$(dirname "$0")/../.." && pwd)
bin=${MEDLEY_BIN:-$root/target/release/medley}
[ -x "$bin" ] || { echo "build it first: cargo build --release --bin medley" >&2; exit 1; }
adapters="$cache/tinyllama_r16_seed1,$cache/tinyllama_r16_seed2,$cache/tinyllama_r16_seed3"
out=$(mktemp -d /tmp/medley-merge-process.XXXXXX)
trap 'rm -rf "$out"' EXIT

echo "| strategy | median ms | min ms | max ms | last run: read / merge / write |"
echo "|---|---:|---:|---:|---|"
for strategy in ${strategies//,/ }; do
    extra=()
    case $strategy in
        ties|dare_ties|dare_linear|magnitude_prune) extra=(--density 0.2) ;;
    esac
    times=()
    line=""
    for _ in $(seq "$runs"); do
        rm -rf "$out/m"
        t0=$(date +%s%N)
        line=$("$bin" merge --adapters "$adapters" --weights 2.0,0.3,0.7 \
            --strategy "$strategy" "${extra[@]}" --out "$out/m")
        t1=$(date +%s%N)
        times+=($(( (t1 - t0) / 1000000 )))
    done
    sorted=($(printf '%s\n' "${times[@]}" | sort -n))
    n=${#sorted[@]}
    breakdown=$(sed -E 's/.*: (read .*)$/\1/' <<<"$line")
    echo "| $strategy | ${sorted[$((n / 2))]} | ${sorted[0]} | ${sorted[$((n - 1))]} | $breakdown |"
done
