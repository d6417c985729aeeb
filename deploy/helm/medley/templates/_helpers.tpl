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
{{- $args = append $args (dict "name" "--shard-startup-timeout" "value" ($v.server.shardStartupTimeout | int64 | toString)) }}
{{- $args = append $args (dict "name" "--graceful-termination-timeout" "value" ($v.server.gracefulTerminationTimeout | int64 | toString)) }}
{{- range $key, $flag := dict "maxConcurrentRequests" "--max-concurrent-requests" "maxInputLength" "--max-input-length" "maxTotalTokens" "--max-total-tokens" "maxBatchPrefillTokens" "--max-batch-prefill-tokens" "maxBatchTotalTokens" "--max-batch-total-tokens" }}
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
