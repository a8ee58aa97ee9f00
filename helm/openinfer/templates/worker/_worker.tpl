{{/*
One entry of `workers`, merged over `workerDefaults` key by key, with what the templates
derive from it (keys starting with `_`). Fills .out: (dict "root" $ "entry" $entry "out" $w).
*/}}
{{- define "openinfer.worker" -}}
{{- $root := .root }}
{{- $w := .out }}
{{- range $k, $v := deepCopy $root.Values.workerDefaults }}
{{- $_ := set $w $k $v }}
{{- end }}
{{- range $k, $v := .entry }}
{{- $_ := set $w $k $v }}
{{- end }}
{{- $tp := int $w.tensorParallelSize }}
{{- $perPod := $tp }}
{{- if not (kindIs "invalid" $w.gpusPerPod) }}
{{- $perPod = int $w.gpusPerPod }}
{{- end }}
{{- if or (lt $perPod 1) (gt $perPod $tp) (ne (mod $tp $perPod) 0) }}
{{- fail (printf "workers[%s]: gpusPerPod %d must divide tensorParallelSize %d (each pod of a group holds the same number of ranks)" $w.name $perPod $tp) }}
{{- end }}
{{- $name := printf "%s-%s" (include "openinfer.fullname" $root) $w.name }}
{{- if gt (len $name) 48 }}
{{- fail (printf "workers[%s]: the object name %s is %d characters; Kubernetes allows 48 here (LeaderWorkerSet pod names and labels): shorten the release or the worker's name" $w.name $name (len $name)) }}
{{- end }}
{{- $_ := set $w "_name" $name }}
{{- $_ := set $w "_tp" $tp }}
{{- $_ := set $w "_perPod" $perPod }}
{{- $_ := set $w "_pods" (div $tp $perPod) }}
{{- $_ := set $w "_cuda" (eq $w.device "cuda") }}
{{- $_ := set $w "_model" (default $w.name $w.servedModelName) }}
{{- $_ := set $w "_grace" (include "openinfer.grace" (dict "drain" $w.drainGraceSeconds "grace" $w.terminationGracePeriodSeconds "margin" 30 "what" (printf "workers[%s]" $w.name))) }}
{{- end }}

{{/* Labels that select one worker entry's pods: (dict "root" $ "w" $w). */}}
{{- define "openinfer.workerSelectorLabels" -}}
{{ include "openinfer.selectorLabels" (dict "root" .root "component" "worker") }}
openinfer.io/worker: {{ .w.name }}
{{- end }}

{{- define "openinfer.workerLabels" -}}
{{ include "openinfer.labels" (dict "root" .root "component" "worker") }}
openinfer.io/worker: {{ .w.name }}
{{- /* A label value: [A-Za-z0-9._-], at most 63, alphanumeric at both ends. */}}
openinfer.io/model: {{ regexReplaceAll "[^A-Za-z0-9._-]+" .w._model "_" | trunc 63 | trimAll "_.-" | quote }}
{{- end }}

{{/* Where the model directory is inside the container. */}}
{{- define "openinfer.modelDir" -}}
{{- $m := .model }}
{{- if $m.preset }}
{{- printf "/models/%s" $m.preset }}
{{- else if $m.image }}
{{- "/models" }}
{{- else }}
{{- printf "/models/%s" (default "" $m.path) | trimSuffix "/" }}
{{- end }}
{{- end }}

