"""The guest's `Embedder`: the host's MiniLM, asked over the link (the guest keeps no model).

A call that cannot reach the host (link down, host restarting, model service busy or absent)
raises `EmbedderUnavailable`, which the indexing worker treats as "keep the work in the journal and
retry later"; writes never wait for it. Vectors of the wrong width (another model on the host) are
a configuration error, not an outage, and say so.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Sequence

from neuraos_agent.vfs.embedder import MINILM_DIM, MINILM_ID
from neuraos_agent.vfs.errors import EmbedderUnavailable, VFSError

if TYPE_CHECKING:
    import numpy as np

    from neuraos_agent.models import ModelsClient

# gRPC codes that mean "not now" rather than "never": the work waits and is retried
RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "CANCELLED", "ABORTED",
                       "UNKNOWN", "INTERNAL", "FAILED_PRECONDITION", "UNIMPLEMENTED"})
# The model reads 256 tokens at most, far fewer than this many characters; the host refuses longer
# texts (8,192), so a chunk of one endless "word" is cut here instead of failing forever.
MAX_CHARS = 4096


class LinkEmbedder:
    """all-MiniLM-L6-v2 (384-d) served by the host's `Models.Embed` at `address`."""

    model_id = MINILM_ID
    dim = MINILM_DIM

    def __init__(self, address: str, timeout_s: float = 120.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._client: ModelsClient | None = None
        self._lock = threading.Lock()

    def _models(self) -> "ModelsClient":
        with self._lock:
            if self._client is None:
                from neuraos_agent.models import ModelsClient

                self._client = ModelsClient(self.address, timeout_s=self.timeout_s)
            return self._client

    def embed(self, texts: Sequence[str]) -> "np.ndarray":
        import numpy as np

        from neuraos_agent.models import ModelsError

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        try:
            vectors = self._models().embed([t[:MAX_CHARS] for t in texts])
        except ModelsError as exc:
            if exc.code in RETRYABLE:
                raise EmbedderUnavailable(f"the host's embedding service is unavailable ({exc})") from None
            raise VFSError(f"the host refused to embed: {exc}") from None
        if vectors.shape != (len(texts), self.dim):
            raise VFSError(f"the host's embeddings are {vectors.shape[1:]} wide, the index needs {self.dim} "
                           f"({self.model_id})")
        return vectors

    def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None
