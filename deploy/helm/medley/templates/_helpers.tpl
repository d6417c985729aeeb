{{/* Chart name, truncated to the 63 characters Kubernetes allows in names. */}}
{{- define "medley.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: <release>-<chart> unless the release name already contains it. */}}
{{- define "medley.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "medley.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "medley.selectorLabels" -}}
app.kubernetes.io/name: {{ include "medley.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "medley.labels" -}}
helm.sh/chart: {{ include "medley.chart" . }}
{{ include "medley.selectorLabels" . }}
app.kubernetes.io/version: {{ include "medley.imageTag" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "medley.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "medley.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Image tag: values.image.tag, else the chart's appVersion. */}}
{{- define "medley.imageTag" -}}
{{- .Values.image.tag | default .Chart.AppVersion | toString }}
{{- end }}

{{- define "medley.image" -}}
{{- printf "%s:%s" .Values.image.repository (include "medley.imageTag" .) }}
{{- end }}

{{/* Shards: model.numShard, else gpu.count, else 1. */}}
{{- define "medley.numShard" -}}
{{- if .Values.model.numShard }}
{{- .Values.model.numShard | int }}
{{- else }}
{{- max 1 (.Values.gpu.count | int) }}
{{- end }}
{{- end }}

{{/* Device of the shards: model.device, else cuda with GPUs, else cpu. */}}
{{- define "medley.device" -}}
{{- if .Values.model.device }}
{{- .Values.model.device }}
{{- else if gt (.Values.gpu.count | int) 0 }}
{{- "cuda" }}
{{- else }}
{{- "cpu" }}
{{- end }}
{{- end }}

{{- define "medley.pvcName" -}}
{{- .Values.cache.persistence.existingClaim | default (printf "%s-hf-cache" (include "medley.fullname" .)) }}
{{- end }}

{{/*
`medley serve` arguments as a list of {name, value} pairs, in a fixed order: the flags derived
from values first, then extraArgs in their order. A pair with an empty value is a bare flag.
*/}}
{{- define "medley.argPairs" -}}
{{- $v := .Values }}
{{- $args := list }}
{{- $args = append $args (dict "name" "--hostname" "value" "0.0.0.0") }}
{{- $args = append $args (dict "name" "--port" "value" ($v.server.httpPort | toString)) }}
{{- $args = append $args (dict "name" "--grpc-port" "value" ($v.server.grpcPort | toString)) }}
{{- with $v.model.id }}
{{- $args = append $args (dict "name" "--model" "value" (toString .)) }}
{{- end }}
{{- with $v.model.revision }}
{{- $args = append $args (dict "name" "--revision" "value" (toString .)) }}
{{- end }}
{{- $args = append $args (dict "name" "--num-shard" "value" (include "medley.numShard" .)) }}
{{- $args = append $args (dict "name" "--device" "value" (include "medley.device" .)) }}
{{- $args = append $args (dict "name" "--dtype" "value" ($v.model.dtype | toString)) }}
{{- with $v.model.kvCacheTokens }}
{{- $args = append $args (dict "name" "--kv-cache-tokens" "value" (. | int64 | toString)) }}
{{- end }}
{{- with $v.model.gpuMemoryUtilization }}
{{- $args = append $args (dict "name" "--gpu-memory-utilization" "value" (toString .)) }}
{{- end }}
{{- with $v.model.kvBlockSize }}
{{- $args = append $args (dict "name" "--kv-block-size" "value" (. | int64 | toString)) }}
{{- end }}
{{- if not (kindIs "invalid" $v.model.prefixCaching) }}
{{- $args = append $args (dict "name" "--prefix-caching" "value" (ternary "on" "off" $v.model.prefixCaching)) }}
{{- end }}
{{- $args = append $args (dict "name" "--shard-startup-timeout" "value" ($v.server.shardStartupTimeout | int64 | toString)) }}
{{- $args = append $args (dict "name" "--graceful-termination-timeout" "value" ($v.server.gracefulTerminationTimeout | int64 | toString)) }}
{{- range $key, $flag := dict "maxConcurrentRequests" "--max-concurrent-requests" "maxInputLength" "--max-input-length" "maxTotalTokens" "--max-total-tokens" "maxBatchPrefillTokens" "--max-batch-prefill-tokens" "maxIdlePrefillTokens" "--max-idle-prefill-tokens" "maxBatchTotalTokens" "--max-batch-total-tokens" }}
{{- $value := index $v.server $key }}
{{- if not (kindIs "invalid" $value) }}
{{- $args = append $args (dict "name" $flag "value" ($value | int64 | toString)) }}
{{- end }}
{{- end }}
{{- if $v.server.jsonLogs }}
{{- $args = append $args (dict "name" "--json-output" "value" "") }}
{{- end }}
{{- range $v.extraArgs }}
{{- if not .name }}
{{- fail "every extraArgs entry needs a name" }}
{{- end }}
{{- $value := "" }}
{{- if not (kindIs "invalid" .value) }}
{{- $value = toString .value }}
{{- end }}
{{- $args = append $args (dict "name" (toString .name) "value" $value) }}
{{- end }}
{{- toJson $args }}
{{- end }}

{{/* Inference gateway: the InferencePool's name (inferenceGateway.pool.name, else the full name). */}}
{{- define "medley.poolName" -}}
{{- .Values.inferenceGateway.pool.name | default (include "medley.fullname" .) }}
{{- end }}

{{/* Inference gateway: name of the endpoint picker's Deployment, Service, ServiceAccount, Role, ConfigMap. */}}
{{- define "medley.eppName" -}}
{{- printf "%s-epp" (include "medley.fullname" . | trunc 59 | trimSuffix "-") }}
{{- end }}

{{- define "medley.eppSelectorLabels" -}}
app.kubernetes.io/name: {{ include "medley.name" . }}-epp
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "medley.eppLabels" -}}
helm.sh/chart: {{ include "medley.chart" . }}
{{ include "medley.eppSelectorLabels" . }}
app.kubernetes.io/component: endpoint-picker
app.kubernetes.io/version: {{ .Values.inferenceGateway.endpointPicker.image.tag | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Label the EPP's core-metrics-extractor reads to pick a pod's metric mapping (engineConfigs by
name). Only Medley's serving pods carry it, so the pool selecting on it leaves out the `helm test`
pod, which has the chart's selector labels too.
*/}}
{{- define "medley.engineLabel" -}}
inference.networking.k8s.io/engine-type: {{ .Values.inferenceGateway.engineName | quote }}
{{- end }}

{{/* The InferencePool's selector: the Deployment's pod selector plus the engine label. */}}
{{- define "medley.poolSelectorLabels" -}}
{{ include "medley.selectorLabels" . }}
{{ include "medley.engineLabel" . }}
{{- end }}

{{/* File name of the EndpointPickerConfig in the EPP's ConfigMap (mounted at /config). */}}
{{- define "medley.eppConfigFile" -}}
endpoint-picker-config.yaml
{{- end }}

{{/*
The EndpointPickerConfig (inference.networking.x-k8s.io/v1alpha1, read by the EPP at start-up; not
a Kubernetes resource). Written for EPP v1.5.0: from that release the metric names are set per
engine in the `core-metrics-extractor` plugin's `engineConfigs` (the older --*-metric flags are
refused), and the data layer wires the `metrics-data-source` (GET <pod>:<targetPort><path>) to
that extractor. The plugins keep their type as their name, so the EPP's system defaults find them
and add no second source or extractor. Medley's series (router/src/metrics):
  queuedRequestsSpec   medley_requests_waiting      requests queued, not yet running
  runningRequestsSpec  medley_requests_running      requests in the running batch
  kvUsageSpec          medley_kv_cache_utilization  share of the KV token budget in use (0-1)
  loraSpec             medley_lora_requests_info    running/waiting adapters and merges, max_lora
  cacheInfoSpec        medley_kv_cache_info         KV block size (tokens) and block count (the
                                                    EPP reads the count from a num_gpu_blocks
                                                    label; Medley's is num_blocks)
*/}}
{{- define "medley.eppConfig" -}}
{{- $g := .Values.inferenceGateway }}
{{- $s := $g.endpointPicker.scorers }}
{{- $scorers := list }}
{{- range $key, $type := dict "queue" "queue-scorer" "kvCacheUtilization" "kv-cache-utilization-scorer" "loraAffinity" "lora-affinity-scorer" "prefixCache" "prefix-cache-scorer" }}
{{- $w := index $s $key | default 0 }}
{{- if gt (float64 $w) 0.0 }}
{{- $scorers = append $scorers (dict "type" $type "weight" $w) }}
{{- end }}
{{- end }}
{{- if not $scorers }}
{{- fail "inferenceGateway.endpointPicker.scorers: give at least one scorer a weight > 0" }}
{{- end }}
apiVersion: inference.networking.x-k8s.io/v1alpha1
kind: EndpointPickerConfig
plugins:
  - type: metrics-data-source
    parameters:
      scheme: http
      path: {{ .Values.metrics.path | quote }}
  - type: core-metrics-extractor
    parameters:
      engineLabelKey: inference.networking.k8s.io/engine-type
      defaultEngine: {{ $g.engineName | quote }}
      engineConfigs:
        - name: {{ $g.engineName | quote }}
          queuedRequestsSpec: medley_requests_waiting
          runningRequestsSpec: medley_requests_running
          kvUsageSpec: medley_kv_cache_utilization
          loraSpec: medley_lora_requests_info
          cacheInfoSpec: medley_kv_cache_info
  {{- range $scorers }}
  - type: {{ .type }}
  {{- end }}
  - type: max-score-picker
data:
  sources:
    - pluginRef: metrics-data-source
      extractors:
        - pluginRef: core-metrics-extractor
schedulingProfiles:
  - name: default
    plugins:
      {{- range $scorers }}
      - pluginRef: {{ .type }}
        weight: {{ .weight }}
      {{- end }}
      - pluginRef: max-score-picker
{{- end }}
