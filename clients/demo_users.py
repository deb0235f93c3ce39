"""The local demo's people: a clinician assigned to the simulated patients and an operator."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from core_services.auth.users import UserStore
from core_services.store import SqlStore
from telehealth.errors import AlreadyExists

if TYPE_CHECKING:
    from clients.mesh import LocalMesh

CLINICIAN = "dr-demo"
OPERATOR = "ops-demo"


def _password(path: Path) -> str:
    # One password per data dir, kept 0600 beside the data, so re-runs print the same one.
    if path.exists():
        return path.read_text().strip()
    pw = secrets.token_urlsafe(12)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(pw + "\n")
    return pw


def demo_patients(patients: int) -> list[str]:
    """The pseudonymous ids `telehealth-device --patient patient --patients N` uses."""
    return ["patient"] if patients == 1 else [f"patient-{i + 1:03d}" for i in range(patients)]


async def demo_security(mesh: LocalMesh, patients: int) -> str:
    password = _password(mesh.data_dir / "demo-password")
    store = SqlStore(f"sqlite+aiosqlite:///{mesh.data_dir / 'core' / 'core.db'}")
    await store.start()
    try:
        users = UserStore(store.engine)
        for user, role in ((CLINICIAN, "clinician"), (OPERATOR, "operator")):
            try:
                await users.add_user(user, role, password)
            except AlreadyExists:
                pass
        for p in demo_patients(patients):
            await users.assign(CLINICIAN, p)
    finally:
        await store.close()
    assert mesh.core is not None
    console = mesh.core.metrics_url.removesuffix("/metrics") + "/console"
    lines = [
        f"Clinician console: {console}",
        f"  sign in as {CLINICIAN} with the password below; the ward shows the demo patients",
        "",
        "Security: mTLS on every link (CA and certificates in "
        f"{mesh.pki_dir}); people log in for a token.",
        f"  clinician {CLINICIAN} (assigned the demo patients)  operator {OPERATOR}",
        f"  password  {password}   (also in {mesh.data_dir / 'demo-password'})",
    ]
    # The TLS exports and logins come first, in the launcher's summary (clients/mesh.py).
    lines += [
        "  administration, on the core's database:",
        f"  telehealth-ctl users --data-dir {mesh.data_dir / 'core'} add USER --role clinician",
        f"  telehealth-ctl audit --data-dir {mesh.data_dir / 'core'} verify",
    ]
    return "\n".join(lines)
