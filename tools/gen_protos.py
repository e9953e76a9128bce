"""Generate the Python code for protos/ with grpcio-tools (never edit the *_pb2*.py files by hand).

    python tools/gen_protos.py           # regenerate in place
    python tools/gen_protos.py --check   # exit 1 if the committed code is stale (CI runs this via a test)
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"


def generate(out_dir: Path) -> list[Path]:
    import grpc_tools
    from grpc_tools import protoc  # dev dependency only

    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    include = Path(grpc_tools.__file__).parent / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", *[str(p) for p in protos]]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted(p.relative_to(out_dir) for p in out_dir.rglob("*_pb2*.py*"))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--check", action="store_true", help="fail if the committed code is stale")
    args = parser.parse_args()
    if not args.check:
        generate(PROTO_ROOT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = [str(rel) for rel in generate(Path(tmp))
                 if not (PROTO_ROOT / rel).exists() or not filecmp.cmp(Path(tmp) / rel, PROTO_ROOT / rel, shallow=False)]
    if stale:
        print("stale generated code, run `python tools/gen_protos.py`:", *stale, sep="\n  ")
        return 1
    print("generated protobuf code is current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
