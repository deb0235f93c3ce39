"""Video calls held through the edge while the vitals load runs (the scenarios' `video_calls`).

Each call is engineer E's two-way consultation from loadtest.video_peers: a patient's aiortc
peer publishing a pre-encoded 640x480@30 VP8 loop of the labelled synthetic face, and a
clinician's peer viewing it (and sending a loop back), both through the edge's media relay.
Glass-to-glass latency is from the frame's hand-off to the packetizer to its decoding at the
clinician, matched by the counter drawn into the pixels; fps is what the clinician receives.
Pre-encoded loops keep the load generator's CPU for the vitals swarm (encoding live would be
the generator's cost, not the edge's). Calls run inside the generator process, on its CPU;
their figures are taken over each step's send window and go with the edge's row.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from typing import Any

# A call is "up" once the clinician has this many frames; how long that may take.
FIRST_FRAMES = 30
START_TIMEOUT_S = 30.0


class VideoCalls:
    """`n` two-way calls on the given sessions of one edge."""

    def __init__(self, edge_address: str, sessions: list[dict[str, str]], label: str) -> None:
        self.edge_address = edge_address
        self.sessions = sessions
        self.label = label
        self.calls: list[Any] = []
        self.error = ""

    async def start(self) -> None:
        from loadtest.video_peers import LoopTrack, edge_call, encode_loop

        t0 = time.monotonic()
        # Encoding the loops is a second of CPU each: off the event loop, once.
        there, back = await asyncio.to_thread(lambda: (encode_loop(72.0), encode_loop(60.0)))
        for s in self.sessions:
            self.calls.append(
                await edge_call(self.edge_address, s, LoopTrack(there), LoopTrack(back))
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(c.probe.frames() >= FIRST_FRAMES for c in self.calls):
            if time.monotonic() > deadline:
                up = sum(c.probe.frames() >= FIRST_FRAMES for c in self.calls)
                raise TimeoutError(
                    f"only {up} of {len(self.calls)} video calls showed video within "
                    f"{START_TIMEOUT_S:.0f} s"
                )
            await asyncio.sleep(0.1)
        print(
            f"[{self.label}] {len(self.calls)} video call(s) through the edge up in "
            f"{time.monotonic() - t0:.1f} s",
            file=sys.stderr,
            flush=True,
        )

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        """fps and glass-to-glass latency of every call over [t0, t1) (time.monotonic)."""
        from loadtest.video_peers import summary

        if not self.calls:
            return {"calls": 0, "error": self.error} if self.error else {"calls": 0}
        fps = [c.probe.fps(t0, t1) for c in self.calls]
        lat = [ms for c in self.calls for ms in c.probe.window(t0, t1)]
        return {
            "calls": len(self.calls),
            "resolution": "640x480@30",
            "fps_min": round(min(fps), 1),
            "fps_mean": round(statistics.fmean(fps), 1),
            "latency_ms": summary(lat),
            "seconds": round(t1 - t0, 2),
        }

    async def close(self) -> None:
        await asyncio.gather(*(c.hangup() for c in self.calls), return_exceptions=True)
        self.calls.clear()
