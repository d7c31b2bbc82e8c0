"""The vector file system as `neuraos-agent run` brings it up at boot, and the host's search command.

The mount starts in its own thread: importing pyfuse3, numpy and Milvus Lite takes tens of seconds
under TCG, and the link to the host must not wait for it (heartbeats, commands and the Embed calls
the indexer itself needs all ride that link). A failed start (no /dev/fuse, a busy mountpoint) is
logged and retried with backoff until the agent stops. Embeddings come from the host over the link
(`LinkEmbedder`); while the host is away the journal keeps the work. Every start reconciles the
index with the files (the worker does that first), so a crash or a rolled-back Milvus manifest
costs nothing but time.

Configuration: `--vfs-mount/--vfs-backing/--vfs-state` or NEURAOS_VFS_MOUNT, NEURAOS_VFS_BACKING,
NEURAOS_VFS_STATE (e.g. in /etc/neuraos/agent.env); NEURAOS_VFS=off leaves it out.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from neuraos_agent.vfs.errors import VFSError

if TYPE_CHECKING:
    from neuraos_agent._gen import link_pb2
    from neuraos_agent.vfs.embedder import Embedder
    from neuraos_agent.vfs.mount import VectorFS

log = logging.getLogger("neuraos.vfs.boot")

DEFAULT_MOUNT = "/srv/neura"
DEFAULT_BACKING = "/var/lib/neuraos/vfs/files"
DEFAULT_STATE = "/var/lib/neuraos/vfs/state"
DEFAULT_SOCKET = "/run/neuraos/vfs.sock"
MAX_K = 100  # hits per host search: the answer must fit one link message
MAX_OUTPUT_BYTES = 200 * 1024


@dataclass(frozen=True)
class BootConfig:
    mountpoint: Path
    backing: Path
    state_dir: Path
    query_socket: Path = Path(DEFAULT_SOCKET)
    enabled: bool = True


def env_default(name: str, default: str) -> str:
    return os.environ.get(name) or default


def enabled_by_env() -> bool:
    return os.environ.get("NEURAOS_VFS", "on").lower() not in ("off", "0", "no", "false")


class BootVFS:
    """Owns the agent's `VectorFS`: `start()` returns at once, `close()` unmounts."""

    def __init__(self, config: BootConfig, link_address: str, retry_max_s: float = 60.0,
                 embedder: "Embedder | None" = None) -> None:
        self.config = config
        self.link_address = link_address
        self.embedder = embedder  # None: the host's, over the link
        self.retry_max_s = retry_max_s
        self.vfs: VectorFS | None = None
        self.error = ""
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="vfs-boot", daemon=True)
        self._thread.start()

    def wait_ready(self, timeout: float) -> bool:
        return self._ready.wait(timeout)

    def _run(self) -> None:
        backoff = 2.0
        while not self._stop.is_set():
            try:
                vfs = self._open()
            except Exception as exc:  # noqa: BLE001 - the agent keeps its link; we say why and retry
                self.error = f"{type(exc).__name__}: {exc}"
                log.error("cannot mount the vector file system at %s: %s; retrying in %.0f s",
                          self.config.mountpoint, self.error, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self.retry_max_s)
                continue
            with self._lock:
                if self._stop.is_set():
                    vfs.close()
                    return
                self.vfs = vfs
            self.error = ""
            self._ready.set()
            log.info("vector file system mounted at %s (files in %s, index in %s)",
                     self.config.mountpoint, self.config.backing, self.config.state_dir)
            return

    def _open(self) -> "VectorFS":
        from neuraos_agent.vfs.link_embedder import LinkEmbedder
        from neuraos_agent.vfs.mount import VectorFS, VFSConfig

        cfg = self.config
        vfs = VectorFS(VFSConfig(backing=cfg.backing, mountpoint=cfg.mountpoint, state_dir=cfg.state_dir,
                                 query_socket=cfg.query_socket), self.embedder or LinkEmbedder(self.link_address))
        vfs.start()
        return vfs

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            vfs, self.vfs = self.vfs, None
        if vfs is not None:
            close = getattr(vfs.embedder, "close", None)
            if close is not None:
                close()  # first: a worker waiting on the host's quota gives up at once
            vfs.close()
        if self._thread is not None:
            self._thread.join(5)

    # -- the host's `neuraos search --guest` ---------------------------------------------------
    def search_command(self, cmd: "link_pb2.Command") -> str:
        """Answer a SearchFiles command with the hits as JSON (every file of this guest's mount)."""
        req = cmd.search
        query = req.query.strip()
        if not query:
            raise VFSError("empty query")
        k = req.k or 10
        if k > MAX_K:
            raise VFSError(f"k is at most {MAX_K} over the link")
        vfs = self.vfs
        if vfs is None:
            raise VFSError(f"the vector file system is not mounted yet{': ' + self.error if self.error else ''}")
        hits = [asdict(h) for h in vfs.search(query, k=k, path_prefix=req.path_prefix.lstrip("/"))]
        out = json.dumps(hits)
        while len(out.encode()) > MAX_OUTPUT_BYTES and hits:  # long snippets: shorten, never fail
            for h in hits:
                h["snippet"] = h["snippet"][: max(0, len(h["snippet"]) // 2)]
            if all(not h["snippet"] for h in hits):
                hits.pop()
            out = json.dumps(hits)
        return out
