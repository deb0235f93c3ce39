"""Who a peer is, from the role URI (SPIFFE-style SAN) of its client certificate.

Every certificate the mesh issues carries exactly one URI SAN naming its role:

    spiffe://telehealth/core
    spiffe://telehealth/edge/<edge_id>    an edge with exactly this id
    spiffe://telehealth/zone/<zone>       any edge serving this zone (Kubernetes: pod names vary)
    spiffe://telehealth/device[/<id>]     a patient's device agent
    spiffe://telehealth/clinician, spiffe://telehealth/operator   people's CLI clients

The CN stays a human-readable name for logs; the URI is what access rules check, because one
CA signs every certificate and a CN alone cannot tell an edge from a device named like one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cryptography import x509

if TYPE_CHECKING:
    import grpc

    Context = grpc.aio.ServicerContext[Any, Any]
else:
    Context = Any

TRUST_DOMAIN = "telehealth"
PREFIX = f"spiffe://{TRUST_DOMAIN}/"
# Roles that name something after the role (edge id, zone) must; device may.
NAMED = ("edge", "zone")
OPTIONALLY_NAMED = ("device",)
UNNAMED = ("core", "clinician", "operator")
KINDS = (*UNNAMED, *NAMED, *OPTIONALLY_NAMED)
MAX_NAME = 128


@dataclass(frozen=True)
class PeerIdentity:
    """A certificate's role (one of KINDS) and the name it carries ('' when none)."""

    kind: str
    name: str = ""
    cn: str = ""

    @property
    def uri(self) -> str:
        return role_uri(self.kind, self.name)

    def describe(self) -> str:
        """For refusal messages: what the certificate says it is."""
        what = self.uri if self.kind else "a certificate without a role URI"
        return what + (f" (CN {self.cn[:64]!r})" if self.cn else "")


NO_IDENTITY = PeerIdentity("")


def role_uri(kind: str, name: str = "") -> str:
    """The SAN URI of a role; raises ValueError for a kind or name the scheme does not allow."""
    if kind not in KINDS:
        raise ValueError(f"role must be one of {', '.join(KINDS)}, not {kind!r}")
    if kind in NAMED and not name:
        raise ValueError(f"a {kind} certificate must name its {kind}")
    if kind in UNNAMED and name:
        raise ValueError(f"a {kind} certificate carries no name")
    if name and (len(name) > MAX_NAME or not all(c.isalnum() or c in "-._" for c in name)):
        raise ValueError(f"{kind} name must be 1-{MAX_NAME} of [A-Za-z0-9-._], not {name!r}")
    return PREFIX + kind + (f"/{name}" if name else "")


def parse_uri(uri: str) -> PeerIdentity | None:
    """The identity a role URI names, or None when it is not one of ours."""
    if not uri.startswith(PREFIX):
        return None
    kind, _, name = uri[len(PREFIX) :].partition("/")
    try:
        role_uri(kind, name)
    except ValueError:
        return None
    return PeerIdentity(kind, name)


def certificate_identity(cert: x509.Certificate) -> PeerIdentity:
    """The role of a certificate: its one role URI. None of ours, or two different ones (a
    certificate cannot be two things), give NO_IDENTITY, which no rule accepts."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    found = {i for i in (parse_uri(u) for u in uris) if i is not None}
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    if len(found) != 1:
        return PeerIdentity("", "", cn)
    one = found.pop()
    return PeerIdentity(one.kind, one.name, cn)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def peer_identity(context: Context) -> PeerIdentity:
    """The identity of this call's client certificate (NO_IDENTITY on plaintext). grpc hands
    over the verified certificate's URI SANs as `peer_uri`, so nothing is parsed per call."""
    ctx = context.auth_context()
    uris = list(ctx.get("peer_uri") or [])
    cns = list(ctx.get("x509_common_name") or [])
    cn = _text(cns[0]) if cns else ""
    found = {i for i in (parse_uri(_text(u)) for u in uris) if i is not None}
    if len(found) != 1:
        return PeerIdentity("", "", cn)
    one = found.pop()
    return PeerIdentity(one.kind, one.name, cn)
