"""An incremental BM25 index over the chunk texts, kept in memory beside the vector store.

Milvus Lite ranks by meaning; exact terms (gene names, numbers, identifiers) are what BM25 is for,
and hybrid ranking needs both scores for the same candidates. Documents are added and removed one
at a time as the worker indexes files, so the postings are dicts, turned into numpy arrays per term
only when a query needs them (and cached until that term changes). Terms are lower-cased, stop
words dropped and Snowball-stemmed, which matters for scientific text (`mutations` ~ `mutation`).
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Hashable

import numpy as np
import Stemmer

_TOKEN = re.compile(r"[a-z0-9]+(?:[-'][a-z0-9]+)*")
STOPWORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most
my myself no nor not now of off on once only or other our ours ourselves out over own same she
should so some such than that the their theirs them themselves then there these they this those
through to too under until up very was we were what when where which while who whom why will with
would you your yours yourself yourselves
""".split())


@dataclass(frozen=True)
class Analyzer:
    """Text → index terms. `stem=False` keeps surface forms (used by the grep-like baseline)."""

    stem: bool = True

    def terms(self, text: str) -> list[str]:
        words = [w for w in _TOKEN.findall(text.lower()) if w not in STOPWORDS]
        parts = [p for w in words for p in ([w, *w.split("-")] if "-" in w else [w])]
        return _STEMMER.stemWords(parts) if self.stem else parts


_STEMMER = Stemmer.Stemmer("english")


class BM25Index:
    """Okapi BM25 over keyed documents; `set` replaces a document, `remove` drops it.

    Thread-safe: the indexing worker writes while queries read.
    """

    def __init__(self, k1: float = 1.2, b: float = 0.75, analyzer: Analyzer | None = None) -> None:
        self.k1, self.b = k1, b
        self.analyzer = analyzer or Analyzer()
        self._slot: dict[Hashable, int] = {}
        self._keys: list[Hashable | None] = []
        self._tfs: list[Counter[str] | None] = []
        self._free: list[int] = []
        self._length = np.zeros(0, dtype=np.float32)
        self._total_length = 0.0
        self._postings: dict[str, dict[int, int]] = {}
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._slot

    def set(self, key: Hashable, text: str, weight_text: str = "", weight: int = 1) -> None:
        """Index `text` under `key`; `weight_text` (e.g. a title) counts `weight` times."""
        tfs = Counter(self.analyzer.terms(text))
        if weight_text:
            for term in self.analyzer.terms(weight_text):
                tfs[term] += weight
        with self._lock:
            self._set(key, tfs)

    def _set(self, key: Hashable, tfs: Counter[str]) -> None:
        self._remove(key)
        slot = self._free.pop() if self._free else self._grow()
        self._slot[key] = slot
        self._keys[slot] = key
        self._tfs[slot] = tfs
        n = float(sum(tfs.values()))
        self._length[slot] = n
        self._total_length += n
        for term, tf in tfs.items():
            self._postings.setdefault(term, {})[slot] = tf
            self._arrays.pop(term, None)

    def remove(self, key: Hashable) -> None:
        with self._lock:
            self._remove(key)

    def _remove(self, key: Hashable) -> None:
        slot = self._slot.pop(key, None)
        if slot is None:
            return
        tfs = self._tfs[slot] or Counter()
        for term in tfs:
            post = self._postings.get(term)
            if post is not None:
                post.pop(slot, None)
                if not post:
                    del self._postings[term]
            self._arrays.pop(term, None)
        self._total_length -= float(self._length[slot])
        self._length[slot] = 0.0
        self._keys[slot] = None
        self._tfs[slot] = None
        self._free.append(slot)

    def _grow(self) -> int:
        self._keys.append(None)
        self._tfs.append(None)
        if len(self._keys) > len(self._length):
            self._length = np.concatenate([self._length, np.zeros(max(64, len(self._length)), np.float32)])
        return len(self._keys) - 1

    def _term_arrays(self, term: str) -> tuple[np.ndarray, np.ndarray]:
        arr = self._arrays.get(term)
        if arr is None:
            post = self._postings.get(term, {})
            arr = (np.fromiter(post.keys(), np.int64, len(post)), np.fromiter(post.values(), np.float32, len(post)))
            self._arrays[term] = arr
        return arr

    def query_weights(self, query: str) -> dict[str, float]:
        """Query terms with their repeat counts (a term asked twice weighs twice)."""
        return dict(Counter(self.analyzer.terms(query)))

    def score(self, weights: dict[str, float], top: int | None = None) -> dict[Hashable, float]:
        """BM25 of every document matching a weighted query, best `top` only when given."""
        with self._lock:
            return self._score(weights, top)

    def _score(self, weights: dict[str, float], top: int | None) -> dict[Hashable, float]:
        n = len(self._slot)
        if n == 0 or not weights:
            return {}
        avgdl = max(self._total_length / n, 1e-9)
        acc = np.zeros(len(self._keys), dtype=np.float32)
        norm = self.k1 * (1.0 - self.b + self.b * self._length[: len(self._keys)] / avgdl)
        for term, qw in weights.items():
            slots, tf = self._term_arrays(term)
            if len(slots) == 0:
                continue
            idf = math.log(1.0 + (n - len(slots) + 0.5) / (len(slots) + 0.5))
            acc[slots] += qw * idf * tf * (self.k1 + 1.0) / (tf + norm[slots])
        hit = np.flatnonzero(acc)
        if top is not None and len(hit) > top:
            hit = hit[np.argpartition(-acc[hit], top)[:top]]
        return {self._keys[i]: float(acc[i]) for i in hit}

    def search(self, query: str, top: int | None = None) -> dict[Hashable, float]:
        return self.score(self.query_weights(query), top)

    def term_counts(self, key: Hashable) -> Counter[str]:
        slot = self._slot.get(key)
        return Counter() if slot is None else Counter(self._tfs[slot] or {})

    def document_frequency(self, term: str) -> int:
        return len(self._postings.get(term, ()))

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._slot.keys())
