{{/*
Names and labels, as `helm create` makes them.
*/}}
{{- define "fsp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fsp.fullname" -}}
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

{{- define "fsp.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "fsp.labels" -}}
helm.sh/chart: {{ include "fsp.chart" . }}
{{ include "fsp.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "fsp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fsp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "fsp.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "fsp.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Where things are in the pod. Every file the configuration names lives under one of
these directories; each directory is one whole volume (never a subPath), so that the
kubelet's atomic symlink swap of an updated Secret reaches the running gateway, which
watches its certificate files.
*/}}
{{- define "fsp.configDir" -}}/etc/fsp{{- end }}
{{- define "fsp.secretsDir" -}}/var/run/secrets/fsp{{- end }}
{{- define "fsp.stateDir" -}}/var/lib/fsp{{- end }}

{{/* The Secret this chart makes from literal values (admin tokens, backend URLs). */}}
{{- define "fsp.secretName" -}}{{ include "fsp.fullname" . }}{{- end }}

{{/* The Secret holding the consumer CA (and CRLs): its own, or the listener's. */}}
{{- define "fsp.clientCaSecret" -}}
{{- default .Values.listener.tls.existingSecret .Values.listener.clientCa.existingSecret }}
{{- end }}

{{/* True ("true") when the consumer CA comes from a Secret other than the listener's. */}}
{{- define "fsp.clientCaSeparate" -}}
{{- if ne (include "fsp.clientCaSecret" .) .Values.listener.tls.existingSecret }}true{{ end }}
{{- end }}

{{- define "fsp.clientCaDir" -}}
{{- if include "fsp.clientCaSeparate" . }}{{ include "fsp.secretsDir" . }}/client-ca{{ else }}{{ include "fsp.secretsDir" . }}/listener{{ end }}
{{- end }}

{{/*
A backend URL (`audit.postgres`, `throttle.redis`, `cluster.redis`): the Secret and key
that hold it. Called with (list $ <the values map> <key in the chart's Secret>).
*/}}
{{- define "fsp.urlSecretName" -}}
{{- $root := index . 0 }}{{ $v := index . 1 }}
{{- if $v.existingSecret }}{{ $v.existingSecret }}{{ else }}{{ include "fsp.secretName" $root }}{{ end }}
{{- end }}
{{- define "fsp.urlSecretKey" -}}
{{- $v := index . 1 }}
{{- if $v.existingSecret }}{{ $v.existingSecretKey }}{{ else }}{{ index . 2 }}{{ end }}
{{- end }}

{{/* Which backends are in use. */}}
{{- define "fsp.auditPostgres" -}}{{ if eq .Values.audit.backend "postgres" }}true{{ end }}{{- end }}
{{- define "fsp.throttleRedis" -}}{{ if eq .Values.throttle.backend "redis" }}true{{ end }}{{- end }}
{{- define "fsp.clusterRedis" -}}{{ if .Values.cluster.enabled }}true{{ end }}{{- end }}

{{/* True when the admin tokens file is mounted, and where it comes from. */}}
{{- define "fsp.adminTokens" -}}
{{- if or .Values.admin.tokens.existingSecret .Values.admin.tokens.values }}true{{ end }}
{{- end }}

{{/*
A TOML value from a values scalar or list. JSON strings, numbers, booleans and arrays
of those are valid TOML; maps are not, and the schema refuses them.
*/}}
{{- define "fsp.toml" -}}
{{- toJson . }}
{{- end }}

{{/* The replica count the throttle's local fallback divides the limits by. */}}
{{- define "fsp.throttleReplicas" -}}
{{- if .Values.throttle.replicas }}{{ .Values.throttle.replicas | int }}
{{- else if .Values.autoscaling.enabled }}{{ .Values.autoscaling.minReplicas | int }}
{{- else }}{{ .Values.replicaCount | int }}{{ end }}
{{- end }}

{{/* The grace period: the shutdown delay and the drain, plus a margin to flush the audit trail. */}}
{{- define "fsp.terminationGracePeriod" -}}
{{- if .Values.terminationGracePeriodSeconds }}{{ .Values.terminationGracePeriodSeconds | int }}
{{- else }}{{ add (.Values.listener.shutdownDelaySeconds | int) (.Values.listener.drainTimeoutSeconds | int) 15 }}{{ end }}
{{- end }}

{{/* TLS to Redis as an inline table: (list secretsDir mountName tlsValues). */}}
{{- define "fsp.redisTls" -}}
{{- $dir := printf "%s/%s" (index . 0) (index . 1) -}}
{{- $tls := index . 2 -}}
{{- $parts := list -}}
{{- if ne $tls.caCertificate false }}{{ $parts = append $parts (printf "ca = \"%s/ca.crt\"" $dir) }}{{ end -}}
{{- if $tls.clientCertificate }}{{ $parts = append $parts (printf "cert = \"%s/tls.crt\", key = \"%s/tls.key\"" $dir $dir) }}{{ end -}}
{ {{ join ", " $parts }} }
{{- end }}
