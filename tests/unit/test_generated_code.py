"""The committed generated code is exactly what make proto produces from proto/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "telehealth" / "v1").iterdir()}
    committed = {
        p.name: p.read_bytes()
        for p in (ROOT / "telehealth" / "v1").iterdir()
        if p.is_file() and p.suffix in (".py", ".pyi")
    }
    assert sorted(fresh) == sorted(committed), "run `make proto`: generated file set differs"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"run `make proto`: stale generated files {stale}"
