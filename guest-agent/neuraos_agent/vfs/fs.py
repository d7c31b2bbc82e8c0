"""The FUSE file system: a passthrough over a backing directory plus the virtual `.search/` directory.

Every operation goes straight to the backing store; the only extra work on the write path is one
`on_change(op, path, dst)` call (a journal append: a buffered write, never a wait for indexing)
after a written file is closed, and after unlink, rename and attribute changes. Permissions are
the kernel's (`default_permissions`), ownership is the caller's, so the backing files look exactly
like the files a user wrote. `ls MOUNT/.search/QUERY` runs a search as the calling user and lists
the best matches as symlinks `NN_SCORE_path` pointing back into the mount.

Inodes are the backing store's inode numbers (as in pyfuse3's passthrough example); the virtual
directory uses numbers from `VIRTUAL_BASE` up, far above any ext4 inode.
"""

from __future__ import annotations

import errno
import logging
import os
import stat as stat_m
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import pyfuse3
import trio

from neuraos_agent.vfs.permissions import Caller

log = logging.getLogger("neuraos.vfs.fs")

SEARCH_DIR = ".search"
VIRTUAL_BASE = 1 << 60
SEARCH_INODE = VIRTUAL_BASE
ENTRY_TIMEOUT_S = 1.0
# st_blksize, the I/O size stdio, Python and cp buffer to: every write(2) through FUSE costs a round
# trip to this process, so ask for large ones (the kernel sends up to 1 MiB per request anyway)
IO_BLOCK = 128 * 1024
NAME_MAX = 255
MAX_QUERY_DIRS = 256


@dataclass(frozen=True)
class Match:
    path: str  # relative to the mount root
    score: float


class SearchFn(Protocol):
    def __call__(self, query: str, caller: Caller) -> Sequence[Match]: ...


ChangeFn = Callable[[str, str, str], None]


@dataclass
class _QueryDir:
    inode: int
    query: str
    uid: int
    made: float
    entries: list[tuple[bytes, int, bytes]]  # (name, inode, symlink target)


