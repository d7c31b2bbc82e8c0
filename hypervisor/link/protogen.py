"""Generate the link's Python stubs for both sides from the one .proto.

The stubs are build products (git-ignored): `.ci/setup` and the guest image
build run this before installing either package. protoc names imports after the
proto's path under its include root, so the proto is staged at the package path
each side imports it from (`hypervisor.link._gen`, `neuraos_agent._gen`).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO = REPO / "guest-agent" / "proto" / "neuraos_link.proto"
TARGETS = {
    "hypervisor/link/_gen": REPO,
    "neuraos_agent/_gen": REPO / "guest-agent",
}


def generate(package_path: str, root: Path, proto: Path = PROTO) -> Path:
    """Write link_pb2.py and link_pb2_grpc.py into root/package_path."""
    from grpc_tools import protoc  # build-time dependency only

    out = root / package_path
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / package_path / "link.proto"
        staged.parent.mkdir(parents=True)
        shutil.copy(proto, staged)
        out.mkdir(parents=True, exist_ok=True)
        rc = protoc.main([
            "protoc", f"-I{tmp}", f"--python_out={root}", f"--grpc_python_out={root}",
            str(staged),
        ])
        if rc != 0:
            raise SystemExit(f"protoc failed on {proto} (exit {rc})")
    (out / "__init__.py").write_text('"""Generated from guest-agent/proto/neuraos_link.proto."""\n')
    return out


def main() -> None:
    for package_path, root in TARGETS.items():
        print(f"generated {generate(package_path, root)}", file=sys.stderr)


if __name__ == "__main__":
    main()
