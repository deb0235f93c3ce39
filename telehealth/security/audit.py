"""The audit chain: what one read of patient data records, and how the chain is checked.

Three layers, so that neither an edit in the database nor a deletion goes unnoticed:
- a SHA-256 hash chain (each entry hashes its predecessor): any edit breaks a link;
- a MAC on every entry with a key the database does not hold (AuditKey, kept with the core's
  token keys): re-hashing the chain after an edit cannot forge the MACs;
- signed checkpoints of the head (seq, hash) after every append, in the database and in an
  append-only file outside it: deleting the newest entries (and the head row) leaves a
  checkpoint naming entries that are gone.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

GENESIS = "0" * 64
# Actions that read patient data; every one of them is recorded.
ACTIONS = (
    # Live vitals from an edge: gRPC Subscribe and the browser WebSocket alike.
    "vitals.subscribe",
    # A clinician receiving a patient's video (Negotiate as viewer) or following a call.
    "media.view",
    "media.watch",
    "session.attach_viewer",
    "archive.query",
    "archive.export",
    "console.view",
    "sessions.list",
    "sessions.watch",
)
MAX_FIELD = 256


@dataclass(frozen=True)
class AuditEvent:
    """Who read what, when and from where (before the core gives it a place in the chain).
    Only pseudonymous ids: subject is a user id or session id, never a name or a token."""

    at_unix_ns: int
    subject: str
    role: str
    action: str
    patient_id: str
    session_id: str
    peer: str
    source: str
    outcome: str = "allowed"

    def clipped(self) -> AuditEvent:
        """Bounded fields: the log never grows by what a hostile peer chose to send."""
        return AuditEvent(
            at_unix_ns=self.at_unix_ns,
            **{
                f.name: str(getattr(self, f.name))[:MAX_FIELD]
                for f in fields(self)
                if f.name != "at_unix_ns"
            },
        )


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    event: AuditEvent
    prev_hash: str
    hash: str
    # HMAC of (seq, hash) under the AuditKey; "" for entries written before keyed audit.
    mac: str = ""


MAC_LABEL = b"telehealth-audit-chain-mac-v1"
CHECKPOINT_LABEL = "telehealth-audit-checkpoint-v1"


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement "the chain's head was entry `seq` with `hash` at `at_unix_ns`"."""

    seq: int
    hash: str
    at_unix_ns: int
    key_id: str
    signature: str

    def message(self) -> bytes:
        return f"{CHECKPOINT_LABEL}:{self.seq}:{self.hash}:{self.at_unix_ns}".encode()

    def when(self) -> str:
        t = dt.datetime.fromtimestamp(self.at_unix_ns / 1e9, dt.UTC)
        return t.strftime("%Y-%m-%dT%H:%M:%SZ")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> Checkpoint:
        """Raises ValueError for anything but one well-formed checkpoint."""
        try:
            d = json.loads(line)
            cp = cls(
                seq=int(d["seq"]),
                hash=str(d["hash"]),
                at_unix_ns=int(d["at_unix_ns"]),
                key_id=str(d["key_id"]),
                signature=str(d["signature"]),
            )
        except (TypeError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"not a checkpoint: {e}") from e
        return cp


