"""Regenerate telehealth/v1 from proto/ with the pinned grpcio-tools (make proto)."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import grpc_tools
from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def generate(out_root: Path) -> list[Path]:
    """Write *_pb2.py, *_pb2_grpc.py and *.pyi for every proto under out_root/telehealth/v1."""
    out_dir = out_root / "telehealth" / "v1"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    protos = sorted(PROTO_ROOT.glob("telehealth/v1/*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        # mypy-protobuf's plugins live beside this interpreter, which may not be on PATH.
        f"--plugin=protoc-gen-mypy={Path(sys.executable).parent / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={Path(sys.executable).parent / 'protoc-gen-mypy_grpc'}",
        f"--python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the message above")
    (out_dir / "__init__.py").write_text(
        '"""Generated from proto/telehealth/v1 by make proto; never edit."""\n'
    )
    return sorted(out_dir.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="root to write telehealth/v1 under")
    ns = parser.parse_args()
    files = generate(ns.out)
    print(f"generated {len(files)} files in {ns.out / 'telehealth' / 'v1'}", file=sys.stderr)


if __name__ == "__main__":
    main()
