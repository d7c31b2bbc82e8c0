"""Make the index agree with the files, for some paths (after journal records) or for all (at start).

The files are the truth. For each path the file is stat'ed and, when its mtime, size, owner or
mode differ from what the index holds, read and chunked again; a chunk whose content hash is
already in the store keeps its vector (no embedding), only new text is embedded, in one batch.
Rows of files that are gone are deleted, which is also what undoes rows that Milvus Lite brings
back after falling back to an older manifest.
"""

from __future__ import annotations

import logging
import os
import stat as stat_m
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from neuraos_agent.vfs.bm25 import BM25Index
from neuraos_agent.vfs.chunker import Chunk, Chunker
from neuraos_agent.vfs.embedder import Embedder
from neuraos_agent.vfs.index import ChunkRow, FileMeta, VectorIndex, chunk_id, content_hash

log = logging.getLogger("neuraos.vfs.sync")


@dataclass
class SyncReport:
    files_indexed: int = 0
    files_removed: int = 0
    files_unchanged: int = 0
    chunks_embedded: int = 0
    chunks_reused: int = 0
    paths: list[str] = field(default_factory=list)

    def add(self, other: "SyncReport") -> None:
        self.files_indexed += other.files_indexed
        self.files_removed += other.files_removed
        self.files_unchanged += other.files_unchanged
        self.chunks_embedded += other.chunks_embedded
        self.chunks_reused += other.chunks_reused


def file_meta(st: os.stat_result) -> FileMeta:
    return FileMeta(st.st_mtime_ns, st.st_size, st.st_uid, st.st_gid, stat_m.S_IMODE(st.st_mode))


def lexical_text(chunks: Iterable[tuple[str, str]]) -> tuple[str, str]:
    """A file's BM25 document: its chunk texts, with each distinct context (title, headings) once."""
    texts, contexts = [], []
    for text, context in chunks:
        texts.append(text)
        if context and context not in contexts:
            contexts.append(context)
    return "\n".join(texts), "\n".join(contexts)


