"""Bind every WebRTC (ICE) host candidate inside the configured UDP port range.

aioice binds candidate sockets to port 0, so the kernel picks any ephemeral port (aioice#47)
and a Kubernetes Service cannot expose them. The edge replaces, per peer connection, the one
aioice step that gathers a component's candidates: the same candidates (host, server-reflexive,
relayed through TURN), but host sockets on ports from the range. Nothing is patched globally,
so other aiortc users in the process (tests, the device agent) are untouched.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import types
from typing import Any

from aioice import Candidate, Connection
from aioice.candidate import candidate_foundation, candidate_priority
from aioice.ice import (
    StunProtocol,
    TransportPolicy,
    relayed_candidate,
    server_reflexive_candidate,
)
from aioice.turn import UDP_SOCKET_BUFFER_SIZE
from aiortc import RTCPeerConnection

from telehealth.config import ConfigError
from telehealth.errors import ResourceExhausted

log = logging.getLogger(__name__)


class UdpPortRange:
    """Hands out ports of [low, high] round-robin, skipping ones the kernel says are taken."""

    def __init__(self, low: int, high: int) -> None:
        if not 1024 <= low <= high <= 65535:
            raise ConfigError(
                f"setting 'media_udp_port_min'/'media_udp_port_max': need 1024 <= min <= max "
                f"<= 65535, got {low}..{high}"
            )
        self.low = low
        self.high = high
        self._next = low

    @property
    def size(self) -> int:
        return self.high - self.low + 1

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    async def bind(
        self, address: str, protocol_factory: Any
    ) -> tuple[asyncio.DatagramTransport, StunProtocol]:
        """A datagram endpoint on address at the first free port of the range."""
        loop = asyncio.get_running_loop()
        for _ in range(self.size):
            port = self._next
            self._next = self.low if port >= self.high else port + 1
            try:
                transport, protocol = await loop.create_datagram_endpoint(
                    protocol_factory, local_addr=(address, port)
                )
            except OSError as e:
                if e.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise
            return transport, protocol
        raise ResourceExhausted(
            f"all {self.size} UDP ports {self.low}-{self.high} for WebRTC on {address} are in "
            "use; widen media_udp_port_min/max or place the session on another edge"
        )


def _in_range_candidates(ports: UdpPortRange) -> Any:
    """aioice's Connection.get_component_candidates (aioice 0.10), with one change: host
    sockets are bound inside `ports` rather than on port 0. Everything else is kept as aioice
    does it: an address that cannot be bound (no longer configured, no route, ...) is skipped,
    not fatal to the call; server-reflexive candidates share the host sockets (so they are in
    range too); a TURN server gives a relayed candidate (its socket talks to the TURN server
    only, so its own port need not be in range)."""

    async def get_component_candidates(
        self: Connection, component: int, addresses: list[str], timeout: int = 5
    ) -> list[Candidate]:
        candidates: list[Candidate] = []
        host_protocols: list[StunProtocol] = []
        try:
            for address in addresses:
                try:
                    transport, protocol = await ports.bind(address, lambda: StunProtocol(self))
                except ResourceExhausted:
                    raise
                except OSError as e:
                    log.info("cannot bind a WebRTC candidate on %s (%s); skipping it", address, e)
                    continue
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_SOCKET_BUFFER_SIZE)
                host_protocols.append(protocol)
                host, port = transport.get_extra_info("sockname")[:2]
                protocol.local_candidate = Candidate(
                    foundation=candidate_foundation("host", "udp", host),
                    component=component,
                    transport="udp",
                    priority=candidate_priority(component, "host"),
                    host=host,
                    port=port,
                    type="host",
                )
                candidates.append(protocol.local_candidate)
        except ResourceExhausted:
            # The range is full: do not keep half a set of sockets open for a call that
            # cannot be made (the caller gets RESOURCE_EXHAUSTED naming the range).
            for p in host_protocols:
                p.transport.close()
            raise
        self._protocols += host_protocols
        tasks: list[asyncio.Task[tuple[Candidate, StunProtocol | None]]] = []
        if self.stun_server:
            tasks += [
                asyncio.create_task(server_reflexive_candidate(p, self.stun_server))
                for p in host_protocols
                if ipaddress.ip_address(p.local_candidate.host).version == 4
            ]
        if self.turn_server:
            tasks.append(
                asyncio.create_task(
                    relayed_candidate(
                        component=component,
                        hide_related_address=self._transport_policy == TransportPolicy.RELAY,
                        protocol_factory=lambda: StunProtocol(self),
                        turn_server=self.turn_server,
                        turn_username=self.turn_username,
                        turn_password=self.turn_password,
                        turn_ssl=self.turn_ssl,
                        turn_transport=self.turn_transport,
                    )
                )
            )
        if tasks:
            done, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in done:
                if task.exception() is None:
                    candidate, relay_protocol = task.result()
                    candidates.append(candidate)
                    if relay_protocol is not None:
                        self._protocols.append(relay_protocol)
                else:
                    log.warning("STUN/TURN candidate failed: %s", task.exception())
            for task in pending:
                task.cancel()
        return candidates

    return get_component_candidates


def bind_in_range(pc: RTCPeerConnection, ports: UdpPortRange) -> None:
    """Make pc's ICE gatherers open host sockets inside `ports`. Call before setLocalDescription."""
    patched = _in_range_candidates(ports)
    seen: set[int] = set()
    for t in pc.getTransceivers():
        gatherer = t.receiver.transport.transport.iceGatherer
        conn = gatherer._connection
        if id(conn) in seen:
            continue
        seen.add(id(conn))
        conn.get_component_candidates = types.MethodType(patched, conn)  # type: ignore[method-assign]


def candidate_ports(sdp: str) -> list[int]:
    """Ports of the a=candidate lines of an SDP (RFC 8839: foundation comp transport prio addr port)."""
    ports = []
    for line in sdp.splitlines():
        if line.startswith("a=candidate:"):
            parts = line.split()
            if len(parts) > 5:
                ports.append(int(parts[5]))
    return ports
