"""The ceiling: a bare grpc.aio server relaying each published batch to its session's subscribers.

It does what the edge's transport does — one bidi Publish stream per device acked per batch,
one server stream per viewer with a bounded drop-oldest queue — and nothing else: no parsing,
validation, scoring or journaling. Run as its own process: `python -m loadtest.peers.echo`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from collections import deque
from collections.abc import AsyncIterator, Sequence

import grpc

from telehealth.rpc import server_options
from telehealth.runtime import settle_heap

SERVICE = "telehealth.loadtest.EchoService"
PUBLISH = f"/{SERVICE}/Publish"
SUBSCRIBE = f"/{SERVICE}/Subscribe"
STATS = f"/{SERVICE}/Stats"
SESSION_HEADER = "x-session"
# Same bound as the edge's default subscriber queue, so both shed load the same way.
QUEUE = 256
# What the edge acks with, roughly: PublishVitalsResponse{received_seq} — a few bytes.
ACK = b"\x10\x01"


class _Viewer:
    def __init__(self) -> None:
        self.q: deque[bytes] = deque()
        self.ready = asyncio.Event()
        self.dropped = 0


class EchoRelay:
    def __init__(self) -> None:
        self.viewers: dict[str, set[_Viewer]] = {}
        self.received = 0
        self.dropped = 0

    async def publish(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        session = dict(context.invocation_metadata() or ()).get(SESSION_HEADER, "")
        async for msg in requests:
            self.received += 1
            for v in self.viewers.get(str(session), ()):
                if len(v.q) >= QUEUE:
                    v.q.popleft()
                    v.dropped += 1
                    self.dropped += 1
                v.q.append(msg)
                v.ready.set()
            yield ACK

    async def subscribe(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        session = request.decode()
        v = _Viewer()
        self.viewers.setdefault(session, set()).add(v)
        try:
            while True:
                while not v.q:
                    v.ready.clear()
                    await v.ready.wait()
                items = list(v.q)
                v.q.clear()
                for m in items:
                    yield m
        finally:
            self.viewers[session].discard(v)

    async def stats(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return json.dumps(
            {
                "received": self.received,
                "dropped": self.dropped,
                "subscribers": sum(len(s) for s in self.viewers.values()),
            }
        ).encode()


def handler(relay: EchoRelay) -> grpc.GenericRpcHandler:
    # No (de)serialisers: the relay moves bytes, which is the point of a ceiling.
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Publish": grpc.stream_stream_rpc_method_handler(relay.publish),
            "Subscribe": grpc.unary_stream_rpc_method_handler(relay.subscribe),
            "Stats": grpc.unary_unary_rpc_method_handler(relay.stats),
        },
    )


async def serve(listen: str) -> None:
    server = grpc.aio.server(options=server_options(16 * 1024 * 1024))
    server.add_generic_rpc_handlers((handler(EchoRelay()),))
    port = server.add_insecure_port(listen)
    await server.start()
    settle_heap()  # as the core and edge do: the baseline runs with the same collector settings
    host = listen.rsplit(":", 1)[0]
    print(f"LISTENING {host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.peers.echo",
        description="Bare grpc.aio relay used as the throughput ceiling in benchmarks.",
    )
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--cpus", default="", help="comma-separated CPUs to pin to")
    ns = parser.parse_args(argv)
    if ns.cpus:
        # Before gRPC starts its threads, so they inherit the mask.
        os.sched_setaffinity(0, {int(c) for c in ns.cpus.split(",")})
    try:
        asyncio.run(serve(ns.listen))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
