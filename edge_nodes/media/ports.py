"""Bind every WebRTC (ICE) host candidate inside the configured UDP port range.

aioice binds candidate sockets to port 0, so the kernel picks any ephemeral port (aioice#47)
and a Kubernetes Service cannot expose them. The edge replaces, per peer connection, the one
aioice step that opens host sockets: same candidates, but on ports from the range. Nothing is
patched globally, so other aiortc users in the process (tests, the device agent) are untouched.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import socket
import types
from typing import Any

from aioice import Candidate, Connection
from aioice.candidate import candidate_foundation, candidate_priority
from aioice.ice import StunProtocol, server_reflexive_candidate
from aioice.turn import UDP_SOCKET_BUFFER_SIZE
from aiortc import RTCPeerConnection

from telehealth.config import ConfigError
from telehealth.errors import ResourceExhausted


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
    async def get_component_candidates(
        self: Connection, component: int, addresses: list[str], timeout: int = 5
    ) -> list[Candidate]:
        candidates: list[Candidate] = []
        host_protocols: list[StunProtocol] = []
        try:
            for address in addresses:
                transport, protocol = await ports.bind(address, lambda: StunProtocol(self))
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
            # Do not keep half a set of sockets open for a call that cannot be made.
            for p in host_protocols:
                p.transport.close()
            raise
        self._protocols += host_protocols
        # Server-reflexive candidates share the host sockets, so they are in range too.
        if self.stun_server:
            tasks = [
                asyncio.create_task(server_reflexive_candidate(p, self.stun_server))
                for p in host_protocols
                if ipaddress.ip_address(p.local_candidate.host).version == 4
            ]
            if tasks:
                done, pending = await asyncio.wait(tasks, timeout=timeout)
                for task in done:
                    if task.exception() is None:
                        candidates.append(task.result()[0])
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
