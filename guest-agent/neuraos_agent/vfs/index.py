"""The Milvus Lite store of chunk vectors and the metadata search and reconciliation need.

One row per chunk: the path it came from, its ordinal and character offset, its content hash (of
the text that was embedded, so an unchanged chunk keeps its vector), and the file's mtime, size,
owner and mode as they were when indexed. The store is a cache of the files, never the truth:
Milvus Lite can silently fall back to an older manifest (deleted rows return), so `open()` checks
that it can be read and queried at all (`IndexCorrupt` otherwise: the caller rebuilds), and the
worker reconciles every row against the files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from neuraos_agent.vfs.errors import IndexCorrupt

log = logging.getLogger("neuraos.vfs.index")

COLLECTION = "chunks"
MAX_TEXT_BYTES = 60000
_FIELDS = ["id", "path", "ordinal", "offset", "hash", "text", "context",
           "mtime_ns", "size", "uid", "gid", "mode"]
_META = ["id", "path", "ordinal", "hash", "mtime_ns", "size", "uid", "gid", "mode"]


@dataclass(frozen=True)
class FileMeta:
    """What the index believes about a file; compared with os.stat to find stale entries."""

    mtime_ns: int
    size: int
    uid: int
    gid: int
    mode: int


@dataclass(frozen=True)
class ChunkRow:
    path: str
    ordinal: int
    offset: int
    hash: str
    text: str
    context: str
    meta: FileMeta

    @property
    def id(self) -> str:
        return chunk_id(self.path, self.ordinal)


@dataclass(frozen=True)
class VectorHit:
    id: str
    path: str
    ordinal: int
    offset: int
    score: float  # cosine similarity


def chunk_id(path: str, ordinal: int) -> str:
    return hashlib.blake2b(f"{path}\0{ordinal}".encode(), digest_size=16).hexdigest()


def content_hash(embed_text: str, model_id: str) -> str:
    """Identifies a vector: the same text under the same model needs no new embedding."""
    return hashlib.blake2b(f"{model_id}\0{embed_text}".encode(), digest_size=16).hexdigest()


def quote(value: str) -> str:
    """A Milvus filter string literal."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") \
        .replace("\r", "\\r").replace("\t", "\\t") + '"'


def _truncate_utf8(text: str, limit: int) -> str:
    raw = text.encode("utf-8")
    return text if len(raw) <= limit else raw[:limit].decode("utf-8", "ignore")


