{{/* The chart name (nameOverride wins). */}}
{{- define "vmnic.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The name of every object: fullnameOverride, else the release name when it
contains the chart name, else <release>-<chart>.
*/}}
{{- define "vmnic.fullname" -}}
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

{{- define "vmnic.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "vmnic.labels" -}}
helm.sh/chart: {{ include "vmnic.chart" . }}
{{ include "vmnic.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vmnic
{{- end }}

{{/* The DaemonSet's selector: never changes across upgrades. */}}
{{- define "vmnic.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vmnic.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node
{{- end }}

{{- define "vmnic.serviceAccountName" -}}
{{- default (include "vmnic.fullname" .) .Values.serviceAccount.name }}
{{- end }}

{{/* The user name of the daemon's service-account tokens. */}}
{{- define "vmnic.serviceAccountUser" -}}
{{- printf "system:serviceaccount:%s:%s" .Release.Namespace (include "vmnic.serviceAccountName" .) }}
{{- end }}

{{- define "vmnic.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Where the host's CNI directories are mounted in the containers. */}}
{{- define "vmnic.cniBinMount" -}}/host/opt/cni/bin{{- end }}
{{- define "vmnic.cniConfMount" -}}/host/etc/cni/net.d{{- end }}

{{/* The containers' security context (values: securityContext). */}}
{{- define "vmnic.securityContext" -}}
readOnlyRootFilesystem: true
{{- if .Values.securityContext.privileged }}
privileged: true
{{- else }}
privileged: false
allowPrivilegeEscalation: false
capabilities:
  drop: [ALL]
  add:
    {{- toYaml .Values.securityContext.capabilities | nindent 4 }}
{{- end }}
{{- end }}

{{/*
The merge patch that registers vmnic's binding in the KubeVirt CR: a tap
attachment (KubeVirt hands QEMU the tap vmnic created and touches nothing
in the pod) with migration enabled. A merge patch, not a JSON patch: "add"
at /spec/configuration/network/binding/<name> fails when the CR has no
network section yet.
*/}}
{{- define "vmnic.bindingPatch" -}}
{{- $binding := dict .Values.kubevirt.binding.name (dict "domainAttachmentType" "tap" "migration" (dict)) }}
{{- dict "spec" (dict "configuration" (dict "network" (dict "binding" $binding))) | toJson }}
{{- end }}
