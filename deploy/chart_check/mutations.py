"""Rendered manifests changed one way each; the repo schemas or the gateway invariants must refuse
every change, so that neither check can pass silently."""

from __future__ import annotations

import copy
from typing import Any, Callable

import yaml

from .common import ENGINE_LABEL, find
from .gateway import gateway_checks
from .render import manifest_errors
from .report import capture, fail


def _doc(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = find(docs, kind)
    return doc


def _epp_config(docs: list[dict[str, Any]], change: Callable[[dict[str, Any]], None]) -> None:
    """Apply `change` to the EndpointPickerConfig inside the EPP ConfigMap."""
    cm = _doc(docs, "ConfigMap")
    (key,) = cm["data"]
    config = yaml.safe_load(cm["data"][key])
    change(config)
    cm["data"][key] = yaml.safe_dump(config, sort_keys=False)


def _extractor(config: dict[str, Any]) -> dict[str, Any]:
    (plugin,) = [p for p in config["plugins"] if p["type"] == "core-metrics-extractor"]
    return plugin["parameters"]


def _route_backend(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return _doc(docs, "HTTPRoute")["spec"]["rules"][0]["backendRefs"][0]


# Rendered manifests changed one way each, which the named layer must refuse: "schema" (the repo
# schemas in deploy/schemas, through manifest_errors) or "invariants" (gateway_checks).
# name -> (case whose rendering is changed, layer, change).
MUTATIONS: dict[str, tuple[str, str, Callable[[list[dict[str, Any]]], None]]] = {
    "pool-failure-mode": (
        "values-gateway.yaml",
        "schema",
        lambda d: _doc(d, "InferencePool")["spec"]["endpointPickerRef"].update(failureMode="FailSometimes"),
    ),
    "pool-ref-without-port": (
        "values-gateway.yaml",
        "schema",
        lambda d: _doc(d, "InferencePool")["spec"]["endpointPickerRef"].pop("port"),
    ),
    "pool-no-target-ports": (
        "values-gateway.yaml",
        "schema",
        lambda d: _doc(d, "InferencePool")["spec"].update(targetPorts=[]),
    ),
    "pool-port-out-of-range": (
        "values-gateway.yaml",
        "schema",
        lambda d: _doc(d, "InferencePool")["spec"].update(targetPorts=[{"number": 70000}]),
    ),
    "pool-selector-typo": (
        "values-gateway.yaml",
        "schema",
        lambda d: _doc(d, "InferencePool")["spec"].update(selector={"matchLabel": {"app": "medley"}}),
    ),
    "pool-old-api-group": (
        "values-gateway.yaml",
        "schema",
        lambda d: _doc(d, "InferencePool").update(apiVersion="inference.networking.x-k8s.io/v1alpha2"),
    ),
    "pool-without-epp-ref": (
        "values-gateway.yaml",
        "schema",
        lambda d: _doc(d, "InferencePool")["spec"].pop("endpointPickerRef"),
    ),
    "route-negative-weight": ("values-gateway.yaml", "schema", lambda d: _route_backend(d).update(weight=-1)),
    "route-service-without-port": (
        "values-gateway.yaml",
        "schema",
        lambda d: _route_backend(d).update(group="", kind="Service"),
    ),
    "route-parent-without-name": (
        "values-gateway.yaml",
        "schema",
        lambda d: _doc(d, "HTTPRoute")["spec"]["parentRefs"][0].pop("name"),
    ),
    "route-bad-timeout": (
        "values-gateway.yaml",
        "schema",
        lambda d: _doc(d, "HTTPRoute")["spec"]["rules"][0].update(timeouts={"request": "5 minutes"}),
    ),
    "podmonitor-scheme": (
        "gateway-everything",
        "schema",
        lambda d: _doc(d, "PodMonitor")["spec"]["podMetricsEndpoints"][0].update(scheme="ftp"),
    ),
    "podmonitor-without-selector": (
        "gateway-everything",
        "schema",
        lambda d: _doc(d, "PodMonitor")["spec"].pop("selector"),
    ),
    "servicemonitor-interval": (
        "everything-on",
        "schema",
        lambda d: _doc(d, "ServiceMonitor")["spec"]["endpoints"][0].update(interval="thirty seconds"),
    ),
    "objective-priority-text": (
        "gateway-everything",
        "schema",
        lambda d: [o["spec"].update(priority="high") for o in find(d, "InferenceObjective")],
    ),
    "unknown-custom-resource": (
        "values-gateway.yaml",
        "schema",
        lambda d: d.append({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}, "spec": {}}),
    ),
    "epp-config-key-typo": (
        "values-gateway.yaml",
        "schema",
        lambda d: _epp_config(
            d,
            lambda c: _extractor(c)["engineConfigs"][0].update(
                queueRequestsSpec=_extractor(c)["engineConfigs"][0].pop("queuedRequestsSpec")
            ),
        ),
    ),
    "epp-config-bad-metric-spec": (
        "values-gateway.yaml",
        "schema",
        lambda d: _epp_config(d, lambda c: _extractor(c)["engineConfigs"][0].update(kvUsageSpec="medley kv cache")),
    ),
    "epp-config-plugin-without-type": (
        "values-gateway.yaml",
        "schema",
        lambda d: _epp_config(d, lambda c: c["plugins"][-1].pop("type")),
    ),
    "epp-config-unknown-section": (
        "values-gateway.yaml",
        "schema",
        lambda d: _epp_config(d, lambda c: c.update(dataLayer=c.pop("data"))),
    ),
    "epp-config-scorer-parameters": (
        "values-gateway.yaml",
        "schema",
        lambda d: _epp_config(
            d, lambda c: [p.update(parameters={"weight": 2}) for p in c["plugins"] if p["type"] == "queue-scorer"]
        ),
    ),
    "epp-config-vllm-metric": (
        "values-gateway.yaml",
        "invariants",
        lambda d: _epp_config(
            d, lambda c: _extractor(c)["engineConfigs"][0].update(kvUsageSpec="vllm:kv_cache_usage_perc")
        ),
    ),
    "epp-config-dangling-ref": (
        "values-gateway.yaml",
        "invariants",
        lambda d: _epp_config(
            d, lambda c: c["schedulingProfiles"][0]["plugins"].append({"pluginRef": "prefix-cache-scorer"})
        ),
    ),
    "pool-selector-misses-pods": (
        "values-gateway.yaml",
        "invariants",
        lambda d: _doc(d, "InferencePool")["spec"]["selector"]["matchLabels"].update({ENGINE_LABEL: "vllm"}),
    ),
    "pool-grpc-port": (
        "values-gateway.yaml",
        "invariants",
        lambda d: _doc(d, "InferencePool")["spec"].update(targetPorts=[{"number": 8081}]),
    ),
    "pool-ref-health-port": (
        "values-gateway.yaml",
        "invariants",
        lambda d: _doc(d, "InferencePool")["spec"]["endpointPickerRef"].update(port={"number": 9003}),
    ),
    "route-to-other-pool": ("values-gateway.yaml", "invariants", lambda d: _route_backend(d).update(name="other-pool")),
    "route-old-pool-group": (
        "values-gateway.yaml",
        "invariants",
        lambda d: _route_backend(d).update(group="inference.networking.x-k8s.io"),
    ),
}


def check_mutations(rendered: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]]) -> None:
    for name, (case, layer, change) in MUTATIONS.items():
        label = f"mutation {name}"
        if case not in rendered:
            fail(label, f"case {case} was not rendered")
            continue
        docs, values = rendered[case]
        docs = copy.deepcopy(docs)
        change(docs)
        if layer == "schema":
            errors = [e for doc in docs for e in manifest_errors(doc)]
        else:
            errors = capture(gateway_checks, label, docs, values)
        if errors:
            print(f"{label}: refused by the {layer} ({errors[0][:150]})")
        else:
            fail(label, f"the {layer} accepted the changed manifests")
