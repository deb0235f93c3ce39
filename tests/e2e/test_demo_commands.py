"""`telehealth-mesh up` (what `make demo` runs): the commands its summary prints work as printed
with TLS on, and Ctrl-C leaves nothing running."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _block(lines: list[str], start: str, end: str) -> list[str]:
    i = next(k for k, ln in enumerate(lines) if ln.startswith(start))
    j = next(k for k, ln in enumerate(lines) if k > i and ln.startswith(end))
    return [
        ln.strip() for ln in lines[i + 1 : j] if ln.startswith("  ") and not ln.startswith("    ")
    ]


def _run(commands: list[str], env: dict[str, str], cwd: Path) -> str:
    script = "set -e\n" + "\n".join(commands) + "\n"
    done = subprocess.run(
        ["bash", "-c", script], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return done.stdout


def _ours(data_dir: Path) -> list[str]:
    """Command lines of live processes started for this data dir."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(data_dir) in cmd:
            out.append(cmd)
    return out


def test_printed_commands_work_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    data = tmp_path / "mesh"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TELEHEALTH_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "config")  # the login token goes here, not in ~
    env["PYTHONUNBUFFERED"] = "1"
    up = subprocess.Popen(
        [sys.executable, "-m", "clients.mesh", "up", "--data-dir", str(data), "--zones",
         "zone-a", "--patients", "1", "--core-port", "0", "--edge-base-port", "0",
         "--http-base-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,  # the commands must not depend on the directory they run in
    )  # fmt: skip
    try:
        assert up.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 90
        while not lines or lines[-1] != "Ctrl-C stops everything.":
            assert time.monotonic() < deadline, "no summary:\n" + "\n".join(lines)
            ln = up.stdout.readline()
            assert ln, "telehealth-mesh exited:\n" + "\n".join(lines)
            lines.append(ln.rstrip("\n"))
        clinician = _block(lines, "Watch a patient", "As the operator")
        operator = _block(lines, "As the operator", "Clinician console")
        # TLS first, then the login, then what a clinician does.
        assert [c.split("=")[0] for c in clinician if c.startswith("export")] == [
            "export TELEHEALTH_TLS_CERT_FILE",
            "export TELEHEALTH_TLS_KEY_FILE",
            "export TELEHEALTH_TLS_CA_FILE",
        ]
        verbs = [c.split()[3] for c in clinician if c.startswith("telehealth-ctl")]
        assert verbs == ["login", "sessions", "watch"]
        watch = next(c for c in clinician if " watch " in c)
        assert re.search(r" watch ses_[0-9a-f]+$", watch), watch
        # Run them as printed; watch stops after 2 s instead of at Ctrl-C.
        shown = _run(
            [c + " --duration 2 --refresh 1" if c == watch else c for c in clinician],
            env,
            tmp_path,
        )
        assert "logged in as dr-demo (clinician)" in shown
        assert "1 session(s)" in shown
        final = shown.strip().split("\n\n")[-1]
        assert "NEWS2" in final and "inputs up to" in final
        assert re.search(r"heart rate +\d+ bpm +age ", final), final
        # The operator's lines follow in the same terminal (the venv already active).
        ops = _run([c for c in clinician if c.startswith(". ")] + operator, env, tmp_path)
        assert "logged in as ops-demo (operator)" in ops
        assert re.search(r"edge-a +zone-a .* healthy", ops), ops
    finally:
        up.send_signal(signal.SIGINT)
        rest, _ = up.communicate(timeout=60)
    assert up.returncode == 0, rest
    assert "stopped; nothing left running." in rest
    assert _ours(data) == []
