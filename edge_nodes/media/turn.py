"""STUN/TURN servers for peers, with short-lived TURN credentials (coturn's use-auth-secret).

coturn's "TURN REST API" scheme (draft-uberti-behave-turn-rest): the username is
"<expiry unix seconds>:<anything>", the password base64(HMAC-SHA1(shared secret, username)).
coturn checks the HMAC with the same secret and refuses the username once its time has passed,
so the edge hands out credentials without talking to coturn, and a leaked one is worth little.
Here the "anything" is the session id, so coturn's logs say which session relayed.

The SDP side of a 1:1 NAT (LiveKit's node_ip): host candidates carry the address peers reach
the edge at (`media_advertise_address`) instead of the pod's own.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import time
from dataclasses import dataclass

TURN_SCHEMES = ("turn:", "turns:")
STUN_SCHEMES = ("stun:", "stuns:")


@dataclass(frozen=True)
class IceServerConfig:
    """A STUN/TURN server as RTCConfiguration.iceServers takes it."""

    urls: tuple[str, ...]
    username: str = ""
    credential: str = ""


def turn_credential(secret: str, username: str) -> str:
    """coturn's password for a REST-API username: base64(HMAC-SHA1(secret, username))."""
    mac = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return base64.b64encode(mac).decode()


def ice_servers(
    urls: list[str], secret: str, who: str, ttl_s: int, now: float | None = None
) -> tuple[list[IceServerConfig], int]:
    """The servers for one peer and when their credentials expire (unix seconds; 0: none).

    STUN urls go as they are; TURN urls share one username valid for ttl_s."""
    stun = tuple(u for u in urls if u.startswith(STUN_SCHEMES))
    turn = tuple(u for u in urls if u.startswith(TURN_SCHEMES))
    out: list[IceServerConfig] = []
    if stun:
        out.append(IceServerConfig(stun))
    expiry = 0
    if turn:
        expiry = int(now if now is not None else time.time()) + ttl_s
        username = f"{expiry}:{who}"
        out.append(IceServerConfig(turn, username, turn_credential(secret, username)))
    return out, expiry


def advertise_host_candidates(sdp: str, address: str) -> str:
    """The SDP with every IPv4 host candidate (and the connection lines) naming `address`:
    behind a 1:1 NAT the peer must send to the public address, which maps to the edge's own.
    Server-reflexive and relayed candidates already carry outside addresses and stay."""
    if not address:
        return sdp
    out = []
    for line in sdp.split("\r\n"):
        if line.startswith("a=candidate:"):
            parts = line.split(" ")
            # RFC 8839: foundation component transport priority address port "typ" type ...
            if len(parts) > 7 and parts[7] == "host" and _ipv4(parts[4]):
                parts[4] = address
                line = " ".join(parts)
        elif line.startswith("c=IN IP4 "):
            line = "c=IN IP4 " + address
        out.append(line)
    return "\r\n".join(out)


def _ipv4(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 4
    except ValueError:
        return False  # an mDNS name: not ours to rewrite
