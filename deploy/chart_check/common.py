"""Where the chart lives, what it must pin, and helpers to pick objects out of rendered manifests
and to read values the way Helm does."""

from __future__ import annotations

import pathlib
from typing import Any

import yaml

DEPLOY = pathlib.Path(__file__).resolve().parent.parent
CHART = DEPLOY / "helm" / "medley"
EXAMPLES = DEPLOY / "examples"
SCHEMAS = DEPLOY / "schemas"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a recent one.
KUBE_VERSIONS = ["1.25.0", "1.33.0"]
RELEASE = "medley"
NAMESPACE = "serving"

# The endpoint picker the chart pins, and the metric names it must read (router/src/metrics):
# EPP engineConfigs key -> Medley series.
EPP_IMAGE = "registry.k8s.io/gateway-api-inference-extension/epp:v1.5.0"
MEDLEY_METRICS = {
    "queuedRequestsSpec": "medley_requests_waiting",
    "runningRequestsSpec": "medley_requests_running",
    "kvUsageSpec": "medley_kv_cache_utilization",
    "loraSpec": "medley_lora_requests_info",
    "cacheInfoSpec": "medley_kv_cache_info",
}
ENGINE_LABEL = "inference.networking.k8s.io/engine-type"
POOL_GROUP = "inference.networking.k8s.io"
EPP_COMPONENT = "endpoint-picker"


def find(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d.get("kind") == kind]


def is_epp(doc: dict[str, Any]) -> bool:
    return doc.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/component") == EPP_COMPONENT


def medley(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The chart's own objects of a kind (not the endpoint picker's)."""
    return [d for d in find(docs, kind) if not is_epp(d)]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = medley(docs, "Deployment")
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    return main


def merged(defaults: Any, values: Any) -> Any:
    """values over the chart defaults, maps merged key by key like Helm (null removes a key)."""
    if isinstance(defaults, dict) and isinstance(values, dict):
        out = dict(defaults)
        for key, value in values.items():
            if value is None:
                out.pop(key, None)
            else:
                out[key] = merged(defaults.get(key), value)
        return out
    return values if values is not None else defaults


def chart_defaults() -> dict[str, Any]:
    """The chart's values.yaml."""
    return yaml.safe_load((CHART / "values.yaml").read_text())


def effective(values: dict[str, Any]) -> dict[str, Any]:
    return merged(chart_defaults(), values)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def flag(args: list[str], name: str) -> str | None:
    """Value of `name` in an argument list, "" for a bare flag, None when absent."""
    if name not in args:
        return None
    i = args.index(name)
    nxt = args[i + 1] if i + 1 < len(args) else None
    return "" if nxt is None or nxt.startswith("--") else nxt


def port_number(container_: dict[str, Any], name_or_number: Any) -> int | None:
    if isinstance(name_or_number, int):
        return name_or_number
    for port in container_.get("ports", []):
        if port.get("name") == name_or_number:
            return port["containerPort"]
    return None
