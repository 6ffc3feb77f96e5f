{{/*
Names and labels.
*/}}
{{- define "dkv.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name prefix of every resource; truncated so that "<fullname>-store-headless" fits 63.
*/}}
{{- define "dkv.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 45 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 45 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "dkv.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of a component's resources. Call with (dict "root" $ "component" "store").
*/}}
{{- define "dkv.labels" -}}
helm.sh/chart: {{ include "dkv.chart" .root }}
{{ include "dkv.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Values.image.tag | default .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: dkv
{{- end }}

{{/*
Selector labels: stable across upgrades (no version, no chart).
*/}}
{{- define "dkv.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dkv.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{- define "dkv.componentName" -}}
{{- printf "%s-%s" (include "dkv.fullname" .root) .component }}
{{- end }}

{{- define "dkv.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dkv.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "dkv.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/*
A scalar as dkv reads it from the environment: strings as they are; whole numbers without an
exponent (YAML numbers reach templates as float64, and 4294967296 would print as 4.294967296e+09).
*/}}
{{- define "dkv.scalar" -}}
{{- if kindIs "float64" . }}
{{- if eq (floor .) . }}{{ int64 . }}{{ else }}{{ . }}{{ end }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/*
Service addresses of the components, through the release's Services. The workers' Services are
headless, and their addresses gRPC "dns:///" names: a channel resolves every ready pod and sends
calls round robin (connections are aged, so new pods get calls too).
*/}}
{{- define "dkv.storeAddress" -}}
{{- $full := include "dkv.fullname" . }}
{{- $port := int .Values.store.port }}
{{- if gt (int .Values.store.shards) 1 }}
{{- /* the shards are the ready pods behind the headless Service, looked up again every 10 s; the
clients place each entry on one (rendezvous hashing of its key over the pods' stable names) */}}
{{- printf "dns:///%s-store-headless:%d" $full $port }}
{{- else }}
{{- printf "%s-store:%d" $full $port }}
{{- end }}
{{- end }}

{{- define "dkv.prefillAddress" -}}
{{- printf "dns:///%s-prefill:%d" (include "dkv.fullname" .) (int .Values.prefill.port) }}
{{- end }}

{{- define "dkv.decodeAddress" -}}
{{- printf "dns:///%s-decode:%d" (include "dkv.fullname" .) (int .Values.decode.port) }}
{{- end }}

{{- define "dkv.redisHost" -}}
{{- printf "%s-redis" (include "dkv.fullname" .) }}
{{- end }}

{{/*
The Secret with the service token (and tenant tokens, cluster secret): the given one, or the
chart's (secrets.yaml).
*/}}
{{- define "dkv.authSecret" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "dkv.fullname" .)) }}
{{- end }}

{{/*
The Secret and key holding the Redis password, as (dict "name" "key"); empty name = no password
(an external Redis without existingSecret).
*/}}
{{- define "dkv.redisPassword" -}}
{{- if .Values.redis.enabled }}
{{- dict "name" (.Values.redis.existingSecret | default (printf "%s-redis" (include "dkv.fullname" .))) "key" .Values.redis.passwordKey | toJson }}
{{- else }}
{{- dict "name" .Values.externalRedis.existingSecret "key" .Values.externalRedis.passwordKey | toJson }}
{{- end }}
{{- end }}

{{/*
A random Secret value that survives upgrades: the one already in the cluster (lookup; empty
under `helm template`), or a new one. Call with (dict "root" $ "name" secretName "key" key "length" n).
*/}}
{{- define "dkv.randomSecretValue" -}}
{{- $old := lookup "v1" "Secret" .root.Release.Namespace .name }}
{{- $data := dig "data" (dict) ($old | default (dict)) }}
{{- get $data .key | default (randAlphaNum .length | b64enc) }}
{{- end }}

{{/*
Whether a size is zero ("0", "0GiB", 0).
*/}}
{{- define "dkv.isZeroSize" -}}
{{- if regexMatch "^\\s*0+(\\.0+)?\\s*([kKmMgGtT]i?[bB]?|[bB])?\\s*$" (include "dkv.scalar" .) }}true{{ end }}
{{- end }}

{{/*
Checks across values that the schema cannot express; each fails rendering with what to change.
*/}}
{{- define "dkv.validate" -}}
{{- $v := .Values }}
{{- if and $v.store.redisTier (not $v.redis.enabled) (not $v.externalRedis.url) }}
{{- fail "store.redisTier is true but there is no Redis: set redis.enabled=true (in-chart Redis), or externalRedis.url=redis://host:port/db, or store.redisTier=false (no Redis tier)" }}
{{- end }}
{{- if and (not $v.store.redisTier) (include "dkv.isZeroSize" $v.store.deviceBytes) (include "dkv.isZeroSize" $v.store.cpuBytes) }}
{{- fail "every store tier is disabled: set store.cpuBytes or store.deviceBytes above 0, or store.redisTier=true" }}
{{- end }}
{{- if and $v.externalRedis.cluster $v.redis.enabled }}
{{- fail "externalRedis.cluster is true but redis.enabled is true: the in-chart Redis is one server, not a cluster; set redis.enabled=false and externalRedis.url to a node of your Redis Cluster" }}
{{- end }}
{{- if and $v.externalRedis.existingSecret (contains "@" $v.externalRedis.url) }}
{{- fail "externalRedis.url must not contain credentials when externalRedis.existingSecret is set: the chart inserts the password" }}
{{- end }}
{{- if and $v.tls.enabled (not $v.tls.existingSecret) }}
{{- fail "tls.enabled is true but tls.existingSecret is empty: create a kubernetes.io/tls Secret (tls.crt, tls.key, ca.crt) and name it in tls.existingSecret" }}
{{- end }}
{{- if and $v.auth.tenantTokensKey (not $v.auth.existingSecret) }}
{{- fail "auth.tenantTokensKey needs auth.existingSecret (the Secret holding the tokens)" }}
{{- end }}
{{- if or (ne $v.prefill.model $v.decode.model) (ne $v.prefill.model $v.gateway.model) }}
{{- fail (printf "prefill.model (%s), decode.model (%s) and gateway.model (%s) must be the same model: cached KV is per model" $v.prefill.model $v.decode.model $v.gateway.model) }}
{{- end }}
{{- range $c := list "store" "prefill" "decode" "gateway" }}
{{- $cv := index $v $c }}
{{- if not (kindIs "invalid" $cv.terminationGracePeriodSeconds) }}
{{- if le (float64 $cv.terminationGracePeriodSeconds) (addf $cv.drainDelayS $cv.graceS) }}
{{- fail (printf "%s.terminationGracePeriodSeconds (%v) must exceed %s.drainDelayS + %s.graceS (%v), or Kubernetes kills the pod while it drains" $c $cv.terminationGracePeriodSeconds $c $c (addf $cv.drainDelayS $cv.graceS)) }}
{{- end }}
{{- end }}
{{- if and (eq (int $cv.metricsPort) (int $cv.port)) }}
{{- fail (printf "%s.metricsPort must differ from %s.port" $c $c) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds of a component: the value, or ceil(drainDelayS + graceS) + 10.
*/}}
{{- define "dkv.terminationGrace" -}}
{{- if kindIs "invalid" .terminationGracePeriodSeconds }}
{{- add (int (ceil (addf .drainDelayS .graceS))) 10 }}
{{- else }}
{{- int .terminationGracePeriodSeconds }}
{{- end }}
{{- end }}

{{/*
The store's Redis URL ("" without a Redis tier). With a password (always for the in-chart Redis)
the URL references $(REDIS_PASSWORD), which Kubernetes expands from the env var defined before it.
*/}}
{{- define "dkv.redisUrl" -}}
{{- $v := .Values }}
{{- if $v.store.redisTier }}
{{- if $v.redis.enabled }}
{{- printf "redis://:$(REDIS_PASSWORD)@%s:%d/0" (include "dkv.redisHost" .) (int $v.redis.port) }}
{{- else if $v.externalRedis.existingSecret }}
{{- $parts := splitn "://" 2 $v.externalRedis.url }}
{{- printf "%s://:$(REDIS_PASSWORD)@%s" $parts._0 $parts._1 }}
{{- else }}
{{- $v.externalRedis.url }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The settings every dkv server has (ServerSettings), as env vars. Call with
(dict "root" $ "component" "store").
*/}}
{{- define "dkv.serverEnv" -}}
{{- $root := .root }}
{{- $v := index $root.Values .component }}
{{- $p := printf "DKV_%s_" (upper .component) -}}
- name: {{ $p }}HOST
  value: "0.0.0.0"
