"""The inference gateway's objects agree with each other and with the Medley pods: the pool, the
endpoint picker (Service, Deployment, config file, RBAC), the HTTPRoute and the objectives."""

from __future__ import annotations

from typing import Any

import yaml

from .common import (
    ENGINE_LABEL,
    EPP_IMAGE,
    MEDLEY_METRICS,
    NAMESPACE,
    POOL_GROUP,
    container,
    effective,
    find,
    flag,
    is_epp,
    medley,
    port_number,
    selects,
)
from .report import fail


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
