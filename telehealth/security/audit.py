"""The audit chain: what one read of patient data records, and how the hash chain is checked."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

GENESIS = "0" * 64
# Actions that read patient data; every one of them is recorded.
ACTIONS = (
    "vitals.subscribe",
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


def canonical(seq: int, event: AuditEvent) -> bytes:
    """Sorted keys, no spaces, UTF-8: the same entry always hashes the same on any backend."""
    body = {"seq": seq, **asdict(event)}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def entry_hash(prev_hash: str, seq: int, event: AuditEvent) -> str:
    return hashlib.sha256(prev_hash.encode() + canonical(seq, event)).hexdigest()


def chain(prev_seq: int, prev_hash: str, events: Iterable[AuditEvent]) -> list[AuditEntry]:
    out: list[AuditEntry] = []
    for ev in events:
        prev_seq += 1
        h = entry_hash(prev_hash, prev_seq, ev)
        out.append(AuditEntry(prev_seq, ev, prev_hash, h))
        prev_hash = h
    return out


@dataclass(frozen=True)
class ChainProblem:
    seq: int
    what: str

    def __str__(self) -> str:
        return f"entry {self.seq}: {self.what}"


def verify(entries: Iterable[AuditEntry], head: tuple[int, str] | None) -> list[ChainProblem]:
    """Every problem found: an edited entry (its hash no longer matches its content), a
    deleted one (a gap in seq, or a broken link), or a removed tail (the head names more)."""
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
