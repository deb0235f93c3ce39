"""How the client programs dial the edge an assignment names (TLS name included)."""

from __future__ import annotations

import grpc

from telehealth.rpc import secure_channel
from telehealth.security.tls import TlsFiles
from telehealth.v1 import sessions_pb2


def edge_channel(a: sessions_pb2.Assignment, tls: TlsFiles | None) -> grpc.aio.Channel:
    """A channel to the assignment's edge. Edges may be dialled by IP address (Kubernetes pod
    IPs) that their certificate does not carry; the name it does carry comes in the
    assignment (INTERFACES §2; empty: the host dialled)."""
    return secure_channel(a.edge_address, tls, server_name=a.edge_tls_server_name)
