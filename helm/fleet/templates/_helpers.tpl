{{- define "fleet.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fleet.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "fleet.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "fleet.brokerAddress" -}}
{{- if .Values.externalBroker.enabled -}}
{{ required "externalBroker.address is required when externalBroker.enabled" .Values.externalBroker.address }}
{{- else -}}
{{- if .Values.mqttTls.enabled -}}
{{ include "fleet.fullname" . }}-broker:{{ .Values.broker.tls.port }}
{{- else -}}
{{ include "fleet.fullname" . }}-broker:{{ .Values.broker.mqttPort }}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* MQTT over TLS for the broker's clients: the CA they trust. */}}
{{- define "fleet.mqttTlsEnv" -}}
{{- if .Values.mqttTls.enabled }}
- { name: FLEET_TLS_CA, value: /etc/fleet/mqtt-ca/ca.crt }
{{- end }}
{{- end -}}

{{- define "fleet.mqttTlsMount" -}}
{{- if .Values.mqttTls.enabled }}
- { name: mqtt-ca, mountPath: /etc/fleet/mqtt-ca, readOnly: true }
{{- end }}
{{- end -}}

{{- define "fleet.mqttTlsVolume" -}}
{{- if .Values.mqttTls.enabled }}
- name: mqtt-ca
  secret:
    secretName: {{ required "mqttTls.caSecret is required when mqttTls.enabled" .Values.mqttTls.caSecret }}
    items: [{ key: ca.crt, path: ca.crt }]
{{- end }}
{{- end -}}

{{- define "fleet.securityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
capabilities:
  drop: [ALL]
{{- end -}}

{{/* The container's requests and limits, for the fleet_process_* resource gauges. */}}
{{- define "fleet.resourceEnv" -}}
- name: FLEET_CPU_REQUEST_MILLICORES
  valueFrom: { resourceFieldRef: { containerName: {{ . }}, resource: requests.cpu, divisor: 1m } }
- name: FLEET_CPU_LIMIT_MILLICORES
  valueFrom: { resourceFieldRef: { containerName: {{ . }}, resource: limits.cpu, divisor: 1m } }
- name: FLEET_MEMORY_REQUEST_BYTES
  valueFrom: { resourceFieldRef: { containerName: {{ . }}, resource: requests.memory } }
- name: FLEET_MEMORY_LIMIT_BYTES
  valueFrom: { resourceFieldRef: { containerName: {{ . }}, resource: limits.memory } }
{{- end -}}

{{/* The pod security context every fleet pod runs with. */}}
{{- define "fleet.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The gateway's web UI as users reach it (empty when nothing says). */}}
{{- define "fleet.publicUrl" -}}
{{- if .Values.gateway.publicUrl -}}
{{ .Values.gateway.publicUrl }}
{{- else if .Values.gateway.ingress.enabled -}}
{{ if .Values.gateway.ingress.tls }}https{{ else }}http{{ end }}://{{ .Values.gateway.ingress.host }}/
{{- end -}}
{{- end -}}
