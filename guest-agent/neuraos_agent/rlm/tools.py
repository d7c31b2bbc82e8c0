"""Tools the REPL's programs may call next to `llm_query`, run in the agent (not the sandbox).

Where a small model's sub-calls are too weak to carry a task (SmolLM2-135M labels TREC
questions barely above the majority class), an embedding model is not: a classifier trained
on labelled examples and a ranker by meaning, both over the host's `embed`. numpy is
imported lazily; the training is a few hundred steps of softmax regression, seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from neuraos_agent.rlm.clients import Embedder


def _np() -> Any:
    import numpy as np

    return np


@dataclass
class EmbeddingRanker:
    """`rank(pieces, query, k)`: the k pieces closest in meaning to `query`, in their original order."""

    embedder: Embedder

    def __call__(self, pieces: Sequence[str], query: str, k: int = 3) -> list[str]:
        np = _np()
        pieces = [str(p) for p in pieces]
        if not pieces:
            return []
        vecs = np.asarray(self.embedder.embed([query] + pieces), dtype=np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True) + 1e-9
        sims = vecs[1:] @ vecs[0]
        keep = sorted(np.argsort(-sims)[: max(1, int(k))].tolist())
        return [pieces[i] for i in keep]


class EmbeddingClassifier:
    """`classify(texts)`: a label for each text, from softmax regression on embedded examples."""

    def __init__(self, embedder: Embedder, examples: Sequence[tuple[str, str]], *, steps: int = 300,
                 lr: float = 5.0, l2: float = 1e-4, vectors: Any | None = None) -> None:
        np = _np()
        self.embedder = embedder
        self.labels = sorted({label for _, label in examples})
        x = np.asarray(vectors if vectors is not None else embedder.embed([t for t, _ in examples]), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-9
        y = np.eye(len(self.labels), dtype=np.float32)[[self.labels.index(lab) for _, lab in examples]]
        self.w = np.zeros((x.shape[1], len(self.labels)), dtype=np.float32)
        self.b = np.zeros(len(self.labels), dtype=np.float32)
        for _ in range(steps):
            z = x @ self.w + self.b
            z -= z.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            g = (p - y) / len(x)
            self.w -= lr * (x.T @ g + l2 * self.w)
            self.b -= lr * g.sum(axis=0)

    def predict_vectors(self, vectors: Any) -> list[str]:
        np = _np()
        x = np.asarray(vectors, dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-9
        return [self.labels[i] for i in (x @ self.w + self.b).argmax(axis=1).tolist()]

    def __call__(self, texts: Sequence[str]) -> list[str]:
        texts = [str(t) for t in texts]
        return self.predict_vectors(self.embedder.embed(texts)) if texts else []