class IndexSync:
    """Brings `index` and `lexical` in line with the files under `root`."""

    def __init__(self, root: Path, index: VectorIndex, lexical: BM25Index, embedder: Embedder,
                 chunker: Chunker, chunk_counts: dict[str, int] | None = None) -> None:
        self.root = Path(root)
        self.chunk_counts = chunk_counts if chunk_counts is not None else {}  # path → rows in the store
        self.index = index
        self.lexical = lexical
        self.embedder = embedder
        self.chunker = chunker

    def load_lexical(self) -> int:
        """Rebuild the in-memory BM25 index from the texts stored with the vectors."""
        by_path: dict[str, list[dict]] = defaultdict(list)
        for row in self.index.texts():
            by_path[row["path"]].append(row)
        for path, rows in by_path.items():
            rows.sort(key=lambda r: r["ordinal"])
            self.chunk_counts[path] = len(rows)
            text, context = lexical_text((r["text"], r["context"]) for r in rows)
            self.lexical.set(path, text, context)
        return len(by_path)

    def walk(self) -> dict[str, os.stat_result]:
        """Every regular file under root (symlinks are not followed)."""
        out: dict[str, os.stat_result] = {}
        for dirpath, _, filenames in os.walk(self.root):
            for name in filenames:
                full = os.path.join(dirpath, name)
                try:
                    st = os.lstat(full)
                except FileNotFoundError:
                    continue
                if stat_m.S_ISREG(st.st_mode):
                    out[os.path.relpath(full, self.root)] = st
        return out

    def reconcile(self) -> SyncReport:
        """Compare every file with the index and fix every difference."""
        on_disk = self.walk()
        indexed = self.index.files()
        stale = [p for p, st in on_disk.items() if indexed.get(p) != file_meta(st) or p not in self.lexical]
        gone = [p for p in indexed if p not in on_disk]
        gone += [p for p in list(self.lexical.keys()) if p not in on_disk and p not in indexed]
        report = self.sync(stale + gone)
        report.files_unchanged += len(on_disk) - len(stale)
        return report

    def sync_words(self, paths: Iterable[str]) -> int:
        """Only the BM25 side, for the words follower: no vector store, no embedding, milliseconds."""
        done = 0
        for path in self.expand(paths, use_index=False):
            if self._stat_regular(path) is None:
                self.lexical.remove(path)
                continue
            chunks = self._read_chunks(path)
            if chunks is not None:
                self.lexical.set(path, *lexical_text((c.text, c.context) for c in chunks))
                done += 1
        return done

    def expand(self, paths: Iterable[str], use_index: bool = True) -> list[str]:
        """Journal paths → file paths: a directory (renamed, removed) stands for what is under it."""
        out: set[str] = set()
        for rel in paths:
            rel = os.path.normpath(rel)
            if rel in ("", ".") or rel.startswith(".."):
                continue
            full = self.root / rel
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                st = None
            if st is not None and stat_m.S_ISDIR(st.st_mode):
                for dirpath, _, filenames in os.walk(full):
                    out.update(os.path.relpath(os.path.join(dirpath, f), self.root) for f in filenames)
            else:
                out.add(rel)
            was_file = rel in self.chunk_counts or rel in self.lexical
            if (st is None or not stat_m.S_ISREG(st.st_mode)) and not was_file:
                # maybe a directory that was renamed or removed: what was indexed under it goes too
                if use_index:
                    out.update(self.index.under(rel))
                prefix = rel + "/"
                out.update(k for k in self.lexical.keys() if isinstance(k, str) and k.startswith(prefix))
        return sorted(out)

    def sync(self, paths: Iterable[str]) -> SyncReport:
        """Index or drop each path as the file now is. On EmbedderUnavailable the words are already
        updated and the vectors untouched; the caller retries the same paths later."""
        paths = self.expand(paths)
        report = SyncReport(paths=paths)
        if not paths:
            return report
        old_rows: dict[str, list[dict]] = defaultdict(list)
        for row in self.index.rows(paths):
            old_rows[row["path"]].append(row)

        drop_ids: list[str] = []
        new_rows: list[ChunkRow] = []
        lexical_set: dict[str, tuple[str, str]] = {}
        lexical_drop: list[str] = []
        indexed_counts: dict[str, int] = {}
        for path in paths:
            st = self._stat_regular(path)
            olds = old_rows.get(path, [])
            if st is None:
                drop_ids += [r["id"] for r in olds]
                lexical_drop.append(path)
                report.files_removed += 1 if olds or path in self.lexical else 0
                continue
            meta = file_meta(st)
            if olds and all(_row_meta(r) == meta for r in olds) and path in self.lexical:
                report.files_unchanged += 1
                continue
            chunks = self._read_chunks(path)
            if chunks is None:  # vanished between stat and read: the next record handles it
                continue
            rows = [ChunkRow(path, i, c.offset, content_hash(c.embed_text, self.embedder.model_id), c.text,
                             c.context, meta) for i, c in enumerate(chunks)]
            keep = {r.id for r in rows}
            drop_ids += [r["id"] for r in olds if r["id"] not in keep]
            old_by_id = {r["id"]: r for r in olds}
            new_rows += [r for r in rows if not (r.id in old_by_id and old_by_id[r.id]["hash"] == r.hash
                                                 and _row_meta(old_by_id[r.id]) == meta)]
            lexical_set[path] = lexical_text((c.text, c.context) for c in chunks)
            indexed_counts[path] = len(rows)
            report.files_indexed += 1

        # words first: BM25 needs no embedding, so a file is found by its words at once (and while
        # the embedder is away); its vectors follow when the embedding returns
        for path in lexical_drop:
            self.lexical.remove(path)
        for path, (text, context) in lexical_set.items():
            self.lexical.set(path, text, context)
        vectors = self._vectors(new_rows, report)  # may raise EmbedderUnavailable: no vector written yet
        self.index.delete_ids(drop_ids)
        self.index.upsert(new_rows, vectors)
        for path in lexical_drop:
            self.chunk_counts.pop(path, None)
        for path, count in indexed_counts.items():
            self.chunk_counts[path] = count
        return report

    def _vectors(self, rows: list[ChunkRow], report: SyncReport) -> np.ndarray:
        if not rows:
            return np.zeros((0, self.embedder.dim), np.float32)
        known = self.index.vectors_by_hash(r.hash for r in rows)
        missing: dict[str, str] = {}
        for r in rows:
            if r.hash not in known and r.hash not in missing:
                missing[r.hash] = Chunk(r.offset, r.text, r.context).embed_text
        if missing:
            fresh = self.embedder.embed(list(missing.values()))
            known.update(zip(missing.keys(), fresh))
        report.chunks_embedded += len(missing)
        report.chunks_reused += len(rows) - len(missing)
        return np.stack([known[r.hash] for r in rows]).astype(np.float32)

    def _stat_regular(self, rel: str) -> os.stat_result | None:
        try:
            st = os.lstat(self.root / rel)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st if stat_m.S_ISREG(st.st_mode) else None

    def _read_chunks(self, rel: str) -> list[Chunk] | None:
        try:
            data = (self.root / rel).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except PermissionError:
            log.warning("cannot read %s to index it", rel)
            return []
        return self.chunker.chunk_file(rel, data)


def _row_meta(row: dict) -> FileMeta:
    return FileMeta(row["mtime_ns"], row["size"], row["uid"], row["gid"], row["mode"])
