# Sourced by the scripts that run a CUDA build on the fake GPU (host-profile.sh, memory-check.sh,
# lora-check-fake.sh, tp-fake.sh): `fake_session BIN` makes a work directory ($work), removed on exit
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