class PassthroughFS(pyfuse3.Operations):
    """pyfuse3 operations over `root`; `on_change` hears of every change that can alter an index."""

    # The kernel batches small writes of read-write opens into large ones. Write-only opens are
    # direct I/O instead (see `_write_only`).
    enable_writeback_cache = True

    def __init__(self, root: str, on_change: ChangeFn, search: SearchFn | None = None,
                 search_ttl_s: float = 2.0, search_k: int = 10) -> None:
        super().__init__()
        self.root = os.path.realpath(root)
        self.on_change = on_change
        self.search = search
        self.search_ttl_s = search_ttl_s
        self.search_k = search_k
        self._inode_path: dict[int, str | set[str]] = {pyfuse3.ROOT_INODE: self.root}
        self._lookup_cnt: defaultdict[int, int] = defaultdict(int)
        self._fd_inode: dict[int, int] = {}
        self._inode_fd: dict[int, int] = {}
        self._fd_open_count: dict[int, int] = {}
        self._fd_written: set[int] = set()
        self._queries: dict[int, _QueryDir] = {}
        self._query_by_key: dict[tuple[int, str], int] = {}
        self._links: dict[int, bytes] = {}  # result-entry inode → symlink target
        self._next_virtual = VIRTUAL_BASE + 1

    # -- paths and inodes ----------------------------------------------------------------------
    def _path(self, inode: int) -> str:
        try:
            val = self._inode_path[inode]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if isinstance(val, set):
            return next(iter(val))
        return val

    def _rel(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def _remember(self, inode: int, path: str) -> None:
        self._lookup_cnt[inode] += 1
        val = self._inode_path.get(inode)
        if val is None:
            self._inode_path[inode] = path
        elif isinstance(val, set):
            val.add(path)
        elif val != path:
            self._inode_path[inode] = {path, val}

    def _forget_path(self, inode: int, path: str) -> None:
        val = self._inode_path[inode]
        if isinstance(val, set):
            val.discard(path)
            if len(val) == 1:
                self._inode_path[inode] = next(iter(val))
        else:
            del self._inode_path[inode]

    def _replace_path(self, old: str, new: str) -> None:
        for inode, val in self._inode_path.items():
            if isinstance(val, set):
                moved = {new + p[len(old):] for p in val if p == old or p.startswith(old + "/")}
                if moved:
                    val.difference_update({p for p in val if p == old or p.startswith(old + "/")})
                    val.update(moved)
            elif val == old:
                self._inode_path[inode] = new
            elif val.startswith(old + "/"):
                self._inode_path[inode] = new + val[len(old):]

    def _notify(self, op: str, path: str, dst: str = "") -> None:
        try:
            self.on_change(op, self._rel(path), self._rel(dst) if dst else "")
        except Exception:  # noqa: BLE001 - indexing must never fail a file operation
            log.exception("could not record %s %s", op, path)

    @staticmethod
    def _fail(exc: OSError) -> pyfuse3.FUSEError:
        return pyfuse3.FUSEError(exc.errno or errno.EIO)

    def _getattr(self, path: str | None = None, fd: int | None = None) -> pyfuse3.EntryAttributes:
        try:
            st = os.fstat(fd) if fd is not None else os.lstat(path)  # type: ignore[arg-type]
        except OSError as exc:
            raise self._fail(exc)
        attr = pyfuse3.EntryAttributes()
        for name in ("st_ino", "st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_size",
                     "st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
            setattr(attr, name, getattr(st, name))
        attr.generation = 0
        attr.entry_timeout = ENTRY_TIMEOUT_S
        attr.attr_timeout = ENTRY_TIMEOUT_S
        attr.st_blksize = IO_BLOCK
        attr.st_blocks = (st.st_size + 511) // 512
        return attr

    # -- lookup and attributes -----------------------------------------------------------------
    async def lookup(self, inode_p, name, ctx=None):  # noqa: ANN001, ANN201 - pyfuse3 signature
        if inode_p == pyfuse3.ROOT_INODE and name == SEARCH_DIR.encode():
            return self._virtual_dir_attr(SEARCH_INODE)
        if inode_p == SEARCH_INODE:
            return await self._lookup_query(name, ctx)
        if inode_p in self._queries:
            for ename, ino, target in self._queries[inode_p].entries:
                if ename == name:
                    return self._virtual_link_attr(ino, target)
            raise pyfuse3.FUSEError(errno.ENOENT)
        path = os.path.join(self._path(inode_p), os.fsdecode(name))
        attr = self._getattr(path=path)
        if name != b"." and name != b"..":
            self._remember(attr.st_ino, path)
        return attr

    async def forget(self, inode_list):  # noqa: ANN001, ANN201
        for inode, nlookup in inode_list:
            if inode >= VIRTUAL_BASE:
                continue
            if self._lookup_cnt[inode] > nlookup:
                self._lookup_cnt[inode] -= nlookup
                continue
            self._lookup_cnt.pop(inode, None)
            if inode not in self._inode_fd:
                self._inode_path.pop(inode, None)

    async def getattr(self, inode, ctx=None):  # noqa: ANN001, ANN201
        if inode == SEARCH_INODE or inode in self._queries:
            return self._virtual_dir_attr(inode)
        if inode in self._links:
            return self._virtual_link_attr(inode, self._links[inode])
        if inode in self._inode_fd:
            return self._getattr(fd=self._inode_fd[inode])
        return self._getattr(path=self._path(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):  # noqa: ANN001, ANN201
        self._refuse_virtual(inode)
        path = self._path(inode) if fh is None else None
        try:
            if fields.update_size:
                if fh is not None:
                    os.ftruncate(fh, attr.st_size)
                else:
                    os.truncate(path, attr.st_size)  # type: ignore[arg-type]
                    self._notify("write", path)  # type: ignore[arg-type]
                if fh is not None:
                    self._fd_written.add(fh)
            if fields.update_mode:
                if fh is not None:
                    os.fchmod(fh, stat_m.S_IMODE(attr.st_mode))
                else:
                    os.chmod(path, stat_m.S_IMODE(attr.st_mode))  # type: ignore[arg-type]
            if fields.update_uid or fields.update_gid:
                uid = attr.st_uid if fields.update_uid else -1
                gid = attr.st_gid if fields.update_gid else -1
                if fh is not None:
                    os.fchown(fh, uid, gid)
                else:
                    os.chown(path, uid, gid, follow_symlinks=False)  # type: ignore[arg-type]
            if fields.update_atime or fields.update_mtime:
                st = os.fstat(fh) if fh is not None else os.lstat(path)  # type: ignore[arg-type]
                times = (attr.st_atime_ns if fields.update_atime else st.st_atime_ns,
                         attr.st_mtime_ns if fields.update_mtime else st.st_mtime_ns)
                if fh is not None:
                    os.utime(fh, ns=times)
                else:
                    os.utime(path, ns=times, follow_symlinks=False)  # type: ignore[arg-type]
        except OSError as exc:
            raise self._fail(exc)
        if fields.update_mode or fields.update_uid or fields.update_gid:
            self._notify("write", path or self._path(inode))  # owner and mode are indexed
        return await self.getattr(inode)

    # -- links, nodes, directories -------------------------------------------------------------
    async def readlink(self, inode, ctx):  # noqa: ANN001, ANN201
        if inode in self._links:
            return self._links[inode]
        try:
            return os.fsencode(os.readlink(self._path(inode)))
        except OSError as exc:
            raise self._fail(exc)

    async def mknod(self, inode_p, name, mode, rdev, ctx):  # noqa: ANN001, ANN201
        path = self._child(inode_p, name)
        try:
            os.mknod(path, mode=(mode & ~ctx.umask), device=rdev)
            os.chown(path, ctx.uid, ctx.gid)
        except OSError as exc:
            raise self._fail(exc)
        attr = self._getattr(path=path)
        self._remember(attr.st_ino, path)
        return attr

    async def mkdir(self, inode_p, name, mode, ctx):  # noqa: ANN001, ANN201
        path = self._child(inode_p, name)
        try:
            os.mkdir(path, mode=(mode & ~ctx.umask))
            os.chown(path, ctx.uid, ctx.gid)
        except OSError as exc:
            raise self._fail(exc)
        attr = self._getattr(path=path)
        self._remember(attr.st_ino, path)
        return attr

    async def rmdir(self, inode_p, name, ctx):  # noqa: ANN001, ANN201
        path = self._child(inode_p, name)
        try:
            inode = os.lstat(path).st_ino
            os.rmdir(path)
        except OSError as exc:
            raise self._fail(exc)
        if inode in self._lookup_cnt:
            self._forget_path(inode, path)
        self._notify("unlink", path)

    async def unlink(self, inode_p, name, ctx):  # noqa: ANN001, ANN201
        path = self._child(inode_p, name)
        try:
            inode = os.lstat(path).st_ino
            os.unlink(path)
        except OSError as exc:
            raise self._fail(exc)
        if inode in self._lookup_cnt and inode in self._inode_path:
            self._forget_path(inode, path)
        self._notify("unlink", path)

    async def symlink(self, inode_p, name, target, ctx):  # noqa: ANN001, ANN201
        path = self._child(inode_p, name)
        try:
            os.symlink(target, path)
            os.chown(path, ctx.uid, ctx.gid, follow_symlinks=False)
        except OSError as exc:
            raise self._fail(exc)
        attr = self._getattr(path=path)
        self._remember(attr.st_ino, path)
        return attr

    async def rename(self, inode_p_old, name_old, inode_p_new, name_new, flags, ctx):  # noqa: ANN001, ANN201
        if flags != 0:
            raise pyfuse3.FUSEError(errno.EINVAL)  # RENAME_EXCHANGE / NOREPLACE: not supported
        old = self._child(inode_p_old, name_old)
        new = self._child(inode_p_new, name_new)
        try:
            replaced = os.lstat(new).st_ino
        except OSError:
            replaced = None
        try:
            os.rename(old, new)
        except OSError as exc:
            raise self._fail(exc)
        if replaced is not None and replaced in self._inode_path and replaced != os.lstat(new).st_ino:
            self._forget_path(replaced, new)  # the overwritten file keeps its inode only while open
        self._replace_path(old, new)
        self._notify("rename", old, new)

    async def link(self, inode, new_inode_p, new_name, ctx):  # noqa: ANN001, ANN201
        self._refuse_virtual(inode)
        new = self._child(new_inode_p, new_name)
        try:
            os.link(self._path(inode), new, follow_symlinks=False)
        except OSError as exc:
            raise self._fail(exc)
        self._remember(inode, new)
        self._notify("write", new)
        return await self.getattr(inode)

    def _child(self, inode_p: int, name: bytes) -> str:
        if inode_p >= VIRTUAL_BASE or (inode_p == pyfuse3.ROOT_INODE and name == SEARCH_DIR.encode()):
            raise pyfuse3.FUSEError(errno.EROFS)  # the virtual directory is read-only
        return os.path.join(self._path(inode_p), os.fsdecode(name))

    @staticmethod
    def _refuse_virtual(inode: int) -> None:
        if inode >= VIRTUAL_BASE:
            raise pyfuse3.FUSEError(errno.EROFS)

    async def opendir(self, inode, ctx):  # noqa: ANN001, ANN201
        return inode

    async def readdir(self, inode, off, token):  # noqa: ANN001, ANN201
        if inode == SEARCH_INODE:
            return  # queries are looked up by name, not listed
        if inode in self._queries:
            for i, (name, ino, target) in enumerate(self._queries[inode].entries[off:], start=off + 1):
                if not pyfuse3.readdir_reply(token, name, self._virtual_link_attr(ino, target), i):
                    return
            return
        path = self._path(inode)
        try:
            entries = []
            for name in pyfuse3.listdir(path):
                if name in (".", "..") or (inode == pyfuse3.ROOT_INODE and name == SEARCH_DIR):
                    continue
                attr = self._getattr(path=os.path.join(path, name))
                entries.append((attr.st_ino, name, attr))
        except OSError as exc:
            raise self._fail(exc)
        entries.sort()
        for i, (ino, name, attr) in enumerate(entries[off:], start=off + 1):
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, i):
                return
            self._remember(ino, os.path.join(path, name))

    async def releasedir(self, fh):  # noqa: ANN001, ANN201
        return None

    async def fsyncdir(self, fh, datasync):  # noqa: ANN001, ANN201
        if fh >= VIRTUAL_BASE:
            return
        fd = os.open(self._path(fh), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    async def statfs(self, ctx):  # noqa: ANN001, ANN201
        stat_ = pyfuse3.StatvfsData()
        try:
            st = os.statvfs(self.root)
        except OSError as exc:
            raise self._fail(exc)
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail"):
            setattr(stat_, attr, getattr(st, attr))
        stat_.f_namemax = st.f_namemax - (len(self.root) + 1)
        return stat_

    # -- extended attributes -------------------------------------------------------------------
    async def setxattr(self, inode, name, value, ctx):  # noqa: ANN001, ANN201
        self._refuse_virtual(inode)
        try:
            os.setxattr(self._path(inode), name, value, follow_symlinks=False)
        except OSError as exc:
            raise self._fail(exc)

    async def getxattr(self, inode, name, ctx):  # noqa: ANN001, ANN201
        if inode >= VIRTUAL_BASE:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        try:
            return os.getxattr(self._path(inode), name, follow_symlinks=False)
        except OSError as exc:
            raise self._fail(exc)

    async def listxattr(self, inode, ctx):  # noqa: ANN001, ANN201
        if inode >= VIRTUAL_BASE:
            return []
        try:
            return [os.fsencode(n) for n in os.listxattr(self._path(inode), follow_symlinks=False)]
        except OSError as exc:
            raise self._fail(exc)

    async def removexattr(self, inode, name, ctx):  # noqa: ANN001, ANN201
        self._refuse_virtual(inode)
        try:
            os.removexattr(self._path(inode), name, follow_symlinks=False)
        except OSError as exc:
            raise self._fail(exc)

    # -- files ---------------------------------------------------------------------------------
    async def open(self, inode, flags, ctx):  # noqa: ANN001, ANN201
        self._refuse_virtual(inode)
        direct = _write_only(flags)
        if inode in self._inode_fd:
            fd = self._inode_fd[inode]
            self._fd_open_count[fd] += 1
            return pyfuse3.FileInfo(fh=fd, keep_cache=True, direct_io=direct)
        # the writeback cache may read a page of a file opened write-only: always open read-write
        # when allowed (the kernel has already checked the caller's permission)
        flags &= ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND)
        try:
            fd = os.open(self._path(inode), (flags & ~os.O_ACCMODE) | os.O_RDWR)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EISDIR, errno.EROFS, errno.ETXTBSY):
                raise self._fail(exc)
            try:
                fd = os.open(self._path(inode), flags)
            except OSError as exc2:
                raise self._fail(exc2)
        self._track_fd(inode, fd)
        if flags & os.O_TRUNC:
            self._fd_written.add(fd)
        return pyfuse3.FileInfo(fh=fd, keep_cache=True, direct_io=direct)

    async def create(self, inode_p, name, mode, flags, ctx):  # noqa: ANN001, ANN201
        path = self._child(inode_p, name)
        direct = _write_only(flags)
        flags &= ~(os.O_NOCTTY | os.O_APPEND | os.O_ACCMODE)
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_RDWR, mode & ~ctx.umask)
            os.fchown(fd, ctx.uid, ctx.gid)
        except OSError as exc:
            raise self._fail(exc)
        attr = self._getattr(fd=fd)
        self._remember(attr.st_ino, path)
        self._track_fd(attr.st_ino, fd)
        self._fd_written.add(fd)  # a new file is news even if nothing is written to it
        return pyfuse3.FileInfo(fh=fd, keep_cache=True, direct_io=direct), attr

    def _track_fd(self, inode: int, fd: int) -> None:
        self._inode_fd[inode] = fd
        self._fd_inode[fd] = inode
        self._fd_open_count[fd] = 1

    async def read(self, fd, offset, length):  # noqa: ANN001, ANN201
        try:
            return os.pread(fd, length, offset)
        except OSError as exc:
            raise self._fail(exc)

    async def write(self, fd, offset, buf):  # noqa: ANN001, ANN201
        try:
            n = os.pwrite(fd, buf, offset)
        except OSError as exc:
            raise self._fail(exc)  # ENOSPC reaches the writer as ENOSPC
        self._fd_written.add(fd)
        return n

    async def flush(self, fd):  # noqa: ANN001, ANN201
        # FLUSH is synchronous with close(2) (RELEASE comes later, asynchronously), and the kernel
        # has written its dirty pages before sending it: this is "close after write"
        if fd in self._fd_written:
            self._fd_written.discard(fd)
            try:
                self._notify("write", self._path(self._fd_inode[fd]))
            except (pyfuse3.FUSEError, KeyError):
                pass

    async def fsync(self, fd, datasync):  # noqa: ANN001, ANN201
        try:
            (os.fdatasync if datasync else os.fsync)(fd)
        except OSError as exc:
            raise self._fail(exc)

    async def release(self, fd):  # noqa: ANN001, ANN201
        if self._fd_open_count[fd] > 1:
            self._fd_open_count[fd] -= 1
            return
        del self._fd_open_count[fd]
        inode = self._fd_inode.pop(fd)
        del self._inode_fd[inode]
        written = fd in self._fd_written
        self._fd_written.discard(fd)
        try:
            os.close(fd)
        except OSError as exc:
            raise self._fail(exc)
        if written:
            try:
                self._notify("write", self._path(inode))
            except pyfuse3.FUSEError:
                pass  # unlinked while open: the unlink was recorded
        if inode not in self._lookup_cnt:
            self._inode_path.pop(inode, None)

    # -- the virtual search directory ----------------------------------------------------------
    def _virtual_dir_attr(self, inode: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode
        attr.st_mode = stat_m.S_IFDIR | 0o555
        attr.st_nlink = 2
        attr.st_uid = self._queries[inode].uid if inode in self._queries else 0
        now = time.time_ns()
        attr.st_atime_ns = attr.st_mtime_ns = attr.st_ctime_ns = now
        attr.entry_timeout = 0  # every `ls` runs the query again (after the short cache)
        attr.attr_timeout = 0
        return attr

    def _virtual_link_attr(self, inode: int, target: bytes) -> pyfuse3.EntryAttributes:
        attr = self._virtual_dir_attr(inode)
        attr.st_mode = stat_m.S_IFLNK | 0o444
        attr.st_nlink = 1
        attr.st_size = len(target)
        return attr

    async def _lookup_query(self, name: bytes, ctx) -> pyfuse3.EntryAttributes:  # noqa: ANN001
        if self.search is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        query = os.fsdecode(name)
        key = (ctx.uid, query)
        inode = self._query_by_key.get(key)
        if inode is not None and time.monotonic() - self._queries[inode].made < self.search_ttl_s:
            return self._virtual_dir_attr(inode)
        caller = Caller(ctx.uid, ctx.gid, frozenset(_groups(ctx.pid)) | {ctx.gid})
        try:
            matches = await trio.to_thread.run_sync(self.search, query, caller)
        except Exception:  # noqa: BLE001 - a failed search shows as an empty listing, logged
            log.exception("search %r failed", query)
            matches = []
        if inode is None:
            inode = self._alloc()
            self._query_by_key[key] = inode
        else:
            for _, ino, _ in self._queries[inode].entries:
                self._links.pop(ino, None)
        entries = []
        for rank, m in enumerate(matches[: self.search_k], start=1):
            ename = _entry_name(rank, m)
            ino = self._alloc()
            target = os.fsencode("../../" + m.path)
            self._links[ino] = target
            entries.append((ename, ino, target))
        self._queries[inode] = _QueryDir(inode, query, ctx.uid, time.monotonic(), entries)
        self._evict_queries()
        return self._virtual_dir_attr(inode)

    def _evict_queries(self) -> None:
        """Keep the newest `MAX_QUERY_DIRS` listings; an evicted one is simply asked again."""
        while len(self._queries) > MAX_QUERY_DIRS:
            oldest = min(self._queries.values(), key=lambda q: q.made)
            del self._queries[oldest.inode]
            self._query_by_key.pop((oldest.uid, oldest.query), None)
            for _, ino, _ in oldest.entries:
                self._links.pop(ino, None)

    def _alloc(self) -> int:
        self._next_virtual += 1
        return self._next_virtual


def _write_only(flags: int) -> bool:
    """Whether an open gets direct I/O: each write(2) goes to us as it is, past the page cache.

    Through the writeback cache every write(2) costs a round trip anyway (the kernel asks for
    `security.capability` before each one: FUSE has no SB_NOSEC without KILLPRIV_V2, which
    libfuse 3.14 lacks), then a copy into the FUSE page cache, throttled by FUSE's small dirty
    limit, and a second trip when the pages are written back. Direct I/O is one trip and one copy
    fewer: large sequential writes ran about 2x faster, small files no slower. Only write-only
    opens: they cannot be mmapped, and readers of the file keep the page cache (the kernel
    invalidates the range a direct write covers).
    """
    return flags & os.O_ACCMODE == os.O_WRONLY


def _entry_name(rank: int, m: Match) -> bytes:
    """`01_0.842_notes_cats.md`: rank, score, then the path with `/` shown as `_`."""
    name = f"{rank:02d}_{m.score:.3f}_{m.path.replace('/', '_')}"
    raw = os.fsencode(name)
    return raw[:NAME_MAX]


def _groups(pid: int) -> set[int]:
    try:
        return set(pyfuse3.get_sup_groups(pid))
    except (OSError, ValueError):
        return set()
