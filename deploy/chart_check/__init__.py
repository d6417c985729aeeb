"""The checks deploy/check_chart.py runs on the Helm chart in deploy/helm/medley.

report      fail() and capture(): the failure list every check reports into
common      paths, pinned names, and helpers to find objects in rendered manifests and values
schemas     the repo's JSON schemas (deploy/schemas/) for custom resources and embedded configs
render      Helm lint and render, and validation of manifests (Kubernetes schemas, then the repo's)
invariants  what every rendering must satisfy (pod, probes, resources, monitoring, autoscaling)
gateway     the inference-gateway invariants (pool, endpoint picker and its config, route, RBAC)
cases       values to render (inline cases with their extra checks) and values to refuse
mutations   rendered manifests changed one way each, which the schemas or invariants must refuse
"""
