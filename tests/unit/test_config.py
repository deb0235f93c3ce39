"""Settings: defaults, YAML, env, flags, in that order; unknown or invalid keys named."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from telehealth.config import ConfigError, CoreSettings, EdgeSettings, add_flags, load_settings


def test_defaults_need_nothing() -> None:
    s = load_settings(EdgeSettings, environ={})
    assert s.zone == "zone-a" and s.heartbeat_interval_s == 0.5


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    cfg = tmp_path / "edge.yaml"
    cfg.write_text("zone: zone-b\ncapacity_sessions: 50\nedge_id: from-file\n")
    parser = argparse.ArgumentParser()
    add_flags(parser, EdgeSettings)
    ns = parser.parse_args(["--config", str(cfg), "--edge-id", "from-flag"])
    s = load_settings(EdgeSettings, ns, environ={"TELEHEALTH_CAPACITY_SESSIONS": "70"})
    assert (s.zone, s.capacity_sessions, s.edge_id) == ("zone-b", 70, "from-flag")


def test_whole_body_in_env() -> None:
    body = "zone_latency_ms: {zone-a: {zone-b: 4}}\nheartbeat_timeout_s: 1.5\n"
    s = load_settings(CoreSettings, environ={"TELEHEALTH_CONFIG": body})
    assert s.zone_latency_ms == {"zone-a": {"zone-b": 4.0}} and s.heartbeat_timeout_s == 1.5


def test_unknown_key_is_named() -> None:
    with pytest.raises(ConfigError, match="zonee"):
        load_settings(EdgeSettings, environ={"TELEHEALTH_CONFIG": "zonee: zone-a\n"})
    with pytest.raises(ConfigError, match="TELEHEALTH_ZONEE"):
        load_settings(EdgeSettings, environ={"TELEHEALTH_ZONEE": "x"})


def test_invalid_value_is_named() -> None:
    with pytest.raises(ConfigError, match="capacity_sessions"):
        load_settings(EdgeSettings, environ={"TELEHEALTH_CAPACITY_SESSIONS": "-3"})
    with pytest.raises(ConfigError, match="discovery"):
        load_settings(CoreSettings, environ={"TELEHEALTH_DISCOVERY": "dns"})


def test_bad_yaml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(CoreSettings, environ={"TELEHEALTH_CONFIG": "a: [1,"})
