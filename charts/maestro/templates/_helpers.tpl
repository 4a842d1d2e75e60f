{{/* Chart name, cut to the 63 characters a label value allows. */}}
{{- define "maestro.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects. */}}
{{- define "maestro.fullname" -}}
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

{{- define "maestro.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "maestro.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: maestro
{{- end }}

{{- define "maestro.selectorLabels" -}}
app.kubernetes.io/name: {{ include "maestro.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "maestro.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "maestro.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "maestro.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{- define "maestro.postgresql.fullname" -}}
{{- printf "%s-postgresql" (include "maestro.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Secret and key holding the database URL. */}}
{{- define "maestro.database.secretName" -}}
{{- if .Values.postgresql.enabled }}
{{- include "maestro.postgresql.fullname" . }}
{{- else }}
{{- required "database.existingSecret: name a Secret holding the database URL (or set postgresql.enabled=true to evaluate)" .Values.database.existingSecret }}
{{- end }}
{{- end }}

{{- define "maestro.database.secretKey" -}}
{{- if .Values.postgresql.enabled }}url{{ else }}{{ .Values.database.secretKey }}{{ end }}
{{- end }}

{{/*
The operator's permissions, shared by the ClusterRole (cluster-wide) and the
per-namespace Roles. Each rule names the call that needs it.
*/}}
{{- define "maestro.rbac.namespacedRules" -}}
# Kopf watches Workflows (only read: their conditions go through workflows/status).
- apiGroups: [maestro.dev]
  resources: [workflows]
  verbs: [get, list, watch]
# Each replica's supervisor lists and watches the runs, and adds and removes its own
# finalizer (maestro.dev/finalizer) with a patch: patch, no update.
- apiGroups: [maestro.dev]
  resources: [workflowruns]
  verbs: [get, list, watch, patch]
# Conditions and run progress.
- apiGroups: [maestro.dev]
  resources: [workflows/status, workflowruns/status]
  verbs: [get, patch]
# WorkflowSchedules: Kopf runs a daemon per schedule (patch: its finalizer); the
# daemon creates the schedule's runs, cancels them (Replace, a spec patch) and deletes
# those beyond the history limits (delete, below).
- apiGroups: [maestro.dev]
  resources: [workflowschedules]
  verbs: [get, list, watch, patch]
- apiGroups: [maestro.dev]
  resources: [workflowschedules/status]
  verbs: [get, patch]
- apiGroups: [maestro.dev]
  resources: [workflowruns]
  verbs: [create]
# ttlSecondsAfterFinished.
- apiGroups: [maestro.dev]
  resources: [workflowruns]
  verbs: [delete]
# Workspaces: one claim per workspace per run, created when the run starts (only if the
# run's ServiceAccount may create claims itself). No delete: Delete-policy claims are
# owned by the WorkflowRun and garbage-collected with it.
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [create]
# One pod per container task attempt, watched (its phase and termination message are
# the attempt's result) and deleted on cancel or timeout.
- apiGroups: [""]
  resources: [pods]
  verbs: [create, get, list, watch, delete]
- apiGroups: [""]
  resources: [pods/log]
  verbs: [get]
# Header values of HTTP tasks (secretKeyRef), read only after a LocalSubjectAccessReview
# says the run's own ServiceAccount may get that Secret (docs/security.md).
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
- apiGroups: [authorization.k8s.io]
  resources: [localsubjectaccessreviews]
  verbs: [create]
# Events on each run transition.
- apiGroups: [""]
  resources: [events]
  verbs: [create, patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}

{{/* Port of /metrics and /readyz: operator.metricsPort, or the probe port when 0. */}}
{{- define "maestro.metricsPort" -}}
{{- if .Values.operator.metricsPort }}{{ .Values.operator.metricsPort }}{{ else }}{{ .Values.operator.port }}{{ end }}
{{- end }}

{{/* The server's labels: the operator's, with component "server" (disjoint selectors). */}}
{{- define "maestro.server.selectorLabels" -}}
app.kubernetes.io/name: {{ include "maestro.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{- define "maestro.server.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "maestro.server.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: maestro
{{- end }}
