"""Archive logic: exactly-once appends with per-session durable watermarks."""

from __future__ import annotations

import asyncio
import time

from core_services.archive.store import ArchiveStore, StoredBatch
from telehealth.telemetry.metrics import CoreMetrics
from telehealth.v1 import archive_pb2, vitals_pb2
from telehealth.watermark import Watermark


class Archive:
    def __init__(self, store: ArchiveStore, metrics: CoreMetrics, shared: bool = False) -> None:
        self.store = store
        # With several core replicas, others append too: watermarks come from the database.
        self._shared = shared
        self._metrics = metrics
        self._wm: dict[str, Watermark] = {}
        # One writer at a time: watermarks are computed from what is already stored.
        self._lock = asyncio.Lock()

    async def _watermark(
        self, session_id: str, loaded: dict[str, Watermark] | None = None
    ) -> Watermark:
        """The session's watermark: cached when this core is the only writer; with several
        replicas, read from the database once per append (others write too)."""
        cache = loaded if self._shared and loaded is not None else self._wm
        wm = cache.get(session_id)
        if wm is None or (self._shared and loaded is None):
            value, above = await self.store.watermark(session_id)
            if not self._shared and (current := cache.get(session_id)) is not None:
                # Loaded (and maybe advanced by an append) while this read waited: a reader
                # (GetWatermark) must not put back the older value it read.
                return current
            wm = Watermark(value)
            for seq in above:
                wm.add(seq)
            cache[session_id] = wm
        return wm

    async def archived_seq(self, session_id: str) -> int:
        return (await self._watermark(session_id)).value

    async def append(
        self, edge_id: str, batches: list[archive_pb2.ArchivedBatch]
    ) -> tuple[dict[str, int], int]:
        """Store what is new; return the watermark of every session touched and the count
        of batches already held."""
        t0 = time.perf_counter()
        async with self._lock:
            rows: list[StoredBatch] = []
            touched: dict[str, Watermark] = {}
            duplicates = 0
            tombstones = 0
            added: set[tuple[str, int]] = set()
            loaded: dict[str, Watermark] = {}
            for ab in batches:
                # A copy: the cached watermark moves only once the rows are committed, so a
                # reader (GetWatermark, the console's fill) never hears of a seq before it is
                # durable and readable (a device drops what is below it from its backlog).
                wm = touched.get(ab.session_id)
                if wm is None:
                    wm = (await self._watermark(ab.session_id, loaded)).copy()
                    touched[ab.session_id] = wm
                seq = ab.batch.seq
                if seq == 0 or wm.seen(seq) or (ab.session_id, seq) in added:
                    duplicates += 1
                    continue
                added.add((ab.session_id, seq))
                if ab.rejected:
                    tombstones += 1
                rows.append(
                    StoredBatch(
                        session_id=ab.session_id,
                        seq=seq,
                        patient_id=ab.patient_id,
                        edge_id=ab.edge_id or edge_id,
                        # A tombstone keeps nothing the edge refused: only session and seq.
                        device_time_unix_ns=0 if ab.rejected else ab.batch.device_time_unix_ns,
                        edge_received_unix_ns=ab.edge_received_unix_ns,
                        batch=(
                            vitals_pb2.VitalsBatch(session_id=ab.session_id, seq=seq)
                            if ab.rejected
                            else ab.batch
                        ).SerializeToString(),
                        rejected=ab.rejected,
                    )
                )
            before = {sid: wm.value for sid, wm in touched.items()}
            for r in rows:
                touched[r.session_id].add(r.seq)
            changed = {sid: wm.value for sid, wm in touched.items() if wm.value != before[sid]}
            try:
                await self.store.append(rows, changed)
            except BaseException:
                # The commit may or may not have taken: the next use reloads from the database.
                for sid in touched:
                    self._wm.pop(sid, None)
                raise
            if not self._shared:
                self._wm.update(touched)
        self._metrics.archived.inc(len(rows) - tombstones)
        self._metrics.archive_duplicates.inc(duplicates)
        self._metrics.archive_append.observe(time.perf_counter() - t0)
        return {sid: wm.value for sid, wm in touched.items()}, duplicates
