"""What every rendering of the chart must satisfy: the Medley pod, its probes, volumes, ports and
resources, the arguments the values turn into, monitoring, autoscaling, and the inference gateway."""

from __future__ import annotations

from typing import Any

import yaml

from .common import CHART, chart_defaults, container, effective, find, flag, medley, selects
from .gateway import gateway_checks
from .report import fail


def common_checks(case: str, docs: list[dict[str, Any]], values: dict[str, Any]) -> None:
    """What every rendering must satisfy."""
    chart_meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    chart_values = chart_defaults()
    deployment = medley(docs, "Deployment")
    if len(deployment) != 1 or len(medley(docs, "Service")) != 1:
        fail(case, "expected exactly one Deployment and one Service (besides the endpoint picker's)")
        return
    pod = deployment[0]["spec"]["template"]["spec"]
    main = container(docs)
    args = [str(a) for a in main.get("args", [])]
    expected_tag = values.get("image", {}).get("tag") or chart_meta["appVersion"]
    if not main["image"].endswith(f":{expected_tag}"):
        fail(case, f"image {main['image']} is not pinned to {expected_tag}")
    if args[:2] != ["--hostname", "0.0.0.0"]:
        fail(case, f"args must start with --hostname 0.0.0.0 (the pod's HOSTNAME is its name): {args}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        enabled = values.get("probes", {}).get(probe.removesuffix("Probe"), {}).get("enabled", True)
        got = main.get(probe)
        if enabled and (not got or got["httpGet"]["path"] != "/health"):
            fail(case, f"{probe} on /health missing")
    volumes = {v["name"]: v for v in pod["volumes"]}
    if values.get("shm", {}).get("enabled", True):
        if volumes.get("shm", {}).get("emptyDir", {}).get("medium") != "Memory":
            fail(case, "/dev/shm must be an in-memory emptyDir")
    mounts = {m["mountPath"] for m in main["volumeMounts"]}
    if not {"/data", "/tmp"} <= mounts:
        fail(case, f"/data and /tmp must be mounted (read-only root fs): {mounts}")
    if not main.get("securityContext", {}).get("readOnlyRootFilesystem"):
        fail(case, "readOnlyRootFilesystem not set")
    if not pod.get("securityContext", {}).get("runAsNonRoot"):
        fail(case, "runAsNonRoot not set")
    if pod.get("enableServiceLinks") is not False:
        fail(case, "enableServiceLinks must be false")
    grace = pod["terminationGracePeriodSeconds"]
    timeout = int(flag(args, "--graceful-termination-timeout") or 0)
    if grace <= timeout:
        fail(case, f"terminationGracePeriodSeconds {grace} <= --graceful-termination-timeout {timeout}")
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    if str(ports.get("http")) != flag(args, "--port") or str(ports.get("grpc")) != flag(args, "--grpc-port"):
        fail(case, f"container ports {ports} do not match --port/--grpc-port in {args}")
    gpus = int(values.get("gpu", {}).get("count", 0))
    resource = values.get("gpu", {}).get("resourceName", "nvidia.com/gpu")
    limits = main.get("resources", {}).get("limits", {})
    if gpus > 0 and int(limits.get(resource, 0)) != gpus:
        fail(case, f"{resource} limit {limits.get(resource)} != gpu.count {gpus}")
    if gpus == 0 and resource in limits:
        fail(case, "GPU limit rendered without gpu.count")
    # Everything but the GPU count comes from values.resources untouched.
    for side in ("requests", "limits"):
        # Helm merges maps key by key with the chart defaults.
        want = {**(chart_values["resources"].get(side) or {}), **(values.get("resources", {}).get(side) or {})}
        got = dict(main.get("resources", {}).get(side, {}))
        got.pop(resource, None)
        if {k: str(v) for k, v in got.items()} != {k: str(v) for k, v in want.items()}:
            fail(case, f"resources.{side} rendered as {got}, values say {want}")
    device = values.get("model", {}).get("device") or ("cuda" if gpus > 0 else "cpu")
    if flag(args, "--device") != device:
        fail(case, f"--device {flag(args, '--device')}, expected {device}")
    shards = int(flag(args, "--num-shard") or 0)
    wanted = values.get("model", {}).get("numShard") or max(1, gpus)
    if shards != int(wanted):
        fail(case, f"--num-shard {shards}, expected {wanted}")
    # extraArgs come last, in order.
    extra = [str(x) for e in values.get("extraArgs", []) for x in (e["name"], e.get("value")) if x not in (None, "")]
    if extra and args[-len(extra):] != extra:
        fail(case, f"extraArgs not rendered last and in order: {args}")
    monitoring_checks(case, docs, values)
    autoscaling_checks(case, docs, values)
    gateway_checks(case, docs, values)


def monitoring_checks(case: str, docs: list[dict[str, Any]], values: dict[str, Any]) -> None:
    """PodMonitor: one when enabled, selecting the pods and scraping their http port."""
    v = effective(values)
    monitors = find(docs, "PodMonitor")
    if not v["metrics"]["podMonitor"]["enabled"]:
        if monitors:
            fail(case, "PodMonitor rendered while metrics.podMonitor.enabled is false")
        return
    if len(monitors) != 1 or find(docs, "ServiceMonitor"):
        fail(case, "expected one PodMonitor and no ServiceMonitor")
        return
    (deployment,) = medley(docs, "Deployment")
    spec = monitors[0]["spec"]
    if not selects(spec["selector"].get("matchLabels", {}), deployment["spec"]["template"]["metadata"]["labels"]):
        fail(case, "PodMonitor selector does not match the Medley pods")
    ports = {p["name"] for p in container(docs)["ports"]}
    for endpoint in spec["podMetricsEndpoints"]:
        if endpoint.get("port") not in ports or endpoint.get("path") != v["metrics"]["path"]:
            fail(case, f"PodMonitor endpoint {endpoint} is not {sorted(ports)} + {v['metrics']['path']}")


def autoscaling_checks(case: str, docs: list[dict[str, Any]], values: dict[str, Any]) -> None:
    """HPA on queue length: a Pods metric medley_requests_waiting with an average value."""
    v = effective(values)["autoscaling"]
    queue = v.get("requestsWaiting", {})
    if not (v["enabled"] and queue.get("enabled")):
        return
    (hpa,) = find(docs, "HorizontalPodAutoscaler")
    pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    want = {"name": queue["metricName"], "averageValue": str(queue["averageValue"])}
    got = [
        {"name": p["metric"]["name"], "averageValue": str(p["target"].get("averageValue"))}
        for p in pods
        if p["target"]["type"] == "AverageValue"
    ]
    if got != [want]:
        fail(case, f"HPA Pods metrics {got}, expected [{want}]")
