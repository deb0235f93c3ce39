"""A local certificate authority for the dev mesh: one CA, a certificate per process and person."""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from telehealth.security.tls import TlsFiles

# Every service name both serves and dials (an edge serves devices and dials the core), so
# server certificates also carry clientAuth; the SANs are what the dialling side checks.
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_SERVICES = ("core", "edge-a", "edge-b", "edge-c")
# Devices and people present client certificates too, so mTLS proves "a device or person this
# CA enrolled"; the bearer token then says which session or clinician (see SECURITY notes).
DEFAULT_CLIENTS = ("device", "clinician", "operator")


@dataclass(frozen=True)
class Authority:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def create_authority(name: str = "telehealth-mesh dev CA", days: int = 3650) -> Authority:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Authority(key, cert)


def _san(hosts: Iterable[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def issue_certificate(
    ca: Authority,
    common_name: str,
    hosts: Sequence[str] = (),
    *,
    server: bool = True,
    days: int = 825,
    not_before: dt.datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    return key, builder.sign(ca.key, hashes.SHA256())


def load_authority(directory: Path) -> Authority | None:
    key_path, cert_path = directory / "ca.key", directory / "ca.crt"
    if not (key_path.exists() and cert_path.exists()):
        return None
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not an EC private key")
    return Authority(key, x509.load_pem_x509_certificate(cert_path.read_bytes()))


def write_certificate(
    directory: Path,
    ca: Authority,
    name: str,
    hosts: Sequence[str] = (),
    *,
    server: bool = True,
    days: int = 825,
) -> TlsFiles:
    key, cert = issue_certificate(ca, name, hosts, server=server, days=days)
    files = files_for(directory, name)
    # Key first then cert, each replaced atomically: a reloading server never reads half a file.
    tmp_key, tmp_cert = files.key.with_suffix(".key.tmp"), files.cert.with_suffix(".crt.tmp")
    _write_key(tmp_key, key)
    tmp_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tmp_key.replace(files.key)
    tmp_cert.replace(files.cert)
    return files


def files_for(directory: Path, name: str) -> TlsFiles:
    return TlsFiles(directory / f"{name}.crt", directory / f"{name}.key", directory / "ca.crt")


def init_pki(
    directory: Path,
    services: Sequence[str] = DEFAULT_SERVICES,
    clients: Sequence[str] = DEFAULT_CLIENTS,
    hosts: Sequence[str] = DEFAULT_HOSTS,
) -> dict[str, TlsFiles]:
    """Create (or complete) the CA and one certificate per name; existing files are kept."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    ca = load_authority(directory)
    if ca is None:
        ca = create_authority()
        _write_key(directory / "ca.key", ca.key)
        (directory / "ca.crt").write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    out: dict[str, TlsFiles] = {}
    for name in services:
        f = files_for(directory, name)
        out[name] = (
            f
            if f.cert.exists() and f.key.exists()
            else write_certificate(directory, ca, name, [*hosts, name, f"telehealth-{name}"])
        )
    for name in clients:
        f = files_for(directory, name)
        out[name] = (
            f
            if f.cert.exists() and f.key.exists()
            else write_certificate(directory, ca, name, server=False)
        )
    return out
