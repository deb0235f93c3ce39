"""TLS flags shared by the client programs: same names as the services' settings, same env vars."""

from __future__ import annotations

import argparse
import os

from telehealth.security.tls import TlsConfigError, TlsFiles

TLS_FLAGS = ("tls_cert_file", "tls_key_file", "tls_ca_file")


def add_tls_flags(parser: argparse.ArgumentParser) -> None:
    """--tls-cert-file/--tls-key-file/--tls-ca-file, defaulting to TELEHEALTH_TLS_* like services."""
    help_of = {
        "tls_cert_file": "PEM client certificate (mTLS); empty with the others = plaintext",
        "tls_key_file": "PEM private key of --tls-cert-file",
        "tls_ca_file": "PEM CA that signs the core's and edges' certificates",
    }
    for name in TLS_FLAGS:
        parser.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=os.environ.get("TELEHEALTH_" + name.upper(), ""),
            help=f"{help_of[name]} (env TELEHEALTH_{name.upper()})",
        )


def tls_from_flags(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> TlsFiles | None:
    try:
        return TlsFiles.from_settings(ns.tls_cert_file, ns.tls_key_file, ns.tls_ca_file)
    except TlsConfigError as e:
        parser.error(str(e))
