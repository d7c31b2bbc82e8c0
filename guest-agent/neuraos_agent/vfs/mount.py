"""`VectorFS`: the mount, the journal, the index, the worker and search as one object with a lifetime.

    with VectorFS(VFSConfig(backing, mountpoint, state_dir), embedder) as vfs:
        ...                      # files written under `mountpoint` become searchable
        vfs.search("query")

Start order: journal (so no change is missed), index (rebuilt from the files when it cannot be
read), BM25 from the stored texts, the FUSE mount (in its own thread, trio inside), then the
worker, which reconciles with the files before it follows the journal. Stop is the reverse, and
always unmounts. The state directory (journal, Milvus Lite) lives outside the backing directory.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyfuse3
import trio

from neuraos_agent.vfs.bm25 import BM25Index
from neuraos_agent.vfs.chunker import Chunker
from neuraos_agent.vfs.embedder import Embedder
from neuraos_agent.vfs.errors import IndexCorrupt, VFSError
from neuraos_agent.vfs.fs import Match, PassthroughFS
from neuraos_agent.vfs.index import VectorIndex
from neuraos_agent.vfs.journal import Journal
from neuraos_agent.vfs.permissions import Caller
from neuraos_agent.vfs.query_socket import QueryServer
from neuraos_agent.vfs.search import RankingConfig, Searcher, SearchHit
from neuraos_agent.vfs.sync import IndexSync
from neuraos_agent.vfs.worker import IndexWorker, WordsFollower, WorkerConfig, WorkerState

log = logging.getLogger("neuraos.vfs")

DEFAULT_MOUNT = Path("/srv/neura")
DEFAULT_BACKING = Path("/var/lib/neuraos/vfs/files")
DEFAULT_STATE = Path("/var/lib/neuraos/vfs/state")


@dataclass(frozen=True)
class VFSConfig:
    backing: Path = DEFAULT_BACKING
    mountpoint: Path = DEFAULT_MOUNT
    state_dir: Path = DEFAULT_STATE
    index_type: str = "FLAT"  # exact search; "HNSW" past a few hundred thousand chunks
    ranking: RankingConfig = field(default_factory=RankingConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    search_k: int = 10  # entries listed under .search/QUERY
    allow_other: bool = True  # every user of the guest sees the mount (permissions still apply)
    query_socket: Path | None = None  # where `neuraos-agent search` asks (the agent: /run/neuraos/vfs.sock)
    # The FUSE thread shares the GIL with the indexer; a shorter switch interval (Python's default:
    # 5 ms) lets each file system request in sooner: 2x the file creates per second next to a busy
    # indexer thread, measured. Process-wide; None leaves it alone.
    gil_switch_s: float | None = 0.0005

    @property
    def index_path(self) -> Path:
        return self.state_dir / "index.db"

    @property
    def journal_dir(self) -> Path:
        return self.state_dir / "journal"


@dataclass(frozen=True)
class VFSStatus:
    mountpoint: str
    pending_records: int
    indexed_files: int  # files found by their words (BM25), under `path_prefix`
    vector_files: int  # files with vectors in the store, under `path_prefix`
    reconciled: bool
    embedder_available: bool
    index_rebuilds: int
    last_error: str
    path_prefix: str = ""


class VectorFS:
    """The vector file system. Use as a context manager; one mount per process (pyfuse3)."""

    def __init__(self, config: VFSConfig, embedder: Embedder, chunker: Chunker | None = None,
                 mount: bool = True) -> None:
        self.config = config
        self.embedder = embedder
        self.chunker = chunker or Chunker()
        self.mount_enabled = mount
        self.index_rebuilds = 0
        self.journal: Journal | None = None
        self.index = VectorIndex(config.index_path, embedder.dim, config.index_type)
        self.lexical = BM25Index()
        self.chunk_counts: dict[str, int] = {}
        self.searcher = Searcher(config.backing, self.index, self.lexical, embedder, self.chunk_counts,
                                 config.ranking)
        self.sync: IndexSync | None = None
        self.worker: IndexWorker | None = None
        self.words: WordsFollower | None = None
        self._fuse_thread: threading.Thread | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._fuse_ready = threading.Event()
        self._fuse_error: BaseException | None = None
        self._mounted = False
        self._rebuild_lock = threading.Lock()
        self._query_server: QueryServer | None = None

    # -- lifetime ------------------------------------------------------------------------------
    def __enter__(self) -> "VectorFS":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        cfg = self.config
        cfg.backing.mkdir(parents=True, exist_ok=True)
        if _inside(cfg.state_dir, cfg.backing):
            raise VFSError(f"state dir {cfg.state_dir} must not be inside the backing dir {cfg.backing}")
        try:
            self.journal = Journal(cfg.journal_dir)
            self._open_index()
            self.sync = IndexSync(cfg.backing, self.index, self.lexical, self.embedder, self.chunker,
                                  chunk_counts=self.chunk_counts)
            self.sync.load_lexical()
            if self.mount_enabled:
                self._mount()
            self.worker = IndexWorker(self.journal, self.sync, self._rebuild, self.index.flush, cfg.worker)
            self.worker.start()
            self.words = WordsFollower(self.journal, self.sync)
            self.words.start()
            if cfg.query_socket is not None:
                self._query_server = QueryServer(
                    cfg.query_socket, lambda q, k, prefix, caller: self.search(q, k, prefix, caller),
                    status=lambda prefix: asdict(self.status(prefix)))
                self._query_server.start()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Unmount, stop the worker, close the index and journal; safe to call twice."""
        if self._query_server is not None:
            self._query_server.close()
            self._query_server = None
        try:
            self._unmount()
        finally:
            if self.words is not None:
                self.words.stop()
                self.words = None
            if self.worker is not None:
                self.worker.stop()
                self.worker = None
            self.index.close()
            if self.journal is not None:
                self.journal.close()
                self.journal = None

    def _open_index(self) -> None:
        try:
            self.index.open()
        except IndexCorrupt as exc:
            self._say_rebuild(exc)
            self.index.destroy()
            self.index.open()

    def _rebuild(self, exc: IndexCorrupt) -> None:
        """Called by the worker when the store fails under it: start again from the files."""
        with self._rebuild_lock:
            self._say_rebuild(exc)
            self.index.destroy()
            self.index.open()
            for key in self.lexical.keys():
                self.lexical.remove(key)
            self.chunk_counts.clear()

    def _say_rebuild(self, exc: IndexCorrupt) -> None:
        self.index_rebuilds += 1
        log.error("vector index is corrupt (%s); rebuilding it from the files", exc)

    # -- the mount -----------------------------------------------------------------------------
    def _mount(self) -> None:
        cfg = self.config
        _clear_stale_mount(cfg.mountpoint)
        cfg.mountpoint.mkdir(parents=True, exist_ok=True)
        ops = PassthroughFS(str(cfg.backing), self._on_change, self._fs_search, search_k=cfg.search_k)
        options = set(pyfuse3.default_options)
        options.discard("default_permissions")
        options |= {"fsname=neuraos-vfs", "default_permissions"}
        if cfg.allow_other:
            options.add("allow_other")
        pyfuse3.init(ops, str(cfg.mountpoint), options)
        if cfg.gil_switch_s is not None:
            sys.setswitchinterval(cfg.gil_switch_s)
        self._mounted = True
        self._fuse_thread = threading.Thread(target=self._serve, name="vfs-fuse", daemon=True)
        self._fuse_thread.start()
        self._fuse_ready.wait(10)
        if self._fuse_error is not None:
            raise VFSError(f"FUSE loop failed: {self._fuse_error}")

    def _serve(self) -> None:
        async def main() -> None:
            self._trio_token = trio.lowlevel.current_trio_token()
            self._fuse_ready.set()
            await pyfuse3.main()

        try:
            trio.run(main)
        except BaseException as exc:  # noqa: BLE001 - reported to start() / logged
            self._fuse_error = exc
            self._fuse_ready.set()
            log.exception("FUSE loop ended with an error")

    def _unmount(self) -> None:
        if not self._mounted:
            return
        self._mounted = False
        if self._fuse_thread is not None and self._fuse_thread.is_alive() and self._trio_token is not None:
            try:
                trio.from_thread.run_sync(pyfuse3.terminate, trio_token=self._trio_token)
            except (trio.RunFinishedError, RuntimeError):
                pass
            self._fuse_thread.join(10)
        pyfuse3.close(unmount=True)

    def _on_change(self, op: str, path: str, dst: str) -> None:
        if self.journal is None:
            return
        try:
            self.journal.append(op, path, dst)
        except OSError as exc:
            # the write itself went through; only its record is lost: a full reconcile finds it
            log.warning("cannot journal %s %s (%s); the index will be reconciled with the files", op, path, exc)
            if self.worker is not None:
                self.worker.request_reconcile()

    def _fs_search(self, query: str, caller: Caller) -> list[Match]:
        return [Match(h.path, h.score) for h in self.search(query, k=self.config.search_k, caller=caller,
                                                             snippets=False)]

    # -- the API -------------------------------------------------------------------------------
    def search(self, query: str, k: int = 10, path_prefix: str = "", caller: Caller | None = None,
               ranking: RankingConfig | None = None, snippets: bool = True) -> list[SearchHit]:
        """Best files for `query`; with `caller`, only files that caller may read."""
        return self.searcher.search(query, k, path_prefix, caller, ranking, snippets)

    def wait_indexed(self, timeout: float = 30.0) -> bool:
        """Block until every change made so far is searchable (tests, benchmarks, `sync`)."""
        return self.worker is not None and self.worker.wait_idle(timeout)

    @property
    def worker_state(self) -> WorkerState:
        return self.worker.state if self.worker is not None else WorkerState()

    def status(self, path_prefix: str = "") -> VFSStatus:
        state = self.worker_state
        pending = len(self.journal.pending()) if self.journal is not None else 0
        words = sum(1 for p in list(self.lexical.keys()) if str(p).startswith(path_prefix))
        vectors = sum(1 for p in list(self.chunk_counts) if p.startswith(path_prefix))
        return VFSStatus(str(self.config.mountpoint), pending, words, vectors, state.reconciled,
                         state.embedder_available, self.index_rebuilds, state.last_error, path_prefix)


def _clear_stale_mount(mountpoint: Path) -> None:
    """A mount left by a killed agent answers ENOTCONN: detach it so we can mount again."""
    try:
        os.stat(mountpoint)
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            return
        log.warning("%s is a stale mount from a previous run; detaching it", mountpoint)
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True, check=False)


def _inside(path: Path, parent: Path) -> bool:
    p, q = os.path.realpath(path), os.path.realpath(parent)
    return p == q or p.startswith(q.rstrip("/") + "/")
