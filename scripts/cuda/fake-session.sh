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
