"""The indexing workers: turn journal records into index updates, in their own threads.

Two followers read the same journal. `WordsFollower` puts each closed file into the BM25 index
within milliseconds (no embedding needed), so a file is found by its words at once even while the
embedder is slow or away. `IndexWorker` is the one that commits.

Neither blocks a writer: the file system only appends to the journal. The worker first brings
the whole index in line with the files (`reconcile`: this is what makes a crash, a lost journal
tail or a rolled-back Milvus manifest harmless), then follows the journal. Records are committed
only after their batch is in the index and flushed; when the embedder is unreachable the batch
stays pending and is retried with backoff, so the journal holds the work until the host is back.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from neuraos_agent.vfs.errors import EmbedderUnavailable, IndexCorrupt
from neuraos_agent.vfs.journal import Journal
from neuraos_agent.vfs.sync import IndexSync, SyncReport

log = logging.getLogger("neuraos.vfs.worker")


@dataclass(frozen=True)
class WorkerConfig:
    gather_s: float = 0.02  # after a record arrives, wait this long for more to batch with it
    max_records: int = 512  # records per batch
    retry_initial_s: float = 0.2
    retry_max_s: float = 10.0
    compact_bytes: int = 1 << 20
    store_failures_to_rebuild: int = 3  # Milvus errors in a row before the store is rebuilt from the files


@dataclass
class WorkerState:
    """What the worker is doing, for `status` and for tests that wait on it."""

    reconciled: bool = False
    embedder_available: bool = True
    last_error: str = ""
    batches: int = 0
    totals: SyncReport = field(default_factory=SyncReport)


class IndexWorker:
    """Follows `journal` and applies it through `sync`; `on_corrupt` rebuilds a broken index."""

    def __init__(self, journal: Journal, sync: IndexSync, on_corrupt: Callable[[IndexCorrupt], None],
                 flush: Callable[[], None], config: WorkerConfig | None = None) -> None:
        self.journal = journal
        self.sync = sync
        self.on_corrupt = on_corrupt
        self.flush = flush
        self.config = config or WorkerConfig()
        self.state = WorkerState()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._idle = threading.Condition()
        self._reconcile_requested = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vfs-indexer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        with self._idle:
            self._idle.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def request_reconcile(self) -> None:
        """A change could not be journalled (disk full): compare everything with the files again."""
        self._reconcile_requested.set()
        self._notify()

    def wait_idle(self, timeout: float) -> bool:
        """True once everything journalled before this call is in the index."""
        target = self.journal.last_seq
        deadline = time.monotonic() + timeout
        with self._idle:
            while not (self.state.reconciled and self.journal.committed >= target):
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    return False
                self._idle.wait(min(left, 0.1))
        return True

    # -- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        backoff = self.config.retry_initial_s
        store_failures = 0
        while not self._stop.is_set():
            try:
                if not self.state.reconciled or self._reconcile_requested.is_set():
                    self._reconcile_requested.clear()
                    self._reconcile()
                elif not self._step():
                    continue
                backoff = self.config.retry_initial_s
                store_failures = 0
                self._set(embedder_available=True, last_error="")
            except EmbedderUnavailable as exc:
                if self.state.embedder_available:
                    log.warning("embedder unreachable, indexing waits in the journal: %s", exc)
                self._set(embedder_available=False, last_error=str(exc))
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.config.retry_max_s)
            except IndexCorrupt as exc:
                self._set(last_error=str(exc))
                self._rebuild(exc, backoff)
                backoff = min(backoff * 2, self.config.retry_max_s)
            except Exception as exc:  # noqa: BLE001 - keep following the journal; the error is shown
                log.exception("indexing failed; retrying")
                self._set(last_error=f"{type(exc).__name__}: {exc}")
                store_failures = store_failures + 1 if _store_error(exc) else 0
                if store_failures >= self.config.store_failures_to_rebuild:
                    store_failures = 0
                    self._rebuild(IndexCorrupt(f"the vector store keeps failing: {exc}"), backoff)
                    continue
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.config.retry_max_s)

    def _rebuild(self, exc: IndexCorrupt, backoff: float) -> None:
        """Start the index again from the files; if even that fails (a full disk), wait and retry
        on the next turn of the loop instead of ending the worker."""
        self.state.reconciled = False
        try:
            self.on_corrupt(exc)
        except Exception as again:  # noqa: BLE001 - the loop retries; the cause is shown
            log.error("rebuilding the index failed (%s); retrying", again)
            self._set(last_error=f"rebuild failed: {again}")
            self._stop.wait(backoff)

    def _reconcile(self) -> None:
        upto = self.journal.last_seq  # everything journalled so far is covered by a full scan
        report = self.sync.reconcile()
        self.flush()
        self.journal.commit(upto)
        self.state.totals.add(report)
        self.state.reconciled = True
        log.info("index reconciled with the files: %d indexed, %d removed, %d unchanged",
                 report.files_indexed, report.files_removed, report.files_unchanged)
        self._notify()

    def _step(self) -> bool:
        """One batch; False when there was nothing to do."""
        pending = self.journal.pending()
        if not pending:
            self.journal.wait(self.journal.last_seq, timeout=0.5)
            return False
        if self.config.gather_s > 0 and len(pending) < self.config.max_records:
            self._stop.wait(self.config.gather_s)
            pending = self.journal.pending()
        batch = pending[: self.config.max_records]
        paths: list[str] = []
        for rec in batch:
            paths.append(rec.path)
            if rec.dst:
                paths.append(rec.dst)
        report = self.sync.sync(dict.fromkeys(paths))
        self.flush()
        self.journal.commit(batch[-1].seq)
        self.journal.compact(self.config.compact_bytes)
        self.state.batches += 1
        self.state.totals.add(report)
        self._notify()
        return True

    def _set(self, **changes: object) -> None:
        for k, v in changes.items():
            setattr(self.state, k, v)

    def _notify(self) -> None:
        with self._idle:
            self._idle.notify_all()


def _store_error(exc: BaseException) -> bool:
    """An error of the vector store itself (not of the embedder, the files, or a full disk)."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC or "No space left" in str(exc):
        return False  # waits for space; rebuilding would not help
    return type(exc).__module__.split(".")[0] in ("pymilvus", "milvus_lite")


class WordsFollower:
    """Follows the journal (without committing) and keeps the BM25 index current right away."""

    def __init__(self, journal: Journal, sync: IndexSync) -> None:
        self.journal = journal
        self.sync = sync
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.seen = journal.last_seq  # older records are covered by the worker's reconcile

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vfs-words", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            records = self.journal.pending(after=self.seen)
            if not records:
                self.journal.wait(self.seen, timeout=0.2)
                continue
            paths: list[str] = []
            for rec in records[:256]:
                paths += [rec.path, rec.dst] if rec.dst else [rec.path]
            try:
                self.sync.sync_words(dict.fromkeys(paths))
            except Exception:  # noqa: BLE001 - the worker's full pass covers anything missed here
                log.exception("updating the word index failed")
            self.seen = records[min(len(records), 256) - 1].seq
