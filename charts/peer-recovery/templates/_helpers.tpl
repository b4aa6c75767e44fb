{{/* The chart's full name: the release name, unless it already contains the chart name. */}}
{{- define "peer-recovery.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Selector labels: name and instance only, so they never change across upgrades. */}}
{{- define "peer-recovery.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
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
