"""Call-mode policy: link hysteresis and the vitals-aware video budget."""

from __future__ import annotations

from edge_nodes.media.quality import (
    CallMode,
    LinkModeController,
    LinkSample,
    VideoDemand,
    allocate,
    reduced_pixel_rate,
)

VGA30 = 640 * 480 * 30.0
GOOD = LinkSample(0.0, 0.02)
LOSSY = LinkSample(0.08, 0.05)
AWFUL = LinkSample(0.4, 0.05)


def test_link_steps_down_after_two_bad_seconds_and_back_up_one_step_at_a_time() -> None:
    c = LinkModeController()
    assert c.update(LOSSY) is CallMode.FULL
    assert c.update(LOSSY) is CallMode.REDUCED
    assert "lost" in c.reason
    for _ in range(4):
        assert c.update(GOOD) is CallMode.REDUCED
    assert c.update(GOOD) is CallMode.FULL
    assert c.reason == "link recovered"


def test_severe_loss_goes_straight_to_audio_only_and_recovers_through_reduced() -> None:
    c = LinkModeController()
    c.update(AWFUL)
    assert c.update(AWFUL) is CallMode.AUDIO_ONLY
    modes = [c.update(GOOD) for _ in range(10)]
    assert modes[4] is CallMode.REDUCED and modes[9] is CallMode.FULL


def test_high_round_trip_time_alone_reduces() -> None:
    c = LinkModeController()
    c.update(LinkSample(0.0, 0.6))
    assert c.update(LinkSample(0.0, 0.6)) is CallMode.REDUCED


def test_one_bad_second_between_good_ones_changes_nothing() -> None:
    c = LinkModeController()
    for s in (GOOD, LOSSY, GOOD, LOSSY, GOOD):
        assert c.update(s) is CallMode.FULL


def demand(sid: str, band: int, started: int, viewers: int = 1) -> VideoDemand:
    return VideoDemand(sid, VGA30, viewers, band, started)


def test_everyone_full_within_budget() -> None:
    modes = allocate([demand("a", 1, 1), demand("b", 1, 2)], budget=2 * VGA30)
    assert modes == {"a": CallMode.FULL, "b": CallMode.FULL}


def test_medium_and_high_news2_keep_full_quality_ahead_of_older_low_risk_calls() -> None:
    calls = [demand("low-old", 1, 1), demand("low-new", 1, 2), demand("high", 4, 3)]
    modes = allocate(calls, budget=1.5 * VGA30)
    assert modes["high"] is CallMode.FULL
    assert modes["low-old"] is CallMode.REDUCED and modes["low-new"] is CallMode.REDUCED


def test_video_stops_for_low_priority_calls_only_when_even_reduced_does_not_fit() -> None:
    calls = [demand("med", 3, 5), demand("low", 1, 1)]
    modes = allocate(calls, budget=reduced_pixel_rate(VGA30) * 1.5)
    assert modes == {"med": CallMode.REDUCED, "low": CallMode.AUDIO_ONLY}


def test_viewers_multiply_what_a_call_costs() -> None:
    modes = allocate([demand("a", 1, 1, viewers=3)], budget=2 * VGA30)
    assert modes["a"] is CallMode.REDUCED


def test_seconds_without_packets_are_no_evidence_either_way() -> None:
    c = LinkModeController()
    c.update(AWFUL)
    c.update(AWFUL)
    assert c.mode is CallMode.AUDIO_ONLY
    # The peer went quiet (or sends nothing on this link): no climbing back on silence.
    silent = LinkSample(0.0, 0.02, packets=0)
    for _ in range(30):
        assert c.update(silent) is CallMode.AUDIO_ONLY
    # Audio alone (50 packets a second) is evidence: a clean audio link climbs back.
    audio_only = LinkSample(0.0, 0.02, packets=50)
    modes = [c.update(audio_only) for _ in range(10)]
    assert modes[4] is CallMode.REDUCED and modes[9] is CallMode.FULL


def test_a_flapping_link_waits_longer_before_each_climb() -> None:
    c = LinkModeController()

    def seconds_to_climb() -> int:
        n = 0
        start = c.mode
        while c.mode is start:
            c.update(GOOD)
            n += 1
        return n

    c.update(LOSSY)
    c.update(LOSSY)
    assert seconds_to_climb() == 5
    # It falls again soon after recovering: the next climb needs twice as long, then four times.
    c.update(LOSSY)
    c.update(LOSSY)
    assert c.mode is CallMode.REDUCED
    assert seconds_to_climb() == 10
    c.update(LOSSY)
    c.update(LOSSY)
    assert seconds_to_climb() == 20
    # Once full quality holds for the flap window, the next fall recovers at the normal pace.
    for _ in range(c.t.flap_window_s):
        c.update(GOOD)
    c.update(LOSSY)
    c.update(LOSSY)
    assert seconds_to_climb() == 5


def test_measured_cpu_over_the_limit_shrinks_the_budget_and_it_regrows_when_relieved() -> None:
    from edge_nodes.media.quality import CpuPressure, pressured_budget

    configured, demand = 4 * VGA30, 3 * VGA30
    p = CpuPressure(limit=0.9)
    # Off (limit 0): the configured pixel rate, whatever the load.
    assert pressured_budget(configured, configured, demand, 5.0, CpuPressure(0.0)) == configured
    # Over the limit: below what the calls demand, so the lowest priority one sends less...
    b = pressured_budget(configured, configured, demand, 1.0, p)
    assert b == demand * p.shrink
    modes = allocate([demand_of("a", 4, 1), demand_of("b", 1, 2), demand_of("c", 1, 3)], b)
    assert modes["a"] is CallMode.FULL and modes["c"] is CallMode.REDUCED
    # ... and while that settles in the CPU figure, no further shrinking on old evidence.
    assert pressured_budget(configured, b, demand, 1.0, p, settling=True) == b
    # Between relief and the limit it holds; well under, it grows back to the configured one.
    assert pressured_budget(configured, b, demand, 0.85, p) == b
    grown = b
    for _ in range(10):
        grown = pressured_budget(configured, grown, demand, 0.3, p)
    assert grown == configured


def demand_of(sid: str, band: int, started: int) -> VideoDemand:
    return VideoDemand(sid, VGA30, 1, band, started)
