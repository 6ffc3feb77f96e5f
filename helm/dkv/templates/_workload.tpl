{{/*
The pod template of a dkv component. Call with
(dict "root" $ "component" "store" "args" (list "store" "serve") "env" "dkv.env.store" "modelCache" true).
"env" names the template rendering the component's own settings.
*/}}
{{- define "dkv.podTemplate" -}}
{{- $root := .root }}
{{- $c := .component }}
{{- $v := index $root.Values $c }}
{{- $ctx := dict "root" $root "component" $c -}}
metadata:
  labels:
    {{- include "dkv.selectorLabels" $ctx | nindent 4 }}
    app.kubernetes.io/part-of: dkv
    {{- with $v.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $v.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "dkv.serviceAccountName" $root }}
  automountServiceAccountToken: {{ $root.Values.serviceAccount.automountServiceAccountToken }}
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  # Longer than drainDelayS + graceS: the server drains (health NOT_SERVING), then lets calls finish.
  terminationGracePeriodSeconds: {{ include "dkv.terminationGrace" $v }}
  securityContext:
    {{- toYaml (mergeOverwrite (deepCopy $root.Values.podSecurityContext) $v.podSecurityContext) | nindent 4 }}
  containers:
    - name: {{ $c }}
      image: {{ include "dkv.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      command: ["dkv"]
      args:
        {{- toYaml .args | nindent 8 }}
      ports:
        - name: grpc
          containerPort: {{ int $v.port }}
          protocol: TCP
        {{- if gt (int $v.httpPort) 0 }}
        - name: http
          containerPort: {{ int $v.httpPort }}
          protocol: TCP
        {{- end }}
        {{- if gt (int $v.metricsPort) 0 }}
        - name: metrics
          containerPort: {{ int $v.metricsPort }}
          protocol: TCP
        {{- end }}
      env:
        {{- include "dkv.serverEnv" $ctx | nindent 8 }}
        {{- include .env $root | nindent 8 }}
        {{- if .modelCache }}
        # Not dkv settings: where converted models (workers/model.py) and Triton kernels are cached.
        - name: DKV_MODEL_CACHE
          value: /cache/models
        - name: TRITON_CACHE_DIR
          value: /cache/triton
        {{- end }}
        - name: HOME
          value: /tmp
        {{- with $v.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- /* Native gRPC probes ask grpc.health.v1 (service ""), which every dkv server registers
           and serves without a token; with TLS they become tcpSocket probes (see values.yaml). */}}
      startupProbe:
        {{- include "dkv.probe" (dict "root" $root "port" $v.port "timing" $v.startupProbe) | nindent 8 }}
      livenessProbe:
        {{- include "dkv.probe" (dict "root" $root "port" $v.port "timing" $v.livenessProbe) | nindent 8 }}
      readinessProbe:
        {{- include "dkv.probe" (dict "root" $root "port" $v.port "timing" $v.readinessProbe) | nindent 8 }}
      resources:
        {{- $res := deepCopy (default (dict) $v.resources) }}
        {{- if gt (int $v.gpus) 0 }}
        {{- $limits := default (dict) $res.limits }}
        {{- $_ := set $limits "nvidia.com/gpu" (int $v.gpus) }}
        {{- $_ := set $res "limits" $limits }}
        {{- end }}
        {{- toYaml $res | nindent 8 }}
      securityContext:
        {{- toYaml (mergeOverwrite (deepCopy $root.Values.securityContext) $v.securityContext) | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        {{- if .modelCache }}
        - name: cache
          mountPath: /cache
        {{- end }}
        {{- if $root.Values.tls.enabled }}
        - name: tls
          mountPath: /etc/dkv/tls
          readOnly: true
        {{- end }}
        {{- with $v.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: tmp
      {{- if $root.Values.tmpSizeLimit }}
      emptyDir:
        sizeLimit: {{ $root.Values.tmpSizeLimit }}
      {{- else }}
      emptyDir: {}
      {{- end }}
    {{- if .modelCache }}
    - name: cache
      {{- if $root.Values.modelCache.existingClaim }}
      persistentVolumeClaim:
        claimName: {{ $root.Values.modelCache.existingClaim }}
      {{- else if $root.Values.modelCache.sizeLimit }}
      emptyDir:
        sizeLimit: {{ $root.Values.modelCache.sizeLimit }}
      {{- else }}
      emptyDir: {}
      {{- end }}
    {{- end }}
    {{- if $root.Values.tls.enabled }}
    - name: tls
      secret:
        secretName: {{ $root.Values.tls.existingSecret }}
        defaultMode: 0440
    {{- end }}
    {{- with $v.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
The Service of a component: grpc and metrics ports. The gateway's type is configurable; the
workers' (prefill, decode) are headless, so their gRPC clients balance calls over the pods.
*/}}
{{- define "dkv.service" -}}
{{- $root := .root }}
{{- $c := .component }}
{{- $v := index $root.Values $c }}
{{- $ctx := dict "root" $root "component" $c -}}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "dkv.componentName" $ctx }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "dkv.labels" $ctx | nindent 4 }}
  {{- with $v.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ $v.service.type | default "ClusterIP" }}
  {{- if has $c (list "prefill" "decode") }}
  clusterIP: None
  {{- end }}
  {{- if and (eq $c "gateway") (ne ($v.service.type | default "ClusterIP") "ClusterIP") }}
  externalTrafficPolicy: {{ $v.service.externalTrafficPolicy }}
  {{- with $v.service.loadBalancerSourceRanges }}
  loadBalancerSourceRanges:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- end }}
  selector:
    {{- include "dkv.selectorLabels" $ctx | nindent 4 }}
  ports:
    - name: grpc
      port: {{ int $v.port }}
      targetPort: grpc
      protocol: TCP
      appProtocol: grpc
      {{- if and (eq $c "gateway") (ne ($v.service.type | default "ClusterIP") "ClusterIP") (not (kindIs "invalid" $v.service.nodePort)) }}
      nodePort: {{ int $v.service.nodePort }}
      {{- end }}
    {{- if gt (int $v.httpPort) 0 }}
    - name: http
      port: {{ int $v.httpPort }}
      targetPort: http
      protocol: TCP
      appProtocol: http
      {{- if and (ne ($v.service.type | default "ClusterIP") "ClusterIP") (not (kindIs "invalid" $v.service.httpNodePort)) }}
      nodePort: {{ int $v.service.httpNodePort }}
      {{- end }}
    {{- end }}
    {{- if gt (int $v.metricsPort) 0 }}
    - name: metrics
      port: {{ int $v.metricsPort }}
      targetPort: metrics
      protocol: TCP
      appProtocol: http
    {{- end }}
{{- end }}

{{/*
The PodDisruptionBudget of a component.
*/}}
{{- define "dkv.pdb" -}}
{{- $root := .root }}
{{- $c := .component }}
{{- $v := index $root.Values $c }}
{{- $ctx := dict "root" $root "component" $c }}
{{- if $v.pdb.enabled -}}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "dkv.componentName" $ctx }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "dkv.labels" $ctx | nindent 4 }}
spec:
  {{- if not (kindIs "invalid" $v.pdb.minAvailable) }}
  minAvailable: {{ $v.pdb.minAvailable }}
  {{- else }}
  maxUnavailable: {{ kindIs "invalid" $v.pdb.maxUnavailable | ternary 1 $v.pdb.maxUnavailable }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "dkv.selectorLabels" $ctx | nindent 6 }}
{{- end }}
{{- end }}
