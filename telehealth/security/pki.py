"""A local certificate authority for the dev mesh: one CA, a certificate per process and person.

Each leaf carries the role URI of telehealth.security.identity (spiffe://telehealth/...),
which is what the core's access rules check; `renew_pki` re-issues leaves from the same CA
so running servers can show that renewed files are picked up without a restart."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from telehealth.security.identity import certificate_identity, role_uri
from telehealth.security.tls import TlsFiles

# Every service name both serves and dials (an edge serves devices and dials the core), so
# server certificates also carry clientAuth; the SANs are what the dialling side checks.
DEFAULT_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_SERVICES = ("core", "edge-a", "edge-b", "edge-c")
# Devices and people present client certificates too, so mTLS proves "a device or person this
# CA enrolled"; the bearer token then says which session or clinician (see SECURITY notes).
DEFAULT_CLIENTS = ("device", "clinician", "operator")
# A zone certificate (any edge of the zone) is filed under this prefix and the zone's name.
ZONE_CERT_PREFIX = "edges-"


def default_role_uri(name: str, *, server: bool) -> str:
    """The role a certificate named `name` gets: services are the core or an edge of that id;
    clients are clinician, operator, or a device (named when not just "device")."""
    if server:
        if name == "core":
            return role_uri("core")
        if name.startswith(ZONE_CERT_PREFIX):
            return role_uri("zone", name[len(ZONE_CERT_PREFIX) :])
        return role_uri("edge", name)
    if name in ("clinician", "operator", "device"):
        return role_uri(name)
    return role_uri("device", name.removeprefix("device-"))


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


def _san(hosts: Iterable[str], uris: Iterable[str] = ()) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    names += [x509.UniformResourceIdentifier(u) for u in uris]
    return x509.SubjectAlternativeName(names)


def issue_certificate(
    ca: Authority,
    common_name: str,
    hosts: Sequence[str] = (),
    *,
    server: bool = True,
    days: int = 825,
    not_before: dt.datetime | None = None,
    uris: Sequence[str] = (),
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
    if hosts or uris:
        builder = builder.add_extension(_san(hosts, uris), critical=False)
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
    uri: str | None = None,
) -> TlsFiles:
    """Issue and write `name`.crt/.key; the role URI defaults to default_role_uri(name)."""
    role = uri if uri is not None else default_role_uri(name, server=server)
    key, cert = issue_certificate(ca, name, hosts, server=server, days=days, uris=[role])
    return _write_pair(files_for(directory, name), key, cert)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _write_pair(
    files: TlsFiles, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> TlsFiles:
    before = _stamp(files.cert)
    # Key first then cert, each replaced atomically: a reloading server never reads half a file.
    tmp_key, tmp_cert = files.key.with_suffix(".key.tmp"), files.cert.with_suffix(".crt.tmp")
    _write_key(tmp_key, key)
    tmp_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tmp_key.replace(files.key)
    tmp_cert.replace(files.cert)
    after = _stamp(files.cert)
    if before is not None and after == before:
        # Same size within one mtime tick: servers watch (mtime, size), so make it differ.
        os.utime(files.cert, ns=(after[0], after[0] + 1))
    return files


def files_for(directory: Path, name: str) -> TlsFiles:
    return TlsFiles(directory / f"{name}.crt", directory / f"{name}.key", directory / "ca.crt")


def _current(f: TlsFiles, uri: str) -> bool:
    """An existing certificate is kept when it carries the role URI it should."""
    if not (f.cert.exists() and f.key.exists()):
        return False
    try:
        cert = x509.load_pem_x509_certificate(f.cert.read_bytes())
    except ValueError:
        return False
    return certificate_identity(cert).uri == uri


def init_pki(
    directory: Path,
    services: Sequence[str] = DEFAULT_SERVICES,
    clients: Sequence[str] = DEFAULT_CLIENTS,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    zones: Sequence[str] = (),
) -> dict[str, TlsFiles]:
    """Create (or complete) the CA and one certificate per name; existing files are kept,
    except certificates from before role URIs, which are re-issued with theirs. `zones` adds
    one certificate per zone (edges-<zone>) that any edge of that zone may present."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    ca = load_authority(directory)
    if ca is None:
        ca = create_authority()
        _write_key(directory / "ca.key", ca.key)
        (directory / "ca.crt").write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    out: dict[str, TlsFiles] = {}
    for name in [*services, *(ZONE_CERT_PREFIX + z for z in zones)]:
        f = files_for(directory, name)
        uri = default_role_uri(name, server=True)
        out[name] = (
            f
            if _current(f, uri)
            else write_certificate(directory, ca, name, [*hosts, name, f"telehealth-{name}"])
        )
    for name in clients:
        f = files_for(directory, name)
        uri = default_role_uri(name, server=False)
        out[name] = f if _current(f, uri) else write_certificate(directory, ca, name, server=False)
    return out


@dataclass(frozen=True)
class Renewed:
    name: str
    files: TlsFiles
    old_serial: int
    new_serial: int


def renew_pki(directory: Path, names: Sequence[str] = (), days: int = 825) -> list[Renewed]:
    """Re-issue leaf certificates from the existing CA with a fresh key and serial, keeping
    each one's subject, SANs (role URI included) and usages; `names` limits which. Running
    servers pick the new files up on their next handshake, clients on their next channel."""
    ca = load_authority(directory)
    if ca is None:
        raise FileNotFoundError(f"no CA in {directory} (ca.crt and ca.key); run `pki init` first")
    wanted = set(names)
    out: list[Renewed] = []
    for cert_path in sorted(directory.glob("*.crt")):
        name = cert_path.stem
        if name == "ca" or (wanted and name not in wanted):
            continue
        files = files_for(directory, name)
        if not files.key.exists():
            continue
        old = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = ec.generate_private_key(ec.SECP256R1())
        start = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
        builder = (
            x509.CertificateBuilder()
            .subject_name(old.subject)
            .issuer_name(ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
        )
        for ext in old.extensions:
            if not isinstance(ext.value, x509.AuthorityKeyIdentifier | x509.SubjectKeyIdentifier):
                builder = builder.add_extension(ext.value, critical=ext.critical)
        cert = builder.sign(ca.key, hashes.SHA256())
        _write_pair(files, key, cert)
        out.append(Renewed(name, files, old.serial_number, cert.serial_number))
    missing = wanted - {r.name for r in out}
    if missing:
        raise FileNotFoundError(f"no certificate and key for {', '.join(sorted(missing))}")
    return out
