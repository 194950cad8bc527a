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

{{/* The volume of the i-th entry of cni.netnsDirs: netns, run-netns, netns-2, ... (the first two keep the names of the chart's earlier fixed pair). */}}
{{- define "vmnic.netnsVolume" -}}
{{- if eq (int .) 0 }}netns{{ else if eq (int .) 1 }}run-netns{{ else }}netns-{{ . }}{{ end }}
{{- end }}

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

{{/*
Checks the metrics values, and that daemon.extraArgs does not set
--metrics-addr behind the probes' back; fails the render with the reason.
*/}}
{{- define "vmnic.validateMetrics" -}}
{{- $m := .Values.metrics }}
{{- if not (has $m.bind (list "loopback" "hostIP")) }}
{{- fail (printf "metrics.bind: %q is neither loopback nor hostIP" (toString $m.bind)) }}
{{- end }}
{{- $port := int $m.port }}
{{- if or (lt $port 1) (gt $port 65535) (ne (toString $m.port) (toString $port)) }}
{{- fail (printf "metrics.port: %q is not a port number (1-65535)" (toString $m.port)) }}
{{- end }}
{{- $scrapers := dict "prometheusAnnotations" $m.prometheusAnnotations "serviceMonitor.enabled" $m.serviceMonitor.enabled }}
{{- range $name, $on := $scrapers }}
{{- if and $on (not $m.enabled) }}
{{- fail (printf "metrics.%s needs metrics.enabled=true" $name) }}
{{- end }}
{{- if and $on (ne $m.bind "hostIP") }}
{{- fail (printf "metrics.%s needs metrics.bind=hostIP: bound to %s the endpoint cannot be scraped from off the node" $name $m.bind) }}
{{- end }}
{{- end }}
{{- range .Values.daemon.extraArgs }}
{{- if regexMatch "^--?metrics-addr(=|$)" (toString .) }}
{{- fail (printf "daemon.extraArgs: %q: set metrics.enabled, metrics.bind and metrics.port instead (the probes follow them)" (toString .)) }}
{{- end }}
{{- end }}
{{- end }}

{{/* vmnicd's --metrics-addr: empty turns the endpoint off. */}}
{{- define "vmnic.metricsAddr" -}}
{{- if .Values.metrics.enabled }}
{{- if eq .Values.metrics.bind "hostIP" }}
{{- /* Brackets: an IPv6 host IP needs them, an IPv4 one takes them. */}}
{{- printf "[$(HOST_IP)]:%d" (int .Values.metrics.port) }}
{{- else }}
{{- printf "127.0.0.1:%d" (int .Values.metrics.port) }}
{{- end }}
{{- end }}
{{- end }}

{{/*
An httpGet probe on the metrics endpoint: the path, then the probe's values
but "enabled" (and "httpGet", which is the chart's). On loopback kubelet (in the host's network namespace)
must ask 127.0.0.1; on hostIP it asks the pod IP, which on the host network
is the node's IP.
*/}}
{{- define "vmnic.probe" -}}
{{- $root := index . 0 -}}
httpGet:
  path: {{ index . 1 }}
  port: {{ int $root.Values.metrics.port }}
  {{- if eq $root.Values.metrics.bind "loopback" }}
  host: 127.0.0.1
  {{- end }}
  scheme: HTTP
{{- with omit (index . 2) "enabled" "httpGet" }}
{{ toYaml . }}
{{- end }}
{{- end }}
