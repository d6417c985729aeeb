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
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import sys
from typing import Any, Callable

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml

DEPLOY = pathlib.Path(__file__).resolve().parent
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

failures: list[str] = []
# While not None, fail() records here silently (negative cases expect failures).
_captured: list[str] | None = None


def fail(case: str, message: str) -> None:
    if _captured is not None:
        _captured.append(f"{case}: {message}")
        return
    failures.append(f"{case}: {message}")
    print(f"FAIL {case}: {message}")


def capture(check: Callable[..., None], *args: Any) -> list[str]:
    """The failures `check(*args)` reports, without counting them."""
    global _captured
    _captured = []
    try:
        check(*args)
        return _captured
    finally:
        _captured = None


def load_repo_schemas() -> dict[tuple[str, str], tuple[str, jsonschema.protocols.Validator]]:
    """deploy/schemas/*.json by the (apiVersion, kind) each one pins with `const`."""
    schemas: dict[tuple[str, str], tuple[str, jsonschema.protocols.Validator]] = {}
    for path in sorted(SCHEMAS.glob("*.json")):
        schema = json.loads(path.read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
        props = schema["properties"]
        key = (props["apiVersion"]["const"], props["kind"]["const"])
        if key in schemas:
            raise SystemExit(f"{path.name}: a second schema for {key}")
        schemas[key] = (path.name, jsonschema.Draft202012Validator(schema))
    return schemas


REPO_SCHEMAS = load_repo_schemas()


def repo_schema_errors(doc: dict[str, Any]) -> list[str]:
    """Errors of `doc` against its schema in deploy/schemas/ (an error too when there is none)."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in REPO_SCHEMAS:
        return [f"no schema for {key[0]} {key[1]} in deploy/schemas/ (custom resources need one)"]
    name, validator = REPO_SCHEMAS[key]
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message} ({name})" for e in errors]


def embedded_configs(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Config files inside a ConfigMap that name an apiVersion and kind (the EPP's config)."""
    if doc.get("kind") != "ConfigMap":
        return []
    out = []
    for key, text in (doc.get("data") or {}).items():
        try:
            parsed = yaml.safe_load(text)
        except yaml.YAMLError:
            continue
        if isinstance(parsed, dict) and "apiVersion" in parsed and "kind" in parsed:
            out.append((key, parsed))
    return out


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


def effective(values: dict[str, Any]) -> dict[str, Any]:
    return merged(yaml.safe_load((CHART / "values.yaml").read_text()), values)


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def flag(args: list[str], name: str) -> str | None:
    """Value of `name` in an argument list, "" for a bare flag, None when absent."""
    if name not in args:
        return None
    i = args.index(name)
    nxt = args[i + 1] if i + 1 < len(args) else None
    return "" if nxt is None or nxt.startswith("--") else nxt


def common_checks(case: str, docs: list[dict[str, Any]], values: dict[str, Any]) -> None:
    """What every rendering must satisfy."""
    chart_meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    chart_values = yaml.safe_load((CHART / "values.yaml").read_text())
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


def port_number(container_: dict[str, Any], name_or_number: Any) -> int | None:
    if isinstance(name_or_number, int):
        return name_or_number
    for port in container_.get("ports", []):
        if port.get("name") == name_or_number:
            return port["containerPort"]
    return None


def gateway_checks(case: str, docs: list[dict[str, Any]], values: dict[str, Any]) -> None:
    """The inference gateway's objects agree with each other and with the Medley pods."""
    v = effective(values)
    g = v["inferenceGateway"]
    gateway_kinds = ("InferencePool", "HTTPRoute", "InferenceObjective", "ConfigMap", "Role", "RoleBinding")
    if not g["enabled"]:
        present = [k for k in gateway_kinds if find(docs, k)] + [f"{d['kind']}/epp" for d in docs if is_epp(d)]
        if present:
            fail(case, f"inference gateway off, but rendered {present}")
        return

    (deployment,) = medley(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    main = container(docs)
    args = [str(a) for a in main.get("args", [])]
    fullname = deployment["metadata"]["name"]
    pool_name = g["pool"]["name"] or fullname
    engine = g["engineName"]
    e = g["endpointPicker"]

    # The pool: selects the Medley pods (and only them) on their HTTP port.
    pools = find(docs, "InferencePool")
    if len(pools) != 1:
        fail(case, f"expected one InferencePool, got {len(pools)}")
        return
    pool = pools[0]
    if pool["apiVersion"] != f"{POOL_GROUP}/v1" or pool["metadata"]["name"] != pool_name:
        fail(
            case, f"InferencePool {pool['apiVersion']} {pool['metadata']['name']}, expected {POOL_GROUP}/v1 {pool_name}"
        )
    spec = pool["spec"]
    selector = spec["selector"]["matchLabels"]
    if not selects(selector, pod_labels):
        fail(case, f"InferencePool selector {selector} does not match the Medley pod labels {pod_labels}")
    if not selects(deployment["spec"]["selector"]["matchLabels"], selector):
        fail(case, "InferencePool selector is wider than the Deployment's (it could select other releases' pods)")
    if selector.get(ENGINE_LABEL) != engine or pod_labels.get(ENGINE_LABEL) != engine:
        fail(case, f"pods and pool must carry {ENGINE_LABEL}={engine} (the EPP's engineConfigs key)")
    for other in find(docs, "Pod") + [d for d in find(docs, "Deployment") if is_epp(d)]:
        labels = other.get("spec", {}).get("template", {}).get("metadata", {}).get("labels") or other["metadata"].get(
            "labels", {}
        )
        if selects(selector, labels):
            fail(case, f"InferencePool also selects {other['kind']}/{other['metadata']['name']}")
    http_port = port_number(main, "http")
    if spec["targetPorts"] != [{"number": http_port}]:
        fail(case, f"InferencePool targetPorts {spec['targetPorts']}, expected the HTTP container port {http_port}")
    if str(http_port) != flag(args, "--port"):
        fail(case, f"HTTP container port {http_port} is not --port {flag(args, '--port')}")
    if "--metrics-require-key" in args:
        fail(case, "--metrics-require-key would lock the endpoint picker out of /metrics")

    # endpointPickerRef -> the EPP Service -> the EPP pods' ext-proc port.
    ref = spec["endpointPickerRef"]
    epp_services = [d for d in find(docs, "Service") if d["metadata"]["name"] == ref.get("name")]
    epp_deployments = [d for d in find(docs, "Deployment") if is_epp(d)]
    if len(epp_services) != 1 or len(epp_deployments) != 1:
        fail(case, f"endpointPickerRef {ref.get('name')}: expected one EPP Service and Deployment")
        return
    service, epp = epp_services[0], epp_deployments[0]
    if (
        ref.get("kind", "Service") != "Service"
        or ref.get("group", "") != ""
        or ref.get("failureMode") != e["failureMode"]
    ):
        fail(case, f"endpointPickerRef {ref} is not a core Service with failureMode {e['failureMode']}")
    epp_pod = epp["spec"]["template"]
    (epp_container,) = epp_pod["spec"]["containers"]
    service_ports = {p["port"]: p for p in service["spec"]["ports"]}
    svc_port = service_ports.get(ref.get("port", {}).get("number"))
    if (
        svc_port is None
        or port_number(epp_container, svc_port["targetPort"]) != e["port"]
        or svc_port.get("appProtocol") != "http2"
    ):
        fail(
            case,
            f"endpointPickerRef port {ref.get('port')} does not reach the EPP's ext-proc port {e['port']} (HTTP/2)",
        )
    if not selects(service["spec"]["selector"], epp_pod["metadata"]["labels"]):
        fail(case, "EPP Service selector does not match the EPP pods")
    if not selects(epp["spec"]["selector"]["matchLabels"], epp_pod["metadata"]["labels"]):
        fail(case, "EPP Deployment selector does not match its pods")

    # The EPP Deployment: pinned image, pool flags, config file from the ConfigMap, RBAC.
    image = f"{e['image']['repository']}:{e['image']['tag']}"
    overridden = "image" in values.get("inferenceGateway", {}).get("endpointPicker", {})
    if epp_container["image"] != image or (not overridden and image != EPP_IMAGE):
        fail(case, f"EPP image {epp_container['image']}, expected {image} (chart default {EPP_IMAGE})")
    epp_args = [str(a) for a in epp_container["args"]]
    if flag(epp_args, "--pool-name") != pool_name or flag(epp_args, "--pool-namespace") != NAMESPACE:
        fail(case, f"EPP --pool-name/--pool-namespace {epp_args} do not name {NAMESPACE}/{pool_name}")
    leader = "--ha-enable-leader-election" in epp_args
    if leader != (e["replicas"] > 1) or epp["spec"]["replicas"] != e["replicas"]:
        fail(case, "EPP leader election must be on exactly when it has more than one replica")
    health = port_number(epp_container, "grpc-health")
    for probe in ("livenessProbe", "readinessProbe"):
        if epp_container.get(probe, {}).get("grpc", {}).get("port") != health:
            fail(case, f"EPP {probe} is not a gRPC probe on the health port {health}")
    config_file = flag(epp_args, "--config-file") or ""
    mounts = {m["mountPath"]: m["name"] for m in epp_container["volumeMounts"]}
    volumes = {vol["name"]: vol for vol in epp_pod["spec"]["volumes"]}
    config_dir, _, config_key = config_file.rpartition("/")
    cm_name = volumes.get(mounts.get(config_dir, ""), {}).get("configMap", {}).get("name")
    config_maps = [d for d in find(docs, "ConfigMap") if d["metadata"]["name"] == cm_name]
    if len(config_maps) != 1 or config_key not in config_maps[0].get("data", {}):
        fail(case, f"EPP --config-file {config_file} is not a key of a ConfigMap mounted at {config_dir}")
        return
    epp_config = yaml.safe_load(config_maps[0]["data"][config_key])
    sa = epp_pod["spec"].get("serviceAccountName")
    if (
        not [d for d in find(docs, "ServiceAccount") if d["metadata"]["name"] == sa]
        or epp_pod["spec"].get("automountServiceAccountToken") is not True
    ):
        fail(case, f"EPP ServiceAccount {sa} missing or its token not mounted (the EPP watches the API)")
    bindings = [
        b
        for b in find(docs, "RoleBinding")
        if {"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE} in b["subjects"]
    ]
    roles = {r["metadata"]["name"]: r for r in find(docs, "Role")}
    granted = {
        (group, resource, verb)
        for b in bindings
        if b["roleRef"]["kind"] == "Role" and b["roleRef"]["name"] in roles
        for rule in roles[b["roleRef"]["name"]]["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    for group, resource in (
        ("", "pods"),
        (POOL_GROUP, "inferencepools"),
        ("inference.networking.x-k8s.io", "inferenceobjectives"),
    ):
        for verb in ("get", "list", "watch"):
            if (group, resource, verb) not in granted:
                fail(case, f"EPP may not {verb} {resource}.{group or 'core'}")
    epp_config_checks(case, epp_config, v)

    # The HTTPRoute: from the named Gateway to this pool, and nowhere else.
    routes = find(docs, "HTTPRoute")
    r = g["httpRoute"]
    if not r["enabled"]:
        if routes:
            fail(case, "HTTPRoute rendered while httpRoute.enabled is false")
    elif len(routes) != 1:
        fail(case, f"expected one HTTPRoute, got {len(routes)}")
    else:
        rspec = routes[0]["spec"]
        want_parent = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": r["gateway"]["name"]}
        want_parent.update({k: r["gateway"][k] for k in ("namespace", "sectionName") if r["gateway"].get(k)})
        if rspec["parentRefs"] != [want_parent]:
            fail(case, f"HTTPRoute parentRefs {rspec['parentRefs']}, expected [{want_parent}]")
        for rule in rspec["rules"]:
            if rule.get("backendRefs") != [{"group": POOL_GROUP, "kind": "InferencePool", "name": pool_name}]:
                fail(case, f"HTTPRoute backendRefs {rule.get('backendRefs')} do not point at InferencePool {pool_name}")
            paths = [m["path"]["value"] for m in rule.get("matches", [])]
            if paths != r["pathPrefixes"]:
                fail(case, f"HTTPRoute paths {paths}, expected {r['pathPrefixes']}")

    objectives = find(docs, "InferenceObjective")
    if len(objectives) != len(g["objectives"]):
        fail(case, f"{len(objectives)} InferenceObjectives for {len(g['objectives'])} in the values")
    for objective in objectives:
        ref = objective["spec"]["poolRef"]
        if (ref.get("group"), ref.get("kind"), ref["name"]) != (POOL_GROUP, "InferencePool", pool_name):
            fail(case, f"InferenceObjective {objective['metadata']['name']} poolRef {ref} is not the pool")


def epp_config_checks(case: str, config: dict[str, Any], v: dict[str, Any]) -> None:
    """The EndpointPickerConfig reads Medley's metric names and scores by queue, KV and LoRA."""
    g = v["inferenceGateway"]
    engine = g["engineName"]
    plugins = {p.get("name") or p.get("type"): p for p in config.get("plugins", [])}
    refs = [
        (f"profile {prof.get('name')}", pl.get("pluginRef"))
        for prof in config.get("schedulingProfiles", [])
        for pl in prof.get("plugins", [])
    ]
    for source in (config.get("data") or {}).get("sources", []):
        refs.append(("data source", source.get("pluginRef")))
        refs += [("data extractor", x.get("pluginRef")) for x in source.get("extractors", [])]
    for where, ref in refs:
        if ref not in plugins:
            fail(case, f"EPP config: {where} refers to undefined plugin {ref!r}")
    by_type = {}
    for name, plugin in plugins.items():
        by_type.setdefault(plugin.get("type"), []).append(name)
        if name != plugin.get("type"):
            fail(
                case,
                f"EPP config: plugin {name} is not named by its type (the EPP's defaults would add a second one)",
            )
    extractors = by_type.get("core-metrics-extractor", [])
    sources = by_type.get("metrics-data-source", [])
    if len(extractors) != 1 or len(sources) != 1:
        fail(
            case,
            f"EPP config: expected one metrics-data-source and one core-metrics-extractor, got {sources} {extractors}",
        )
        return
    wired = [
        s
        for s in (config.get("data") or {}).get("sources", [])
        if s.get("pluginRef") == sources[0] and {"pluginRef": extractors[0]} in s.get("extractors", [])
    ]
    if not wired:
        fail(case, "EPP config: data.sources does not wire metrics-data-source to core-metrics-extractor")
    source_params = plugins[sources[0]].get("parameters") or {}
    if source_params.get("path") != v["metrics"]["path"] or source_params.get("scheme", "http") != "http":
        fail(case, f"EPP metrics source {source_params} does not scrape http {v['metrics']['path']}")
    params = plugins[extractors[0]].get("parameters") or {}
    if params.get("defaultEngine") != engine or params.get("engineLabelKey", ENGINE_LABEL) != ENGINE_LABEL:
        fail(
            case,
            f"EPP extractor defaultEngine {params.get('defaultEngine')}, engineLabelKey "
            f"{params.get('engineLabelKey')}: expected {engine}, {ENGINE_LABEL}",
        )
    mapping = [c for c in params.get("engineConfigs", []) if c.get("name") == engine]
    if len(mapping) != 1 or {k: x for k, x in mapping[0].items() if k != "name"} != MEDLEY_METRICS:
        fail(case, f"EPP engineConfigs[{engine}] {mapping} is not Medley's metric names {MEDLEY_METRICS}")
    profiles = config.get("schedulingProfiles", [])
    weights = {pl["pluginRef"]: pl.get("weight") for prof in profiles for pl in prof.get("plugins", [])}
    s = g["endpointPicker"]["scorers"]
    want = {
        "queue-scorer": s["queue"],
        "kv-cache-utilization-scorer": s["kvCacheUtilization"],
        "lora-affinity-scorer": s["loraAffinity"],
        "prefix-cache-scorer": s["prefixCache"],
    }
    for scorer, weight in want.items():
        if weights.get(scorer, 0) != weight:
            fail(case, f"EPP scorer {scorer} weight {weights.get(scorer)}, values say {weight}")


# Extra expectations per case: name -> check(docs, values).
def expect_defaults(case: str, docs: list[dict[str, Any]], _values: dict[str, Any]) -> None:
    args = [str(a) for a in container(docs)["args"]]
    if flag(args, "--model") is not None:
        fail(case, "defaults must serve the embedded model (no --model)")
    if find(docs, "PersistentVolumeClaim") or find(docs, "ServiceMonitor") or find(docs, "HorizontalPodAutoscaler"):
        fail(case, "PVC / ServiceMonitor / HPA must be off by default")
    if find(docs, "PodMonitor") or find(docs, "InferencePool") or len(docs) != 4:
        fail(case, "PodMonitor / inference gateway must be off by default (4 manifests)")
    if flag(args, "--json-output") != "":
        fail(case, "--json-output expected by default")


def expect_everything_on(case: str, docs: list[dict[str, Any]], values: dict[str, Any]) -> None:
    for kind in ("PersistentVolumeClaim", "PodDisruptionBudget", "HorizontalPodAutoscaler", "ServiceMonitor"):
        if len(find(docs, kind)) != 1:
            fail(case, f"expected one {kind}")
    env = {e["name"]: e for e in container(docs)["env"]}
    if env.get("HF_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef", {}).get("name") != "hf-token":
        fail(case, "HF_TOKEN must come from the secret")
    (deployment,) = find(docs, "Deployment")
    if "replicas" in deployment["spec"]:
        fail(case, "replicas must be left to the HPA")


INLINE_CASES: dict[str, tuple[dict[str, Any], Callable[..., None] | None]] = {
    "defaults": ({}, expect_defaults),
    "everything-on": (
        {
            "model": {"id": "org/name", "revision": "v1", "kvCacheTokens": 4096},
            "gpu": {"count": 2},
            "hub": {"tokenSecret": {"name": "hf-token"}, "offline": True},
            "cache": {"persistence": {"enabled": True, "storageClass": "fast"}},
            "podDisruptionBudget": {"enabled": True},
            "autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 70},
            "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
            "server": {"maxInputLength": 2048, "maxTotalTokens": 4096},
            "extraArgs": [{"name": "--max-stop-sequences", "value": 8}, {"name": "--some-bare-flag"}],
            "shm": {"enabled": False},
            "probes": {"liveness": {"enabled": False}},
        },
        expect_everything_on,
    ),
    "gpu-explicit-device": ({"gpu": {"count": 1}, "model": {"device": "cuda:1"}}, None),
    "cpu-with-defaults": ({"model": {"device": "cpu"}}, None),
    # Every inference-gateway branch the example leaves out, a PodMonitor, and the HPA on queue
    # length alone (gateway_checks, monitoring_checks and autoscaling_checks run on every case).
    "gateway-everything": (
        {
            "server": {"httpPort": 9000},
            "inferenceGateway": {
                "enabled": True,
                "pool": {"name": "medley-pool"},
                "engineName": "medley-cpu",
                "endpointPicker": {
                    "replicas": 2,
                    "port": 9102,
                    "scorers": {"prefixCache": 1, "queue": 1},
                    "extraArgs": ["--tracing=false"],
                    "tolerations": [{"key": "infra", "operator": "Exists", "effect": "NoSchedule"}],
                },
                "httpRoute": {
                    "gateway": {"name": "gw", "namespace": "gateway-system", "sectionName": "http"},
                    "hostnames": ["llm.example.com", "*.llm.example.com"],
                    "pathPrefixes": ["/v1"],
                    "requestTimeout": "",
                },
                "objectives": [
                    {"name": "interactive", "priority": 10},
                    {"name": "batch", "priority": -1},
                    {"name": "plain"},
                ],
            },
            "autoscaling": {
                "enabled": True,
                "targetCPUUtilizationPercentage": None,
                "requestsWaiting": {"enabled": True, "averageValue": "2500m"},
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
            },
            "metrics": {"podMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        },
        None,
    ),
    "gateway-without-route": (
        {"inferenceGateway": {"enabled": True, "httpRoute": {"enabled": False}}},
        None,
    ),
}

# Values that must be refused at render time.
BAD_CASES: dict[str, dict[str, Any]] = {
    "extraArgs-without-name": {"extraArgs": [{"value": "1"}]},
    "autoscaling-without-target": {
        "autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None}
    },
    "schema-typo": {"modle": {"id": "org/name"}},
    "schema-bad-dtype": {"model": {"dtype": "f64"}},
    "schema-bad-device": {"model": {"device": "tpu"}},
    "schema-shard-count-as-text": {"model": {"numShard": "two"}},
    "gateway-typo": {"inferenceGateway": {"enabeld": True}},
    "gateway-bad-failure-mode": {
        "inferenceGateway": {
            "enabled": True,
            "endpointPicker": {"failureMode": "FailSometimes"},
            "httpRoute": {"gateway": {"name": "gw"}},
        }
    },
    "gateway-without-gateway-name": {"inferenceGateway": {"enabled": True}},
    "gateway-epp-latest": {
        "inferenceGateway": {
            "enabled": True,
            "endpointPicker": {"image": {"tag": "latest"}},
            "httpRoute": {"gateway": {"name": "gw"}},
        }
    },
    "gateway-no-scorer": {
        "inferenceGateway": {
            "enabled": True,
            "endpointPicker": {"scorers": {"queue": 0, "kvCacheUtilization": 0, "loraAffinity": 0}},
            "httpRoute": {"gateway": {"name": "gw"}},
        }
    },
    "gateway-metrics-require-key": {
        "inferenceGateway": {"enabled": True, "httpRoute": {"gateway": {"name": "gw"}}},
        "extraArgs": [{"name": "--metrics-require-key"}],
    },
    "gateway-bad-timeout": {
        "inferenceGateway": {"enabled": True, "httpRoute": {"gateway": {"name": "gw"}, "requestTimeout": "5 minutes"}}
    },
    "gateway-fractional-weight": {
        "inferenceGateway": {
            "enabled": True,
            "endpointPicker": {"scorers": {"queue": 1.5}},
            "httpRoute": {"gateway": {"name": "gw"}},
        }
    },
    "hpa-queue-bad-quantity": {
        "autoscaling": {"enabled": True, "requestsWaiting": {"enabled": True, "averageValue": "lots"}}
    },
    "hpa-queue-typo": {"autoscaling": {"enabled": True, "requestsWaitng": {"enabled": True}}},
    "monitors-both": {"metrics": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}},
    "podmonitor-bad-interval": {"metrics": {"podMonitor": {"enabled": True, "interval": "30 seconds"}}},
}


def _doc(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d.get("kind") == kind]
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
