"""Hybrid search over the indexed files: meaning (MiniLM vectors) and words (BM25), fused per file.

A file's dense score is its best chunk's cosine with the query; its lexical score is BM25 over the
whole file. Candidates are the best files of either retriever; both scores are computed exactly
for every candidate, standardised over the candidate set (z-scores: the two scales share nothing)
and combined linearly with a weight tuned on training queries only. Optional dense pseudo-relevance
feedback moves the query vector toward the first round's best files and scores again. Every hit
shows its scores. Permissions are checked last, against the files as they are now, so a user only
finds what they could read. When the embedder is unreachable search degrades to BM25 alone.
"""

from __future__ import annotations

import heapq
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from neuraos_agent.vfs.bm25 import BM25Index
from neuraos_agent.vfs.embedder import Embedder
from neuraos_agent.vfs.errors import EmbedderUnavailable
from neuraos_agent.vfs.index import VectorIndex, chunk_id
from neuraos_agent.vfs.permissions import Caller, may_read

log = logging.getLogger("neuraos.vfs.search")

Mode = Literal["hybrid", "vector", "bm25"]


@dataclass(frozen=True)
class RankingConfig:
    """The shipped default is what `benchmarks/vfs.py` reports as `neuraos` (tuned on SciFact train)."""

    mode: Mode = "hybrid"
    vector_weight: float = 0.55  # weight of the dense z-score; 1 - this for BM25 (train argmax)
    candidates: int = 100  # files taken from each retriever before fusion
    chunk_hits: int = 300  # chunk hits asked of the vector store (a file has several chunks)
    prf_docs: int = 0  # dense pseudo-relevance feedback: how many first-round files
    prf_weight: float = 0.0  # how far the query vector moves toward them


@dataclass(frozen=True)
class SearchHit:
    rank: int
    path: str  # relative to the mount root
    score: float  # the fused score that ranked it
    vector_score: float | None  # best chunk cosine
    bm25_score: float | None
    offset: int  # character offset of the best chunk
    snippet: str = ""


@dataclass
class _Candidate:
    path: str
    dense: float = float("nan")
    offset: int = 0
    bm25: float = 0.0
    vectors: np.ndarray | None = None
    offsets: list[int] | None = None


def zscores(values: np.ndarray) -> np.ndarray:
    std = float(values.std())
    return (values - values.mean()) / std if std > 1e-12 else np.zeros_like(values)


