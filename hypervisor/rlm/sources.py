"""What `neuraos ask --context` names, turned into an RLM context.

One folder stays a lazily read corpus (the REPL opens a file only when a program does); one
file or stdin is a string; several files, folders or globs become a list of documents, each
headed by its path so a program can say where an answer came from. Binary files are skipped.
"""

from __future__ import annotations

import glob
import sys
from pathlib import Path
from typing import IO, Sequence

from neuraos_agent.rlm.context import Context, CorpusRef

from hypervisor.errors import NeuraError

MAX_CHARS = 256 << 20  # a list of documents is staged into the sandbox as one JSON file


def _is_text(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return b"\0" not in fh.read(4096)
    except OSError:
        return False


def _expand(spec: str) -> list[Path]:
    if any(ch in spec for ch in "*?["):
        hits = [Path(p) for p in sorted(glob.glob(spec, recursive=True))]
        if not hits:
            raise NeuraError(f"no files match {spec}", "check the pattern (quote it so the shell leaves it alone)")
        paths = hits
    else:
        p = Path(spec).expanduser()
        if not p.exists():
            raise NeuraError(f"no such file or folder: {spec}", "pass files, folders, globs, or - for stdin")
        paths = [p]
    out: list[Path] = []
    for p in paths:
        out += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.is_file() else []
    return out


def gather(specs: Sequence[str], stdin: IO[str] = sys.stdin) -> tuple[Context, str]:
    """(context, a short description of where it came from) for the `--context` values."""
    if not specs:
        if stdin.isatty():
            raise NeuraError("no context given", "pass --context PATH|GLOB (repeatable) or pipe text to stdin")
        specs = ["-"]
    if list(specs) == ["-"]:
        text = stdin.read()
        if not text.strip():
            raise NeuraError("the context on stdin is empty")
        return text, "stdin"
    if len(specs) == 1 and "-" not in specs and Path(specs[0]).expanduser().is_dir():
        folder = Path(specs[0]).expanduser().resolve()
        if not any(f.is_file() for f in folder.rglob("*")):
            raise NeuraError(f"folder {folder} has no files")
        return CorpusRef(folder), f"folder {folder}"
    if len(specs) == 1 and "-" not in specs and Path(specs[0]).expanduser().is_file():
        path = Path(specs[0]).expanduser()
        if not _is_text(path):
            raise NeuraError(f"{path} is not a text file")
        return path.read_text(encoding="utf-8", errors="replace"), f"file {path}"
    docs: list[str] = []
    chars = 0
    seen: set[Path] = set()
    for spec in specs:
        if spec == "-":
            docs.append("[stdin]\n" + stdin.read())
            continue
        for f in _expand(spec):
            if f.resolve() in seen or not _is_text(f):
                continue
            seen.add(f.resolve())
            docs.append(f"[{f}]\n" + f.read_text(encoding="utf-8", errors="replace"))
            chars += len(docs[-1])
            if chars > MAX_CHARS:
                raise NeuraError(f"the context is over {MAX_CHARS >> 20} MiB of text",
                                 "name a folder instead (read lazily) or narrow the globs")
    if not docs:
        raise NeuraError("the context has no text files", "binary files are skipped")
    return docs, f"{len(docs)} files from {', '.join(specs)}"
