"""Session tokens: issued by one key ring, verified with public keys only, rotation by kid."""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest

from telehealth.errors import PermissionDenied, Unauthenticated
from telehealth.security.tokens import KeyRing, TokenIssuer, TokenVerifier


def issue(ring: KeyRing, ttl: int = 60, **kw: object) -> str:
    args = {
        "session_id": "s1",
        "role": "publisher",
        "edge_id": "e1",
        "zone": "zone-a",
        "spo2_scale": 2,
    }
    args.update(kw)
    return TokenIssuer(ring, ttl).issue(**args)[0]  # type: ignore[arg-type]


def test_round_trip_and_claims() -> None:
    ring = KeyRing()
    claims = TokenVerifier(ring.public_keys()).verify(
        issue(ring), session_id="s1", roles=("publisher",)
    )
    assert (claims.edge_id, claims.spo2_scale, claims.role) == ("e1", 2, "publisher")


def test_wrong_session_role_forged_and_expired() -> None:
    ring = KeyRing()
    v = TokenVerifier(ring.public_keys())
    with pytest.raises(PermissionDenied, match="not s2"):
        v.verify(issue(ring), session_id="s2", roles=("publisher",))
    with pytest.raises(PermissionDenied, match="role"):
        v.verify(issue(ring), session_id="s1", roles=("viewer",))
    with pytest.raises(Unauthenticated, match="unknown key"):
        v.verify(issue(KeyRing()), session_id="s1", roles=("publisher",))
    with pytest.raises(Unauthenticated, match="missing"):
        v.verify(None, session_id="s1", roles=("publisher",))
    with pytest.raises(Unauthenticated, match="malformed"):
        v.verify("not-a-jwt", session_id="s1", roles=("publisher",))
    expired = jwt.encode(
        {"sub": "s1", "iat": 1, "exp": 2, "aud": "telehealth-mesh", "iss": "telehealth-core"},
        ring.private(ring.current_kid),
        algorithm="EdDSA",
        headers={"kid": ring.current_kid},
    )
    with pytest.raises(Unauthenticated, match="expired"):
        v.verify(expired, session_id="s1", roles=("publisher",))


def test_rotation_keeps_old_tokens_valid_until_retired(tmp_path: Path) -> None:
    ring = KeyRing.load_or_create(tmp_path)
    old = issue(ring)
    old_kid = ring.current_kid
    ring.rotate()
    new = issue(ring)
    v = TokenVerifier(ring.public_keys())
    for t in (old, new):
        v.verify(t, session_id="s1", roles=("publisher",))
    ring.retire(old_kid)
    v.replace_keys(ring.public_keys())
    with pytest.raises(Unauthenticated):
        v.verify(old, session_id="s1", roles=("publisher",))
    ring.save(tmp_path)
    assert KeyRing.load_or_create(tmp_path).public_keys().keys() >= {ring.current_kid}


def test_identify_names_only_genuine_tokens() -> None:
    ring = KeyRing()
    v = TokenVerifier(ring.public_keys())
    issuer = TokenIssuer(ring, 60)
    token, _ = issuer.issue(
        session_id="s9", role="viewer", edge_id="e", zone="z", spo2_scale=1, subject_id="dr-1"
    )
    got = v.identify(token)
    assert got is not None and (got.session_id, got.role, got.subject_id) == (
        "s9",
        "viewer",
        "dr-1",
    )
    # Our own key, long expired: still names its subject (for the refusal's audit record).
    old = jwt.encode(
        {"sub": "s9", "act": "dr-2", "iat": 1, "exp": 2, "aud": "telehealth-mesh", "iss": "telehealth-core"},
        ring.private(ring.current_kid),
        algorithm="EdDSA",
        headers={"kid": ring.current_kid},
    )  # fmt: skip
    assert (c := v.identify(old)) is not None and c.subject_id == "dr-2"
    # Signed by someone else's key, or not a token at all: nobody.
    forged = issue(KeyRing())
    assert v.identify(forged) is None
    assert v.identify("x.y.z") is None and v.identify(None) is None


def test_role_uris_name_exactly_one_role() -> None:
    from telehealth.security.identity import parse_uri, role_uri

    assert role_uri("edge", "edge-a") == "spiffe://telehealth/edge/edge-a"
    assert role_uri("device") == "spiffe://telehealth/device"
    assert parse_uri("spiffe://telehealth/zone/zone-b") == parse_uri(role_uri("zone", "zone-b"))
    for bad in (
        "spiffe://telehealth/edge",  # an edge must name itself
        "spiffe://telehealth/operator/bob",  # people's roles carry no name
        "spiffe://telehealth/admin",
        "spiffe://other/edge/edge-a",
        "spiffe://telehealth/edge/a/b",
        "https://telehealth/edge/edge-a",
    ):
        assert parse_uri(bad) is None, bad
    with pytest.raises(ValueError):
        role_uri("core", "x")
