"""The audit chain's anchor outside the database: an append-only file of signed checkpoints."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from telehealth.security.audit import Checkpoint

log = logging.getLogger(__name__)


class CheckpointFile:
    """One JSON line per append, opened O_APPEND so writers only ever add at the end (on a
    filesystem that supports it, `chattr +a` makes that a kernel rule). Each core replica keeps
    its own file; `audit verify --checkpoints` reads any number of them."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, cp: Checkpoint) -> None:
        # No fsync: a line lost to a power cut only leaves the newest entries unanchored (never
        # a false alarm), and an fsync per audited read would cost more than the read.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (cp.to_json() + "\n").encode())
        finally:
            os.close(fd)

    def read(self) -> tuple[list[Checkpoint], list[str]]:
        """(checkpoints, lines that are not one); FileNotFoundError when there is no file."""
        good: list[Checkpoint] = []
        bad: list[str] = []
        with self.path.open(encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    good.append(Checkpoint.from_json(line))
                except ValueError:
                    bad.append(line)
        return good, bad
