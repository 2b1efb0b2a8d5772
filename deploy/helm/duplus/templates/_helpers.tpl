{{/* Names ------------------------------------------------------------------------------------ */}}

{{- define "duplus.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* <release>, or <release>-<chart> when the release name does not contain the chart's name */}}
{{- define "duplus.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "duplus.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* labels: (dict "ctx" $ "component" "triton") */}}
{{- define "duplus.selectorLabels" -}}
app.kubernetes.io/name: {{ include "duplus.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "duplus.labels" -}}
{{ include "duplus.selectorLabels" . }}
helm.sh/chart: {{ include "duplus.chart" .ctx }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: duplus
{{- if .ctx.Chart.AppVersion }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
{{- end }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "duplus.image" -}}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) -}}
{{- end -}}

{{/* Triton -------------------------------------------------------------------------------------- */}}

{{- define "duplus.triton.fullname" -}}
{{- printf "%s-triton" (include "duplus.fullname" .) -}}
{{- end -}}

{{- define "duplus.triton.headless" -}}
{{- printf "%s-triton-headless" (include "duplus.fullname" .) -}}
{{- end -}}

{{/* The launcher's --model-repository; fails unless exactly one source is chosen */}}
{{- define "duplus.modelRepository" -}}
{{- $m := .Values.modelRepository -}}
{{- $n := 0 -}}
{{- if $m.pvc.claimName }}{{ $n = add1 $n }}{{ end -}}
{{- if $m.uri }}{{ $n = add1 $n }}{{ end -}}
{{- if $m.inImage }}{{ $n = add1 $n }}{{ end -}}
{{- if ne (int $n) 1 -}}
{{- fail (printf "modelRepository: set exactly one of pvc.claimName, uri or inImage (got %d): the Triton pods need one model repository" (int $n)) -}}
{{- end -}}
{{- if $m.uri -}}
{{- if not (regexMatch "^(s3|gs|as)://.+" $m.uri) -}}
{{- fail (printf "modelRepository.uri must be s3://..., gs://... or as://..., got %q" $m.uri) -}}
{{- end -}}
{{- $m.uri -}}
{{- else -}}
{{- $m.mountPath -}}
{{- end -}}
{{- end -}}

{{/* Checks that a JSON schema cannot express; rendered (as nothing) by the Triton Deployment */}}
{{- define "duplus.validate" -}}
{{- $t := .Values.triton -}}
{{- $a := $t.autoscaling -}}
{{- if and $a.enabled (lt (int $a.maxReplicas) (int $a.minReplicas)) -}}
{{- fail (printf "triton.autoscaling: maxReplicas (%d) must be >= minReplicas (%d)" (int $a.maxReplicas) (int $a.minReplicas)) -}}
{{- end -}}
{{- $budget := mul (int $t.startupProbe.periodSeconds) (int $t.startupProbe.failureThreshold) -}}
{{- if lt (int $budget) (int $t.readyTimeoutS) -}}
{{- fail (printf "triton.startupProbe: periodSeconds x failureThreshold = %d s is shorter than triton.readyTimeoutS = %d s: Kubernetes would restart the pod while its models still load" (int $budget) (int $t.readyTimeoutS)) -}}
{{- end -}}
{{- if le (int $t.terminationGracePeriodSeconds) (add (int $t.preStopSleepS) 30) -}}
{{- fail (printf "triton.terminationGracePeriodSeconds (%d) must exceed preStopSleepS + 30 (%d): the launcher waits up to 30 s for Triton to finish the requests in flight" (int $t.terminationGracePeriodSeconds) (add (int $t.preStopSleepS) 30)) -}}
{{- end -}}
{{- $r := .Values.dicomNode.receiver -}}
{{- if le (int $r.terminationGracePeriodSeconds) (int $r.preStopSleepS) -}}
{{- fail (printf "dicomNode.receiver.terminationGracePeriodSeconds (%d) must exceed its preStopSleepS (%d)" (int $r.terminationGracePeriodSeconds) (int $r.preStopSleepS)) -}}
{{- end -}}
{{- if and .Values.modelRepository.uri .Values.modelRepository.credentials.gcsKeySecret (not (hasPrefix "gs://" .Values.modelRepository.uri)) -}}
{{- fail "modelRepository.credentials.gcsKeySecret is for a gs:// repository" -}}
{{- end -}}
{{- end -}}

{{/* The DICOM node ------------------------------------------------------------------------------ */}}

{{- define "duplus.queueUrl" -}}
{{- $p := .Values.postgresql -}}
{{- $url := printf "postgresql://%s@%s:%d/%s" $p.user $p.host (int $p.port) $p.database -}}
{{- if $p.options }}{{ $url = printf "%s?%s" $url $p.options }}{{ end -}}
{{- $url -}}
{{- end -}}

{{/* the default triton_url: the headless Service through gRPC's DNS resolver (gRPC balances its addresses) */}}
{{- define "duplus.tritonUrl" -}}
{{- printf "dns:///%s.%s.svc.%s:%d" (include "duplus.triton.headless" .) .Release.Namespace .Values.clusterDomain (int .Values.triton.ports.grpc) -}}
{{- end -}}

{{/* the node configuration of one role: (dict "ctx" $ "role" "receiver"|"worker") */}}
{{- define "duplus.nodeConfig" -}}
{{- $v := .ctx.Values -}}
{{- $cfg := deepCopy $v.dicomNode.config -}}
{{- range $key := list "host" "port" "metrics_port" "workdir" "queue_url" "triton_url" "receive" "workers" -}}
{{- if hasKey $cfg $key -}}
{{- fail (printf "dicomNode.config.%s is written by the chart (host 0.0.0.0; port: dicomNode.port; metrics_port: dicomNode.metricsPort; workdir: spool.mountPath; queue_url: postgresql.*; triton_url: dicomNode.tritonUrl; receive and workers: receivers take C-STOREs with workers 0, workers have receive false and dicomNode.worker.workers)" $key) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $cfg "host" "0.0.0.0" -}}
{{- $_ := set $cfg "port" (int $v.dicomNode.port) -}}
{{- $_ := set $cfg "metrics_port" (int $v.dicomNode.metricsPort) -}}
{{- $_ := set $cfg "workdir" $v.spool.mountPath -}}
{{- $_ := set $cfg "queue_url" (include "duplus.queueUrl" .ctx) -}}
{{- $_ := set $cfg "triton_url" ($v.dicomNode.tritonUrl | default (include "duplus.tritonUrl" .ctx)) -}}
{{- if eq .role "receiver" -}}
{{- $_ := set $cfg "receive" true -}}
{{- $_ := set $cfg "workers" 0 -}}
{{- else -}}
{{- $_ := set $cfg "receive" false -}}
{{- $_ := set $cfg "workers" (int $v.dicomNode.worker.workers) -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{- define "duplus.spoolClaim" -}}
{{- default (printf "%s-spool" (include "duplus.fullname" .)) .Values.spool.existingClaim -}}
{{- end -}}

{{/* the PGPASSWORD env of both roles: a reference to the existing Secret, never a value */}}
{{- define "duplus.pgPasswordEnv" -}}
- name: PGPASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.postgresql.existingSecret }}
      key: {{ .Values.postgresql.existingSecretKey }}
{{- end -}}

{{/* the pod template of one DICOM node role: (dict "ctx" $ "role" "receiver"|"worker") */}}
{{- define "duplus.nodePodTemplate" -}}
{{- $ := .ctx -}}
{{- $n := $.Values.dicomNode -}}
{{- $r := index $n .role -}}
{{- $ctx := dict "ctx" $ "component" (printf "dicom-%s" .role) -}}
metadata:
  labels:
    {{- include "duplus.selectorLabels" $ctx | nindent 4 }}
  annotations:
    checksum/config: {{ include "duplus.nodeConfig" (dict "ctx" $ "role" .role) | sha256sum }}
    {{- with $r.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  automountServiceAccountToken: false
  {{- with $.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  terminationGracePeriodSeconds: {{ $r.terminationGracePeriodSeconds }}
  {{- with $n.podSecurityContext }}
  securityContext:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: dicom-node
      image: {{ include "duplus.image" (dict "ctx" $ "image" $n.image) | quote }}
      imagePullPolicy: {{ $n.image.pullPolicy }}
      command: ["python", "-m", "clients", "dicom-node", "--config", "/etc/duplus/dicom_node.yaml"]
      ports:
        {{- if eq .role "receiver" }}
        - {name: dicom, containerPort: {{ $n.port }}, protocol: TCP}
        {{- end }}
        - {name: metrics, containerPort: {{ $n.metricsPort }}, protocol: TCP}
      env:
        - {name: PYTHONUNBUFFERED, value: "1"}
        {{- include "duplus.pgPasswordEnv" $ | nindent 8 }}
        {{- with $n.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      # /healthz: 200 while the SCP listens (receivers) and every worker thread is alive (workers)
      readinessProbe:
        httpGet: {path: /healthz, port: metrics}
        periodSeconds: 5
        failureThreshold: 2
        timeoutSeconds: 3
      livenessProbe:
        httpGet: {path: /healthz, port: metrics}
        initialDelaySeconds: 20
        periodSeconds: 10
        failureThreshold: 3
        timeoutSeconds: 3
      {{- if eq .role "receiver" }}
      lifecycle:
        # the pod already left the DICOM Service's endpoints; finish the associations in flight
        preStop:
          exec:
            command: ["sleep", {{ $r.preStopSleepS | quote }}]
      {{- end }}
      resources:
        {{- toYaml $r.resources | nindent 8 }}
      {{- with $n.securityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      volumeMounts:
        - {name: config, mountPath: /etc/duplus, readOnly: true}
        - {name: spool, mountPath: {{ $.Values.spool.mountPath }}}
        - {name: tmp, mountPath: /tmp}
  volumes:
    - name: config
      configMap:
        name: {{ include "duplus.fullname" $ }}-dicom-{{ .role }}
    - name: spool
      persistentVolumeClaim:
        claimName: {{ include "duplus.spoolClaim" $ }}
    - name: tmp
      emptyDir: {}
  {{- with $r.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $r.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $r.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}
