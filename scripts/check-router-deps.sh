#!/usr/bin/env bash
# The router library links no model code: `medley-router` must not depend (normal dependencies,
# transitively) on the shard, the merge engine, candle or gemm. Run by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
forbidden='^(medley-shard|medley-merge|medley-kernels|candle-[a-z-]+|gemm[a-z0-9-]*) '
deps=$(cargo tree -p medley-router -e normal --prefix none --no-dedupe --offline 2>/dev/null ||
    cargo tree -p medley-router -e normal --prefix none --no-dedupe)
if bad=$(grep -E "$forbidden" <<<"$deps" | sort -u) && [ -n "$bad" ]; then
    echo "medley-router links model code:" >&2
    echo "$bad" >&2
    exit 1
fi
echo "medley-router: no model code among $(sort -u <<<"$deps" | wc -l) normal dependencies"
