"""The load generator's send loop, deadline path and loss accounting, on a virtual clock.

Pure logic: the swarm's `send` is a stand-in whose writes take as long as a test says (a
blocked write is the server pushing back), so the schedule, the batches never sent and the
batches never delivered can be checked exactly, without a network or real time.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable

import numpy as np
import pytest
from hdrh.histogram import HdrHistogram

from loadtest.generator import (
    GeneratorSpec,
    StepSpec,
    Swarm,
    generator_bound,
    step_passes,
    step_result,
)
from loadtest.recording import HIST_MAX_US, Hist, Patient, Segment, StepRecorder, memory_growth
from telehealth.v1 import vitals_pb2

MS = 1_000_000
S = 1_000_000_000
PERIOD = 40 * MS  # 25 batches/s


class VirtualClock:
    """perf_counter_ns and asyncio.sleep stand-ins: time moves only when every task waits."""

    def __init__(self, start_ns: int = 10 * S) -> None:
        self.now = start_ns
        self._sleepers: list[tuple[int, int, asyncio.Future[None]]] = []
        self._n = itertools.count()

    def clock(self) -> int:
        return self.now

    async def sleep(self, seconds: float) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(
            self._sleepers, (self.now + max(0, round(seconds * 1e9)), next(self._n), fut)
        )
        await fut

    async def run(self, task: asyncio.Task[None]) -> None:
        """Drive `task` to completion: let runnable tasks run, then jump to the next wake-up."""
        while not task.done():
            for _ in range(50):
                await asyncio.sleep(0)
            while self._sleepers and self._sleepers[0][2].cancelled():
                heapq.heappop(self._sleepers)
            if not self._sleepers:
                continue
            wake, _, fut = heapq.heappop(self._sleepers)
            self.now = max(self.now, wake)
            fut.set_result(None)
        await task


class FakeSwarm(Swarm):
    """A swarm whose writes take `write_ns(patient, seq)` of virtual time."""

    def __init__(
        self, spec: GeneratorSpec, vc: VirtualClock, write_ns: Callable[[int, int], int]
    ) -> None:
        super().__init__(spec)
        self.clock = vc.clock  # type: ignore[method-assign]
        self.sleep = vc.sleep  # type: ignore[method-assign]
        self.vc = vc
        self.write_ns = write_ns
        self.writes: list[tuple[int, int, int]] = []  # (patient, seq, time the write began)
        self.resets: list[int] = []
        self.patients = [self.new_patient(i, f"s{i}") for i in range(spec.max_patients)]

    async def send(self, p: Patient, data: bytes) -> None:
        seq = vitals_pb2.VitalsBatch.FromString(data).seq
        self.writes.append((p.index, seq, self.clock()))
        d = self.write_ns(p.index, seq)
        if d:
            await self.sleep(d / 1e9)

    def reset_stream(self, p: Patient) -> None:
        self.resets.append(p.index)


def _spec(patients: int = 1, duration_s: float = 1.0, drain_s: float = 0.5) -> GeneratorSpec:
    return GeneratorSpec(
        label="fake", path="echo", target="", batch_rate_hz=25, ecg_hz=250, vitals_rate_hz=1,
        steps=[StepSpec(patients, duration_s)], viewers=1, watched=patients, drain_s=drain_s,
    )  # fmt: skip


async def _run(
    patients: int = 1, duration_s: float = 1.0, write_ns: Callable[[int, int], int] = lambda p, s: 0
) -> tuple[FakeSwarm, StepRecorder]:
    vc = VirtualClock()
    spec = _spec(patients, duration_s)
    swarm = FakeSwarm(spec, vc, write_ns)
    rec = StepRecorder(0, patients, patients * 25.0, t0_ns=vc.now + 200 * MS)
    await vc.run(asyncio.create_task(swarm.run_step(rec, spec.steps[0])))
    return swarm, rec


async def test_batches_go_out_on_schedule_with_phases_spread_over_a_period() -> None:
    swarm, rec = await _run(patients=2)
    t0 = rec.t0_ns
    assert rec.scheduled == rec.sent == 50 and rec.unsent == 0
    for p in (0, 1):
        mine = [(seq, t) for i, seq, t in swarm.writes if i == p]
        assert [seq for seq, _ in mine] == list(range(1, 26))
        # Patient p starts half a period after patient p-1; every batch exactly on time.
        assert [t for _, t in mine] == [t0 + p * PERIOD // 2 + k * PERIOD for k in range(25)]
    assert rec.send_lag.percentiles_ms()["max"] == pytest.approx(0.001, abs=0.001)
    assert rec.expected == 50


async def test_a_slow_write_delays_the_next_send_and_the_lag_counts_from_the_schedule() -> None:
    # Seq 3's write is blocked 100 ms: seqs 4..5 go out late, back to back, then on time again.
    swarm, rec = await _run(write_ns=lambda p, seq: 100 * MS if seq == 3 else 0)
    t0 = rec.t0_ns
    times = {seq: t for _, seq, t in swarm.writes}
    assert times[4] == times[5] == t0 + 2 * PERIOD + 100 * MS
    assert times[6] == t0 + 5 * PERIOD
    assert rec.sent == 25 and rec.unsent == 0
    # Seq 4 was due at 3 periods and went at 2 periods + 100 ms: 60 ms late.
    assert rec.send_lag.percentiles_ms()["max"] == pytest.approx(60.0, rel=0.01)


async def test_batches_not_sent_by_the_deadline_count_as_not_sent_with_lower_bound_latency() -> (
    None
):
    # Seq 5's write blocks 2.5 s: the send window (1 s + max(drain, 1 s)) ends meanwhile, and
    # the write returns within the grace second after it.
    swarm, rec = await _run(write_ns=lambda p, seq: 2500 * MS if seq == 5 else 0)
    assert swarm.resets == []
    assert rec.sent == 5 and rec.unsent == 20 and rec.scheduled == 25
    assert rec.censored_unsent == 20  # one viewer: 20 expected deliveries that never could be
    stop = rec.t0_ns + 4 * PERIOD + 2500 * MS  # when the blocked write returned
    hist = rec.hist.hist
    assert hist.get_total_count() == 20
    # Each is recorded at stop - its scheduled time: the nearest one is the smallest.
    assert rec.censored_min_us == (stop - (rec.t0_ns + 24 * PERIOD)) // 1000
    assert hist.get_max_value() / 1000 == pytest.approx(
        (stop - (rec.t0_ns + 5 * PERIOD)) / MS, rel=0.001
    )
    for seq in range(1, 6):
        swarm.deliver(0, 0, seq, rec.t0_ns + (seq - 1) * PERIOD + 2 * MS)
    swarm.finish_step(rec, stop + S)
    res = step_result(rec, StepSpec(1, 1.0), 5.0, 0, {})
    assert res["not_sent"] == 20 and res["lost"] == 0 and res["delivered"] == 5
    # 20 of 25 samples are lower bounds of at least ~2 s: p50 and p99 are themselves bounds.
    assert res["latency_lower_bound"]["p50"] and res["latency_lower_bound"]["p99"]
    assert res["latency_ms"]["p99"] > 2000
    assert not step_passes(res, 50.0)


async def test_a_write_blocked_for_good_is_abandoned_after_the_grace_and_its_stream_reset() -> None:
    swarm, rec = await _run(write_ns=lambda p, seq: 3600 * S if seq == 2 else 0)
    assert rec.sent == 2 and rec.unsent == 23
    assert swarm.resets == [0]
    deadline = rec.t0_ns + 1 * S + 1 * S
    # Abandoned one grace second after the deadline; nothing waited the hour.
    assert swarm.vc.now == deadline + S


async def test_undelivered_batches_are_recorded_at_the_drain_end_and_fail_the_step() -> None:
    swarm, rec = await _run()
    t0 = rec.t0_ns
    for seq in range(1, 26):
        if seq not in (3, 7):
            swarm.deliver(0, 0, seq, t0 + (seq - 1) * PERIOD + 2 * MS)
    swarm.deliver(0, 0, 4, t0 + 3 * PERIOD + 9 * MS)  # a duplicate
    drain_end = t0 + 5 * S
    swarm.finish_step(rec, drain_end)
    assert (rec.delivered, rec.duplicates, rec.censored_undelivered) == (23, 1, 2)
    assert rec.hist.count() == 25  # every expected delivery has a latency sample
    # Seq 3 was due at 2 periods: recorded at drain end minus that.
    assert rec.censored_min_us == (drain_end - (t0 + 6 * PERIOD)) // 1000
    res = step_result(rec, StepSpec(1, 1.0), 6.0, 0, {})
    assert res["lost"] == 2 and res["not_sent"] == 0
    assert not res["latency_lower_bound"]["p50"]  # 2 ms, below any lower-bound sample
    assert res["latency_lower_bound"]["max"]
    assert not step_passes(res, 50.0)
    # Arriving after the drain changes nothing: the step was counted.
    swarm.deliver(0, 0, 3, drain_end + S)
    assert rec.delivered == 23 and swarm.after_drain == 1


async def test_a_clean_step_passes_and_a_fully_sent_but_slow_one_does_not() -> None:
    swarm, rec = await _run()
    for seq in range(1, 26):
        swarm.deliver(0, 0, seq, rec.t0_ns + (seq - 1) * PERIOD + 3 * MS)
    swarm.finish_step(rec, rec.t0_ns + 3 * S)
    res = step_result(rec, StepSpec(1, 1.0), 4.0, 0, {})
    assert res["latency_ms"]["p99"] == pytest.approx(3.0, rel=0.01)
    assert not any(res["latency_lower_bound"].values())
    assert step_passes(res, 50.0) and not step_passes(res, 2.0)


def test_the_receive_window_stays_bounded_and_gives_up_on_old_seqs() -> None:
    spec = GeneratorSpec(
        label="w", path="echo", target="", batch_rate_hz=1, ecg_hz=0, vitals_rate_hz=1,
        steps=[StepSpec(1, 1000.0)], viewers=1, watched=1,
    )  # fmt: skip
    swarm = Swarm(spec)
    swarm.patients = [swarm.new_patient(0, "s")]
    rec = StepRecorder(0, 1, 1.0, t0_ns=0)
    seg = Segment(1, 0, S, 1000, rec, sent=1000)
    swarm.patients[0].segments.append(seg)
    w = swarm.patients[0].seen[0]
    for seq in range(1, 1001):
        if seq != 10:
            swarm.deliver(0, 0, seq, seg.due(seq) + MS)
        assert len(w.bits) <= 2 * swarm.window + 256
    # Seq 10 was given up on once the window passed it, at least EXPIRE_S after it was due.
    assert rec.expired == 1 and rec.censored_undelivered == 1
    assert rec.censored_min_us >= HIST_MAX_US
    swarm.deliver(0, 0, 10, seg.due(10) + 2000 * S)
    assert rec.delivered == 999 and swarm.after_drain == 1
    swarm.finish_step(rec, seg.due(1000) + S)
    assert rec.delivered + rec.censored_undelivered == rec.expected or rec.expected == 0
    assert rec.hist.count() == 1000


def test_unwatched_patients_count_batches_but_expect_no_deliveries() -> None:
    spec = _spec(patients=2)
    spec.watched = 1
    swarm = Swarm(spec)
    swarm.patients = [swarm.new_patient(i, f"s{i}") for i in range(2)]
    assert swarm.patients[0].watched and not swarm.patients[1].watched


def test_bulk_histogram_matches_hdrh_exactly() -> None:
    rng = np.random.default_rng(7)
    values = np.concatenate(
        [
            rng.integers(1, 5000, 3000),
            rng.lognormal(9, 2, 6000).astype(np.int64) + 1,
            [1, 2047, 2048, HIST_MAX_US * 2],
        ]
    )
    for digits in (2, 3):
        ref = HdrHistogram(1, HIST_MAX_US, digits)
        for v in values:
            ref.record_value(int(min(max(v, 1), HIST_MAX_US)))
        bulk = Hist(digits)
        for v in values[:5000]:
            bulk.add(int(v))
        bulk.add_many(values[5000:])
        assert bulk.hist.encode() == ref.encode()
        assert bulk.percentiles_ms()["p99"] == ref.get_value_at_percentile(99.0) / 1000


def test_percentiles_below_every_lower_bound_sample_are_exact() -> None:
    rec = StepRecorder(0, 1, 25.0, t0_ns=0)
    for i in range(98):
        rec.on_delivered(0, (1 + i % 5) * MS)
    rec.on_undelivered(0, 4 * S)
    rec.on_undelivered(0, 5 * S)
    lat = rec.latency_ms()
    lb = rec.lower_bound(lat)
    assert not lb["p50"] and not lb["p90"]
    assert lb["p99"] and lb["max"] and lb["mean"]  # p99 lands on a 4 s lower-bound sample


def test_generator_bound_by_cpu_or_by_its_loop_lag() -> None:
    assert not generator_bound(60.0, 1.2)["bound"]
    assert generator_bound(91.0, 1.2)["bound"]
    slow = generator_bound(20.0, 12.0, 40.0)
    assert slow["bound"] and "other processes" in slow["reasons"][0]
    # A 20 ms lag is no explanation for a p99 of seconds (an overloaded server's bursts).
    assert not generator_bound(30.0, 21.0, 8000.0)["bound"]


def test_memory_growth_from_first_and_last_windows_and_slope() -> None:
    samples = [(float(t), {"edge": 100.0 + t / 10, "echo": 50.0}) for t in range(0, 101)]
    g = memory_growth(samples, window_s=20)
    assert g["edge"]["first_mib"] == pytest.approx(101.0)
    assert g["edge"]["last_mib"] == pytest.approx(109.0)
    assert g["edge"]["growth_mib"] == pytest.approx(8.0)
    assert g["edge"]["slope_mib_per_h"] == pytest.approx(360.0)
    assert g["echo"]["growth_mib"] == 0.0 and g["echo"]["slope_mib_per_h"] == pytest.approx(0.0)
    # Warm-up skipped: the first window starts after it.
    assert memory_growth(samples, skip_s=50, window_s=10)["edge"]["first_mib"] == pytest.approx(
        105.5
    )
    assert memory_growth(samples[:1]) == {}
