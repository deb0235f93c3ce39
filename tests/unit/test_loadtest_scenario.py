"""Scenario files: every built-in parses, and mistakes are errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest import cli
from loadtest.payload import PayloadBook, PayloadShape, wrap_publish
from loadtest.scenario import ScenarioError, available, load_scenario, parse_scenario
from telehealth.v1 import vitals_pb2


def test_builtin_scenarios_all_parse() -> None:
    names = available()
    for required in ("steady", "ramp-to-saturation", "ward", "icu", "soak", "ci-smoke"):
        assert required in names
    for name in names:
        sc = load_scenario(name)
        assert sc.name == name


def test_builtin_scenarios_match_their_descriptions() -> None:
    ward, icu, soak = load_scenario("ward"), load_scenario("icu"), load_scenario("soak")
    assert (ward.patients, ward.batch_rate_hz, ward.watched) == (500, 1, 30)
    assert (icu.patients, icu.batch_rate_hz, icu.subscribers_per_patient) == (50, 25, 4)
    assert icu.ecg_hz > 0
    assert soak.duration_s == 1800
    ci = load_scenario("ci-smoke")
    assert ci.load_seconds == 20 and ci.placement_edges > 0  # "a 20-second scenario"


def test_unknown_key_is_an_error_naming_it() -> None:
    with pytest.raises(ScenarioError, match=r"unknown key.*patinets"):
        parse_scenario({"name": "x", "patinets": 3}, "x.yaml")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"patients": 0}, "patients must be between"),
        ({"patients": 2.5}, "whole number"),
        ({"batch_rate_hz": "fast"}, "must be a number"),
        ({"video_calls": 65}, "video_calls must be between 0 and 64"),
        ({"video_calls": 2, "paths": ["echo"]}, "need the edge path"),
        ({"video_calls": 20, "patients": 10}, "cannot exceed the number of patients"),
        ({"placement_sessions": 10}, "needs placement_edges"),
        ({"paths": ["edge", "kafka"]}, "unknown path 'kafka'"),
        ({"steps": []}, "non-empty list"),
        ({"vitals_rate_hz": 50, "batch_rate_hz": 25}, "cannot exceed"),
        ({"ecg_hz": 0, "vitals_rate_hz": 0}, "empty"),
        ({"parallel_paths": "yes"}, "true or false"),
        ({"subscribers_per_patient": 9, "connections": 4}, "distinct clients"),
    ],
)
def test_bad_values_are_rejected(data: dict[str, object], message: str) -> None:
    with pytest.raises(ScenarioError, match=message):
        parse_scenario({"name": "x", **data}, "x.yaml")


def test_not_a_mapping_is_rejected() -> None:
    with pytest.raises(ScenarioError, match="mapping"):
        parse_scenario([1, 2], "x.yaml")


def test_missing_scenario_lists_the_builtin_ones() -> None:
    with pytest.raises(ScenarioError, match="ci-smoke"):
        load_scenario("no-such-scenario")


def test_cli_exits_2_on_a_bad_scenario_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("name: bad\npatients: 3\nduratoin_s: 5\n")
    with pytest.raises(SystemExit) as e:
        cli.main(["run", str(f)])
    assert e.value.code == 2
    assert "duratoin_s" in capsys.readouterr().err


def test_cli_list_names_every_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    cli.main(["list"])
    out = capsys.readouterr().out
    assert all(name in out for name in available())


def test_payload_carries_seq_session_and_contiguous_ecg_times() -> None:
    book = PayloadBook(PayloadShape(25, 250, 1), variants=1)
    first = vitals_pb2.VitalsBatch.FromString(book.encode(0, "ses_1", 1, 1_000, 5))
    second = vitals_pb2.VitalsBatch.FromString(book.encode(0, "ses_1", 2, 1_000, 6))
    assert (first.session_id, first.seq, second.seq) == ("ses_1", 1, 2)
    assert len(first.waveforms[0].samples) == 10  # 40 ms at 250 Hz
    assert len(first.vitals) == 1 and len(second.vitals) == 0  # vitals once a second
    assert (
        second.waveforms[0].start_time_unix_ns - first.waveforms[0].start_time_unix_ns == 40_000_000
    )
    wrapped = vitals_pb2.PublishVitalsRequest.FromString(wrap_publish(first.SerializeToString()))
    assert wrapped.batch == first


def test_vitals_only_batches_for_a_ward() -> None:
    book = PayloadBook(PayloadShape(1, 0, 1), variants=1)
    b = vitals_pb2.VitalsBatch.FromString(book.encode(0, "s", 1, 1, 1))
    assert not b.waveforms and len(b.vitals) == 1
