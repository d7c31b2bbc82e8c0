"""The vector file system: a FUSE mount whose files are also searchable by meaning.

Public API: `VectorFS` (with `VFSConfig`), the `Embedder` protocol (`MiniLMEmbedder` for the host
and benchmarks), `RankingConfig`/`SearchHit` for search, `Caller` for permission-filtered queries.
"""

from neuraos_agent.vfs.embedder import Embedder, MiniLMEmbedder
from neuraos_agent.vfs.errors import EmbedderUnavailable, IndexCorrupt, VFSError
from neuraos_agent.vfs.mount import VectorFS, VFSConfig, VFSStatus
from neuraos_agent.vfs.permissions import Caller
from neuraos_agent.vfs.search import RankingConfig, SearchHit

__all__ = [
    "Caller", "Embedder", "EmbedderUnavailable", "IndexCorrupt", "MiniLMEmbedder",
    "RankingConfig", "SearchHit", "VFSConfig", "VFSError", "VFSStatus", "VectorFS",
]
