{{/*
The chart name, or nameOverride.
*/}}
{{- define "audience-token-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects: fullnameOverride, else <release>-<name>, else
<release> when the release name already contains the chart name. 63 characters at most
(some Kubernetes name fields are DNS labels).
*/}}
{{- define "audience-token-operator.fullname" -}}
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

{{/*
<chart>-<version>, for the helm.sh/chart label.
*/}}
{{- define "audience-token-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "audience-token-operator.labels" -}}
helm.sh/chart: {{ include "audience-token-operator.chart" . }}
{{ include "audience-token-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: audience-token-operator
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels: what the Deployment, Service and PodDisruptionBudget select the pods by.
*/}}
{{- define "audience-token-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "audience-token-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The ServiceAccount's name.
*/}}
{{- define "audience-token-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "audience-token-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The image reference: repository@digest when a digest is set, else repository:tag (tag
defaulting to the chart's appVersion).
*/}}
{{- define "audience-token-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
Where ClusterTokenIssuers' Secrets live: clusterResourceNamespace, else the release
namespace.
*/}}
{{- define "audience-token-operator.clusterResourceNamespace" -}}
{{- default .Release.Namespace .Values.clusterResourceNamespace }}
{{- end }}

{{/*
The name of an RBAC object in `namespace` (empty: cluster-scoped). Objects in the release
namespace take the full name; cluster-scoped objects and Roles in other namespaces also
carry the release namespace, so that two releases of the same name in different
namespaces (one per watched namespace, say) do not claim the same object.
Call with (dict "ctx" $ "namespace" $ns).
*/}}
{{- define "audience-token-operator.rbacName" -}}
{{- $fullname := include "audience-token-operator.fullname" .ctx }}
{{- if eq .namespace .ctx.Release.Namespace }}
{{- $fullname }}
{{- else }}
{{- printf "%s-%s" $fullname .ctx.Release.Namespace | trunc 253 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/*
Checks of combinations of values that the schema cannot express. Renders nothing, or
fails the install with a message saying what to change.
*/}}
{{- define "audience-token-operator.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) }}
{{- fail (printf "replicaCount is %d but leaderElection.enabled is false: several replicas would issue and renew the same tokens at once (and race on refresh-token chains). Set leaderElection.enabled=true, or replicaCount=1." (int .Values.replicaCount)) }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.service.enabled) }}
{{- fail "metrics.serviceMonitor.enabled is true but metrics.service.enabled is false: the ServiceMonitor scrapes the metrics Service. Enable the Service, or disable the ServiceMonitor." }}
{{- end }}
{{- end }}

{{/*
The operator's API permissions, as the operator states them (`audience-token-operator rbac
[--namespace W] --operator-namespace O --cluster-resource-namespace C [--leader-elect]`;
tests/helm checks that the rendered RBAC grants exactly that). Renders YAML:
  cluster: [PolicyRule]            # the ClusterRole
  namespaced: {<namespace>: [PolicyRule]}   # one Role per namespace
*/}}
{{- define "audience-token-operator.rbacRules" -}}
{{- $watched := .Values.watchNamespace }}
{{- $clusterResourceNs := include "audience-token-operator.clusterResourceNamespace" . }}
{{- $cluster := include "audience-token-operator.rules.clusterScoped" . | fromYamlArray }}
{{- $namespaced := dict }}
{{- if $watched }}
{{- $_ := set $namespaced $watched (concat (get $namespaced $watched | default list) (include "audience-token-operator.rules.watched" . | fromYamlArray)) }}
{{- if ne $clusterResourceNs $watched }}
{{- $_ := set $namespaced $clusterResourceNs (concat (get $namespaced $clusterResourceNs | default list) (include "audience-token-operator.rules.clusterResourceSecrets" . | fromYamlArray)) }}
{{- end }}
{{- if ne $watched "default" }}
{{- $_ := set $namespaced "default" (concat (get $namespaced "default" | default list) (include "audience-token-operator.rules.events" . | fromYamlArray)) }}
{{- end }}
{{- else }}
{{- $cluster = concat $cluster (include "audience-token-operator.rules.watched" . | fromYamlArray) }}
{{- end }}
{{- if .Values.leaderElection.enabled }}
{{- $ns := .Release.Namespace }}
{{- $_ := set $namespaced $ns (concat (get $namespaced $ns | default list) (include "audience-token-operator.rules.leaderElection" . | fromYamlArray)) }}
{{- end }}
{{- toYaml (dict "cluster" $cluster "namespaced" $namespaced) }}
{{- end }}

{{/* Always cluster-wide: ClusterTokenIssuers are cluster-scoped, and namespaces are
watched for ClusterTokenIssuers' allowedNamespaces (metadata only). */}}
{{- define "audience-token-operator.rules.clusterScoped" -}}
- apiGroups: ["audiencetoken.io"]
  resources: ["clustertokenissuers"]
  verbs: ["list", "watch"]
- apiGroups: ["audiencetoken.io"]
  resources: ["clustertokenissuers/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}

{{/* In the watched namespace, or cluster-wide when all namespaces are watched. Secrets:
list/watch metadata by label, get (client secrets, keys, refresh state), create and update
(refresh state), patch (server-side apply of token Secrets). Never delete: owner references
let the garbage collector do that. */}}
{{- define "audience-token-operator.rules.watched" -}}
- apiGroups: ["audiencetoken.io"]
  resources: ["audiencetokens", "tokenissuers"]
  verbs: ["list", "watch"]
- apiGroups: ["audiencetoken.io"]
  resources: ["audiencetokens/status", "tokenissuers/status"]
  verbs: ["patch"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "update", "patch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/* In the cluster resource namespace, when it is not the watched one: ClusterTokenIssuers'
client secrets and keys (get), their refresh state (create, update). */}}
{{- define "audience-token-operator.rules.clusterResourceSecrets" -}}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create", "update"]
{{- end }}

{{/* In `default`, when it is not the watched namespace: Events about cluster-scoped
ClusterTokenIssuers land there. */}}
{{- define "audience-token-operator.rules.events" -}}
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}

{{/* In the release namespace, with leader election: the Lease (read, created once,
renewed by patch). */}}
{{- define "audience-token-operator.rules.leaderElection" -}}
- apiGroups: ["coordination.k8s.io"]
  resources: ["leases"]
  verbs: ["get", "create", "patch"]
{{- end }}
