#!/usr/bin/env python3
"""Lints and renders deploy/helm/medley without a helm binary, validates every rendered manifest
against the Kubernetes API schemas (offline), and checks what the chart must always produce.

Run through deploy/check.sh, which provides the tools (helm-python-sdk = Helm's Go SDK,
kubernetes-validate = bundled OpenAPI schemas, jsonschema).

Cases: the chart defaults, every deploy/examples/values-*.yaml, and a few inline values that
exercise branches the examples do not. Plain manifests in deploy/examples/ (*.yaml that are not
values files) are validated as they are.

Built-in kinds are validated against the Kubernetes schemas; custom resources (InferencePool,
HTTPRoute, InferenceObjective, PodMonitor, ServiceMonitor) and the endpoint picker's config file
(parsed out of its ConfigMap) against the JSON schemas in deploy/schemas/, keyed by the
apiVersion/kind each schema pins. A custom resource without a schema there is an error. Negative
cases make sure bad values are refused and that mutated manifests fail the schemas and the
inference-gateway invariants, so neither check can pass silently.

The checks live in the package chart_check/ next to this file (its __init__ lists the modules);
this script runs them and prints the report.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any, Callable

import helm_python as helm
import kubernetes_validate
import yaml

from chart_check.cases import BAD_CASES, INLINE_CASES
from chart_check.common import EXAMPLES
from chart_check.invariants import common_checks
from chart_check.mutations import check_mutations
from chart_check.render import lint, render, validate
from chart_check.report import fail, failures
from chart_check.schemas import REPO_SCHEMAS


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, help="write each case's rendered manifests here")
    opts = parser.parse_args()
    print(f"helm SDK {helm.helm_sdk_version()}, kubernetes-validate {kubernetes_validate.__version__}")

    print(f"repo schemas: {', '.join(f'{k[1]} {k[0]}' for k in REPO_SCHEMAS)}")
    cases: dict[str, tuple[dict[str, Any], Callable[..., None] | None]] = dict(INLINE_CASES)
    rendered: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {}
    manifests: list[pathlib.Path] = []
    for path in sorted(EXAMPLES.glob("*.yaml")):
        if path.name.startswith("values-"):
            cases[path.name] = (yaml.safe_load(path.read_text()) or {}, None)
        else:
            manifests.append(path)

    for case, (values, extra_check) in cases.items():
        print(f"case {case}")
        lint(case, values)
        try:
            docs = render(values)
        except helm.HelmError as e:
            fail(case, f"render: {e}")
            continue
        if opts.out:
            opts.out.mkdir(parents=True, exist_ok=True)
            (opts.out / f"{pathlib.Path(case).stem}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
        rendered[case] = (docs, values)
        validate(case, docs)
        common_checks(case, docs, values)
        if extra_check:
            extra_check(case, docs, values)
        print(f"  {len(docs)} manifests: {', '.join(sorted(d['kind'] for d in docs))}")

    for case, values in BAD_CASES.items():
        try:
            render(values)
            fail(case, "rendered, but must be refused")
        except helm.HelmError as e:
            print(f"case {case}: refused as expected ({str(e).splitlines()[0][:120]})")

    check_mutations(rendered)

    for path in manifests:
        print(f"manifest {path.name}")
        validate(path.name, [d for d in yaml.safe_load_all(path.read_text()) if d])

    if failures:
        print(f"\n{len(failures)} problem(s)")
        return 1
    print("\nchart OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
