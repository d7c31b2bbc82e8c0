"""The vector file system: a FUSE mount whose files are also searchable by meaning.

Public API: `VectorFS` (with `VFSConfig`), the `Embedder` protocol (`MiniLMEmbedder` for the host
and benchmarks), `RankingConfig`/`SearchHit` for search, `Caller` for permission-filtered queries,
and `cli.main`/`cli.cmd_search` for `neuraos-agent search`. Names are imported on first use, so
the CLI does not pay for pyfuse3, numpy and Milvus just to ask the running agent a question.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Caller": "permissions", "Embedder": "embedder", "EmbedderUnavailable": "errors",
    "IndexCorrupt": "errors", "MiniLMEmbedder": "embedder", "RankingConfig": "search",
    "SearchHit": "search", "VFSConfig": "mount", "VFSError": "errors", "VFSStatus": "mount",
    "VectorFS": "mount",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{module}"), name)
