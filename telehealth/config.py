"""Typed settings for each process: defaults in code, then YAML, then TELEHEALTH_* env, then flags."""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from telehealth.security.tls import TlsConfigError, TlsFiles

ENV_PREFIX = "TELEHEALTH_"
ENV_BODY = "TELEHEALTH_CONFIG"


class ConfigError(Exception):
    """A setting is unknown or invalid; the message names the key."""


class Settings(BaseModel):
    """Keys shared by every process. Unknown keys are an error (extra='forbid')."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    log_level: str = Field("INFO", description="DEBUG, INFO, WARNING or ERROR")
    log_format: str = Field("json", description="json (one object per line) or text")
    data_dir: Path = Field(Path("var"), description="where SQLite files and keys live")
    grpc_max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="largest gRPC message accepted"
    )
    tls_cert_file: str = Field(
        "", description="PEM certificate chain of this process; empty (all three) = plaintext"
    )
    tls_key_file: str = Field("", description="PEM private key of tls_cert_file")
    tls_ca_file: str = Field(
        "", description="PEM CA that signs every peer; servers require client certs from it"
    )
    grpc_idle_timeout_s: float = Field(
        300.0, gt=0, description="close a connection with no RPC for this long"
    )
    http_tls_cert_file: str = Field(
        "",
        description="PEM certificate chain for HTTPS on http_listen (server auth only; reloaded "
        "when renewed); empty with http_tls_key_file = plain HTTP",
    )
    http_tls_key_file: str = Field("", description="PEM private key of http_tls_cert_file")

    def http_tls(self) -> tuple[Path, Path] | None:
        """(certificate, key) for HTTPS, or None for plain HTTP."""
        if bool(self.http_tls_cert_file) != bool(self.http_tls_key_file):
            raise ConfigError(
                "settings 'http_tls_cert_file' and 'http_tls_key_file' go together (or neither)"
            )
        if not self.http_tls_cert_file:
            return None
        return Path(self.http_tls_cert_file), Path(self.http_tls_key_file)

    def tls(self) -> TlsFiles | None:
        """The mTLS files, or None for plaintext (tests and dev)."""
        try:
            return TlsFiles.from_settings(self.tls_cert_file, self.tls_key_file, self.tls_ca_file)
        except TlsConfigError as e:
            raise ConfigError(str(e)) from e

    @model_validator(mode="after")
    def _tls_complete(self) -> Settings:
        self.tls()
        self.http_tls()
        return self

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return v

    @field_validator("log_format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v not in {"json", "text"}:
            raise ValueError("must be json or text")
        return v


class CoreSettings(Settings):
    grpc_listen: str = Field("127.0.0.1:50051", description="host:port of the core's gRPC API")
    http_listen: str = Field("127.0.0.1:8080", description="host:port of /metrics and the console")
    database_url: str = Field(
        "", description="SQLAlchemy async URL; empty means SQLite at data_dir/core.db"
    )
    heartbeat_timeout_s: float = Field(3.0, gt=0, description="edge declared dead after this")
    token_ttl_s: int = Field(900, ge=30, description="lifetime of session tokens")
    token_key_rotation_s: float = Field(
        86400.0, gt=0, description="period of new token signing keys (edges get them at once)"
    )
    token_refresh_grace_s: int = Field(
        3600, ge=0, description="how long after expiry a device's token still buys a fresh one"
    )
    user_token_ttl_s: int = Field(
        8 * 3600, ge=60, description="lifetime of a clinician's or operator's login token"
    )
    http_trust_forwarded: bool = Field(
        False,
        description="behind one reverse proxy (ingress): take the client address from the last "
        "X-Forwarded-For entry and https from X-Forwarded-Proto; only the proxy must reach "
        "http_listen",
    )
    login_max_failures_per_user: int = Field(
        5, ge=1, description="failed HTTP logins for one user id per login_failure_window_s"
    )
    login_failure_window_s: float = Field(
        300.0, gt=0, description="window of login_max_failures_per_user"
    )
    login_max_attempts_per_address: int = Field(
        30, ge=1, description="HTTP login attempts from one client address per minute"
    )
    open_rate_per_address_per_s: float = Field(
        100.0, gt=0, description="Sessions.Open calls per second from one client address"
    )
    open_burst_per_address: int = Field(
        1000, ge=1, description="Sessions.Open calls one address may make at once"
    )
    password_scrypt_n: int = Field(
        2**14,
        ge=2**10,
        description="scrypt cost N of new password hashes (power of two); with "
        "password_scrypt_p the OWASP pairs are 2^14/5, 2^15/3, 2^16/2, 2^17/1; weaker values "
        "(tests) are logged at start; older hashes are upgraded at login",
    )
    password_scrypt_p: int = Field(
        5, ge=1, le=16, description="scrypt parallelisation p of new password hashes"
    )
    bootstrap_users_file: Path | None = Field(
        None,
        description="YAML list of {user_id, role, password | password_file, patients}: created "
        "at start when missing (Kubernetes: mounted from a Secret); passwords never logged",
    )
    zone_latency_ms: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="zone -> {other zone -> latency ms}; fallback order when a zone is full",
    )
    discovery: str = Field("heartbeat", description="heartbeat or kubernetes")
    cluster: bool = Field(
        False,
        description="several core replicas share one PostgreSQL store (changes travel by "
        "LISTEN/NOTIFY); needs a postgresql database_url and a shared keys_dir",
    )
    keys_dir: Path | None = Field(
        None, description="token signing keys; shared by all replicas (default data_dir/keys)"
    )
    audit_key_file: Path | None = Field(
        None,
        description="Ed25519 key that MACs audit entries and signs checkpoints; never in the "
        "database; shared by all replicas (default keys_dir/audit.key, created on first start)",
    )
    audit_checkpoint_file: Path | None = Field(
        None,
        description="append-only file of signed audit checkpoints, outside the database; one "
        "per replica (default data_dir/audit-checkpoints.jsonl)",
    )
    kubernetes_namespace: str = Field("", description="namespace of the edge Service")
    kubernetes_edge_service: str = Field("telehealth-edge", description="edge Service name")

    @field_validator("password_scrypt_n")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError("must be a power of two (e.g. 16384)")
        return v

    @field_validator("discovery")
    @classmethod
    def _discovery(cls, v: str) -> str:
        if v not in {"heartbeat", "kubernetes"}:
            raise ValueError("must be heartbeat or kubernetes")
        return v

    @model_validator(mode="after")
    def _cluster_needs_postgres(self) -> CoreSettings:
        if self.cluster and not self.database_url.startswith("postgresql"):
            raise ValueError("cluster needs database_url on PostgreSQL (postgresql+asyncpg://...)")
        return self

    def resolved_keys_dir(self) -> Path:
        return self.keys_dir or self.data_dir / "keys"

    def resolved_audit_key_file(self) -> Path:
        return self.audit_key_file or self.resolved_keys_dir() / "audit.key"

    def resolved_audit_checkpoint_file(self) -> Path:
        return self.audit_checkpoint_file or self.data_dir / "audit-checkpoints.jsonl"

    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite+aiosqlite:///{self.data_dir / 'core.db'}"


class EdgeSettings(Settings):
    edge_id: str = Field("edge-a", min_length=1, description="unique name of this edge node")
    zone: str = Field("zone-a", min_length=1, description="zone this edge serves")
    grpc_listen: str = Field("127.0.0.1:50061", description="host:port devices and clinicians dial")
    advertise_address: str = Field(
        "", description="address given to devices; empty means grpc_listen"
    )
    tls_server_name: str = Field(
        "",
        description="name in this edge's server certificate that devices, clinicians and the "
        "core check when they dial advertise_address (e.g. a pod IP); empty: its host",
    )
    http_listen: str = Field("127.0.0.1:9102", description="host:port of /metrics")
    core_address: str = Field("127.0.0.1:50051", description="the core's gRPC address")
    capacity_sessions: int = Field(
        1000, ge=1, description="sessions before placement looks elsewhere"
    )
    heartbeat_interval_s: float = Field(0.5, gt=0, description="load report period")
    subscriber_queue: int = Field(256, ge=4, description="events buffered per subscriber")
    max_batch_samples: int = Field(20000, ge=1, description="waveform samples allowed per batch")
    max_batch_vitals: int = Field(100, ge=1, description="spot readings allowed per batch")
    assignment_wait_s: float = Field(
        1.0, ge=0, description="how long a publish waits to learn of a fresh placement"
    )
    ecg_window_s: float = Field(8.0, gt=2, description="ECG window for R-peak heart rate")
    media_udp_port_min: int = Field(
        40000, ge=1024, le=65535, description="lowest UDP port of WebRTC (ICE) candidates"
    )
    media_udp_port_max: int = Field(
        40099, ge=1024, le=65535, description="highest UDP port of WebRTC (ICE) candidates"
    )
    media_pixel_budget: int = Field(
        640 * 480 * 30 * 8,
        ge=1,
        description="video pixels/s the edge forwards at full quality before low-risk calls degrade",
    )
    media_cpu_limit: float = Field(
        0.0,
        ge=0,
        description="cores of CPU the edge process may use before low-priority calls are asked "
        "to send less (measured, on top of media_pixel_budget); 0 turns it off",
    )
    media_passthrough: bool = Field(
        True,
        description="forward the patient's encoded video to viewers as it came (no decode and "
        "re-encode) when codecs match and the call is at full quality",
    )
    http_advertise_url: str = Field(
        "", description="base URL browsers use for this edge; empty means http://http_listen"
    )
    publish_rate_batches_per_s: float = Field(
        200.0, gt=0, description="per-session publish rate (token bucket); devices send ~25/s"
    )
    publish_burst_batches: int = Field(
        2000, ge=1, description="batches a session may send at once (catch-up after an outage)"
    )
    publish_idle_timeout_s: float = Field(
        600.0,
        gt=0,
        description="a publish stream with no batch for this long is closed (sparse "
        "devices, e.g. a blood-pressure cuff every few minutes, must stay connected)",
    )
    max_subscribers_per_session: int = Field(
        32, ge=1, description="concurrent vitals subscriptions of one session"
    )
    media_advertise_address: str = Field(
        "",
        description="public IP address peers reach this edge's UDP range at (1:1 NAT, like "
        "LiveKit's node_ip): host ICE candidates carry it instead of the pod's own address",
    )
    turn_urls: list[str] = Field(
        default_factory=list,
        description="STUN/TURN servers for peers and the edge itself, e.g. "
        "['turn:turn.example.org:3478?transport=udp']; empty: peers reach the UDP range directly",
    )
    turn_secret: str = Field(
        "",
        description="coturn's static-auth-secret (use-auth-secret): short-lived TURN "
        "credentials are derived from it; needed when turn_urls has a turn: or turns: url",
    )
    turn_credential_ttl_s: int = Field(
        3600, ge=60, description="lifetime of the TURN credentials handed to a peer"
    )
    media_silence_s: float = Field(
        4.0,
        gt=0,
        description="seconds without any RTP from a call's patient before the edge reports "
        "them gone (patient_connected false) while ICE still waits (~30 s) to give up",
    )
    vision_sample_hz: float = Field(
        15.0,
        gt=0,
        le=60,
        description="patient frames per second copied to vision (rPPG needs >= 8)",
    )
    max_clock_skew_s: float = Field(
        300.0,
        gt=0,
        description="a batch stamped further than this ahead of the edge clock is refused "
        "(INVALID_ARGUMENT): one future-dated reading would otherwise pin a NEWS2 parameter",
    )
    # RCP NEWS2 (2017) asks for observations at least hourly once the aggregate reaches 5
    # (or any single parameter 3) - the most frequent fixed schedule before continuous
    # monitoring. A value older than that is overdue at any level of concern, so by
    # default it no longer counts; hourly spot readings (a home BP cuff) still do.
    news2_max_input_age_s: float = Field(
        3600.0,
        gt=0,
        description="a NEWS2 input measured longer ago than this is shown as stale and left "
        "out of the total (the score is then incomplete)",
    )

    @model_validator(mode="after")
    def _media_network(self) -> EdgeSettings:
        for url in self.turn_urls:
            if not url.startswith(("stun:", "stuns:", "turn:", "turns:")):
                raise ValueError(
                    f"setting 'turn_urls': {url!r} must start with stun:, stuns:, turn: or turns:"
                )
        if any(u.startswith(("turn:", "turns:")) for u in self.turn_urls) and not self.turn_secret:
            raise ValueError("setting 'turn_secret' is needed for the turn: urls in 'turn_urls'")
        if self.media_advertise_address:
            try:
                ipaddress.IPv4Address(self.media_advertise_address)
            except ValueError:
                raise ValueError(
                    "setting 'media_advertise_address' must be an IPv4 address, not "
                    f"{self.media_advertise_address!r}"
                ) from None
        return self

    def advertised(self) -> str:
        return self.advertise_address or self.grpc_listen


S = TypeVar("S", bound=Settings)


def _env_overrides(model: type[Settings], environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in model.model_fields:
        key = ENV_PREFIX + name.upper()
        if key in environ:
            # YAML parsing lets env carry numbers, booleans and maps ({a: {b: 1}}).
            out[name] = yaml.safe_load(environ[key]) if environ[key] else ""
    known = {ENV_PREFIX + n.upper() for n in model.model_fields} | {ENV_BODY}
    unknown = sorted(k for k in environ if k.startswith(ENV_PREFIX) and k not in known)
    if unknown:
        raise ConfigError(f"unknown environment setting {unknown[0]} (known: {sorted(known)})")
    return out


def add_flags(parser: argparse.ArgumentParser, model: type[Settings]) -> None:
    """One --flag per setting; flags win over env and file."""
    parser.add_argument("--config", type=Path, help="YAML file of settings")
    for name, field in model.model_fields.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=f"setting_{name}",
            default=None,
            metavar=name.upper(),
            help=f"{field.description or ''} (default: {field.get_default(call_default_factory=True)!r})",
        )


def load_settings(
    model: type[S],
    ns: argparse.Namespace | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> S:
    """Merge file/body, env, flags and overrides; raise ConfigError naming the bad key."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    path = getattr(ns, "config", None) if ns is not None else None
    body = env.get(ENV_BODY)
    try:
        if path is not None:
            values.update(yaml.safe_load(Path(path).read_text()) or {})
        elif body:
            values.update(yaml.safe_load(body) or {})
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read configuration: {e}") from e
    if not isinstance(values, dict):
        raise ConfigError("configuration must be a YAML mapping of setting: value")
    values.update(_env_overrides(model, env))
    if ns is not None:
        for name in model.model_fields:
            v = getattr(ns, f"setting_{name}", None)
            if v is not None:
                values[name] = yaml.safe_load(v) if name == "zone_latency_ms" else v
    values.update(overrides or {})
    try:
        return model.model_validate(values)
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"]) or "?"
        raise ConfigError(f"setting {key!r}: {err['msg']}") from e


def parse_settings(model: type[S], argv: Sequence[str] | None, description: str) -> S:
    """Parse flags for a service's main(); exits with status 2 and the key on bad config."""
    parser = argparse.ArgumentParser(
        description=description,
        epilog=f"Every setting can also come from a YAML file (--config or the whole body in "
        f"{ENV_BODY}) or from {ENV_PREFIX}<NAME> environment variables; flags win.",
    )
    add_flags(parser, model)
    ns = parser.parse_args(argv)
    try:
        return load_settings(model, ns)
    except ConfigError as e:
        parser.error(str(e))
