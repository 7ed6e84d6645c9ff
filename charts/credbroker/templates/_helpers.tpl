{{/*
Shared pieces. The object names are fixed (one release per cluster): the
admission policies, the docs and the webhook's defaults name them.
*/}}

{{/* Labels on every object. */}}
{{- define "credbroker.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/part-of: credbroker
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{/* The selector labels of a component: (dict "ctx" $ "component" "controller"). */}}
{{- define "credbroker.selectorLabels" -}}
app.kubernetes.io/name: credbroker-{{ .component }}
app.kubernetes.io/instance: {{ .ctx.Release.Name | quote }}
{{- end -}}

{{/* A component's labels (its selector labels among them: the common ones carry the instance). */}}
{{- define "credbroker.componentLabels" -}}
app.kubernetes.io/name: credbroker-{{ .component }}
app.kubernetes.io/component: {{ .component }}
{{ include "credbroker.labels" .ctx }}
{{- end -}}

{{/*
An image reference from {repository, tag}: tag "" is the appVersion, and a
tag "sha256:..." is a digest (repository@sha256:...).
(dict "image" .Values.images.sidecar "ctx" $)
*/}}
{{- define "credbroker.image" -}}
{{- $tag := .image.tag | default .ctx.Chart.AppVersion | toString -}}
{{- if hasPrefix "sha256:" $tag -}}
{{- printf "%s@%s" .image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{/* A value that may be a string or a list, as a list. */}}
{{- define "credbroker.list" -}}
{{- if kindIs "string" . -}}
{{- if . }}{{ list . | toJson }}{{ else }}[]{{ end -}}
{{- else -}}
{{- default (list) . | toJson -}}
{{- end -}}
{{- end -}}

{{/* The images a real sidecar may run: the current one, then the previous ones. */}}
{{- define "credbroker.sidecarImages" -}}
{{- $current := include "credbroker.image" (dict "image" .Values.images.sidecar "ctx" .) -}}
{{- concat (list $current) (include "credbroker.list" .Values.images.previousSidecar | fromJsonArray) | uniq | toJson -}}
{{- end -}}

{{/* The images a real init container may run. */}}
{{- define "credbroker.initImages" -}}
{{- $current := include "credbroker.image" (dict "image" .Values.images.init "ctx" .) -}}
{{- concat (list $current) (include "credbroker.list" .Values.images.previousInit | fromJsonArray) | uniq | toJson -}}
{{- end -}}

{{/* A CEL list literal of plain strings: ['a', 'b']. */}}
{{- define "credbroker.celStrings" -}}
{{- $items := list -}}
{{- range . }}{{ $items = append $items (printf "'%s'" .) }}{{ end -}}
[{{ join ", " $items }}]
{{- end -}}

{{/* A resource list as the webhook's --sidecar-requests/--sidecar-limits take it: cpu=50m,memory=32Mi. */}}
{{- define "credbroker.resourceFlag" -}}
{{- $items := list -}}
{{- range $k, $v := . }}{{ $items = append $items (printf "%s=%v" $k $v) }}{{ end -}}
{{ join "," $items }}
{{- end -}}

{{/* The controller's ServiceAccount as the API server names its user. */}}
{{- define "credbroker.controllerUser" -}}
system:serviceaccount:{{ .Release.Namespace }}:credbroker-controller
{{- end -}}

{{/* The webhook's ServiceAccount as the API server names its user. */}}
{{- define "credbroker.webhookUser" -}}
system:serviceaccount:{{ .Release.Namespace }}:credbroker-webhook
{{- end -}}

{{/* The hardened container securityContext of the controller and the webhook. */}}
{{- define "credbroker.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
privileged: false
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The pod securityContext. */}}
{{- define "credbroker.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The default soft anti-affinity over nodes: (dict "ctx" $ "component" "webhook"). */}}
{{- define "credbroker.antiAffinity" -}}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "credbroker.selectorLabels" . | nindent 12 }}
{{- end -}}

{{/* Checks of values the schema cannot express. */}}
{{- define "credbroker.validate" -}}
{{- if and .Values.networkPolicy.enabled (not .Values.networkPolicy.controlPlaneCidrs) (not .Values.networkPolicy.webhookFrom) -}}
{{- fail "networkPolicy.enabled needs networkPolicy.controlPlaneCidrs or networkPolicy.webhookFrom: otherwise the API server cannot reach the webhook and every opted-in pod is refused" -}}
{{- end -}}
{{- if eq (toString .Values.brokerAudience) (toString .Values.vault.controllerAudience) -}}
{{- fail (printf "brokerAudience and vault.controllerAudience are both %q: they must differ, or the controller's Vault login token would be a broker token, which the sidecars' Vault roles accept and the admission policy reserves for the injected sidecar" (toString .Values.brokerAudience)) -}}
{{- end -}}
{{- end -}}
