{{/*
Names, labels and the pieces every pod of the chart shares. Per-component templates live in
router/, worker/, etcd/ and monitoring/.
*/}}

{{- define "openinfer.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name, short enough for the suffixes the components add. */}}
{{- define "openinfer.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 30 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 30 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 30 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "openinfer.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of a component: (dict "root" $ "component" "router"). */}}
{{- define "openinfer.selectorLabels" -}}
app.kubernetes.io/name: {{ include "openinfer.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of a component's objects: (dict "root" $ "component" "router"). */}}
{{- define "openinfer.labels" -}}
{{ include "openinfer.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: openinfer
helm.sh/chart: {{ include "openinfer.chart" .root }}
{{- end }}

{{- define "openinfer.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "openinfer.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image of a flavour: (dict "root" $ "flavor" "cpu"|"cuda"). */}}
{{- define "openinfer.image" -}}
{{- $img := index .root.Values.image .flavor }}
{{- if $img.digest }}
{{- printf "%s@%s" $img.repository $img.digest }}
{{- else }}
{{- printf "%s:%s" $img.repository (default (printf "%s-%s" .root.Chart.AppVersion .flavor) $img.tag) }}
{{- end }}
{{- end }}

{{- define "openinfer.routerName" -}}
{{- printf "%s-router" (include "openinfer.fullname" .) }}
{{- end }}

{{- define "openinfer.etcdName" -}}
{{- printf "%s-etcd" (include "openinfer.fullname" .) }}
{{- end }}

{{/* etcd endpoints as the binary's --registry URL. */}}
{{- define "openinfer.registryUrl" -}}
{{- if eq .Values.etcd.mode "bundled" }}
{{- $name := include "openinfer.etcdName" . }}
{{- $members := list }}
{{- range $i := until (int .Values.etcd.bundled.replicas) }}
{{- $members = append $members (printf "%s-%d.%s-headless.%s.svc.%s:2379" $name $i $name $.Release.Namespace $.Values.clusterDomain) }}
{{- end }}
{{- printf "etcd://%s" (join "," $members) }}
{{- else }}
{{- if not .Values.etcd.external.endpoints }}
{{- fail "etcd.mode is external: list the members in etcd.external.endpoints (host:port)" }}
{{- end }}
{{- printf "etcd://%s" (join "," .Values.etcd.external.endpoints) }}
{{- end }}
{{- end }}

{{/* Where the external etcd's TLS files are mounted. */}}
{{- define "openinfer.etcdTlsDir" -}}/etc/openinfer/etcd-tls{{- end }}

{{/* The registry flags of routers and workers. */}}
{{- define "openinfer.registryArgs" -}}
- --registry={{ include "openinfer.registryUrl" . }}
{{- $ext := .Values.etcd.external }}
{{- if and (eq .Values.etcd.mode "external") $ext.tls.enabled }}
- --etcd-ca={{ include "openinfer.etcdTlsDir" . }}/ca.crt
{{- if $ext.tls.clientCertificate }}
- --etcd-cert={{ include "openinfer.etcdTlsDir" . }}/tls.crt
- --etcd-key={{ include "openinfer.etcdTlsDir" . }}/tls.key
{{- end }}
{{- end }}
{{- end }}

{{/*
Environment every openinfer container gets: the pod's identity (downward API), logging,
OpenTelemetry and the etcd credentials (the password from its Secret, never an argument).
(dict "root" $ "service" "openinfer-router")
*/}}
{{- define "openinfer.commonEnv" -}}
{{- $v := .root.Values -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: OPENINFER_LOG_FORMAT
  value: {{ $v.logFormat | quote }}
- name: OPENINFER_LOG
  value: {{ $v.logLevel | quote }}
{{- if $v.otel.endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ $v.otel.endpoint | quote }}
{{- end }}
- name: OTEL_SERVICE_NAME
  value: {{ .service | quote }}
{{- if $v.otel.sampler }}
- name: OTEL_TRACES_SAMPLER
  value: {{ $v.otel.sampler | quote }}
{{- end }}
{{- if $v.otel.samplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ $v.otel.samplerArg | quote }}
{{- end }}
{{- $attrs := list "k8s.pod.name=$(POD_NAME)" "k8s.namespace.name=$(POD_NAMESPACE)" }}
{{- range $k, $val := $v.otel.resourceAttributes }}
{{- $attrs = append $attrs (printf "%s=%s" $k $val) }}
{{- end }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ join "," $attrs | quote }}
{{- $auth := $v.etcd.external.auth }}
{{- if and (eq $v.etcd.mode "external") $auth.enabled }}
- name: OPENINFER_ETCD_USER
  value: {{ required "etcd.external.auth.username is required when auth is enabled" $auth.username | quote }}
# The password is a file of a Secret volume: never an argument, never in the environment.
- name: OPENINFER_ETCD_PASSWORD_FILE
  value: {{ include "openinfer.etcdPasswordDir" .root }}/{{ $auth.passwordKey }}
{{- end }}
{{- end }}

{{- define "openinfer.etcdPasswordDir" -}}/etc/openinfer/etcd-password{{- end }}

{{/* Volumes and mounts of the etcd client's Secrets: certificates when TLS is on, the
password when auth is. */}}
{{- define "openinfer.etcdTlsVolume" -}}
{{- $ext := .Values.etcd.external }}
{{- if and (eq .Values.etcd.mode "external") $ext.tls.enabled }}
- name: etcd-tls
  secret:
    secretName: {{ required "etcd.external.tls.secretName names the Secret with ca.crt (and tls.crt, tls.key)" $ext.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- if and (eq .Values.etcd.mode "external") $ext.auth.enabled }}
- name: etcd-password
  secret:
    secretName: {{ required "etcd.external.auth.secretName names the Secret that holds the etcd password" $ext.auth.secretName }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "openinfer.etcdTlsMount" -}}
{{- if and (eq .Values.etcd.mode "external") .Values.etcd.external.tls.enabled }}
- name: etcd-tls
  mountPath: {{ include "openinfer.etcdTlsDir" . }}
  readOnly: true
{{- end }}
{{- if and (eq .Values.etcd.mode "external") .Values.etcd.external.auth.enabled }}
- name: etcd-password
  mountPath: {{ include "openinfer.etcdPasswordDir" . }}
  readOnly: true
{{- end }}
{{- end }}

{{/*
Flags from a map of camelCase keys: every key whose value is set becomes --kebab-case=value,
in the map's (sorted) key order.
*/}}
{{- define "openinfer.flags" -}}
{{- range $k, $val := . }}
{{- if not (kindIs "invalid" $val) }}
- --{{ kebabcase $k }}={{ include "openinfer.scalar" $val }}
{{- end }}
{{- end }}
{{- end }}

{{/* A value as a flag wants it: whole numbers without an exponent (YAML numbers are floats). */}}
{{- define "openinfer.scalar" -}}
{{- if and (kindIs "float64" .) (eq (floor .) .) }}
{{- int64 . }}
{{- else }}
{{- . }}
{{- end }}
{{- end }}

{{/* The grace Kubernetes gives a pod to drain: (dict "drain" 30 "grace" nil "margin" 15 "what" "router"). */}}
{{- define "openinfer.grace" -}}
{{- if kindIs "invalid" .grace }}
{{- add .drain .margin }}
{{- else if le (int .grace) (int .drain) }}
{{- fail (printf "%s: terminationGracePeriodSeconds (%v) must be longer than the drain (%v s): Kubernetes would kill the pod before its drain ends" .what .grace .drain) }}
{{- else }}
{{- .grace }}
{{- end }}
{{- end }}

{{/*
Security (docs/security.md): where each Secret is mounted, the flags that read it, and the
volumes. Secrets are volumes, never environment variables, so rotations reach the processes.
*/}}
{{- define "openinfer.securityDir" -}}/etc/openinfer/security{{- end }}

{{- define "openinfer.workerTlsOn" -}}
{{- $t := .Values.security.workerTls }}
{{- if and $t.routerSecretName $t.workerSecretName }}true
{{- else if or $t.routerSecretName $t.workerSecretName }}
{{- fail "security.workerTls is mutual: set both routerSecretName and workerSecretName, or neither" }}
{{- end }}
{{- end }}

{{- define "openinfer.routerSecurityArgs" -}}
{{- $s := .Values.security }}
{{- $d := include "openinfer.securityDir" . }}
{{- if $s.tls.secretName }}
- --tls-cert={{ $d }}/tls/tls.crt
- --tls-key={{ $d }}/tls/tls.key
{{- if $s.tls.clientCaSecretName }}
- --tls-client-ca={{ $d }}/client-ca/ca.crt
{{- end }}
{{- else if $s.tls.clientCaSecretName }}
{{- fail "security.tls.clientCaSecretName needs security.tls.secretName (client certificates are checked over TLS)" }}
{{- end }}
{{- if include "openinfer.workerTlsOn" . }}
- --worker-tls-cert={{ $d }}/worker-tls/tls.crt
- --worker-tls-key={{ $d }}/worker-tls/tls.key
- --worker-tls-ca={{ $d }}/worker-tls/ca.crt
{{- with $s.workerTls.serverName }}
- --worker-tls-server-name={{ . }}
{{- end }}
{{- end }}
{{- if $s.tenants.secretName }}
- --tenants={{ $d }}/tenants/{{ $s.tenants.key }}
{{- end }}
{{- end }}

{{- define "openinfer.routerSecurityVolumes" -}}
{{- $s := .Values.security }}
{{- if $s.tls.secretName }}
- name: tls
  secret:
    secretName: {{ $s.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- if $s.tls.clientCaSecretName }}
- name: client-ca
  secret:
    secretName: {{ $s.tls.clientCaSecretName }}
    defaultMode: 0440
{{- end }}
{{- if include "openinfer.workerTlsOn" . }}
- name: worker-tls
  secret:
    secretName: {{ $s.workerTls.routerSecretName }}
    defaultMode: 0440
{{- end }}
{{- if $s.tenants.secretName }}
- name: tenants
  secret:
    secretName: {{ $s.tenants.secretName }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "openinfer.routerSecurityMounts" -}}
{{- $s := .Values.security }}
{{- $d := include "openinfer.securityDir" . }}
{{- range $name, $on := dict "tls" $s.tls.secretName "client-ca" $s.tls.clientCaSecretName "worker-tls" (include "openinfer.workerTlsOn" $) "tenants" $s.tenants.secretName }}
{{- if $on }}
- name: {{ $name }}
  mountPath: {{ $d }}/{{ $name }}
  readOnly: true
{{- end }}
{{- end }}
{{- end }}

{{- define "openinfer.workerSecurityArgs" -}}
{{- if include "openinfer.workerTlsOn" . }}
{{- $d := include "openinfer.securityDir" . }}
- --worker-tls-cert={{ $d }}/worker-tls/tls.crt
- --worker-tls-key={{ $d }}/worker-tls/tls.key
- --worker-tls-ca={{ $d }}/worker-tls/ca.crt
{{- end }}
{{- end }}

{{- define "openinfer.workerSecurityVolume" -}}
{{- if include "openinfer.workerTlsOn" . }}
- name: worker-tls
  secret:
    secretName: {{ .Values.security.workerTls.workerSecretName }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "openinfer.workerSecurityMount" -}}
{{- if include "openinfer.workerTlsOn" . }}
- name: worker-tls
  mountPath: {{ include "openinfer.securityDir" . }}/worker-tls
  readOnly: true
{{- end }}
{{- end }}

{{/* A probe of a gRPC port: grpc.health.v1 (with `service`), or, where the port speaks TLS
(kubelet's gRPC probes cannot), whether it accepts connections. */}}
{{- define "openinfer.probe" -}}
{{- if .tls }}
tcpSocket:
  port: {{ .port }}
{{- else }}
grpc:
  port: {{ .port }}
  {{- with .service }}
  service: {{ . }}
  {{- end }}
{{- end }}
{{- end }}
