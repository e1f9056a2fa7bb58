{{/*
Names, labels, and the pieces the Deployment and the training Job share.
*/}}

{{- define "loraserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* <release>-<chart>, at most 63 characters (a DNS label); the release name alone when it already holds the chart's. */}}
{{- define "loraserve.fullname" -}}
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

{{- define "loraserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "loraserve.labels" -}}
helm.sh/chart: {{ include "loraserve.chart" . }}
{{ include "loraserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: loraserve
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "loraserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "loraserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The server pods, and only them: the training Job's pods carry component=training. */}}
{{- define "loraserve.serverSelectorLabels" -}}
{{ include "loraserve.selectorLabels" . }}
app.kubernetes.io/component: server
{{- end }}

{{- define "loraserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "loraserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "loraserve.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* --model: the hub id, or the model directory on its volume. */}}
{{- define "loraserve.modelArg" -}}
{{- if eq .Values.model.source "hub" }}
{{- required "model.id is required when model.source is hub" .Values.model.id }}
{{- else }}
{{- $path := required "model.path (the model directory on the volume) is required when model.source is volume" .Values.model.path }}
{{- printf "%s/%s" (trimSuffix "/" .Values.model.volume.mountPath) (trimPrefix "/" $path) }}
{{- end }}
{{- end }}

{{- define "loraserve.modelClaimName" -}}
{{- default (printf "%s-model" (include "loraserve.fullname" .)) .Values.model.volume.existingClaim }}
{{- end }}

{{- define "loraserve.storeClaimName" -}}
{{- default (printf "%s-adapters" (include "loraserve.fullname" .)) .Values.adapterStore.persistence.existingClaim }}
{{- end }}

{{/* Secret names: the existing one when given, else the chart-created one. */}}
{{- define "loraserve.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "loraserve.fullname" .)) .Values.apiKeys.existingSecret }}
{{- end }}

{{- define "loraserve.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "loraserve.fullname" .)) .Values.tls.existingSecret }}
{{- end }}

{{- define "loraserve.clientCASecretName" -}}
{{- default (printf "%s-client-ca" (include "loraserve.fullname" .)) .Values.tls.clientAuth.existingSecret }}
{{- end }}

{{- define "loraserve.probeClientSecretName" -}}
{{- default (printf "%s-probe-tls" (include "loraserve.fullname" .)) .Values.tls.probeClient.existingSecret }}
{{- end }}

{{/* Whether the client CA lives in its own Secret (else: ca.crt of the TLS Secret). */}}
{{- define "loraserve.separateClientCA" -}}
{{- if and .Values.tls.clientAuth.enabled (or .Values.tls.clientAuth.existingSecret .Values.tls.clientAuth.ca) }}true{{ end }}
{{- end }}

{{- define "loraserve.clientCAPath" -}}
{{- if include "loraserve.separateClientCA" . }}
{{- printf "%s/ca.crt" .Values.tls.clientAuth.mountPath }}
{{- else }}
{{- printf "%s/ca.crt" .Values.tls.mountPath }}
{{- end }}
{{- end }}

{{/* Values that must agree with each other, checked once for every template that renders. */}}
{{- define "loraserve.validate" -}}
{{- if and .Values.apiKeys.enabled (not .Values.apiKeys.existingSecret) (not .Values.apiKeys.keysFile) }}
{{- fail "apiKeys.enabled needs apiKeys.existingSecret (preferred) or apiKeys.keysFile" }}
{{- end }}
{{- if .Values.tls.enabled }}
{{- if and (not .Values.tls.existingSecret) (not (and .Values.tls.certificate .Values.tls.privateKey .Values.tls.ca)) }}
{{- fail "tls.enabled needs tls.existingSecret (preferred) or all of tls.certificate, tls.privateKey and tls.ca" }}
{{- end }}
{{- if and .Values.tls.clientAuth.enabled (not .Values.tls.probeClient.existingSecret) (not (and .Values.tls.probeClient.certificate .Values.tls.probeClient.privateKey)) }}
{{- fail "tls.clientAuth (mTLS) needs a client certificate for the health probes: tls.probeClient.existingSecret, or tls.probeClient.certificate and tls.probeClient.privateKey" }}
{{- end }}
{{- else if .Values.tls.clientAuth.enabled }}
{{- fail "tls.clientAuth (mTLS) needs tls.enabled" }}
{{- end }}
{{- if and (eq .Values.model.source "volume") (eq .Values.model.volume.type "emptyDir") }}
{{- fail "model.source volume reads the model from a claim: set model.volume.type to pvc (with model.volume.existingClaim)" }}
{{- end }}
{{- if and .Values.training.enabled (not .Values.training.config.tasks) (not (and .Values.training.config.adapter_name .Values.training.config.train_file)) }}
{{- fail "training.enabled needs training.config.adapter_name and training.config.train_file (or training.config.tasks)" }}
{{- end }}
{{- if and .Values.training.enabled (not .Values.adapterStore.persistence.enabled) }}
{{- fail "training.enabled needs adapterStore.persistence.enabled: the Job publishes into the servers' store claim" }}
{{- end }}
{{- $parallel := mul (int64 .Values.server.tensorParallelSize) (int64 .Values.server.pipelineParallelSize) }}
{{- if and (gt $parallel 1) (ne .Values.server.engine "vllm") }}
{{- fail (printf "server.tensorParallelSize x pipelineParallelSize = %d splits the model over GPUs, which only the vllm engine does: set server.engine to vllm" $parallel) }}
{{- end }}
{{- if and (gt $parallel 1) (ne (int64 .Values.gpu.count) $parallel) }}
{{- fail (printf "server.tensorParallelSize x pipelineParallelSize = %d GPUs per server, but gpu.count is %d: make them equal" $parallel (int64 .Values.gpu.count)) }}
{{- end }}
{{- $_ := include "loraserve.terminationGracePeriodSeconds" . }}
{{- end }}

{{/*
The pod's grace period. Kubernetes sends SIGTERM after the preStop sleep and SIGKILL when the
grace period ends, so it must cover the sleep plus the server's whole drain.
*/}}
{{- define "loraserve.terminationGracePeriodSeconds" -}}
{{- $drain := int64 (ceil .Values.server.drainTimeout) }}
{{- $needed := add $drain (int64 .Values.preStopSleepSeconds) }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- add $needed (int64 .Values.terminationGraceMarginSeconds) }}
{{- else if le (int64 .Values.terminationGracePeriodSeconds) $needed }}
{{- fail (printf "terminationGracePeriodSeconds %d must be longer than preStopSleepSeconds %d + server.drainTimeout %v = %d s: Kubernetes would kill the server in the middle of its drain (leave it null to derive it)" (int64 .Values.terminationGracePeriodSeconds) (int64 .Values.preStopSleepSeconds) .Values.server.drainTimeout $needed) }}
{{- else }}
{{- int64 .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/* A number as a flag value: integers without an exponent, other numbers as they are. */}}
{{- define "loraserve.number" -}}
{{- if eq (float64 .) (float64 (int64 .)) }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- end }}

{{/* `loraserve --log-level L serve ...`: every flag is a `loraserve serve` flag (a test parses them). */}}
{{- define "loraserve.serverArgs" -}}
{{- $s := .Values.server }}
{{- $args := list "--log-level" $s.logLevel "serve" "--model" (include "loraserve.modelArg" .) "--adapters-dir" .Values.adapterStore.mountPath }}
{{- $args = concat $args (list "--host" $s.host "--port" (toString (int64 $s.port)) "--metrics-port" (toString (int64 $s.metricsPort))) }}
{{- $args = concat $args (list "--engine" $s.engine "--quantization" $s.quantization "--dtype" $s.dtype "--device-map" $s.deviceMap) }}
{{- range $flag, $key := dict "--max-loras" "maxLoras" "--max-cpu-loras" "maxCpuLoras" "--max-lora-rank" "maxLoraRank" "--max-batch-size" "maxBatchSize" "--max-queue" "maxQueue" "--max-input-tokens" "maxInputTokens" "--max-prefill-tokens" "maxPrefillTokens" "--prefix-cache-mib" "prefixCacheMib" "--host-cache-mib" "hostCacheMib" "--kv-cache-mib" "kvCacheMib" "--max-new-tokens" "maxNewTokens" "--max-adapter-bytes" "maxAdapterBytes" "--max-store-bytes" "maxStoreBytes" "--engine-threads" "engineThreads" "--front-nice" "frontNice" "--max-concurrent-rpcs" "maxConcurrentRpcs" "--max-streams-per-connection" "maxStreamsPerConnection" "--max-concurrent-uploads" "maxConcurrentUploads" "--max-concurrent-uploads-per-tenant" "maxConcurrentUploadsPerTenant" "--tensor-parallel-size" "tensorParallelSize" "--pipeline-parallel-size" "pipelineParallelSize" "--max-model-len" "maxModelLen" "--vllm-cpu-kv-cache-gib" "vllmCpuKvCacheGib" "--max-num-batched-tokens" "maxNumBatchedTokens" "--long-prefill-token-threshold" "longPrefillTokenThreshold" }}
{{- $args = concat $args (list $flag (toString (int64 (index $s $key)))) }}
{{- end }}
{{- $args = concat $args (list "--drain-timeout" (include "loraserve.number" $s.drainTimeout) "--store-sync-interval" (include "loraserve.number" $s.storeSyncInterval) "--refusal-hold" (include "loraserve.number" $s.refusalHold)) }}
{{- $args = concat $args (list "--gpu-memory-utilization" (include "loraserve.number" $s.gpuMemoryUtilization)) }}
{{- $args = append $args (ternary "--enable-prefix-caching" "--no-enable-prefix-caching" $s.enablePrefixCaching) }}
{{- $args = append $args (ternary "--enable-chunked-prefill" "--no-enable-chunked-prefill" $s.enableChunkedPrefill) }}
{{- $args = concat $args (list "--heartbeat-interval" (include "loraserve.number" $s.heartbeatInterval) "--engine-stall-timeout" (include "loraserve.number" $s.engineStallTimeout)) }}
{{- range $s.importRoots }}{{ $args = concat $args (list "--import-roots" (toString .)) }}{{ end }}
{{- range $s.preload }}{{ $args = concat $args (list "--preload" (toString .)) }}{{ end }}
{{- range $s.pin }}{{ $args = concat $args (list "--pin" (toString .)) }}{{ end }}
{{- if $s.allowOpenManagement }}{{ $args = append $args "--allow-open-management" }}{{ end }}
{{- if .Values.apiKeys.enabled }}
{{- $args = concat $args (list "--api-keys-file" (printf "%s/%s" .Values.apiKeys.mountPath .Values.apiKeys.secretKey)) }}
{{- end }}
{{- if .Values.tls.enabled }}
{{- $args = concat $args (list "--tls-cert" (printf "%s/tls.crt" .Values.tls.mountPath) "--tls-key" (printf "%s/tls.key" .Values.tls.mountPath)) }}
{{- if .Values.tls.clientAuth.enabled }}
{{- $args = concat $args (list "--tls-client-ca" (include "loraserve.clientCAPath" .)) }}
{{- end }}
{{- end }}
{{- range $s.extraArgs }}{{ $args = append $args (toString .) }}{{ end }}
{{- toYaml $args }}
{{- end }}

{{/*
One probe's action. Without TLS: the kubelet's native gRPC probe (grpc.health.v1 on the port).
With TLS: the kubelet's gRPC probe cannot do a TLS handshake, so `loraserve health` runs in the
container and checks the same service over TLS (exit 0 only when SERVING).
*/}}
{{- define "loraserve.probeAction" -}}
{{- $v := .root.Values }}
{{- if $v.tls.enabled }}
{{- $cmd := list "loraserve" "health" "--server" (printf "127.0.0.1:%d" (int64 $v.server.port)) "--service" .service "--timeout" (toString (int64 .timeout)) }}
{{- $cmd = concat $cmd (list "--tls-ca" (printf "%s/ca.crt" $v.tls.mountPath) "--tls-server-name" (include "loraserve.tlsServerName" .root)) }}
{{- if $v.tls.clientAuth.enabled }}
{{- $cmd = concat $cmd (list "--tls-cert" (printf "%s/tls.crt" $v.tls.probeClient.mountPath) "--tls-key" (printf "%s/tls.key" $v.tls.probeClient.mountPath)) }}
{{- end }}
exec:
  command:
    {{- toYaml $cmd | nindent 4 }}
{{- else }}
grpc:
  port: {{ int64 $v.server.port }}
  service: {{ .service | quote }}
{{- end }}
{{- end }}

{{- define "loraserve.tlsServerName" -}}
{{- default (printf "%s.%s.svc" (include "loraserve.fullname" .) .Release.Namespace) .Values.tls.serverName }}
{{- end }}

{{/* Environment both the server and the training Job need: caches on writable volumes, the hub token. */}}
{{- define "loraserve.commonEnv" -}}
- name: HOME
  value: /tmp
- name: PYTHONUNBUFFERED
  value: "1"
{{- if eq .Values.model.source "hub" }}
- name: HF_HOME
  value: {{ .Values.model.volume.mountPath | quote }}
{{- with .Values.model.hfToken.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.model.hfToken.key }}
{{- end }}
{{- else }}
- name: HF_HOME
  value: /tmp/huggingface
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- end }}

{{/* The model volume: the HF cache (hub) or the model directory's claim (volume, read-only). */}}
{{- define "loraserve.modelVolume" -}}
- name: model
{{- if eq .Values.model.volume.type "emptyDir" }}
  {{- include "loraserve.emptyDir" (dict "sizeLimit" .Values.model.volume.sizeLimit) | nindent 2 }}
{{- else }}
  persistentVolumeClaim:
    claimName: {{ include "loraserve.modelClaimName" . }}
    {{- if eq .Values.model.source "volume" }}
    readOnly: true
    {{- end }}
{{- end }}
{{- end }}

{{- define "loraserve.modelVolumeMount" -}}
- name: model
  mountPath: {{ .Values.model.volume.mountPath }}
  {{- if eq .Values.model.source "volume" }}
  readOnly: true
  {{- end }}
{{- end }}

{{- define "loraserve.storeVolume" -}}
- name: adapters
{{- if .Values.adapterStore.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ include "loraserve.storeClaimName" . }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}

{{/* Scratch volumes for a read-only root filesystem. */}}
{{- define "loraserve.scratchVolumes" -}}
- name: tmp
  {{- include "loraserve.emptyDir" (dict "sizeLimit" .Values.tmpSizeLimit) | nindent 2 }}
- name: dshm
  {{- include "loraserve.emptyDir" (dict "sizeLimit" .Values.shmSizeLimit "medium" "Memory") | nindent 2 }}
{{- end }}

{{/* An emptyDir volume source from {sizeLimit, medium}, both optional. */}}
{{- define "loraserve.emptyDir" -}}
{{- $spec := dict }}
{{- with .medium }}{{ $_ := set $spec "medium" . }}{{ end }}
{{- with .sizeLimit }}{{ $_ := set $spec "sizeLimit" . }}{{ end }}
{{- toYaml (dict "emptyDir" $spec) }}
{{- end }}

{{- define "loraserve.scratchVolumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: dshm
  mountPath: /dev/shm
{{- end }}

{{/* storageClassName of a claim: "" = the cluster's default (omitted), "-" = none (""). */}}
{{- define "loraserve.storageClass" -}}
{{- if eq . "-" }}
storageClassName: ""
{{- else if . }}
storageClassName: {{ . | quote }}
{{- end }}
{{- end }}

{{/* An IntOrString value: 1 stays a number, "50%" a string. */}}
{{- define "loraserve.intOrPercent" -}}
{{- if kindIs "string" . }}{{ . | quote }}{{ else }}{{ int64 . }}{{ end }}
{{- end }}
