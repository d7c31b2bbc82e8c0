"""`neuraos-agent search "QUERY" [--path-prefix P] [-k N] [--json]`: search the guest's files by meaning.

The agent's main CLI dispatches here: `add_search_parser(subparsers)` then `cmd_search(args)`, or
`main(argv)` alone. The search runs in the agent (it owns the index) and sees who asks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from neuraos_agent.vfs.errors import VFSError

DEFAULT_SOCKET = Path(os.environ.get("NEURAOS_VFS_SOCKET", "/run/neuraos/vfs.sock"))


def add_search_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    p = sub.add_parser("search", help="search the files under the vector file system by meaning")
    configure(p)
    return p


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("query", help="what to look for, in words")
    p.add_argument("--path-prefix", metavar="P", default="", help="only files under this path (relative to the mount)")
    p.add_argument("-k", type=int, default=10, metavar="N", help="how many files (default 10)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--socket", type=Path, default=DEFAULT_SOCKET, help=f"agent socket (default {DEFAULT_SOCKET})")


def cmd_search(args: argparse.Namespace) -> int:
    if args.k < 1:
        print("neuraos-agent search: -k must be at least 1", file=sys.stderr)
        return 2
    from neuraos_agent.vfs.query_socket import query

    try:
        hits = query(args.socket, args.query, args.k, args.path_prefix)
    except VFSError as exc:
        print(f"neuraos-agent search: {exc}", file=sys.stderr)
        print("hint: is `neuraos-agent run` up with the vector file system mounted?", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([asdict(h) for h in hits], indent=2))
        return 0
    if not hits:
        print("no matches")
        return 0
    for h in hits:
        vec = "—" if h.vector_score is None else f"{h.vector_score:.3f}"
        bm = "—" if h.bm25_score is None else f"{h.bm25_score:.2f}"
        print(f"{h.rank:2d}. {h.score:7.3f}  {h.path}  (vector {vec}, bm25 {bm})")
        if h.snippet:
            print(f"      {h.snippet}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="neuraos-agent search", description=__doc__.splitlines()[0])
    configure(p)
    return cmd_search(p.parse_args(argv))


def add_status_parser(sub: "argparse._SubParsersAction[argparse.ArgumentParser]") -> argparse.ArgumentParser:
    """`neuraos-agent vfs-status`: is the mount up, how much is waiting, what is indexed (root only)."""
    p = sub.add_parser("vfs-status", help="the vector file system's journal and index counters")
    p.add_argument("--path-prefix", metavar="P", default="", help="count only files under this path")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--socket", type=Path, default=DEFAULT_SOCKET, help=f"agent socket (default {DEFAULT_SOCKET})")
    p.set_defaults(func=cmd_status)
    return p


def cmd_status(args: argparse.Namespace) -> int:
    from neuraos_agent.vfs.query_socket import status

    try:
        st = status(args.socket, args.path_prefix)
    except VFSError as exc:
        print(f"neuraos-agent vfs-status: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    under = f" under {st['path_prefix']}" if st.get("path_prefix") else ""
    print(f"mount       {st['mountpoint']}")
    print(f"pending     {st['pending_records']} journal records")
    print(f"indexed     {st['vector_files']} files with vectors, {st['indexed_files']} by words{under}")
    print(f"reconciled  {'yes' if st['reconciled'] else 'not yet'}")
    print(f"embedder    {'available' if st['embedder_available'] else 'unavailable (work waits in the journal)'}")
    print(f"rebuilds    {st['index_rebuilds']}")
    if st["last_error"]:
        print(f"last error  {st['last_error']}")
    return 0
