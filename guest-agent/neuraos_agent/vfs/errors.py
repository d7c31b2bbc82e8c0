"""The vector file system's one exception hierarchy, so callers catch `VFSError` and nothing wider."""

from __future__ import annotations


class VFSError(Exception):
    """Base of every expected failure in the vector file system."""


class EmbedderUnavailable(VFSError):
    """The embedding service cannot be reached now; the work stays in the journal and is retried."""


class IndexCorrupt(VFSError):
    """The Milvus Lite store cannot be read or queried; it is rebuilt from the files."""

