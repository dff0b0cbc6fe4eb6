{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "weir.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name of the release's objects. */}}
{{- define "weir.fullname" -}}
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

{{- define "weir.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "weir.labels" -}}
helm.sh/chart: {{ include "weir.chart" . }}
{{ include "weir.selectorLabels" . }}
app.kubernetes.io/version: {{ include "weir.version" . | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: gateway
{{- end }}

{{- define "weir.selectorLabels" -}}
app.kubernetes.io/name: {{ include "weir.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "weir.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "weir.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The version label: the image tag (or the chart's appVersion) made a valid
label value. A tag may hold what a label may not ("1.2.0+build.7",
"1.2.0@sha256:…") or be longer than 63 characters: those would make every
object of the release invalid.
*/}}
{{- define "weir.version" -}}
{{- $version := regexReplaceAll "[^-A-Za-z0-9_.]" (.Values.image.tag | default .Chart.AppVersion | replace "+" "_") "_" | trunc 63 }}
{{- regexReplaceAll "^[-_.]+|[-_.]+$" $version "" }}
{{- end }}

{{/* The image: repository@digest when image.digest is set (the tag is then ignored), else repository:tag. */}}
{{- define "weir.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* The ConfigMap holding weir.toml: the chart's own or config.existingConfigMap. */}}
{{- define "weir.configMapName" -}}
{{- if .Values.config.existingConfigMap }}
{{- .Values.config.existingConfigMap }}
{{- else }}
{{- printf "%s-config" (include "weir.fullname" .) }}
{{- end }}
{{- end }}

{{/* The Secret whose keys become environment variables, or "" when there is none. */}}
{{- define "weir.envSecretName" -}}
{{- if .Values.existingSecret }}
{{- .Values.existingSecret }}
{{- else if .Values.secretEnv }}
{{- printf "%s-env" (include "weir.fullname" .) }}
{{- end }}
{{- end }}

{{/* The gRPC port, taken from server.listen ("0.0.0.0:50051", "[::]:50051"). */}}
{{- define "weir.grpcPort" -}}
{{- $port := regexFind "[0-9]+$" .Values.server.listen }}
{{- if not $port }}
{{- fail (printf "server.listen %q must end with a port, e.g. 0.0.0.0:50051" .Values.server.listen) }}
{{- end }}
{{- $port }}
{{- end }}

{{/*
Seconds in a humantime duration ("10s", "1m 30s", "1500ms"), rounded up;
"" when it cannot be read (Weir itself refuses such a file).
*/}}
{{- define "weir.durationSeconds" -}}
{{- $text := trim . }}
{{- /* Nanoseconds per unit, as humantime spells them. */}}
{{- $units := dict "ns" 1 "nsec" 1 "us" 1000 "usec" 1000 "ms" 1000000 "msec" 1000000 "s" 1000000000 "sec" 1000000000 "secs" 1000000000 "second" 1000000000 "seconds" 1000000000 "m" 60000000000 "min" 60000000000 "mins" 60000000000 "minute" 60000000000 "minutes" 60000000000 "h" 3600000000000 "hr" 3600000000000 "hrs" 3600000000000 "hour" 3600000000000 "hours" 3600000000000 "d" 86400000000000 "day" 86400000000000 "days" 86400000000000 }}
{{- if regexMatch `^([0-9]+ *[a-z]+ *)+$` $text }}
{{- $total := 0 }}
{{- $ok := true }}
{{- range regexFindAll `[0-9]+ *[a-z]+` $text -1 }}
{{- $unit := regexFind `[a-z]+$` . }}
{{- if hasKey $units $unit }}
{{- $total = add $total (mul (regexFind `^[0-9]+` . | int64) (get $units $unit)) }}
{{- else }}
{{- $ok = false }}
{{- end }}
{{- end }}
{{- if $ok }}
{{- div (add $total 999999999) 1000000000 }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Fails unless SIGKILL comes after Weir's own shutdown: the preStop sleep, then
server.shutdown_grace (from WEIR__SERVER__SHUTDOWN_GRACE in extraEnv, else
[server] in config.toml, else the default 10 s; an existingConfigMap is not
read, so only the default is checked; a form it cannot read is refused),
then up to 20 s of wrap-up (cut
streams, rollbacks and cancels share 10 s; blocking work and the trace flush
5 s each) must fit in terminationGracePeriodSeconds.
*/}}
{{- define "weir.checkShutdownBudget" -}}
{{- $grace := "10s" }}
{{- $from := "the default" }}
{{- if not .Values.config.existingConfigMap }}
{{- /* shutdown_grace of the [server] table: the text from [server] to the next table. */}}
{{- $server := regexFind `(?ms)^[ \t]*\[server\][ \t]*(#[^\n]*)?$.*?(^[ \t]*\[|\z)` (.Values.config.toml | default "") }}
{{- $line := regexFind `(?m)^[ \t]*shutdown_grace[ \t]*=[ \t]*"[^"]*"` $server }}
{{- if $line }}
{{- $grace = regexReplaceAll `^[^"]*"([^"]*)"$` $line "${1}" }}
{{- $from = "[server] shutdown_grace in config.toml" }}
{{- else if regexMatch `(?m)^[^#\n]*shutdown_grace` (.Values.config.toml | default "") }}
{{- /* A literal string, a dotted key, a spaced table header: not read above, so not checked. */}}
{{- fail "config.toml sets shutdown_grace in a form the chart cannot read to check terminationGracePeriodSeconds: write it as shutdown_grace = \"...\" (double quotes) in a [server] table, or set WEIR__SERVER__SHUTDOWN_GRACE in extraEnv" }}
{{- end }}
{{- if regexMatch `(?m)^[^#\n]*shutdown_delay` (.Values.config.toml | default "") }}
{{- fail "config.toml sets shutdown_delay, which the chart's shutdown budget does not count: on Kubernetes use preStopSleepSeconds, which keeps the pod serving while it leaves the Service's endpoints" }}
{{- end }}
{{- end }}
{{- range .Values.extraEnv }}
{{- if eq (.name | default "") "WEIR__SERVER__SHUTDOWN_DELAY" }}
{{- fail "WEIR__SERVER__SHUTDOWN_DELAY in extraEnv: the chart's shutdown budget does not count it; on Kubernetes use preStopSleepSeconds, which keeps the pod serving while it leaves the Service's endpoints" }}
{{- end }}
{{- if eq (.name | default "") "WEIR__SERVER__SHUTDOWN_GRACE" }}
{{- if not .value }}
{{- fail "WEIR__SERVER__SHUTDOWN_GRACE in extraEnv must have a value (not valueFrom): the chart checks terminationGracePeriodSeconds against it" }}
{{- end }}
{{- $grace = .value }}
{{- $from = "WEIR__SERVER__SHUTDOWN_GRACE in extraEnv" }}
{{- end }}
{{- end }}
{{- $seconds := include "weir.durationSeconds" $grace }}
{{- if not $seconds }}
{{- fail (printf "shutdown_grace %q (%s) is a duration the chart cannot read to check terminationGracePeriodSeconds: write it in ns, us, ms, s, m, h or d (\"30s\", \"1m 30s\")" $grace $from) }}
{{- end }}
{{- $needed := add (int .Values.preStopSleepSeconds) (int $seconds) 20 }}
{{- if lt (int .Values.terminationGracePeriodSeconds) (int $needed) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be at least preStopSleepSeconds (%d) + shutdown_grace (%s, %s) + 20 s of wrap-up = %d, or SIGKILL cuts Weir's shutdown short (open transactions not rolled back, streams not ended); raise terminationGracePeriodSeconds or lower shutdown_grace" (int .Values.terminationGracePeriodSeconds) (int .Values.preStopSleepSeconds) $grace $from (int $needed)) }}
{{- end }}
{{- end }}
