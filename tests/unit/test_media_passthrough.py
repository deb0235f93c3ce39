"""Encoded-frame passthrough pieces: marker-completed frames, keyframe detection, bounded feeds."""

from __future__ import annotations

from typing import Any

from aiortc.rtp import RtpPacket

from edge_nodes.media.passthrough import (
    FEED_DEPTH,
    Encoded,
    EncodedFeed,
    MarkerJitterBuffer,
    is_keyframe,
)


def packet(seq: int, ts: int, data: bytes, marker: bool = False) -> RtpPacket:
    p = RtpPacket(payload_type=96, sequence_number=seq, timestamp=ts, marker=int(marker))
    p._data = data  # type: ignore[attr-defined]
    return p


def test_a_frame_completes_on_its_marker_packet_not_on_the_next_frame() -> None:
    jb = MarkerJitterBuffer(capacity=128, is_video=True)
    assert jb.add(packet(10, 3000, b"a"))[1] is None
    assert jb.add(packet(11, 3000, b"b"))[1] is None
    _, frame = jb.add(packet(12, 3000, b"c", marker=True))
    assert frame is not None and frame.data == b"abc" and frame.timestamp == 3000
    # The next frame starts clean.
    _, frame = jb.add(packet(13, 6000, b"d", marker=True))
    assert frame is not None and frame.data == b"d"


def test_a_gap_holds_the_frame_until_the_missing_packet_arrives() -> None:
    jb = MarkerJitterBuffer(capacity=128, is_video=True)
    jb.add(packet(10, 3000, b"a"))
    assert jb.add(packet(12, 3000, b"c", marker=True))[1] is None
    _, frame = jb.add(packet(11, 3000, b"b"))  # a retransmission fills the gap
    assert frame is not None and frame.data == b"abc"


def test_audio_packets_are_frames_at_once() -> None:
    jb = MarkerJitterBuffer(capacity=16, every_packet=True)
    for i in range(3):
        _, frame = jb.add(packet(100 + i, 960 * i, bytes([i])))
        assert frame is not None and frame.data == bytes([i])


def test_keyframes_are_recognised() -> None:
    assert is_keyframe("VP8", b"\x10\x02\x00\x9d\x01\x2a")  # frame tag bit 0 clear
    assert not is_keyframe("VP8", b"\x11\x02\x00")
    assert is_keyframe("H264", b"\x00\x00\x00\x01\x67\x42" + b"\x00\x00\x00\x01\x65\x88")
    assert not is_keyframe("H264", b"\x00\x00\x00\x01\x41\x9a")
    assert is_keyframe("opus", b"\x78")


class FakeTap:
    def __init__(self) -> None:
        self.requests = 0
        self.feeds: set[Any] = set()

    def request_keyframe(self) -> None:
        self.requests += 1


def enc(key: bool, n: int = 0) -> Encoded:
    return Encoded("VP8", bytes([n]), key, n)


async def test_a_feed_starts_at_a_keyframe_and_restarts_when_it_overflows() -> None:
    tap = FakeTap()
    feed = EncodedFeed(tap)  # type: ignore[arg-type]
    feed.offer(enc(False, 1))
    assert not feed.synced and tap.requests == 1
    feed.offer(enc(True, 2))
    for i in range(FEED_DEPTH - 1):
        feed.offer(enc(False, 3 + i))
    assert (await feed.get()).data == bytes([2])
    # Nobody reads: the feed fills, then drops everything and waits for a keyframe.
    for i in range(FEED_DEPTH + 1):
        feed.offer(enc(False, 20 + i))
    assert feed.restarts == 1 and not feed.synced
    feed.offer(enc(True, 40))
    assert (await feed.get()).data == bytes([40])
