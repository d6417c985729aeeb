# Sourced by the scripts that run a CUDA build on the fake GPU (host-profile.sh, memory-check.sh,
# lora-check-fake.sh, tp-fake.sh, graphs-fake.sh): `fake_session BIN` makes a work directory ($work), removed on exit
# together with the server whose pid is in $pid (if any), and builds the fake GPU's libraries
# for BIN into $work/fake (scripts/cuda/fake-gpu.sh).
fake_session() {
  work="$(mktemp -d)"
  pid=
  trap 'if [ -n "$pid" ]; then kill "$pid" 2>/dev/null; fi; wait 2>/dev/null; rm -rf "$work"' EXIT
  "$(dirname "${BASH_SOURCE[0]}")/fake-gpu.sh" "$work/fake" "$1" >/dev/null
}

# `fake_server_check NAME ARGS...`: the start of the checks that serve `medley` on the fake GPU
# (memory-check.sh, tp-fake.sh): takes `--bin BIN` from ARGS (default
# target/release-cuda/medley; sets $bin), starts the session and puts the fake's libraries on
# the loader path.
fake_server_check() {
  local name="$1"
  shift
  bin="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/target/release-cuda/medley"
  while [ $# -gt 0 ]; do
    case "$1" in
      --bin) bin="$2"; shift 2 ;;
      *) echo "$name: unknown argument $1" >&2; exit 2 ;;
    esac
  done
  fake_session "$bin"
  export LD_LIBRARY_PATH="$work/fake"
}

# `fake_serving NAME SEED PORT_BASE`: what the checks that serve 2-layer TinyLlama-shaped models
# share (tp-fake.sh, graphs-fake.sh): two rank-16 PEFT adapters a0 and a1 (seeds SEED and
# SEED + 1) in $work/adapters, a port of this process ($port, and $url) and `fail MESSAGE`, which
# prints the message and the server log's last warnings, then exits 1.
fake_serving() {
  local i
  for i in 0 1; do
    "$(dirname "$bin")/medley-merge-dev" fixture --preset tinyllama --layers 2 --rank 16 \
      --seed "$(($2 + i))" --out "$work/adapters/a$i" >/dev/null
  done
  port=$(($3 + ($$ % 2000) * 2))
  url="http://127.0.0.1:$port"
  fake_name="$1"
  fail() {
    echo "$fake_name: $1" >&2
    grep -E "ERROR|WARN|fake-gpu" "$work/server.log" | tail -n 12 >&2 || true
    exit 1
  }
}