class VectorIndex:
    """Chunk vectors in a Milvus Lite directory (`db_path`, a ".db" directory) owned by this process."""

    def __init__(self, db_path: Path, dim: int, index_type: str = "FLAT") -> None:
        self.db_path = Path(db_path)
        self.dim = dim
        self.index_type = index_type
        self._client = None
        self._lock = threading.RLock()  # one MilvusClient, used from the worker and from queries

    # -- lifetime ------------------------------------------------------------------------------
    def open(self) -> None:
        """Connect, create the collection when new, and prove it answers; `IndexCorrupt` if not."""
        from pymilvus import MilvusClient

        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.db_path.exists()
        try:
            self._check_files()  # before Milvus Lite opens it and falls back to an older manifest
            self._client = MilvusClient(str(self.db_path))
            if not self._client.has_collection(COLLECTION):
                if not new and (self.db_path / "collections").exists() and any((self.db_path / "collections").iterdir()):
                    raise IndexCorrupt(f"{self.db_path}: the chunk collection is missing")
                self._create()
            self._client.load_collection(COLLECTION)
            self._check()
        except IndexCorrupt:
            self.close()
            raise
        except Exception as exc:  # noqa: BLE001 - any failure to read the store means: rebuild it
            self.close()
            raise IndexCorrupt(f"{self.db_path}: {type(exc).__name__}: {exc}") from exc

    def _create(self) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.VARCHAR, is_primary=True, max_length=64)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dim)
        schema.add_field("path", DataType.VARCHAR, max_length=4096)
        schema.add_field("ordinal", DataType.INT64)
        schema.add_field("offset", DataType.INT64)
        schema.add_field("hash", DataType.VARCHAR, max_length=64)
        schema.add_field("text", DataType.VARCHAR, max_length=65535)
        schema.add_field("context", DataType.VARCHAR, max_length=4096)
        for name in ("mtime_ns", "size", "uid", "gid", "mode"):
            schema.add_field(name, DataType.INT64)
        params = self._client.prepare_index_params()
        params.add_index(field_name="vector", index_type=self.index_type, metric_type="IP")
        self._client.create_collection(COLLECTION, schema=schema)
        # sync=False: waiting asks the server for AllocTimestamp, which Milvus Lite does not serve
        self._client.create_index(COLLECTION, params, sync=False)

    def _check_files(self) -> None:
        """The manifest parses and every segment it names exists."""
        collection = self.db_path / "collections" / COLLECTION
        manifest = collection / "manifest.json"
        if manifest.exists():
            try:
                doc = json.loads(manifest.read_text())
            except (OSError, ValueError) as exc:
                raise IndexCorrupt(f"{manifest}: unreadable manifest ({exc})") from exc
            # Milvus Lite skips a missing segment with a log line and serves the rest: we do not
            for name, part in (doc.get("partitions") or {}).items():
                for rel in [*part.get("data_files", []), *part.get("delta_files", [])]:
                    if not (collection / "partitions" / name / rel).exists():
                        raise IndexCorrupt(f"{manifest}: segment {name}/{rel} is missing")

    def _check(self) -> None:
        """Query and search the way users will; a segment that cannot be read fails here."""
        self._client.query(COLLECTION, filter='id != ""', output_fields=["id"], limit=1)
        self._client.search(COLLECTION, data=[[0.0] * (self.dim - 1) + [1.0]], limit=1, output_fields=["path"])
        self._client.get_collection_stats(COLLECTION)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass
        try:
            from milvus_lite.server_manager import server_manager_instance
            server_manager_instance.release_server(str(self.db_path))
        except Exception:  # noqa: BLE001 - releasing a half-opened store must not hide the cause
            pass

    def destroy(self) -> None:
        """Close and delete the store (before a rebuild from the files)."""
        self.close()
        shutil.rmtree(self.db_path, ignore_errors=True)

    @property
    def client(self):  # noqa: ANN201 - pymilvus.MilvusClient
        if self._client is None:
            raise IndexCorrupt(f"{self.db_path}: the index is not open")
        return self._client

    # -- reading -------------------------------------------------------------------------------
    def _query_all(self, flt: str, fields: list[str], page: int = 16384) -> list[dict]:
        """All rows matching `flt`, a page at a time (one gRPC message stays small)."""
        out: dict[str, dict] = {}
        offset = 0
        while True:
            with self._lock:
                res = self.client.query(COLLECTION, filter=flt, output_fields=["id", *fields],
                                        limit=page, offset=offset)
            for r in res:
                out[r["id"]] = r
            if len(res) < page:
                return list(out.values())
            offset += page

    def files(self) -> dict[str, FileMeta]:
        """Every indexed path with the metadata it was indexed with."""
        out: dict[str, FileMeta] = {}
        for r in self._query_all('id != ""', ["path", "mtime_ns", "size", "uid", "gid", "mode"]):
            out[r["path"]] = FileMeta(r["mtime_ns"], r["size"], r["uid"], r["gid"], r["mode"])
        return out

    def rows(self, paths: Sequence[str]) -> list[dict]:
        """Metadata rows (no vectors) of the given paths."""
        out: list[dict] = []
        for i in range(0, len(paths), 256):
            part = paths[i:i + 256]
            with self._lock:
                out.extend(self.client.query(
                    COLLECTION, filter=f"path in [{', '.join(quote(p) for p in part)}]", output_fields=_META))
        return out

    def under(self, directory: str) -> list[str]:
        """Indexed paths below a directory (for a renamed or removed directory)."""
        prefix = directory.rstrip("/") + "/"
        pattern = prefix.replace("%", "_")  # LIKE has no escape: `_` matches any one char, then filter exactly
        rows = self._query_all(f"path like {quote(pattern + '%')}", ["path"])
        return sorted({r["path"] for r in rows if r["path"].startswith(prefix)})

    def vectors_by_hash(self, hashes: Iterable[str]) -> dict[str, np.ndarray]:
        wanted = sorted(set(hashes))
        out: dict[str, np.ndarray] = {}
        for i in range(0, len(wanted), 256):
            part = wanted[i:i + 256]
            with self._lock:
                res = self.client.query(COLLECTION, filter=f"hash in [{', '.join(quote(h) for h in part)}]",
                                        output_fields=["hash", "vector"])
            for r in res:
                out[r["hash"]] = np.asarray(r["vector"], dtype=np.float32)
        return out

    def vectors_of(self, paths: Sequence[str]) -> dict[str, list[tuple[int, int, np.ndarray]]]:
        """Every chunk vector of the given files: path → [(ordinal, offset, vector)]."""
        out: dict[str, list[tuple[int, int, np.ndarray]]] = {}
        for i in range(0, len(paths), 256):
            part = list(paths[i:i + 256])
            with self._lock:
                res = self.client.query(COLLECTION, filter=f"path in [{', '.join(quote(p) for p in part)}]",
                                        output_fields=["path", "ordinal", "offset", "vector"])
            for r in res:
                out.setdefault(r["path"], []).append(
                    (r["ordinal"], r["offset"], np.asarray(r["vector"], dtype=np.float32)))
        return out

    def vectors_by_id(self, ids: Sequence[str]) -> list[dict]:
        """Rows (path, ordinal, offset, vector) by primary key: far cheaper than a filter on path."""
        out: list[dict] = []
        for i in range(0, len(ids), 1024):
            with self._lock:
                out.extend(self.client.get(COLLECTION, ids=list(ids[i:i + 1024]),
                                           output_fields=["path", "ordinal", "offset", "vector"]))
        return out

    def texts(self) -> list[dict]:
        """Every chunk's text and context, to rebuild the in-memory BM25 index at start."""
        return self._query_all('id != ""', ["id", "path", "ordinal", "offset", "text", "context"])

    def count(self) -> int:
        with self._lock:
            res = self.client.query(COLLECTION, filter="", output_fields=["count(*)"])
        return int(res[0]["count(*)"])

    def search(self, vector: np.ndarray, limit: int, path_prefix: str = "") -> list[VectorHit]:
        flt = ""
        if path_prefix:
            flt = f"path like {quote(path_prefix.replace('%', '_') + '%')}"
        with self._lock:
            res = self.client.search(COLLECTION, data=[vector.astype(np.float32).tolist()], limit=limit,
                                     filter=flt, output_fields=["path", "ordinal", "offset"])
        hits = [VectorHit(h["id"], h["entity"]["path"], h["entity"]["ordinal"], h["entity"]["offset"],
                          float(h["distance"])) for h in res[0]]
        return [h for h in hits if h.path.startswith(path_prefix)]

    # -- writing -------------------------------------------------------------------------------
    def upsert(self, rows: Sequence[ChunkRow], vectors: np.ndarray) -> None:
        if not rows:
            return
        data = [{
            "id": r.id, "vector": v.astype(np.float32).tolist(), "path": r.path, "ordinal": r.ordinal,
            "offset": r.offset, "hash": r.hash, "text": _truncate_utf8(r.text, MAX_TEXT_BYTES),
            "context": _truncate_utf8(r.context, 4000), "mtime_ns": r.meta.mtime_ns, "size": r.meta.size,
            "uid": r.meta.uid, "gid": r.meta.gid, "mode": r.meta.mode,
        } for r, v in zip(rows, vectors)]
        with self._lock:
            for i in range(0, len(data), 1024):
                self.client.upsert(COLLECTION, data[i:i + 1024])

    def delete_ids(self, ids: Sequence[str]) -> None:
        for i in range(0, len(ids), 512):
            with self._lock:
                self.client.delete(COLLECTION, ids=list(ids[i:i + 512]))

    def flush(self) -> None:
        """Seal what was written so searches see it fast (search before flush is ~50x slower)."""
        with self._lock:
            self.client.flush(COLLECTION)
