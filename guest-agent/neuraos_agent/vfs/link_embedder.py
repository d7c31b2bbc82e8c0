"""The guest's `Embedder`: the host's MiniLM, asked over the link (the guest keeps no model).

A call that cannot reach the host (link down, host restarting, model service absent) raises
`EmbedderUnavailable`, which the indexing worker treats as "keep the work in the journal and retry
later"; writes never wait for it. A host that answers "over quota, retry in N s" is there: we wait
as told and go on with the next slice, because failing the batch would throw away the slices the
host already embedded (and charged) and retry them for ever. Vectors of the wrong width (another
model on the host) are a configuration error, not an outage, and say so.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Sequence

from neuraos_agent.throttle import retry_after_s
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
SLICE = 128  # texts per Embed call (the host's limit per call)
MAX_WAIT_S = 30.0  # longest single wait a quota answer can impose before we ask again


class LinkEmbedder:
    """all-MiniLM-L6-v2 (384-d) served by the host's `Models.Embed` at `address`."""

    model_id = MINILM_ID
    dim = MINILM_DIM

    def __init__(self, address: str, timeout_s: float = 120.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._client: ModelsClient | None = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.throttled_s = 0.0  # time spent waiting on the host's quota, for status and tests

    def _models(self) -> "ModelsClient":
        with self._lock:
            if self._client is None:
                from neuraos_agent.models import ModelsClient

                self._client = ModelsClient(self.address, timeout_s=self.timeout_s)
            return self._client

    def embed(self, texts: Sequence[str]) -> "np.ndarray":
        import numpy as np

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        cut = [t[:MAX_CHARS] for t in texts]
        vectors = np.concatenate([self._slice(cut[i:i + SLICE]) for i in range(0, len(cut), SLICE)])
        if vectors.shape != (len(texts), self.dim):
            raise VFSError(f"the host's embeddings are {vectors.shape[1:]} wide, the index needs {self.dim} "
                           f"({self.model_id})")
        return vectors

    def _slice(self, texts: list[str]) -> "np.ndarray":
        from neuraos_agent.models import ModelsError

        while True:
            try:
                return self._models().embed(texts)
            except ModelsError as exc:
                wait = quota_wait(exc.code, exc.message)
                if wait is None:
                    if exc.code in RETRYABLE:
                        raise EmbedderUnavailable(f"the host's embedding service is unavailable ({exc})") from None
                    raise VFSError(f"the host refused to embed: {exc}") from None
            if self._closed.wait(wait):
                raise EmbedderUnavailable("the agent is stopping")
            self.throttled_s += wait

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


def quota_wait(code: str, message: str) -> float | None:
    """Seconds to wait when the host throttles us (RESOURCE_EXHAUSTED), else None."""
    if code != "RESOURCE_EXHAUSTED":
        return None
    named = retry_after_s(code, message)
    return min(MAX_WAIT_S, named + 0.05) if named is not None else 0.5  # "too many calls at once": soon
