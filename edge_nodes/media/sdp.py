"""Checks an SDP offer before aiortc sees it, so bad input gets a clear reason, not a traceback."""

from __future__ import annotations

from aiortc.sdp import SessionDescription

from telehealth.errors import InvalidArgument

# A browser offer with audio, video and a dozen candidates is 5-10 kB.
MAX_SDP_BYTES = 64 * 1024
MEDIA_KINDS = ("audio", "video")


def check_offer(sdp: str) -> SessionDescription:
    """Parse an offer; raise InvalidArgument saying what is wrong and what is expected."""
    if not sdp or not sdp.strip():
        raise InvalidArgument(
            "offer SDP is empty: send the complete SDP of an RTCPeerConnection offer"
        )
    if len(sdp.encode()) > MAX_SDP_BYTES:
        raise InvalidArgument(f"offer SDP is larger than {MAX_SDP_BYTES} bytes")
    if not sdp.lstrip().startswith("v=0"):
        raise InvalidArgument("offer is not SDP: it must start with 'v=0'")
    try:
        parsed = SessionDescription.parse(sdp)
    except Exception as e:
        # aiortc raises whatever its line parser trips on (ValueError, KeyError, IndexError...).
        raise InvalidArgument(f"malformed SDP offer ({type(e).__name__}: {e})") from None
    media = [m for m in parsed.media if m.kind in MEDIA_KINDS]
    if not media:
        raise InvalidArgument("offer has no audio or video section (m=audio / m=video)")
    for m in media:
        if m.ice is None or not m.ice.usernameFragment or not m.ice.password:
            raise InvalidArgument(
                f"offer's m={m.kind} section has no ICE credentials (a=ice-ufrag, a=ice-pwd): "
                "the SDP looks truncated"
            )
        if m.dtls is None or not m.dtls.fingerprints:
            raise InvalidArgument(
                f"offer's m={m.kind} section has no DTLS fingerprint: the SDP looks truncated"
            )
        if not m.rtp.codecs:
            raise InvalidArgument(f"offer's m={m.kind} section lists no codecs")
    if not any(m.ice_candidates for m in media):
        raise InvalidArgument(
            "offer has no ICE candidates: wait for ICE gathering to complete before sending "
            "(this endpoint does not take trickled candidates)"
        )
    return parsed