class AuditKey:
    """The audit log's secret: an Ed25519 key that signs checkpoints; the entries' MAC key is
    derived from it, so one file (0600, beside the token keys, never in the database) holds
    both. Anyone holding the database alone can neither re-MAC entries nor sign a head."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        raw = private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        self._mac_key = hashlib.sha256(MAC_LABEL + raw).digest()
        self._private = private
        self._public = private.public_key()
        pub = self._public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = hashlib.sha256(pub).hexdigest()[:16]

    @classmethod
    def load(cls, path: Path) -> AuditKey:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        return cls(key)

    @classmethod
    def load_or_create(cls, path: Path) -> AuditKey:
        """Create it on first start; O_EXCL so core replicas sharing keys_dir agree on one."""
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            pem = Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                pass  # another replica won the race: use its key
            else:
                with os.fdopen(fd, "wb") as f:
                    f.write(pem)
        return cls.load(path)

    def mac(self, seq: int, entry_hash: str) -> str:
        return hmac.new(self._mac_key, f"{seq}:{entry_hash}".encode(), hashlib.sha256).hexdigest()

    def sign(self, seq: int, entry_hash: str, at_unix_ns: int) -> Checkpoint:
        unsigned = Checkpoint(seq, entry_hash, at_unix_ns, self.key_id, "")
        sig = self._private.sign(unsigned.message())
        return Checkpoint(seq, entry_hash, at_unix_ns, self.key_id, base64.b64encode(sig).decode())

    def signed(self, cp: Checkpoint) -> bool:
        try:
            self._public.verify(base64.b64decode(cp.signature, validate=True), cp.message())
        except (InvalidSignature, ValueError):
            return False
        return cp.key_id == self.key_id


def canonical(seq: int, event: AuditEvent) -> bytes:
    """Sorted keys, no spaces, UTF-8: the same entry always hashes the same on any backend."""
    body = {"seq": seq, **asdict(event)}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(prev_hash: str, seq: int, event: AuditEvent) -> str:
    return hashlib.sha256(prev_hash.encode() + canonical(seq, event)).hexdigest()


def chain(
    prev_seq: int, prev_hash: str, events: Iterable[AuditEvent], key: AuditKey | None = None
) -> list[AuditEntry]:
    out: list[AuditEntry] = []
    for ev in events:
        prev_seq += 1
        h = entry_hash(prev_hash, prev_seq, ev)
        out.append(AuditEntry(prev_seq, ev, prev_hash, h, key.mac(prev_seq, h) if key else ""))
        prev_hash = h
    return out


@dataclass(frozen=True)
class ChainProblem:
    seq: int
    what: str

    def __str__(self) -> str:
        return f"entry {self.seq}: {self.what}"


@dataclass
class AuditReport:
    """What `audit verify` found: problems mean tampering; notes are facts worth knowing."""

    checked: int = 0
    checkpoints: int = 0
    problems: list[ChainProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def verify(entries: Iterable[AuditEntry], head: tuple[int, str] | None) -> list[ChainProblem]:
    """Every problem the chain alone shows: an edited entry (its hash no longer matches its
    content), a deleted one (a gap in seq, or a broken link), or a removed tail (the head row
    names more). Without the key and checkpoints a re-hashed chain or a tail deleted together
    with the head row cannot show; verify_anchored() covers those."""
    problems: list[ChainProblem] = []
    expected_seq, prev_hash = 1, GENESIS
    for e in entries:
        if e.seq != expected_seq:
            missing = (
                f"{expected_seq}" if e.seq == expected_seq + 1 else f"{expected_seq}-{e.seq - 1}"
            )
            problems.append(ChainProblem(expected_seq, f"deleted (entries {missing} missing)"))
        elif e.prev_hash != prev_hash:
            # Someone edited the previous entry and recomputed its hash; this one still
            # links to the original.
            problems.append(
                ChainProblem(e.seq - 1, f"edited (re-hashed; entry {e.seq} links to the original)")
            )
        if entry_hash(e.prev_hash, e.seq, e.event) != e.hash:
            problems.append(ChainProblem(e.seq, "edited (content does not match its hash)"))
        expected_seq, prev_hash = e.seq + 1, e.hash
    if head is not None:
        head_seq, head_hash = head
        if head_seq >= expected_seq:
            problems.append(
                ChainProblem(expected_seq, f"deleted (the chain head names entry {head_seq})")
            )
        elif head_seq == expected_seq - 1 and head_seq > 0 and head_hash != prev_hash:
            problems.append(ChainProblem(head_seq, "edited (does not match the chain head)"))
    return problems


def verify_anchored(
    entries: list[AuditEntry],
    head: tuple[int, str] | None,
    key: AuditKey,
    checkpoints: Iterable[Checkpoint],
    bad_checkpoints: Iterable[str] = (),
) -> AuditReport:
    """verify() plus the keyed layers: every entry's MAC, and every signed checkpoint against
    the chain (a checkpoint naming an entry that is gone means the tail was deleted)."""
    report = AuditReport(checked=len(entries), problems=verify(entries, head))
    problems = report.problems
    known = {p.seq for p in problems}
    unkeyed = 0
    keyed_seen = False
    for e in entries:
        if not e.mac:
            if keyed_seen:
                problems.append(ChainProblem(e.seq, "edited (its MAC was removed)"))
            else:
                unkeyed += 1
            continue
        keyed_seen = True
        if not hmac.compare_digest(e.mac, key.mac(e.seq, e.hash)) and e.seq not in known:
            problems.append(
                ChainProblem(
                    e.seq, "edited (MAC does not match: the entry or its hash was rewritten)"
                )
            )
    if unkeyed:
        report.notes.append(
            f"entries 1-{unkeyed} predate keyed audit (hash chain only, no MAC)"
            if unkeyed > 1
            else "entry 1 predates keyed audit (hash chain only, no MAC)"
        )
    for line in bad_checkpoints:
        problems.append(ChainProblem(0, f"checkpoint store has a corrupt line: {line[:80]!r}"))
    by_seq = {e.seq: e for e in entries}
    last_seq = entries[-1].seq if entries else 0
    newest: Checkpoint | None = None
    mismatch: Checkpoint | None = None
    for cp in checkpoints:
        if not key.signed(cp):
            problems.append(
                ChainProblem(cp.seq, f"checkpoint of {cp.when()} has a bad signature (forged)")
            )
            continue
        report.checkpoints += 1
        if newest is None or cp.seq > newest.seq:
            newest = cp
        at = by_seq.get(cp.seq)
        if at is not None and at.hash != cp.hash and (mismatch is None or cp.seq < mismatch.seq):
            mismatch = cp
    if newest is not None and newest.seq > last_seq:
        missing = (
            f"{last_seq + 1}" if newest.seq == last_seq + 1 else f"{last_seq + 1}-{newest.seq}"
        )
        problems.append(
            ChainProblem(
                last_seq + 1,
                f"deleted (entries {missing} missing: the signed checkpoint of {newest.when()} "
                f"names entry {newest.seq}; the newest entries were removed)",
            )
        )
    if mismatch is not None and mismatch.seq not in {p.seq for p in problems}:
        problems.append(
            ChainProblem(
                mismatch.seq,
                f"edited (does not match the signed checkpoint of {mismatch.when()}; "
                "the chain was rewritten up to here)",
            )
        )
    if keyed_seen and report.checkpoints == 0:
        problems.append(
            ChainProblem(
                last_seq,
                "no signed checkpoint found: deleting the newest entries could not be told; "
                "is the checkpoint file where verify looks (--checkpoints)?",
            )
        )
    problems.sort(key=lambda p: p.seq)
    return report
