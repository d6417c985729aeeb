#!/usr/bin/env python3
"""Lints and renders deploy/helm/medley without a helm binary, validates every rendered manifest
against the Kubernetes API schemas (offline), and checks what the chart must always produce.

Run through deploy/check.sh, which provides the tools (helm-python-sdk = Helm's Go SDK,
kubernetes-validate = bundled OpenAPI schemas).

Cases: the chart defaults, every deploy/examples/values-*.yaml, and a few inline values that
exercise branches the examples do not. Plain manifests in deploy/examples/ (*.yaml that are not
values files) are validated as they are.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any, Callable

import helm_python as helm
import kubernetes_validate
import yaml

DEPLOY = pathlib.Path(__file__).resolve().parent
CHART = DEPLOY / "helm" / "medley"
EXAMPLES = DEPLOY / "examples"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a recent one.
KUBE_VERSIONS = ["1.25.0", "1.33.0"]
RELEASE = "medley"
NAMESPACE = "serving"

failures: list[str] = []


def fail(case: str, message: str) -> None:
    failures.append(f"{case}: {message}")
    print(f"FAIL {case}: {message}")


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
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                # Custom resources (ServiceMonitor): no schema ships with the tool.
                print(f"  skip {kind}: no schema for {doc.get('apiVersion')} (custom resource)")
                break
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                fail(case, f"{kind} invalid for Kubernetes {version}: {path}: {e.message}")


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


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = find(docs, "Deployment")
    (main,) = deployment["spec"]["template"]["spec"]["containers"]
    return main


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
    deployment = find(docs, "Deployment")
    if len(deployment) != 1 or len(find(docs, "Service")) != 1:
        fail(case, "expected exactly one Deployment and one Service")
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


# Extra expectations per case: name -> check(docs, values).
def expect_defaults(case: str, docs: list[dict[str, Any]], _values: dict[str, Any]) -> None:
    args = [str(a) for a in container(docs)["args"]]
    if flag(args, "--model") is not None:
        fail(case, "defaults must serve the embedded model (no --model)")
    if find(docs, "PersistentVolumeClaim") or find(docs, "ServiceMonitor") or find(docs, "HorizontalPodAutoscaler"):
        fail(case, "PVC / ServiceMonitor / HPA must be off by default")
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
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, help="write each case's rendered manifests here")
    opts = parser.parse_args()
    print(f"helm SDK {helm.helm_sdk_version()}, kubernetes-validate {kubernetes_validate.__version__}")

    cases: dict[str, tuple[dict[str, Any], Callable[..., None] | None]] = dict(INLINE_CASES)
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
