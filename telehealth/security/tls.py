"""mTLS material from files: server credentials that demand client certs and reload on renewal."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    Context = grpc.aio.ServicerContext[Any, Any]
else:
    Context = grpc.aio.ServicerContext


class TlsConfigError(ValueError):
    """The TLS file settings are incomplete or unreadable; the message names the setting."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of one process: its certificate chain, its private key and the CA it trusts."""

    cert: Path
    key: Path
    ca: Path

    @classmethod
    def from_settings(cls, cert: str | Path, key: str | Path, ca: str | Path) -> TlsFiles | None:
        """None when all three are empty (plaintext for tests and dev); an error when partial."""
        given = {"tls_cert_file": str(cert), "tls_key_file": str(key), "tls_ca_file": str(ca)}
        if not any(given.values()):
            return None
        missing = [k for k, v in given.items() if not v]
        if missing:
            raise TlsConfigError(
                f"setting {missing[0]!r} is empty; TLS needs tls_cert_file, tls_key_file and "
                "tls_ca_file together (or none of them for plaintext)"
            )
        return cls(Path(cert), Path(key), Path(ca))

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(cert chain, key, CA) as bytes."""
        return self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()

    def stamp(self) -> tuple[tuple[int, int], ...]:
        """What changes when any file is renewed (mtime and size), cheap to compare."""
        return files_stamp((self.cert, self.key, self.ca))


def files_stamp(paths: Iterable[Path]) -> tuple[tuple[int, int], ...]:
    """(mtime, size) of each file, (0, 0) for one missing: what a renewal changes, cheap to
    compare (pki's writers make sure a same-size rewrite changes the mtime)."""
    out = []
    for p in paths:
        try:
            st = os.stat(p)
        except OSError:
            out.append((0, 0))
        else:
            out.append((st.st_mtime_ns, st.st_size))
    return tuple(out)


def _server_config(files: TlsFiles) -> Any:
    cert, key, ca = files.read()
    return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)


class ReloadingServerCredentials:
    """grpc calls `fetch` before each handshake; it returns a new configuration only when the
    files changed, so renewed certificates take effect for new connections without a restart."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._lock = threading.Lock()
        self._stamp = files.stamp()
        self.reloads = 0
        self.credentials = grpc.dynamic_ssl_server_credentials(
            _server_config(files), self.fetch, require_client_authentication=True
        )

    def fetch(self) -> Any:
        # Called from grpc's own threads, hence the lock around the shared stamp.
        with self._lock:
            stamp = self.files.stamp()
            if stamp == self._stamp:
                return None
            try:
                config = _server_config(self.files)
                # A half-written renewal (key and cert disagreeing) must not replace a good pair.
                _check_pair(self.files)
            except (OSError, ValueError) as e:
                log.warning(
                    "TLS files changed but cannot be loaded; keeping the old ones",
                    extra={"error": str(e)},
                )
                return None
            self._stamp = stamp
            self.reloads += 1
            log.info("TLS certificate reloaded", extra={"cert": str(self.files.cert)})
            return config


def _check_pair(files: TlsFiles) -> None:
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    key = serialization.load_pem_private_key(files.key.read_bytes(), password=None)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    if cert.public_key().public_bytes(enc, pub) != key.public_key().public_bytes(enc, pub):
        raise ValueError("certificate and key do not match")


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Client side of mTLS: trust only our CA and present our own certificate.
    Read at call time, so a channel rebuilt on reconnect picks up renewed files."""
    cert, key, ca = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def peer_common_name(context: Context) -> str:
    """The CN of the client certificate of this call ('' on plaintext)."""
    values = list(context.auth_context().get("x509_common_name") or [])
    if not values:
        return ""
    v = values[0]
    return v.decode() if isinstance(v, bytes) else str(v)


def certificate_common_name(pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(pem)
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else ""