class Searcher:
    """Answers queries from `index` (vectors), `lexical` (BM25 by path) and the files under `root`."""

    def __init__(self, root: Path, index: VectorIndex, lexical: BM25Index, embedder: Embedder,
                 chunk_counts: dict[str, int], config: RankingConfig | None = None, cache_size: int = 256) -> None:
        self.root = Path(root)
        self.chunk_counts = chunk_counts  # path → chunks in the store, kept by IndexSync
        self.index = index
        self.lexical = lexical
        self.embedder = embedder
        self.config = config or RankingConfig()
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def search(self, query: str, k: int = 10, path_prefix: str = "", caller: Caller | None = None,
               config: RankingConfig | None = None, snippets: bool = True) -> list[SearchHit]:
        cfg = config or self.config
        prefix = path_prefix.strip("/")
        prefix = prefix + "/" if prefix else ""
        qvec = None
        if cfg.mode != "bm25":
            try:
                qvec = self._embed_query(query)
            except EmbedderUnavailable as exc:
                log.warning("embedder unreachable; searching by words only: %s", exc)
                cfg = replace(cfg, mode="bm25")
        cands = self._candidates(query, qvec, prefix, replace(cfg, candidates=max(cfg.candidates, k)))
        if not cands:
            return []
        ranked = self._rank(cands, qvec, cfg)
        hits: list[SearchHit] = []
        for c, score in ranked:
            if not (self.root / c.path).is_file():
                continue  # removed, its rows not yet dropped (the embedder is away, or a batch is running)
            if caller is not None and not may_read(self.root, c.path, caller):
                continue
            hits.append(SearchHit(len(hits) + 1, c.path, score, None if np.isnan(c.dense) else c.dense,
                                  c.bm25, c.offset, self._snippet(c.path, c.offset) if snippets else ""))
            if len(hits) >= k:
                break
        return hits

    # -- candidates ----------------------------------------------------------------------------
    def _candidates(self, query: str, qvec: np.ndarray | None, prefix: str, cfg: RankingConfig) -> list[_Candidate]:
        lex = self.lexical.search(query)
        if prefix:
            lex = {p: s for p, s in lex.items() if isinstance(p, str) and p.startswith(prefix)}
        cands: dict[str, _Candidate] = {}
        if cfg.mode != "vector":
            for path, _ in heapq.nlargest(cfg.candidates, lex.items(), key=lambda kv: kv[1]):
                cands[path] = _Candidate(path)  # type: ignore[arg-type]
        if qvec is not None:
            dense: dict[str, _Candidate] = {}
            for h in self.index.search(qvec, cfg.chunk_hits, prefix):
                c = dense.get(h.path)
                if c is None or h.score > c.dense:
                    dense[h.path] = _Candidate(h.path, h.score, h.offset)
            for c in sorted(dense.values(), key=lambda c: -c.dense)[: cfg.candidates]:
                cands[c.path] = c
            missing = [p for p, c in cands.items() if np.isnan(c.dense)]
            if missing and cfg.mode != "bm25":
                self._fill_dense(cands, missing, qvec)
        for c in cands.values():
            c.bm25 = float(lex.get(c.path, 0.0))
        return list(cands.values())

    def _fill_dense(self, cands: dict[str, _Candidate], paths: list[str], qvec: np.ndarray) -> None:
        """Exact dense scores for files that only BM25 found (their chunks were past `chunk_hits`)."""
        ids = [chunk_id(p, i) for p in paths for i in range(self.chunk_counts.get(p, 0))]
        by_path: dict[str, list[tuple[int, int, np.ndarray]]] = {}
        for r in self.index.vectors_by_id(ids):
            by_path.setdefault(r["path"], []).append((r["ordinal"], r["offset"], np.asarray(r["vector"], np.float32)))
        for path, chunks in by_path.items():
            if path not in cands:
                continue
            mat = np.stack([v for _, _, v in chunks])
            sims = mat @ qvec
            best = int(np.argmax(sims))
            c = cands[path]
            c.dense, c.offset = float(sims[best]), chunks[best][1]
            c.vectors, c.offsets = mat, [o for _, o, _ in chunks]

    # -- ranking -------------------------------------------------------------------------------
    def _rank(self, cands: list[_Candidate], qvec: np.ndarray | None,
              cfg: RankingConfig) -> list[tuple[_Candidate, float]]:
        cands = [c for c in cands if cfg.mode != "vector" or not np.isnan(c.dense)]
        dense = np.array([0.0 if np.isnan(c.dense) else c.dense for c in cands])
        bm25 = np.array([c.bm25 for c in cands])
        if cfg.mode == "vector":
            fused = dense
        elif cfg.mode == "bm25" or qvec is None:
            fused = bm25
        else:
            fused = cfg.vector_weight * zscores(dense) + (1 - cfg.vector_weight) * zscores(bm25)
            if cfg.prf_docs > 0 and cfg.prf_weight > 0:
                fused = self._feedback(cands, qvec, fused, bm25, cfg)
        order = np.argsort(-fused, kind="stable")
        return [(cands[i], float(fused[i])) for i in order]

    def _feedback(self, cands: list[_Candidate], qvec: np.ndarray, fused: np.ndarray, bm25: np.ndarray,
                  cfg: RankingConfig) -> np.ndarray:
        """Rocchio in embedding space: q' = q + w·mean(top files' chunk centroids), then rescore."""
        need = [c.path for c in cands if c.vectors is None]
        if need:
            for path, chunks in self.index.vectors_of(need).items():
                c = next(x for x in cands if x.path == path)
                c.vectors, c.offsets = np.stack([v for _, _, v in chunks]), [o for _, o, _ in chunks]
        top = [cands[i] for i in np.argsort(-fused)[: cfg.prf_docs] if cands[i].vectors is not None]
        if not top:
            return fused
        centroid = np.mean([c.vectors.mean(axis=0) for c in top], axis=0)  # type: ignore[union-attr]
        q2 = qvec + cfg.prf_weight * centroid
        q2 /= np.linalg.norm(q2) or 1.0
        dense2 = np.zeros(len(cands))
        for i, c in enumerate(cands):
            if c.vectors is not None:
                sims = c.vectors @ q2
                dense2[i] = float(sims.max())
        return cfg.vector_weight * zscores(dense2) + (1 - cfg.vector_weight) * zscores(bm25)

    # -- helpers -------------------------------------------------------------------------------
    def _embed_query(self, query: str) -> np.ndarray:
        with self._lock:
            vec = self._cache.get(query)
            if vec is not None:
                self._cache.move_to_end(query)
                return vec
        vec = self.embedder.embed([query])[0].astype(np.float32)
        with self._lock:
            self._cache[query] = vec
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return vec

    def _snippet(self, path: str, offset: int, length: int = 160) -> str:
        try:
            with open(self.root / path, "rb") as f:
                text = f.read(offset * 4 + length * 4).decode("utf-8", "replace")
        except OSError:
            return ""
        return " ".join(text[offset:offset + length].split())
