"""`neuraos search --guest NAME "QUERY" [-k N] [--path-prefix P] [--json]`: a guest's files by meaning.

The search runs in the guest's agent (it owns that guest's index) and reaches it through the
running controller's link: this process asks the controller over its control socket
(`hypervisor.control`), the controller sends the guest a `SearchFiles` command. Wired into
hypervisor/cli.py with `register(add)`; the controller serves `control_ops(link)`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Callable

from rich.console import Console
from rich.markup import escape

from hypervisor.config import Config
from hypervisor.link.search import MAX_K, SearchError

out = Console()


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("search", cmd_search, "search a guest's files by meaning (answered by its agent over the link)")
    p.add_argument("--guest", required=True, metavar="NAME", help="whose files (only that guest's)")
    p.add_argument("query", help="what to look for, in words")
    p.add_argument("-k", type=int, default=10, metavar="N", help=f"how many files (1–{MAX_K}, default 10)")
    p.add_argument("--path-prefix", metavar="P", default="", help="only files under this path (relative to the mount)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the guest (default 60)")


def control_ops(link) -> dict:  # noqa: ANN001 - a LinkServer
    """What the controller serves for this command on its control socket."""
    from hypervisor.link.search import search_files

    def search(args: dict) -> list[dict]:
        hits = search_files(link, str(args["guest"]), str(args["query"]), int(args.get("k", 10)),
                            str(args.get("path_prefix", "")), float(args.get("timeout", 60.0)))
        return [asdict(h) for h in hits]

    return {"search": search}


def cmd_search(args: argparse.Namespace, cfg: Config) -> int:
    from hypervisor.control import call, control_path

    if not 1 <= args.k <= MAX_K:
        raise SearchError(f"-k must be between 1 and {MAX_K}", hint="")
    hits = call(control_path(cfg), "search", {"guest": args.guest, "query": args.query, "k": args.k,
                                              "path_prefix": args.path_prefix, "timeout": args.timeout},
                timeout=args.timeout + 10)
    if args.json:
        print(json.dumps(hits))
        return 0
    if not hits:
        out.print(f"no matches in {args.guest}'s files")
        return 0
    for h in hits:
        vec = "—" if h["vector_score"] is None else f"{h['vector_score']:.3f}"
        bm = "—" if h["bm25_score"] is None else f"{h['bm25_score']:.2f}"
        out.print(f"{h['rank']:2d}. {h['score']:7.3f}  [bold]{escape(h['path'])}[/]  (vector {vec}, bm25 {bm})")
        if h.get("snippet"):
            out.print(f"      [dim]{escape(h['snippet'])}[/]")
    return 0
