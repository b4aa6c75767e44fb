{{/* The chart's name: nameOverride when set. */}}
{{- define "peer-recovery.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The chart's full name, prefix of every object's name: fullnameOverride when set, else
the release name, unless it already contains the chart's name. */}}
{{- define "peer-recovery.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "peer-recovery.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Selector labels: name and instance only, so they never change across upgrades. */}}
{{- define "peer-recovery.selectorLabels" -}}
app.kubernetes.io/name: {{ include "peer-recovery.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The full label set of every object. */}}
{{- define "peer-recovery.labels" -}}
{{ include "peer-recovery.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "peer-recovery.serviceAccountName" -}}
{{- default (include "peer-recovery.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{/* The operator's image reference: repository, then ":tag" (the chart's appVersion when
the tag is empty), then "@digest" when a digest pins it. */}}
{{- define "peer-recovery.operatorImage" -}}
{{- $image := .Values.operator.image -}}
{{- $ref := printf "%s:%s" $image.repository (default .Chart.AppVersion $image.tag) -}}
{{- if $image.digest -}}
{{- $ref = printf "%s@%s" $ref $image.digest -}}
{{- end -}}
{{- $ref -}}
{{- end -}}
