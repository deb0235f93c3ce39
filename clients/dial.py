"""How the client programs dial the edge an assignment names (TLS name included)."""

from __future__ import annotations

import inspect

import grpc

from telehealth.rpc import secure_channel
from telehealth.security.tls import TlsFiles
from telehealth.v1 import sessions_pb2

# secure_channel(server_name=) arrives with the core's edge TLS names (INTERFACES §2); until a
# tree has it, an edge is checked against the host it is dialled by, as before.
_HAS_SERVER_NAME = "server_name" in inspect.signature(secure_channel).parameters


def edge_channel(a: sessions_pb2.Assignment, tls: TlsFiles | None) -> grpc.aio.Channel:
    """A channel to the assignment's edge. Edges may be dialled by IP address (Kubernetes pod
    IPs); the name their certificate carries comes in the assignment."""
    if _HAS_SERVER_NAME and a.edge_tls_server_name:
        return secure_channel(a.edge_address, tls, server_name=a.edge_tls_server_name)  # type: ignore[call-arg,unused-ignore]
    return secure_channel(a.edge_address, tls)
