"""Confine the REPL process: its own filesystem view, resource limits, then the syscall filter.

Runs inside the child, which `unshare` has already put in new user, mount, pid and net
namespaces (mapped to root there, so it may mount, but only inside its own namespaces). The
view is a fresh tmpfs root holding read-only binds of exactly what CPython and the REPL need,
the context read-only at /context, and a size-capped tmpfs at /scratch; the old root is
detached, so nothing else on the machine can be named, let alone read.
"""

from __future__ import annotations

import ctypes
import os
import resource
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
MNT_DETACH = 2
SYS_PIVOT_ROOT = 155  # x86_64
# statvfs f_flag bits that are locked on a mount a user namespace inherits; a remount must keep them
_LOCKED = ((os.ST_NOSUID, MS_NOSUID), (os.ST_NODEV, MS_NODEV), (os.ST_NOEXEC, MS_NOEXEC),
           (os.ST_NOATIME, MS_NOATIME), (os.ST_NODIRATIME, MS_NODIRATIME), (os.ST_RELATIME, MS_RELATIME))

SCRATCH = "/scratch"
CONTEXT = "/context"


@dataclass(frozen=True)
class Limits:
    """Per-sandbox resource limits; the CPU and wall limits apply to each turn."""

    memory_mib: int = 768        # address space (RLIMIT_AS): a blow-up raises MemoryError
    turn_cpu_s: float = 30.0     # CPU seconds per turn (SIGXCPU, then the turn fails)
    turn_wall_s: float = 60.0    # wall seconds per turn (SIGALRM inside; the parent kills past a grace)
    session_cpu_s: int = 600     # hard CPU cap for the whole sandbox (the kernel kills past it)
    open_files: int = 64
    file_size_mib: int = 64      # largest file the REPL may write (in /scratch)
    scratch_mib: int = 64        # size of the /scratch tmpfs


@dataclass(frozen=True)
class View:
    """What the child sees. Paths are host paths, bound read-only at the same place."""

    root: str                                   # empty host dir the new root is mounted on
    ro_paths: tuple[str, ...] = ()
    context_dir: str | None = None              # bound read-only at /context
    corpus_dir: str | None = None               # a folder corpus, bound read-only at /context/corpus
    scratch_mib: int = 64
    namespaces: bool = True                     # False: limits and filter only (no user namespaces here)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Confinement:
    """What was actually applied, reported back to the parent at startup."""

    namespaces: bool = False
    view: list[str] = field(default_factory=list)
    seccomp: list[str] = field(default_factory=list)
    limits: dict = field(default_factory=dict)


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
    return libc


def _mount(libc: ctypes.CDLL, src: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    if libc.mount(enc(src), enc(target), enc(fstype), flags, enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {src} on {target}: {os.strerror(err)}")


def _bind_ro(libc: ctypes.CDLL, src: str, target: str) -> None:
    _mount(libc, src, target, None, MS_BIND)
    st = os.statvfs(src)
    locked = sum(ms for st_flag, ms in _LOCKED if st.f_flag & st_flag)
    _mount(libc, None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | locked)


def _make_target(root: str, path: str, is_dir: bool) -> str:
    target = root + path
    if is_dir:
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        Path(target).touch()
    return target


def build_view(view: View) -> list[str]:
    """Mount the new root and pivot into it; returns the paths visible inside."""
    libc = _libc()
    root = view.root
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    _mount(libc, "tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=4m,mode=0755")
    visible: list[str] = []
    for path in sorted(set(view.ro_paths)):
        if not os.path.exists(path):
            continue
        _bind_ro(libc, path, _make_target(root, path, os.path.isdir(path)))
        visible.append(path)
    # merged-/usr systems: /lib64 -> usr/lib64 and friends, so the dynamic loader finds libraries
    for link in ("/bin", "/lib", "/lib64", "/sbin"):
        if os.path.islink(link) and not os.path.lexists(root + link):
            os.symlink(os.readlink(link), root + link)
    for dev in ("/dev/null", "/dev/zero", "/dev/urandom"):
        _mount(libc, dev, _make_target(root, dev, False), None, MS_BIND)
    scratch = _make_target(root, SCRATCH, True)
    _mount(libc, "tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
           f"size={view.scratch_mib}m,mode=0777")
    if not os.path.lexists(root + "/tmp"):  # a visible path under /tmp (a checkout there) made it a dir
        os.symlink(SCRATCH, root + "/tmp")
    visible.append(SCRATCH)
    if view.context_dir:
        _bind_ro(libc, view.context_dir, _make_target(root, CONTEXT, True))
        visible.append(CONTEXT)
        if view.corpus_dir:  # its mount point was made by the parent inside the context folder
            _bind_ro(libc, view.corpus_dir, root + CONTEXT + "/corpus")
    old = _make_target(root, "/.old", True)
    os.chdir(root)
    if libc.syscall(SYS_PIVOT_ROOT, b".", b".old") != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"pivot_root: {os.strerror(err)}")
    os.chdir("/")
    if libc.umount2(b"/.old", MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount old root: {os.strerror(err)}")
    os.rmdir("/.old")
    del old
    _mount(libc, None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    return visible


def apply_limits(limits: Limits) -> dict:
    mib = 1024 * 1024
    cpu = int(limits.session_cpu_s)
    resource.setrlimit(resource.RLIMIT_AS, (limits.memory_mib * mib, limits.memory_mib * mib))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits.open_files, limits.open_files))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits.file_size_mib * mib, limits.file_size_mib * mib))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an oversized write fails with EFBIG instead
    return asdict(limits)