- name: {{ $p }}PORT
  value: {{ include "dkv.scalar" $v.port | quote }}
- name: {{ $p }}GRACE_S
  value: {{ include "dkv.scalar" $v.graceS | quote }}
- name: {{ $p }}DRAIN_DELAY_S
  value: {{ include "dkv.scalar" $v.drainDelayS | quote }}
- name: {{ $p }}LOG_LEVEL
  value: {{ $v.logLevel | quote }}
- name: {{ $p }}LOG_FORMAT
  value: {{ $v.logFormat | quote }}
- name: {{ $p }}METRICS_PORT
  value: {{ include "dkv.scalar" $v.metricsPort | quote }}
{{- with $root.Values.auth }}
{{- if .enabled }}
- name: {{ $p }}AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "dkv.authSecret" $root }}
      key: {{ .tokenKey }}
{{- if .tenantTokensKey }}
- name: {{ $p }}TENANT_TOKENS
  valueFrom:
    secretKeyRef:
      name: {{ include "dkv.authSecret" $root }}
      key: {{ .tenantTokensKey }}
{{- end }}
{{- end }}
{{- end }}
{{- with $root.Values.tls }}
{{- if .enabled }}
- name: {{ $p }}TLS_CERT
  value: /etc/dkv/tls/tls.crt
- name: {{ $p }}TLS_KEY
  value: /etc/dkv/tls/tls.key
{{- if .mutual }}
- name: {{ $p }}TLS_CA
  value: /etc/dkv/tls/ca.crt
{{- else if .trustCA }}
- name: GRPC_DEFAULT_SSL_ROOTS_FILE_PATH
  value: /etc/dkv/tls/ca.crt
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
A probe: gRPC health (grpc.health.v1, service "") on the gRPC port; with TLS a tcpSocket probe,
because the kubelet's gRPC probe cannot do TLS. Call with (dict "root" $ "port" N "timing" {...}).
*/}}
{{- define "dkv.probe" -}}
{{- if .root.Values.tls.enabled -}}
tcpSocket:
  port: grpc
{{- else -}}
grpc:
  port: {{ int .port }}
  service: ""
{{- end }}
{{ toYaml .timing }}
{{- end }}
