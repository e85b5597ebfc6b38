{{/* Labels of every object; "component" names the part (operator, agent, ...). */}}
{{- define "covi.labels" -}}
app.kubernetes.io/name: covi
app.kubernetes.io/part-of: covi
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
{{- with .component }}
app.kubernetes.io/component: {{ . }}
{{- end }}
{{- end -}}

{{/* Selector labels of a component's pods (never change on upgrade). */}}
{{- define "covi.selector" -}}
app.kubernetes.io/name: covi
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Image reference of a covi binary. */}}
{{- define "covi.image" -}}
{{ .root.Values.image.registry }}/{{ .name }}:{{ .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- end -}}
