"""Search one guest's files by meaning, answered by that guest's agent over its own link.

The host holds no copy of a guest's index: it sends a `SearchFiles` command down the guest's
channel and the agent searches its vector file system (files of that guest only, since the
channel names the guest). The agent answers with JSON hits in `CommandResult.output`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from hypervisor.errors import LinkError, NeuraError
from hypervisor.link._gen import link_pb2
from hypervisor.link.server import LinkServer

MAX_K = 100  # what the agent serves in one answer


@dataclass(frozen=True)
class FileHit:
    rank: int
    path: str  # relative to the guest's mount (default /srv/neura)
    score: float  # the fused score that ranked it
    vector_score: float | None  # best chunk cosine; None: the file has no vectors yet
    bm25_score: float | None
    offset: int  # character offset of the best chunk
    snippet: str = ""


class SearchError(NeuraError):
    hint = "see the guest's `neuraos-agent vfs-status`; the mount comes up a minute after boot under TCG"


def search_files(link: LinkServer, guest: str, query: str, k: int = 10, path_prefix: str = "",
                 timeout: float = 60.0) -> list[FileHit]:
    """The best `k` files of `guest` for `query`; `SearchError` with the agent's reason if it fails."""
    if not query.strip():
        raise SearchError("the query is empty", hint="say in words what the files are about")
    if not 1 <= k <= MAX_K:
        raise SearchError(f"-k must be between 1 and {MAX_K}", hint="")
    cmd = link_pb2.Command(search=link_pb2.SearchFiles(query=query, k=k, path_prefix=path_prefix))
    result = link.send_command(guest, cmd, timeout)
    if not result.ok:
        raise SearchError(f"guest {guest} could not search: {result.error}")
    try:
        rows = json.loads(result.output)
        return [FileHit(**{f: r.get(f) for f in FileHit.__dataclass_fields__}) for r in rows]
    except (ValueError, TypeError, AttributeError) as exc:
        raise LinkError(f"guest {guest} answered the search with something that is not a list of hits: {exc}") from None
