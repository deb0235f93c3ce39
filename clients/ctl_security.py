"""telehealth-ctl's security commands: pki init/renew, login, users add/assign, audit verify."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import grpc
from cryptography import x509

from core_services.audit.anchor import CheckpointFile
from core_services.audit.store import SqlAuditLog
from core_services.auth.users import UserStore
from core_services.store import SqlStore
from telehealth.config import CoreSettings
from telehealth.security.audit import AuditKey
from telehealth.security.identity import certificate_identity
from telehealth.security.pki import DEFAULT_CLIENTS, DEFAULT_HOSTS, init_pki, renew_pki
from telehealth.v1 import auth_pb2, auth_pb2_grpc

TOKEN_ENV = "TELEHEALTH_TOKEN"


def token_path() -> Path:
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "telehealth" / "token"


def saved_token() -> str:
    """The login token: TELEHEALTH_TOKEN wins, then the file `telehealth-ctl login` wrote."""
    env = os.environ.get(TOKEN_ENV, "")
    if env:
        return env
    try:
        return token_path().read_text().strip()
    except OSError:
        return ""


class _Bearer:
    """Adds the login token to every call that does not carry its own authorization."""

    def __init__(self, token: str) -> None:
        self._token = token

    def _details(self, d: Any) -> Any:
        md = list(d.metadata or [])
        if not any(k == "authorization" for k, _ in md):
            md.append(("authorization", f"Bearer {self._token}"))
        return d._replace(metadata=grpc.aio.Metadata(*md))


class _BearerUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


def bearer_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    """One interceptor per call kind: grpc.aio files an interceptor under the first kind it
    is an instance of, so one object serving both would never see server-streaming calls
    (ExportFhir, Watch)."""
    return [_BearerUnary(token), _BearerStream(token)]


def _database_url(ns: argparse.Namespace) -> str:
    if ns.database_url:
        return str(ns.database_url)
    return CoreSettings(data_dir=Path(ns.data_dir)).resolved_database_url()


def _password(ns: argparse.Namespace) -> str:
    if ns.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    if os.environ.get("TELEHEALTH_PASSWORD"):
        return os.environ["TELEHEALTH_PASSWORD"]
    return getpass.getpass(f"password for {ns.user}: ")


async def cmd_pki(ns: argparse.Namespace, out: TextIO) -> int:
    if ns.pki_command == "renew":
        try:
            renewed = renew_pki(Path(ns.dir), [n for n in ns.names.split(",") if n], days=ns.days)
        except FileNotFoundError as e:
            out.write(f"cannot renew: {e}\n")
            return 1
        for r in renewed:
            out.write(f"  {r.name:<14} serial {r.old_serial:x} -> {r.new_serial:x}\n")
        out.write(
            f"renewed {len(renewed)} certificate(s) in {ns.dir} from the same CA; running "
            "servers use them for new connections without a restart\n"
        )
        return 0
    edges = [e for e in ns.edges.split(",") if e]
    files = init_pki(
        Path(ns.dir),
        services=["core", *edges],
        clients=list(DEFAULT_CLIENTS),
        hosts=[*DEFAULT_HOSTS, *[h for h in ns.hosts.split(",") if h]],
        zones=[z for z in ns.zones.split(",") if z],
    )
    out.write(f"CA and {len(files)} certificate(s) in {ns.dir} (existing files kept)\n")
    for name, f in files.items():
        uri = certificate_identity(x509.load_pem_x509_certificate(f.cert.read_bytes())).uri
        out.write(f"  {name:<14} {uri:<36} {f.cert}\n")
    return 0


async def cmd_users(ns: argparse.Namespace, out: TextIO) -> int:
    store = SqlStore(_database_url(ns))
    await store.start()
    try:
        users = UserStore(store.engine)
        if ns.users_command == "add":
            await users.add_user(ns.user, ns.role, _password(ns))
            out.write(f"user {ns.user} added ({ns.role})\n")
        else:
            for patient in ns.patients:
                await users.assign(ns.user, patient)
            out.write(f"{ns.user} assigned {len(ns.patients)} patient(s)\n")
    finally:
        await store.close()
    return 0


def _core_paths(ns: argparse.Namespace) -> CoreSettings:
    """Where the core keeps its audit key and checkpoint file, from the same data_dir/keys_dir
    defaults the core uses."""
    return CoreSettings(
        data_dir=Path(ns.data_dir),
        keys_dir=Path(ns.keys_dir) if ns.keys_dir else None,
        audit_key_file=Path(ns.audit_key_file) if ns.audit_key_file else None,
    )


async def cmd_audit(ns: argparse.Namespace, out: TextIO) -> int:
    paths = _core_paths(ns)
    key_path = paths.resolved_audit_key_file()
    try:
        key = AuditKey.load(key_path)
    except (OSError, ValueError) as e:
        out.write(
            f"cannot verify: no audit key at {key_path} ({e}); give --keys-dir or "
            "--audit-key-file of the core\n"
        )
        return 2
    files = [CheckpointFile(Path(f)) for f in ns.checkpoints] or [
        CheckpointFile(paths.resolved_audit_checkpoint_file())
    ]
    store = SqlStore(_database_url(ns))
    await store.start()
    try:
        report = await SqlAuditLog(store.engine, key).report(files)
    finally:
        await store.close()
    for note in report.notes:
        out.write(f"NOTE {note}\n")
    if not report.problems:
        out.write(
            f"audit chain intact: {report.checked} entries, {report.checkpoints} signed "
            f"checkpoint(s) match\n"
        )
        return 0
    for p in report.problems:
        out.write(f"TAMPERED {p}\n")
    out.write(
        f"audit chain broken: {len(report.problems)} problem(s) in {report.checked} entries\n"
    )
    return 1


async def cmd_login(ch: grpc.aio.Channel, ns: argparse.Namespace, out: TextIO) -> int:
    stub = auth_pb2_grpc.AuthServiceStub(ch)
    resp = await stub.Login(
        auth_pb2.LoginRequest(user_id=ns.user, password=_password(ns)), timeout=10
    )
    path = token_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(resp.token + "\n")
    out.write(f"logged in as {resp.user_id} ({resp.role}); token saved to {path}\n")
    return 0


def add_commands(sub: Any) -> None:
    pki = sub.add_parser("pki", help="local certificate authority for the dev mesh")
    pki_sub = pki.add_subparsers(dest="pki_command", required=True)
    init = pki_sub.add_parser(
        "init",
        help="create the CA and certificates (keeps existing ones); each carries its role as a "
        "SAN URI: spiffe://telehealth/core, .../edge/<id>, .../zone/<zone>, .../device, "
        ".../clinician, .../operator",
    )
    init.add_argument("--dir", default="var/pki", help="where the PEM files go")
    init.add_argument("--edges", default="edge-a,edge-b,edge-c", help="edge ids to certify")
    init.add_argument(
        "--zones",
        default="",
        help="zones to certify (edges-<zone>.crt): any edge of the zone may use it, as pods "
        "whose names vary do",
    )
    init.add_argument("--hosts", default="", help="extra SANs for server certificates")
    renew = pki_sub.add_parser(
        "renew",
        help="re-issue leaf certificates from the existing CA (new key and serial, same names "
        "and roles); running servers pick them up for new connections",
    )
    renew.add_argument("--dir", default="var/pki", help="where the PEM files are")
    renew.add_argument("--names", default="", help="only these (e.g. core,edge-a); default all")
    renew.add_argument("--days", type=int, default=825, help="validity of the new certificates")
    login = sub.add_parser("login", help="log in (clinician or operator) and save the token")
    login.add_argument("user", help="user id")
    login.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    for name, helptext in (
        ("users", "manage clinicians, operators and assignments (on the core's database)"),
        ("audit", "check the audit log's hash chain (on the core's database)"),
    ):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--database-url", default="", help="the core's database URL")
        p.add_argument("--data-dir", default="var", help="the core's data_dir (SQLite default)")
        if name == "users":
            us = p.add_subparsers(dest="users_command", required=True)
            add = us.add_parser("add", help="add a user")
            add.add_argument("user")
            add.add_argument("--role", choices=("clinician", "operator"), required=True)
            add.add_argument("--password-stdin", action="store_true")
            assign = us.add_parser("assign", help="assign patients to a clinician")
            assign.add_argument("user")
            assign.add_argument("patients", nargs="+", help="pseudonymous patient ids")
        else:
            a = p.add_subparsers(dest="audit_command", required=True)
            v = a.add_parser(
                "verify",
                help="check the chain, every entry's MAC and the signed checkpoints; exit 1 "
                "naming every edited or deleted entry (2: the audit key is not here)",
            )
            v.add_argument(
                "--keys-dir", default="", help="the core's keys_dir (default DATA_DIR/keys)"
            )
            v.add_argument("--audit-key-file", default="", help="the core's audit_key_file, if set")
            v.add_argument(
                "--checkpoints",
                action="append",
                default=[],
                metavar="FILE",
                help="a checkpoint file (repeat for each core replica's; default "
                "DATA_DIR/audit-checkpoints.jsonl)",
            )


LOCAL = {"pki": cmd_pki, "users": cmd_users, "audit": cmd_audit}


def run_local(ns: argparse.Namespace, out: TextIO) -> int:
    return asyncio.run(LOCAL[ns.command](ns, out))


def local_commands() -> Sequence[str]:
    return tuple(LOCAL)
