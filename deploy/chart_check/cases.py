"""The values the chart is rendered with besides the examples (each with an optional extra check),
and values it must refuse."""

from __future__ import annotations

from typing import Any, Callable

from .common import container, find, flag
from .report import fail


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
    args = [str(a) for a in container(docs)["args"]]
    for name, want in [
        ("--kv-cache-tokens", "4096"),
        ("--gpu-memory-utilization", "0.85"),
        ("--kv-block-size", "32"),
        ("--prefix-caching", "off"),
        ("--max-idle-prefill-tokens", "1024"),
    ]:
        if flag(args, name) != want:
            fail(case, f"{name} {flag(args, name)}, expected {want}")
    (deployment,) = find(docs, "Deployment")
    if "replicas" in deployment["spec"]:
        fail(case, "replicas must be left to the HPA")


INLINE_CASES: dict[str, tuple[dict[str, Any], Callable[..., None] | None]] = {
    "defaults": ({}, expect_defaults),
    "everything-on": (
        {
            "model": {
                "id": "org/name",
                "revision": "v1",
                "kvCacheTokens": 4096,
                "gpuMemoryUtilization": 0.85,
                "kvBlockSize": 32,
                "prefixCaching": False,
            },
            "gpu": {"count": 2},
            "hub": {"tokenSecret": {"name": "hf-token"}, "offline": True},
            "cache": {"persistence": {"enabled": True, "storageClass": "fast"}},
            "podDisruptionBudget": {"enabled": True},
            "autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 70},
            "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
            "server": {"maxInputLength": 2048, "maxTotalTokens": 4096, "maxIdlePrefillTokens": 1024},
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