{{/*
A worker pod: (dict "root" $ "w" $w "role" "whole"|"leader"|"follower").
whole: a Deployment's pod (the whole group, tp ranks in one pod, or tp = 1);
leader: pod 0 of a LeaderWorkerSet group (holds rank 0: gRPC, registration, probes);
follower: the other pods of the group (only ranks that follow rank 0).
*/}}
{{- define "openinfer.workerPod" -}}
{{- $root := .root }}
{{- $w := .w }}
{{- $v := $root.Values }}
{{- $serves := ne .role "follower" }}
{{- $flavor := ternary "cuda" "cpu" $w._cuda -}}
metadata:
  labels:
    {{- include "openinfer.workerLabels" (dict "root" $root "w" $w) | nindent 4 }}
    {{- if ne .role "whole" }}
    openinfer.io/role: {{ .role }}
    {{- end }}
    {{- with $w.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $w.podAnnotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  serviceAccountName: {{ include "openinfer.serviceAccountName" $root }}
  automountServiceAccountToken: false
  {{- with $v.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $v.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ $w._grace }}
  {{- with $w.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  {{- with $w.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- $m := $w.model }}
  {{- if or $m.preset $m.image }}
  initContainers:
    {{- if $m.preset }}
    # The random-weight demo model, made in the pod (no network).
    - name: make-model
      image: {{ include "openinfer.image" (dict "root" $root "flavor" $flavor) }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      args:
        - make-model
        - --preset={{ $m.preset }}
        - --out={{ include "openinfer.modelDir" $w }}
    {{- else }}
    # The model directory, copied out of its image.
    - name: copy-model
      image: {{ $m.image.reference }}
      {{- with $m.image.pullPolicy }}
      imagePullPolicy: {{ . }}
      {{- end }}
      command: [cp, -R, {{ printf "%s/." (trimSuffix "/" $m.image.path) | quote }}, /models/]
    {{- end }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      volumeMounts:
        - name: model
          mountPath: /models
  {{- end }}
  containers:
    - name: worker
      image: {{ include "openinfer.image" (dict "root" $root "flavor" $flavor) }}
      imagePullPolicy: {{ $v.image.pullPolicy }}
      args:
        - worker
        - --model={{ include "openinfer.modelDir" $w }}
        - --served-model-name={{ $w._model }}
        - --device={{ $w.device }}
        {{- with $w.dtype }}
        - --dtype={{ . }}
        {{- end }}
        {{- with $w.kvCacheMemory }}
        - --kv-cache-memory={{ . }}
        {{- end }}
        {{- with $w.kvCacheDtype }}
        - --kv-cache-dtype={{ . }}
        {{- end }}
        {{- if gt $w._tp 1 }}
        - --tp={{ $w._tp }}
        {{- end }}
        - --listen=0.0.0.0:{{ $w.grpcPort }}
        - --metrics-listen=0.0.0.0:{{ $w.metricsPort }}
        {{- include "openinfer.registryArgs" $root | nindent 8 }}
        - --drain-grace={{ $w.drainGraceSeconds }}s
        {{- with include "openinfer.workerSecurityArgs" $root }}{{ . | nindent 8 }}{{- end }}
        {{- with include "openinfer.flags" $w.flags }}{{ . | nindent 8 }}{{- end }}
        {{- with $w.extraArgs }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      env:
        {{- include "openinfer.commonEnv" (dict "root" $root "service" "openinfer-worker") | nindent 8 }}
        # Routers dial the pod's IP; the group is named for the pod (its leader's, in a
        # LeaderWorkerSet).
        - name: OPENINFER_ADVERTISE_ADDR
          value: $(POD_IP)
        {{- if eq .role "follower" }}
        - name: OPENINFER_GROUP_ID
          valueFrom:
            fieldRef:
              fieldPath: metadata.annotations['leaderworkerset.sigs.k8s.io/leader-name']
        {{- else }}
        - name: OPENINFER_GROUP_ID
          value: $(POD_NAME)
        {{- end }}
        {{- if $w._cuda }}
        # The root filesystem is read-only: CUDA's kernel cache goes to /tmp.
        - name: CUDA_CACHE_PATH
          value: /tmp/cuda-cache
        {{- end }}
        {{- if ne .role "whole" }}
        # The LeaderWorkerSet controller sets LWS_GROUP_SIZE (pods in the group) and
        # LWS_WORKER_INDEX (this pod's index, 0 for the leader); ranks listen on the pod's IP
        # and meet through etcd under the group id.
        - name: OPENINFER_TP_NODES
          value: $(LWS_GROUP_SIZE)
        - name: OPENINFER_TP_NODE_RANK
          value: $(LWS_WORKER_INDEX)
        - name: OPENINFER_TP_LISTEN
          value: $(POD_IP)
        {{- end }}
        {{- with $w.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- if $serves }}
      ports:
        - name: grpc
          containerPort: {{ $w.grpcPort }}
          protocol: TCP
        - name: metrics
          containerPort: {{ $w.metricsPort }}
          protocol: TCP
      # grpc.health.v1 (docs/deploy.md): the port opens once the model has loaded and warmed
      # up; "" is SERVING until the drain; openinfer.worker.v1.Worker is SERVING once the
      # worker is in the registry, until the drain.
      {{- $tls := include "openinfer.workerTlsOn" $root }}
      startupProbe:
        {{- include "openinfer.probe" (dict "tls" $tls "port" $w.grpcPort) | nindent 8 }}
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: {{ max 1 (div (add $w.startupTimeoutSeconds 9) 10) }}
      livenessProbe:
        {{- include "openinfer.probe" (dict "tls" $tls "port" $w.grpcPort) | nindent 8 }}
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 3
      readinessProbe:
        {{- include "openinfer.probe" (dict "tls" $tls "port" $w.grpcPort "service" "openinfer.worker.v1.Worker") | nindent 8 }}
        periodSeconds: 5
        timeoutSeconds: 3
        failureThreshold: 2
      {{- end }}
      {{- $res := deepCopy (default dict $w.resources) }}
      {{- if $w._cuda }}
      {{- $limits := default dict $res.limits }}
      {{- $_ := set $limits "nvidia.com/gpu" $w._perPod }}
      {{- $_ := set $res "limits" $limits }}
      {{- end }}
      {{- with $res }}
      resources:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $v.securityContext | nindent 8 }}
      volumeMounts:
        - name: model
          mountPath: /models
          readOnly: true
        - name: tmp
          mountPath: /tmp
        {{- if $w._cuda }}
        - name: shm
          mountPath: /dev/shm
        {{- end }}
        {{- with include "openinfer.etcdTlsMount" $root }}{{ . | nindent 8 }}{{- end }}
        {{- with include "openinfer.workerSecurityMount" $root }}{{ . | nindent 8 }}{{- end }}
        {{- with $w.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
  volumes:
    - name: model
      {{- if $m.pvc }}
      persistentVolumeClaim:
        claimName: {{ $m.pvc.claimName }}
        readOnly: true
      {{- else if $m.hostPath }}
      hostPath:
        path: {{ $m.hostPath.path }}
        type: Directory
      {{- else }}
      emptyDir: {}
      {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: 256Mi
    {{- if $w._cuda }}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $w.shmSize }}
    {{- end }}
    {{- with include "openinfer.etcdTlsVolume" $root }}{{ . | nindent 4 }}{{- end }}
    {{- with include "openinfer.workerSecurityVolume" $root }}{{ . | nindent 4 }}{{- end }}
    {{- with $w.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with $w.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $w.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $w.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $w.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
