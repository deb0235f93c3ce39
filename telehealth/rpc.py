"""gRPC plumbing shared by every server: construction, interceptors, health, reflection, errors."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from telehealth.errors import DomainError, ErrorCode, InvalidArgument
from telehealth.security.tls import ReloadingServerCredentials, TlsFiles, channel_credentials
from telehealth.telemetry.metrics import RpcMetrics
from telehealth.v1 import vitals_pb2

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Context = grpc.aio.ServicerContext
    Handler = grpc.RpcMethodHandler

STATUS_OF: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCode.OUT_OF_RANGE: grpc.StatusCode.OUT_OF_RANGE,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_of(err: DomainError) -> grpc.StatusCode:
    return STATUS_OF[err.code]


class Malformed:
    """Stands in for a request that did not decode, so the handler can refuse it by name
    (grpc would otherwise answer UNKNOWN, as if the server had failed)."""

    def __init__(self, error: str) -> None:
        self.error = error


def _safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def safe(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as e:  # any decode failure of untrusted bytes
            return Malformed(type(e).__name__)

    return safe


def _checked(request: Any, method: str) -> Any:
    if isinstance(request, Malformed):
        raise InvalidArgument(
            f"request to {method} is not a valid protobuf message ({request.error})"
        )
    return request


class _CheckedRequests:
    """A request stream whose undecodable messages are refused by name. A plain async
    iterator rather than an async generator: on a stream of thousands of batches a second,
    one coroutine per message costs less than resuming a generator frame through asend()."""

    __slots__ = ("_method", "_next")

    def __init__(self, requests: Any, method: str) -> None:
        self._next = requests.__aiter__().__anext__
        self._method = method

    def __aiter__(self) -> _CheckedRequests:
        return self

    async def __anext__(self) -> Any:
        r = await self._next()
        if type(r) is Malformed:
            raise InvalidArgument(
                f"request to {self._method} is not a valid protobuf message ({r.error})"
            )
        return r


def _split(method: str) -> tuple[str, str]:
    # "/telehealth.v1.VitalsService/Publish" -> ("telehealth.v1.VitalsService", "Publish")
    _, service, name = method.split("/", 2)
    return service, name


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Measures every RPC and turns DomainError into its gRPC status in one place."""

    def __init__(self, metrics: RpcMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, method = _split(handler_call_details.method)
        m = self._metrics

        def _begin() -> float:
            m.started.labels(service, method).inc()
            m.in_flight.labels(service, method).inc()
            return time.perf_counter()

        def _end(t0: float, context: Context) -> None:
            m.in_flight.labels(service, method).dec()
            code = context.code()
            name = code.name if isinstance(code, grpc.StatusCode) else "OK"
            m.duration.labels(service, method, name).observe(time.perf_counter() - t0)

        async def _abort(context: Context, err: DomainError) -> None:
            await context.abort(status_of(err), err.message)

        if handler.unary_unary is not None:
            inner_uu: Any = handler.unary_unary

            async def unary_unary(request: Any, context: Context) -> Any:
                t0 = _begin()
                try:
                    return await inner_uu(_checked(request, method), context)
                except DomainError as e:
                    await _abort(context, e)
                finally:
                    _end(t0, context)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=_safe_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        # Streaming handlers write each response themselves (context.write) instead of
        # re-yielding it: one async-generator layer fewer per message on the hot paths
        # (Publish acks, Subscribe events), same error mapping and metrics.
        if handler.unary_stream is not None:
            inner_us: Any = handler.unary_stream

            async def unary_stream(request: Any, context: Context) -> None:
                t0 = _begin()
                try:
                    write = context.write
                    async for item in inner_us(_checked(request, method), context):
                        await write(item)
                except DomainError as e:
                    await _abort(context, e)
                finally:
                    _end(t0, context)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=_safe_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            inner_ss: Any = handler.stream_stream

            async def stream_stream(request_iterator: Any, context: Context) -> None:
                t0 = _begin()
                try:
                    write = context.write
                    requests = _CheckedRequests(request_iterator, method)
                    async for item in inner_ss(requests, context):
                        await write(item)
                except DomainError as e:
                    await _abort(context, e)
                finally:
                    _end(t0, context)

            return grpc.stream_stream_rpc_method_handler(
                stream_stream,
                request_deserializer=_safe_deserializer(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return handler


def server_options(max_message_bytes: int, idle_timeout_s: float = 300.0) -> list[tuple[str, Any]]:
    return [
        # A connection with no RPC for this long is closed: idle sockets cost memory per peer.
        ("grpc.max_connection_idle_ms", int(idle_timeout_s * 1000)),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
    ]


def secure_channel(
    address: str,
    tls: TlsFiles | None,
    options: Sequence[tuple[str, Any]] | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    server_name: str = "",
) -> grpc.aio.Channel:
    """The one way to dial a peer: mTLS when files are configured, plaintext otherwise.
    The files are read now, so a channel rebuilt after a reconnect uses renewed certificates.
    `server_name`: the name the peer's certificate must carry when it differs from the host
    dialled (an edge pod dialled by IP, its certificate naming the zone's Service)."""
    opts = list(options if options is not None else channel_options())
    if tls is None:
        return grpc.aio.insecure_channel(address, options=opts, interceptors=interceptors)
    if server_name:
        opts.append(("grpc.ssl_target_name_override", server_name))
    return grpc.aio.secure_channel(
        address, channel_credentials(tls), options=opts, interceptors=interceptors
    )


# An edge's heartbeat stream to the core retries at most this far apart (before jitter), so
# after a core restart every edge is back well within the heartbeat timeout (default 3 s).
CORE_LINK_BACKOFF_CAP_S = 0.5
# jittered() makes a wait between half the backoff and this factor of it.
BACKOFF_JITTER_MAX = 1.5
# The longest an edge waits between attempts to reach the core; the core's liveness grace
# after it starts serving is its heartbeat timeout plus this.
EDGE_RECONNECT_MAX_S = CORE_LINK_BACKOFF_CAP_S * BACKOFF_JITTER_MAX


def channel_options(
    max_message_bytes: int = 4 * 1024 * 1024, max_reconnect_backoff_s: float = 2.0
) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # Detect a dead peer within seconds, so a device fails over quickly.
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", int(max_reconnect_backoff_s * 1000)),
    ]


class GrpcServer:
    """A grpc.aio server with health, reflection and the shared interceptor, bound to one address."""

    def __init__(
        self,
        listen: str,
        metrics: RpcMetrics,
        max_message_bytes: int,
        extra_interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        tls: TlsFiles | None = None,
        idle_timeout_s: float = 300.0,
    ) -> None:
        self.server = grpc.aio.server(
            interceptors=[ServerInterceptor(metrics), *extra_interceptors],
            options=server_options(max_message_bytes, idle_timeout_s),
        )
        # Client certificates are required whenever TLS is on: mTLS, never one-way TLS.
        self.tls = ReloadingServerCredentials(tls) if tls is not None else None
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._listen = listen
        self.port = 0
        self._service_names: list[str] = [health.SERVICE_NAME, reflection.SERVICE_NAME]

    def add(
        self, register: Callable[[Any, grpc.aio.Server], None], servicer: Any, name: str
    ) -> None:
        register(servicer, self.server)
        self._service_names.append(name)

    async def start(self) -> int:
        reflection.enable_server_reflection(self._service_names, self.server)
        if self.tls is not None:
            self.port = self.server.add_secure_port(self._listen, self.tls.credentials)
        else:
            self.port = self.server.add_insecure_port(self._listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self._listen}")
        await self.server.start()
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self._service_names]:
            await self.health.set(name, status)

    async def stop(self, grace: float = 2.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


def host_of(listen: str) -> str:
    return listen.rsplit(":", 1)[0]


def with_port(listen: str, port: int) -> str:
    return f"{host_of(listen)}:{port}"


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def with_refresh_token(publish_request: bytes, token: str) -> bytes:
    """An encoded PublishVitalsRequest with refresh_token added, for a fresh token sent
    in-band on an open Publish stream: encoded messages concatenate as a merge, so the
    batch is not parsed and encoded again."""
    return (
        publish_request + vitals_pb2.PublishVitalsRequest(refresh_token=token).SerializeToString()
    )


def token_from(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value[len("Bearer ") :]
    return None


def install_signal_handlers(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT set `stop`, so serve() drains gracefully."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def jittered(backoff: float) -> float:
    """A wait of 0.5 to BACKOFF_JITTER_MAX times `backoff`, at random: jitter keeps many
    clients that lost the same peer from retrying in lock step."""
    return backoff * (BACKOFF_JITTER_MAX - 1.0 + random.random())


async def wait_backoff(stop: asyncio.Event, backoff: float, cap: float = 2.0) -> float:
    """Sleep a jittered `backoff` (or until stop); return the next, doubled up to `cap`."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), jittered(backoff))
    return min(backoff * 2, cap)
