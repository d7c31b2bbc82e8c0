"""Context sources and their description: what the root model is told instead of the context.

A context is a string, a list of documents, or a folder read lazily (`CorpusRef`). The root
only ever gets `describe()`'s `ContextInfo` (kind, size, counts, record field names); the
context itself is staged into a folder the sandbox mounts read-only at /context.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence, Union

from neuraos_agent.rlm.errors import ContextError

CHARS_PER_TOKEN = 4


@dataclass(frozen=True)
class CorpusRef:
    """A folder whose files are the documents; the REPL reads each only when a program does."""

    path: Path


Context = Union[str, list, CorpusRef]
VfsSearch = Callable[[str, int], Sequence[Any]]  # (query, k) -> paths or hits with `.path`


@dataclass(frozen=True)
class ContextInfo:
    kind: str                     # text | documents | corpus
    chars: int
    tokens_est: int
    items: int                    # documents (or lines of a text)
    source: str = ""
    record_fields: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def sentence(self, window: int | None = None) -> str:
        """How the root is told about the context (never its content)."""
        unit = "lines" if self.kind == "text" else "documents"
        s = (f"`context` is a {self._type()} of {self.chars:,} characters (about {self.tokens_est:,} tokens"
             + (f", {self.tokens_est / window:.0f}x your window" if window else "") + f") in {self.items:,} {unit}")
        if self.record_fields:
            s += "; each line is a record with fields " + ", ".join(self.record_fields)
        return s + (f"; source: {self.source}" if self.source else "") + "."

    def _type(self) -> str:
        return {"text": "string", "documents": "list of documents", "corpus": "lazily loaded corpus"}[self.kind]


_RECORD = re.compile(r"([A-Za-z][\w ]{0,30}?)\s*:\s*[^|]*")


def _record_fields(sample_lines: list[str]) -> tuple[str, ...]:
    """Field names when the lines look like `Key: value || Key: value` records."""
    seen: list[str] = []
    good = 0
    for ln in sample_lines[:20]:
        parts = [p.strip() for p in ln.split("||")]
        names = [m.group(1).strip() for p in parts if (m := _RECORD.fullmatch(p))]
        if len(parts) > 1 and len(names) == len(parts):
            good += 1
            for n in names:
                if n not in seen:
                    seen.append(n)
    return tuple(seen) if good >= max(1, len(sample_lines[:20]) // 2) else ()


def _doc_text(d: Any) -> str:
    return d if isinstance(d, str) else json.dumps(d) if isinstance(d, dict) else str(d)


def describe(context: Context, source: str = "") -> ContextInfo:
    if isinstance(context, str):
        head = context[:20_000].splitlines()
        n = context.count("\n") + (1 if context and not context.endswith("\n") else 0)
        return ContextInfo("text", len(context), len(context) // CHARS_PER_TOKEN, n, source, _record_fields(head))
    if isinstance(context, CorpusRef):
        files = [p for p in sorted(context.path.rglob("*")) if p.is_file()]
        chars = sum(p.stat().st_size for p in files)
        return ContextInfo("corpus", chars, chars // CHARS_PER_TOKEN, len(files), source or str(context.path))
    if isinstance(context, list):
        texts = [_doc_text(d) for d in context]
        chars = sum(len(t) for t in texts)
        fields = _record_fields([t.splitlines()[0] for t in texts[:20] if t])
        if not fields and context and all(isinstance(d, dict) for d in context[:20]):
            fields = tuple(dict.fromkeys(k for d in context[:20] for k in d))
        return ContextInfo("documents", chars, chars // CHARS_PER_TOKEN, len(context), source, fields)
    raise ContextError(f"unsupported context type {type(context).__name__}",
                       hint="pass a string, a list of documents or a CorpusRef")


def stage(context: Context, folder: Path) -> Path | None:
    """Write the context where the sandbox will mount it; returns a corpus folder to bind, if any."""
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(context, str):
        (folder / "context.txt").write_text(context, encoding="utf-8")
        kind = "text"
    elif isinstance(context, list):
        (folder / "context.json").write_text(json.dumps(context), encoding="utf-8")
        kind = "documents"
    elif isinstance(context, CorpusRef):
        (folder / "corpus").mkdir(exist_ok=True)  # mount point (or, unconfined, a symlink's place)
        kind = "corpus"
    else:
        raise ContextError(f"unsupported context type {type(context).__name__}")
    (folder / "manifest.json").write_text(json.dumps({"kind": kind}), encoding="utf-8")
    return context.path.resolve() if isinstance(context, CorpusRef) else None


def default_vfs_root() -> Path:
    """The vector FS mount (the vfs package's default, /srv/neura), or $NEURAOS_VFS_ROOT."""
    return Path(os.environ.get("NEURAOS_VFS_ROOT", "/srv/neura"))


def resolve(spec: str | None, *, vfs_root: Path | None = None, vfs_search: VfsSearch | None = None,
            k: int = 50) -> tuple[Context, str]:
    """A CLI `--context` value to a context: PATH, `vfs` (the whole vector FS, read lazily),
    `vfs:/PREFIX` (the files under a path prefix), `vfs:QUERY` (the top-k files by meaning),
    `logs` (journald) or `system` (processes and memory)."""
    spec = spec or "vfs"
    if spec == "vfs" or spec.startswith("vfs:"):
        root = vfs_root or default_vfs_root()
        query = spec[4:].strip()
        if not query or query.startswith("/"):
            folder = root / query.lstrip("/")
            if not folder.is_dir():
                raise ContextError(f"vector FS folder {folder} not found",
                                   hint="is the vector FS mounted? set NEURAOS_VFS_ROOT or pass --context PATH")
            return CorpusRef(folder), f"vfs {folder}"
        search = vfs_search or _vfs_search()
        hits = search(query, k)
        docs = []
        for h in hits:
            p = root / str(getattr(h, "path", h)).lstrip("/")
            try:
                docs.append(f"[{p}]\n" + p.read_text(encoding="utf-8", errors="replace"))
            except OSError:
                continue
        return docs, f"vfs search {query!r} (top {len(docs)})"
    if spec == "logs":
        return _journal(), "journald (last 5000 lines)"
    if spec == "system":
        return _system_state(), "processes and memory (/proc)"
    path = Path(spec).expanduser()
    if path.is_dir():
        return CorpusRef(path), f"folder {path}"
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace"), f"file {path}"
    raise ContextError(f"no such context: {spec}", hint="use a file or folder PATH, vfs, vfs:QUERY, logs or system")


def _vfs_search() -> VfsSearch:
    """Search through the running agent's vector FS socket (it owns the index)."""
    try:
        from neuraos_agent.vfs.cli import DEFAULT_SOCKET
        from neuraos_agent.vfs.query_socket import query
    except ImportError as exc:
        raise ContextError("the vector FS is not available in this agent", hint="use --context PATH") from exc

    def search(q: str, k: int) -> Sequence[Any]:
        try:
            return query(DEFAULT_SOCKET, q, k)
        except Exception as exc:  # noqa: BLE001  (the vfs has its own error types)
            raise ContextError(f"vector FS search failed: {exc}",
                               hint="is `neuraos-agent run` up with the vector FS mounted?") from exc
    return search


def _journal() -> str:
    if shutil.which("journalctl"):
        out = subprocess.run(["journalctl", "-n", "5000", "--no-pager", "-o", "short-iso"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout
    for p in (Path("/var/log/syslog"), Path("/var/log/messages")):
        if p.exists():
            return "\n".join(p.read_text(errors="replace").splitlines()[-5000:])
    raise ContextError("no system log found", hint="journald or /var/log/syslog is needed for --context logs")


def _system_state() -> str:
    rows = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            status = dict(ln.split(":", 1) for ln in (d / "status").read_text().splitlines() if ":" in ln)
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        rows.append(f"Pid: {d.name} || Name: {status.get('Name', '').strip()} || State: "
                    f"{status.get('State', '').strip()} || RssKiB: {status.get('VmRSS', '0 kB').split()[0]} || "
                    f"Command: {cmd[:200]}")
    mem = Path("/proc/meminfo").read_text().splitlines()[:5]
    return "\n".join(mem + rows)
