"""Helm lint and render of the chart (Helm's Go SDK, no helm binary), and validation of manifests:
built-in kinds against the Kubernetes schemas (kubernetes-validate, offline), custom resources and
embedded configs against the repo's schemas."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

from .common import CHART, KUBE_VERSIONS, NAMESPACE, RELEASE
from .report import fail
from .schemas import embedded_configs, repo_schema_errors


def manifest_errors(doc: dict[str, Any]) -> list[str]:
    """Problems of one manifest: the Kubernetes schemas for built-in kinds, the repo's for
    custom resources, and the repo's for config files embedded in ConfigMaps."""
    errors = []
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            return repo_schema_errors(doc)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"invalid for Kubernetes {version}: {path}: {e.message}")
    for key, config in embedded_configs(doc):
        errors += [f"data.{key}: {e}" for e in repo_schema_errors(config)]
    return errors


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    chart = helm.Chart.load(str(CHART))
    rendered = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    docs = []
    for path, text in sorted(rendered.items()):
        if not path.endswith((".yaml", ".yml")):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append(doc)
    return docs


def validate(case: str, docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        kind = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        for error in manifest_errors(doc):
            fail(case, f"{kind}: {error}")


def lint(case: str, values: dict[str, Any]) -> None:
    report = helm.lint(str(CHART), values, strict=True, kube_version=f"v{KUBE_VERSIONS[-1]}")
    for message in report.get("messages", []):
        # Severity: 1 info, 2 warning, 3 error. Helm reports a missing icon as info.
        if message.get("severity", 0) >= 2:
            fail(case, f"lint: {message.get('path')}: {message.get('error')}")
    for error in report.get("errors", []) or []:
        fail(case, f"lint: {error}")
