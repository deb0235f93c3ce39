{{/* Chart name, truncated for DNS labels. */}}
{{- define "telehealth.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-scoped base name of every object. */}}
{{- define "telehealth.fullname" -}}
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

{{- define "telehealth.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that select this release's pods (all components). */}}
{{- define "telehealth.instanceLabels" -}}
app.kubernetes.io/name: {{ include "telehealth.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "telehealth.labels" -}}
helm.sh/chart: {{ include "telehealth.chart" . }}
{{ include "telehealth.instanceLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: telehealth-mesh
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component: call with (dict "ctx" $ "component" "core"). */}}
{{- define "telehealth.selectorLabels" -}}
{{ include "telehealth.instanceLabels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "telehealth.coreName" -}}
{{- printf "%s-core" (include "telehealth.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "telehealth.edgeName" -}}
{{- printf "%s-edge" (include "telehealth.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Name of one zone's edge Deployment and Service: (dict "ctx" $ "zone" "zone-a"). */}}
{{- define "telehealth.edgeZoneName" -}}
{{- printf "%s-%s" (include "telehealth.edgeName" .ctx) .zone | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The headless Service the core watches for edges. */}}
{{- define "telehealth.edgeDiscoveryName" -}}
{{- printf "%s-edge-discovery" (include "telehealth.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "telehealth.turnName" -}}
{{- printf "%s-turn" (include "telehealth.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "telehealth.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
Secret with one component's mTLS material (tls.crt, tls.key, ca.crt); empty when TLS is off.
Args: dict "ctx" $ "component" "core"|"edge" ["zone" name]. Each component has its own
certificate, because the core checks the role URI in it (INTERFACES §1).
*/}}
{{- define "telehealth.tlsSecretName" -}}
{{- $v := .ctx.Values.tls }}
{{- if $v.enabled }}
{{- if $v.certManager.enabled }}
{{- if eq .component "core" }}
{{- printf "%s-tls" (include "telehealth.coreName" .ctx) }}
{{- else }}
{{- printf "%s-tls" (include "telehealth.edgeZoneName" (dict "ctx" .ctx "zone" .zone)) }}
{{- end }}
{{- else if eq .component "core" }}
{{- printf "%s-core" $v.existingSecretPrefix }}
{{- else }}
{{- printf "%s-zone-%s" $v.existingSecretPrefix .zone }}
{{- end }}
{{- end }}
{{- end }}

{{/* The names a Service answers to in cluster DNS: (dict "name" svc "namespace" ns). */}}
{{- define "telehealth.serviceDnsNames" -}}
- {{ .name }}
- {{ .name }}.{{ .namespace }}
- {{ .name }}.{{ .namespace }}.svc
- {{ .name }}.{{ .namespace }}.svc.cluster.local
{{- end }}

{{/* The DNS name of a zone's edge Service, which edges advertise as tls_server_name. */}}
{{- define "telehealth.zoneServiceHost" -}}
{{- printf "%s.%s.svc" (include "telehealth.edgeZoneName" (dict "ctx" .ctx "zone" .zone)) .ctx.Release.Namespace }}
{{- end }}

{{/*
Secret holding the token signing keys mounted as the core's keys_dir; empty when the single
SQLite core keeps its own keys on its data volume.
*/}}
{{- define "telehealth.tokenKeysSecret" -}}
{{- if .Values.core.tokenKeys.existingSecret }}
{{- .Values.core.tokenKeys.existingSecret }}
{{- else if .Values.externalPostgresql.enabled }}
{{- printf "%s-token-keys" (include "telehealth.coreName" .) }}
{{- end }}
{{- end }}

{{/* Secret with the bootstrap users file (users.yaml) and the password files it names. */}}
{{- define "telehealth.bootstrapSecret" -}}
{{- $b := .Values.core.bootstrapUsers }}
{{- if $b.enabled }}
{{- $b.existingSecret | default (printf "%s-bootstrap-users" (include "telehealth.coreName" .)) }}
{{- end }}
{{- end }}

{{/* Secret with the TURN shared secret (turn_secret): the chart's or turn.existingSecret. */}}
{{- define "telehealth.turnSecret" -}}
{{- if .Values.turn.existingSecret }}
{{- .Values.turn.existingSecret }}
{{- else if .Values.turn.enabled }}
{{- printf "%s-secret" (include "telehealth.turnName" .) }}
{{- end }}
{{- end }}

{{/* The edges' turn_urls as a YAML list: turn.urls, else the chart's coturn Service. */}}
{{- define "telehealth.turnUrls" -}}
{{- $urls := .Values.turn.urls }}
{{- if and (not $urls) .Values.turn.enabled }}
{{- $host := printf "%s.%s.svc:%d" (include "telehealth.turnName" .) .Release.Namespace (int .Values.turn.port) }}
{{- $urls = list (printf "turn:%s?transport=udp" $host) (printf "turn:%s?transport=tcp" $host) }}
{{- end }}
{{- toYaml ($urls | default list) }}
{{- end }}

{{/* Where the core reads its token signing keys from the Secret above. */}}
{{- define "telehealth.keysDir" -}}
/etc/telehealth/token-keys
{{- end }}

{{/* The claim holding the single SQLite core's data_dir; empty for an emptyDir. */}}
{{- define "telehealth.coreDataClaim" -}}
{{- $p := .Values.core.persistence }}
{{- if $p.existingClaim }}
{{- $p.existingClaim }}
{{- else if and $p.enabled (not .Values.externalPostgresql.enabled) }}
{{- printf "%s-data" (include "telehealth.coreName" .) }}
{{- end }}
{{- end }}

{{/* The restricted Pod Security Standard, for pods. */}}
{{- define "telehealth.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* The restricted Pod Security Standard, for every container. */}}
{{- define "telehealth.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Volumes every telehealth pod mounts: (dict "ctx" $ "data" <volume source dict> "tls" <Secret name or "">).
*/}}
{{- define "telehealth.volumes" -}}
- name: data
  {{- toYaml .data | nindent 2 }}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- with .tls }}
- name: tls
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "telehealth.volumeMounts" -}}
- name: data
  mountPath: /var/lib/telehealth
- name: tmp
  mountPath: /tmp
{{- if .Values.tls.enabled }}
- name: tls
  mountPath: /etc/telehealth/tls
  readOnly: true
{{- end }}
{{- end }}

{{/* Number of UDP ports in a {min, max} range, failing on a bad or oversized range. */}}
{{- define "telehealth.portCount" -}}
{{- $n := add (sub (int .range.max) (int .range.min)) 1 }}
{{- if lt $n 1 }}
{{- fail (printf "%s: max (%d) must not be below min (%d)" .what (int .range.max) (int .range.min)) }}
{{- end }}
{{- if gt $n 64 }}
{{- fail (printf "%s: %d ports; at most 64 fit in one Service's EndpointSlice" .what $n) }}
{{- end }}
{{- $n }}
{{- end }}

{{/*
One zone's resolved edge settings as YAML (use with fromYaml): its UDP range, node ports and
what it advertises. Args: dict "ctx" $ "zone" <zones[] entry>.
  grpc: host:port devices dial; http: base URL browsers use; media: address in ICE host
  candidates ("" = the pod's own). "$(POD_IP)"/"$(HOST_IP)" are expanded by the kubelet.
*/}}
{{- define "telehealth.zoneSpec" -}}
{{- $v := .ctx.Values }}
{{- $z := .zone }}
{{- $range := $z.mediaUdpPortRange | default $v.media.udpPortRange }}
{{- $np := $z.nodePorts | default dict }}
{{- $svcHost := include "telehealth.zoneServiceHost" (dict "ctx" .ctx "zone" $z.name) }}
{{- $scheme := include "telehealth.httpScheme" .ctx }}
{{- $grpc := printf "$(POD_IP):%d" (int $v.edge.grpcPort) }}
{{- $http := printf "%s://$(POD_IP):%d" $scheme (int $v.edge.httpPort) }}
{{- $media := "" }}
{{- if eq $v.edge.advertise "service" }}
{{- $grpc = printf "%s:%d" $svcHost (int $v.edge.grpcPort) }}
{{- $http = printf "%s://%s:%d" $scheme $svcHost (int $v.edge.httpPort) }}
{{- else if eq $v.edge.advertise "node" }}
{{- $grpc = printf "$(HOST_IP):%d" (int $np.grpc) }}
{{- $http = printf "%s://$(HOST_IP):%d" $scheme (int $np.http) }}
{{- $media = "$(HOST_IP)" }}
{{- end }}
name: {{ $z.name }}
replicas: {{ hasKey $z "replicas" | ternary $z.replicas 1 }}
range:
  min: {{ int $range.min }}
  max: {{ int $range.max }}
ports: {{ include "telehealth.portCount" (dict "range" $range "what" (printf "media UDP range of %s" $z.name)) }}
nodePorts:
  grpc: {{ $np.grpc | default 0 | int }}
  http: {{ $np.http | default 0 | int }}
advertise:
  grpc: {{ $z.advertiseAddress | default $grpc | quote }}
  http: {{ $z.httpAdvertiseUrl | default $http | quote }}
  media: {{ $z.mediaAdvertiseAddress | default $media | quote }}
{{- end }}

{{/* Does the zone Service publish node ports whose numbers devices are told (NodePort)? */}}
{{- define "telehealth.nodePortMedia" -}}
{{- if eq .Values.edge.service.type "NodePort" }}true{{ end }}
{{- end }}

{{/* Chart-wide checks that the schema cannot express. */}}
{{- define "telehealth.validate" -}}
{{- if and (not .Values.externalPostgresql.enabled) (or (gt (int .Values.core.replicas) 1) .Values.core.autoscaling.enabled) }}
{{- fail "core.replicas > 1 or core.autoscaling.enabled needs externalPostgresql.enabled: each replica would otherwise keep its own SQLite database" }}
{{- end }}
{{- if and .Values.externalPostgresql.enabled (not .Values.externalPostgresql.existingSecret) }}
{{- fail "externalPostgresql.existingSecret must name the Secret holding the database URL" }}
{{- end }}
{{- if and .Values.tls.enabled (not .Values.tls.existingSecretPrefix) (not .Values.tls.certManager.enabled) }}
{{- fail "tls.enabled needs tls.existingSecretPrefix (Secrets <prefix>-core and <prefix>-zone-<zone>) or tls.certManager.enabled" }}
{{- end }}
{{- $turnUrls := fromYamlArray (include "telehealth.turnUrls" .) }}
{{- range $turnUrls }}
{{- if and (or (hasPrefix "turn:" .) (hasPrefix "turns:" .)) (not (include "telehealth.turnSecret" $)) }}
{{- fail (printf "turn.urls has %s: a turn: URL needs the shared secret, from turn.existingSecret (or turn.enabled)" .) }}
{{- end }}
{{- end }}
{{- if and .Values.turn.enabled (eq .Values.turn.service.type "NodePort") }}
{{- $t := .Values.turn }}
{{- if or (lt (int $t.port) 30000) (gt (int $t.port) 32767) (lt (int $t.relayPortRange.min) 30000) (gt (int $t.relayPortRange.max) 32767) }}
{{- fail (printf "turn.service.type=NodePort publishes turn.port and the relay ports under their own numbers, so they must lie in 30000-32767 (port %d, relay %d-%d)" (int $t.port) (int $t.relayPortRange.min) (int $t.relayPortRange.max)) }}
{{- end }}
{{- end }}
{{- if and .Values.tls.https (not .Values.tls.enabled) }}
{{- fail "tls.https serves the HTTP ports with the components' certificates: it needs tls.enabled" }}
{{- end }}
{{- if and .Values.tls.existingSecretPrefix .Values.tls.certManager.enabled }}
{{- fail "tls: set either tls.existingSecretPrefix or tls.certManager.enabled, not both" }}
{{- end }}
{{- if and .Values.core.persistence.existingClaim (or .Values.externalPostgresql.enabled (gt (int .Values.core.replicas) 1)) }}
{{- fail "core.persistence.existingClaim is for a single core replica on SQLite" }}
{{- end }}
{{- $seen := dict }}
{{- range .Values.zones }}
{{- if hasKey $seen .name }}
{{- fail (printf "zones: %q is listed twice" .name) }}
{{- end }}
{{- $_ := set $seen .name true }}
{{- end }}
{{- /* Node ports are cluster-wide: every number the chart asks for must be unique, and media
     ports are published with nodePort == port, so the ranges must sit in the node port range. */}}
{{- $taken := dict }}
{{- $claim := list }}
{{- with .Values.core.service.nodePorts }}
{{- if .grpc }}{{ $claim = append $claim (list (int .grpc) "core.service.nodePorts.grpc") }}{{ end }}
{{- if .http }}{{ $claim = append $claim (list (int .http) "core.service.nodePorts.http") }}{{ end }}
{{- end }}
{{- range .Values.zones }}
{{- $zs := fromYaml (include "telehealth.zoneSpec" (dict "ctx" $ "zone" .)) }}
{{- if $zs.nodePorts.grpc }}{{ $claim = append $claim (list (int $zs.nodePorts.grpc) (printf "zones[%s].nodePorts.grpc" .name)) }}{{ end }}
{{- if $zs.nodePorts.http }}{{ $claim = append $claim (list (int $zs.nodePorts.http) (printf "zones[%s].nodePorts.http" .name)) }}{{ end }}
{{- if eq $.Values.edge.advertise "node" }}
{{- if not (and $zs.nodePorts.grpc $zs.nodePorts.http (eq $.Values.edge.service.type "NodePort")) }}
{{- fail (printf "edge.advertise=node needs edge.service.type=NodePort and zones[%s].nodePorts.grpc and .http" .name) }}
{{- end }}
{{- end }}
{{- if include "telehealth.nodePortMedia" $ }}
{{- if or (lt (int $zs.range.min) 30000) (gt (int $zs.range.max) 32767) }}
{{- fail (printf "zone %s: with edge.service.type=NodePort the media UDP range is published as node ports (nodePort = port), so it must lie in 30000-32767, not %d-%d; set zones[].mediaUdpPortRange" .name (int $zs.range.min) (int $zs.range.max)) }}
{{- end }}
{{- range $i, $_ := until (int $zs.ports) }}
{{- $claim = append $claim (list (add (int $zs.range.min) $i) (printf "media UDP range of %s" $zs.name)) }}
{{- end }}
{{- end }}
{{- end }}
{{- range $claim }}
{{- $key := toString (index . 0) }}
{{- if hasKey $taken $key }}
{{- fail (printf "node port %s is asked for twice: by %s and by %s (node ports are unique in a cluster; give each zone its own media range)" $key (index $taken $key) (index . 1)) }}
{{- end }}
{{- $_ := set $taken $key (index . 1) }}
{{- end }}
{{- end }}

{{/* Render ServiceMonitor/PrometheusRule? Only when the operator's API is there, or forced. */}}
{{- define "telehealth.monitoringOn" -}}
{{- if and .Values.monitoring.enabled (or .Values.monitoring.force (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1")) }}true{{- end }}
{{- end }}

{{/*
mTLS material for a container, when tls.enabled: the paths of the mounted Secret; with
tls.https the same certificate serves the HTTP port too (server auth; reloaded when
cert-manager renews it).
*/}}
{{- define "telehealth.tlsEnv" -}}
{{- if .Values.tls.enabled }}
- name: TELEHEALTH_TLS_CERT_FILE
  value: /etc/telehealth/tls/tls.crt
- name: TELEHEALTH_TLS_KEY_FILE
  value: /etc/telehealth/tls/tls.key
- name: TELEHEALTH_TLS_CA_FILE
  value: /etc/telehealth/tls/ca.crt
{{- if .Values.tls.https }}
- name: TELEHEALTH_HTTP_TLS_CERT_FILE
  value: /etc/telehealth/tls/tls.crt
- name: TELEHEALTH_HTTP_TLS_KEY_FILE
  value: /etc/telehealth/tls/tls.key
{{- end }}
{{- end }}
{{- end }}

{{/* "https" when the HTTP ports serve TLS, else "http". */}}
{{- define "telehealth.httpScheme" -}}
{{- if and .Values.tls.enabled .Values.tls.https }}https{{ else }}http{{ end }}
{{- end }}

{{/*
A probe's handler: native gRPC health while the port is plaintext; with mTLS the kubelet
has no client certificate, so probes use the plaintext /healthz of the HTTP port instead.
Args: dict "root" $ "grpcPort" N "httpPort" N.
*/}}
{{- define "telehealth.probeHandler" -}}
{{- if .root.Values.tls.enabled }}
httpGet:
  path: /healthz
  port: {{ .httpPort }}
  {{- if .root.Values.tls.https }}
  # The kubelet does not verify the certificate of an HTTPS probe.
  scheme: HTTPS
  {{- end }}
{{- else }}
grpc:
  port: {{ .grpcPort }}
{{- end }}
{{- end }}


{{/*
Egress rules to the Kubernetes API server for the core's discovery. NetworkPolicy cannot
select the API server by label, so the rules name its addresses: networkPolicy.kubeApi.cidr
when set; else the `kubernetes` Service's cluster IP and its endpoints, looked up at install
(needs read access to Services and EndpointSlices in namespace default); else, when nothing
could be looked up (helm template), any address on networkPolicy.kubeApi.ports.
*/}}
{{- define "telehealth.kubeApiEgress" -}}
{{- $api := .Values.networkPolicy.kubeApi }}
{{- $svc := dict }}
{{- $slice := dict }}
{{- if not $api.cidr }}
{{- $svc = lookup "v1" "Service" "default" "kubernetes" }}
{{- $slice = lookup "discovery.k8s.io/v1" "EndpointSlice" "default" "kubernetes" }}
{{- end }}
{{- if and $svc $svc.spec $slice $slice.endpoints }}
- to:
    {{- range $svc.spec.clusterIPs | default (list $svc.spec.clusterIP) }}
    - ipBlock:
        cidr: {{ . }}/{{ if contains ":" . }}128{{ else }}32{{ end }}
    {{- end }}
  ports:
    {{- range $svc.spec.ports }}
    - {protocol: TCP, port: {{ .port }}}
    {{- end }}
- to:
    {{- range $slice.endpoints }}
    {{- range .addresses }}
    - ipBlock:
        cidr: {{ . }}/{{ if contains ":" . }}128{{ else }}32{{ end }}
    {{- end }}
    {{- end }}
  ports:
    {{- range $slice.ports }}
    - {protocol: TCP, port: {{ .port }}}
    {{- end }}
{{- else }}
- to:
    - ipBlock:
        cidr: {{ $api.cidr | default "0.0.0.0/0" }}
  ports:
    {{- range $api.ports }}
    - {protocol: TCP, port: {{ . }}}
    {{- end }}
{{- end }}
{{- end }}
