#!/usr/bin/env bash
# Lints, renders and validates the Helm chart in deploy/helm/medley with no helm or kubeconform
# binary: Helm's Go SDK comes from the PyPI package helm-python-sdk, the Kubernetes schemas from
# kubernetes-validate (offline), and jsonschema checks the custom resources against deploy/schemas/.
# See deploy/check_chart.py for what is checked.
#
#   deploy/check.sh                      # all cases
#   deploy/check.sh --out /tmp/rendered  # also keep the rendered manifests
#
# The tools live in a venv at $MEDLEY_DEPLOY_VENV (default: target/deploy-venv), created on
# first use and refreshed when deploy/check-requirements.txt changes.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
venv="${MEDLEY_DEPLOY_VENV:-$repo/target/deploy-venv}"
requirements="$here/check-requirements.txt"
stamp="$venv/.medley-requirements"

if [ ! -x "$venv/bin/python" ] || ! cmp -s "$requirements" "$stamp"; then
  echo "setting up $venv" >&2
  "${PYTHON:-python3}" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$stamp"
fi

exec "$venv/bin/python" "$here/check_chart.py" "$@"
