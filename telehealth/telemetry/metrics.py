"""Prometheus metrics of each process, all under the telehealth_ namespace, one registry per server."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

NAMESPACE = "telehealth"

# Latency buckets from 100 µs to 10 s: vitals delivery lives in the low milliseconds.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
)  # fmt: skip


# Placement decisions take microseconds: buckets fine enough to show "well under 1 ms".
DECISION_BUCKETS = (
    0.000002, 0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025,
    0.01,
)  # fmt: skip


class RpcMetrics:
    """Per-method gRPC latency and outcome, filled by the server interceptor."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram(
            "rpc_duration_seconds",
            "Time to complete a unary RPC, or lifetime of a streaming RPC",
            ["service", "method", "code"],
            namespace=NAMESPACE,
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.started = Counter(
            "rpc_started_total",
            "RPCs started",
            ["service", "method"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.in_flight = Gauge(
            "rpc_in_flight",
            "RPCs (including open streams) in progress",
            ["service", "method"],
            namespace=NAMESPACE,
            registry=registry,
        )


class EdgeSeries:
    """Declares one edge's metrics under NAMESPACE in the server's registry, labelled with the
    edge and its zone, and returns that edge's own series. (A metric with labels of its own
    besides is declared in full, with `values` among its labels.)"""

    def __init__(self, registry: CollectorRegistry, edge_id: str, zone: str) -> None:
        self.registry = registry
        self.values = {"edge": edge_id, "zone": zone}
        self.names = list(self.values)

    def counter(self, name: str, documentation: str) -> Counter:
        return Counter(
            name, documentation, self.names, namespace=NAMESPACE, registry=self.registry
        ).labels(**self.values)

    def gauge(self, name: str, documentation: str) -> Gauge:
        return Gauge(
            name, documentation, self.names, namespace=NAMESPACE, registry=self.registry
        ).labels(**self.values)

    def histogram(self, name: str, documentation: str) -> Histogram:
        return Histogram(
            name,
            documentation,
            self.names,
            namespace=NAMESPACE,
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        ).labels(**self.values)


class GuardMetrics:
    """The edge's front door: publish pacing and the durable audit outbox."""

    def __init__(self, registry: CollectorRegistry, edge_id: str, zone: str) -> None:
        series = EdgeSeries(registry, edge_id, zone)
        labels = series.values
        self.paced = series.counter(
            "edge_publish_paced_total",
            "Publish batches held back because their session was over its rate",
        )
        self.paced_seconds = series.counter(
            "edge_publish_paced_seconds_total", "Time publish streams were held back by pacing"
        )
        self.audit_pending = series.gauge(
            "edge_audit_pending",
            "Audit records persisted at the edge and not yet chained by the core",
        )
        recorded = Counter(
            "edge_audit_recorded_total",
            "Audit records of patient-data reads at this edge, by outcome (allowed, denied)",
            [*labels, "outcome"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.audit_allowed = recorded.labels(**labels, outcome="allowed")
        self.audit_denied = recorded.labels(**labels, outcome="denied")


class EdgeMetrics:
    """What an edge node's vitals pipeline exports."""

    def __init__(self, registry: CollectorRegistry, edge_id: str, zone: str) -> None:
        self.rpc = RpcMetrics(registry)
        series = EdgeSeries(registry, edge_id, zone)
        labels = series.values
        self.active_sessions = series.gauge(
            "edge_active_sessions", "Sessions with a publisher or subscriber on this edge"
        )
        self.subscribers = series.gauge("edge_subscribers", "Open vitals subscriptions")
        self.publishers = series.gauge("edge_publishers", "Open device publish streams")
        batches_in = Counter(
            "edge_batches_in_total",
            "Vitals batches received, by result (accepted, duplicate, rejected)",
            [*labels, "result"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.batches_accepted = batches_in.labels(**labels, result="accepted")
        self.batches_duplicate = batches_in.labels(**labels, result="duplicate")
        self.batches_rejected = batches_in.labels(**labels, result="rejected")
        self.events_out = series.counter("edge_events_out_total", "Events delivered to subscribers")
        self.fanout_dropped = series.counter(
            "edge_fanout_dropped_total",
            "Events dropped (oldest first) for subscribers that fell behind",
        )
        self.sample_age = series.histogram(
            "edge_sample_age_seconds",
            "Age of a batch (edge clock minus device send time) when handed to a subscriber",
        )
        self.news2_alerts = series.counter(
            "edge_alerts_total", "Clinical alerts raised (NEWS2 band changes and red parameters)"
        )
        self.heartbeats = series.counter(
            "edge_heartbeats_sent_total", "Load reports sent to the core"
        )
        self.core_connected = series.gauge(
            "edge_core_connected", "1 while the heartbeat stream to the core is up"
        )


class CoreMetrics:
    """What the core exports: sessions, placement, the edge registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.rpc = RpcMetrics(registry)
        self.open_sessions = Gauge(
            "core_open_sessions",
            "Open sessions by zone of the edge they are placed on",
            ["zone"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.placements = Counter(
            "core_placements_total",
            "Placement decisions by outcome (same_zone, fallback_zone, rejected)",
            ["outcome"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.placement_duration = Histogram(
            "core_placement_duration_seconds",
            "Time to place a session in memory (choose an edge, count it there), store excluded",
            namespace=NAMESPACE,
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.placement_decision = Histogram(
            "core_placement_decision_seconds",
            "Time of the placement decision itself (which edge), beside the Open RPC latency",
            namespace=NAMESPACE,
            registry=registry,
            buckets=DECISION_BUCKETS,
        )
        self.migrations = Counter(
            "core_migrations_total",
            "Sessions moved to another edge, by reason (edge_dead, drain, zone_change)",
            ["reason"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.move_attempts_unconfirmed = Counter(
            "core_move_attempts_unconfirmed_total",
            "Make-before-break moves whose chosen new edge did not confirm the session in "
            "time (another edge is tried), by reason",
            ["reason"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.moves_failed = Counter(
            "core_moves_failed_total",
            "Make-before-break moves given up (no edge confirmed; the session stayed), by reason",
            ["reason"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.edges = Gauge(
            "core_edges",
            "Known edge nodes by state",
            ["state"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.edge_load = Gauge(
            "core_edge_load_ratio",
            "Active sessions over capacity, per edge, from heartbeats",
            ["edge", "zone"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.heartbeats = Counter(
            "core_heartbeats_total",
            "Heartbeats received from edges",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.reconciled_releases = Counter(
            "core_reconciled_releases_total",
            "Sessions released at an edge that still held them after the core had placed "
            "them elsewhere or closed them (e.g. an edge declared dead came back)",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.archived = Counter(
            "core_archived_batches_total",
            "Vitals batches made durable in the archive",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.archive_duplicates = Counter(
            "core_archive_duplicates_total",
            "Batches the archive already held (re-sent after a failover), dropped",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.archive_append = Histogram(
            "core_archive_append_seconds",
            "Time to make one append request of batches durable",
            namespace=NAMESPACE,
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.watchers = Gauge(
            "core_session_watchers",
            "Open Sessions.Watch streams",
            namespace=NAMESPACE,
            registry=registry,
        )


class MediaMetrics:
    """What an edge's media relay and vision export (telehealth_media_*)."""

    def __init__(self, registry: CollectorRegistry, edge_id: str, zone: str) -> None:
        series = EdgeSeries(registry, edge_id, zone)
        labels = series.values
        self.active_calls = series.gauge(
            "media_active_calls", "Consultations with a connected patient or clinician on this edge"
        )
        self.peer_connections = series.gauge(
            "media_peer_connections", "Open WebRTC peer connections"
        )
        self.frames_relayed = series.counter(
            "media_frames_relayed_total", "Video frames handed to a peer's encoder"
        )
        self.frames_dropped = Counter(
            "media_frames_dropped_total",
            "Video frames not forwarded or not decoded, by reason: behind (a viewer, or its "
            "encoded feed, fell behind: newest wins), restart (skipped until a keyframe after "
            "that), stale (the edge fell behind a receiver), decoder_behind (decoder queue "
            "full), mode (reduced mode's lower frame rate)",
            [*labels, "reason"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.call_fps = Gauge(
            "media_call_fps",
            "Frames per second received from the patient, per session",
            [*labels, "session"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.call_mode = Gauge(
            "media_call_mode",
            "Call mode per session: 1 full, 2 reduced, 3 audio only",
            [*labels, "session"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.negotiations = Counter(
            "media_negotiations_total",
            "Offers answered or refused, by role and result",
            [*labels, "role", "result"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.vision_latency = series.histogram(
            "media_vision_latency_seconds",
            "Time from a frame's arrival to its vision result (queueing and analysis)",
        )
        self.vision_skipped = series.counter(
            "media_vision_skipped_total",
            "Sampled frames not analysed because the vision worker was still busy",
        )
        self._labels = labels

    def dropped(self, reason: str) -> Counter:
        return self.frames_dropped.labels(**self._labels, reason=reason)

    def forget_session(self, session_id: str) -> None:
        # Per-session series would otherwise grow without bound over a long-running edge.
        for gauge in (self.call_fps, self.call_mode):
            try:
                gauge.remove(*self._labels.values(), session_id)
            except KeyError:
                pass
