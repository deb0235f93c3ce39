"""Encoded-frame passthrough pieces: marker-completed frames, keyframe detection, bounded feeds."""

from __future__ import annotations

from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RtpPacket

from edge_nodes.media.passthrough import (
    DECODE_DEPTH,
    FEED_DEPTH,
    Encoded,
    EncodedTap,
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


class Tap(EncodedTap):
    """A real tap, not yet bound to a connection: with no SSRC seen it cannot send a PLI, so
    its keyframe requests go nowhere (the receiver is never used); drops are tallied."""

    def __init__(self) -> None:
        super().__init__(None, MarkerJitterBuffer(capacity=128, is_video=True))  # type: ignore[arg-type]
        self.drops: dict[str, int] = {}
        self.on_drop = lambda reason, n: self.drops.__setitem__(
            reason, self.drops.get(reason, 0) + n
        )


def tap() -> Tap:
    return Tap()


def enc(key: bool, n: int = 0) -> Encoded:
    return Encoded("VP8", bytes([n]), key, n)


async def test_a_feed_starts_at_a_keyframe_and_restarts_when_it_overflows() -> None:
    t = tap()
    feed = t.subscribe()
    feed.offer(enc(False, 1))
    assert not feed.synced
    feed.offer(enc(True, 2))
    for i in range(FEED_DEPTH - 1):
        feed.offer(enc(False, 3 + i))
    assert (await feed.get()).data == bytes([2])
    assert t.drops == {}
    # Nobody reads: the feed fills, then drops everything and waits for a keyframe.
    for i in range(FEED_DEPTH + 1):
        feed.offer(enc(False, 20 + i))
    assert feed.restarts == 1 and not feed.synced
    feed.offer(enc(False, 30))  # still no keyframe: lost to this viewer too
    # Counted: the FEED_DEPTH frames thrown away when frame 21 overflowed the feed, and every
    # frame after until a keyframe (21 to 24, and 30).
    assert t.drops == {"behind": FEED_DEPTH, "restart": 5}
    feed.offer(enc(True, 40))
    assert (await feed.get()).data == bytes([40])


def vp8(key: bool, n: int) -> tuple[RTCRtpCodecParameters, JitterFrame]:
    data = bytes([0x10 if key else 0x11, n])
    return RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000), JitterFrame(data, n)


def test_the_decoder_queue_is_bounded_and_restarts_at_a_keyframe() -> None:
    t = tap()
    t.decoded_readers = 1  # vision wants pictures, but its decoder thread is stuck
    t.put(vp8(True, 0))
    for i in range(1, 40):
        t.put(vp8(False, i))
    # Never more than DECODE_DEPTH frames wait; the rest were dropped and counted.
    assert t.qsize() <= DECODE_DEPTH
    assert t.decoder_restarts >= 1
    assert sum(t.drops.values()) >= 40 - DECODE_DEPTH - 1
    # After a drop the decoder starts again at the next keyframe only.
    t._drain()
    t._decoder_synced = False
    t.put(vp8(False, 50))
    assert t.qsize() == 0
    t.put(vp8(True, 51))
    assert t.qsize() == 1 and t.get_nowait()[1].data == bytes([0x10, 51])
    # The stop sentinel is never dropped.
    for i in range(DECODE_DEPTH):
        t.put(vp8(False, 60 + i))
    t.put(None)
    t.put(vp8(True, 99))
    assert None in list(t.queue)
