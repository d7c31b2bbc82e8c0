"""Containment of one process: freeze it (cgroup v2) and cut its egress (nftables), undo on release.

Freeze: the process moves into its own cgroup `/neuraos-contained/pid-<tgid>` (moving a
process moves all its threads) and `cgroup.freeze` is set; we wait for `cgroup.events`
to say `frozen 1`. Egress: a base chain of its own in the `inet neuraos_contain` table
drops what the process sends, matched two ways, because nftables' cgroup match reads the
cgroup a socket was *created* in: `socket cgroupv2` on the new cgroup (sockets it makes
later) and the exact 5-tuples of the TCP/UDP sockets it already holds (read from its fds
and /proc/net), which also stops data already queued in the kernel. Release thaws it,
moves it back to the cgroup it came from and removes the chain; kill sends SIGKILL (a
frozen task still dies of it) and cleans up the same way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ipaddress
import os
import signal
import socket
import struct
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTAINED = "neuraos-contained"
TABLE = "neuraos_contain"


class ContainError(Exception):
    """A containment step failed (the message says which)."""


@dataclass
class Contained:
    tgid: int
    origin: str  # cgroup path it came from, relative to the root
    cgroup: Path
    chain: str
    frozen_at: float | None = None  # monotonic
    cut_at: float | None = None
    sockets: list[str] = field(default_factory=list)  # the 5-tuples cut
    errors: list[str] = field(default_factory=list)


def _tcp_tuples(tgid: int, proc: Path) -> list[tuple[str, str, int, str, int]]:
    """(proto, local addr, local port, remote addr, remote port) of the process's connected sockets."""
    inodes = set()
    try:
        for fd in os.listdir(proc / str(tgid) / "fd"):
            try:
                target = os.readlink(proc / str(tgid) / "fd" / fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        return []
    out = []
    for proto, fname, v6 in (("tcp", "tcp", False), ("tcp", "tcp6", True), ("udp", "udp", False),
                             ("udp", "udp6", True)):
        try:
            lines = (proc / str(tgid) / "net" / fname).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 10 or f[9] not in inodes:
                continue
            (la, lp), (ra, rp) = (_addr(x, v6) for x in (f[1], f[2]))
            if rp:
                out.append((proto, la, lp, ra, rp))
    return out


def _addr(hexaddr: str, v6: bool) -> tuple[str, int]:
    a, p = hexaddr.split(":")
    raw = bytes.fromhex(a)
    if v6:
        raw = b"".join(struct.pack("<I", w) for w in struct.unpack(">4I", raw))
        ip = ipaddress.IPv6Address(raw)
        return (str(ip.ipv4_mapped) if ip.ipv4_mapped else str(ip)), int(p, 16)
    return socket.inet_ntoa(struct.pack("<I", int(a, 16))), int(p, 16)


class Containment:
    """Freezes and cuts processes; keeps what it did so that release/kill can undo it."""

    def __init__(self, cgroup_root: Path = CGROUP_ROOT, proc: Path = Path("/proc"), nft: str = "nft",
                 freeze_wait_s: float = 0.3) -> None:
        self.root = cgroup_root
        self.proc = proc
        self.nft = nft
        self.freeze_wait_s = freeze_wait_s
        self.held: dict[int, Contained] = {}

    def prepare(self) -> None:
        """Make the parent cgroup and the nftables table once, so containing costs no setup."""
        (self.root / CONTAINED).mkdir(exist_ok=True)
        self._nft(f"add table inet {TABLE}\n")

    def contain(self, tgid: int) -> Contained:
        """Freeze `tgid` and cut its egress now; errors are kept in the result, never raised."""
        origin = ""
        try:
            for line in (self.proc / str(tgid) / "cgroup").read_text().splitlines():
                if line.startswith("0::"):
                    origin = line[3:]
        except OSError as exc:
            raise ContainError(f"process {tgid} is gone: {exc}") from exc
        cg = self.root / CONTAINED / f"pid-{tgid}"
        c = Contained(tgid, origin, cg, f"pid_{tgid}")
        self.held[tgid] = c
        try:
            cg.mkdir(exist_ok=True)
            (cg / "cgroup.procs").write_text(str(tgid))
            (cg / "cgroup.freeze").write_text("1")
            deadline = time.monotonic() + self.freeze_wait_s
            while "frozen 1" not in (cg / "cgroup.events").read_text():
                if time.monotonic() > deadline:
                    c.errors.append(f"cgroup not frozen within {self.freeze_wait_s:g}s")
                    break
                time.sleep(0.002)
            else:
                c.frozen_at = time.monotonic()
        except OSError as exc:
            c.errors.append(f"freeze: {exc}")
        tuples = _tcp_tuples(tgid, self.proc)
        rules = [f'add chain inet {TABLE} {c.chain} {{ type filter hook output priority -10; policy accept; }}',
                 f'add rule inet {TABLE} {c.chain} socket cgroupv2 level 2 "{CONTAINED}/pid-{tgid}" drop']
        for proto, la, lp, ra, rp in tuples:
            fam = "ip6" if ":" in ra else "ip"
            rules.append(f"add rule inet {TABLE} {c.chain} {fam} saddr {la} {fam} daddr {ra} "
                         f"{proto} sport {lp} {proto} dport {rp} drop")
            c.sockets.append(f"{proto} {la}:{lp} -> {ra}:{rp}")
        try:
            self._nft("\n".join(rules) + "\n")
            c.cut_at = time.monotonic()
        except ContainError as exc:
            c.errors.append(str(exc))
        return c

    def release(self, tgid: int) -> str:
        c = self.held.get(tgid)
        if c is None:
            raise ContainError(f"process {tgid} is not contained")
        try:
            (c.cgroup / "cgroup.freeze").write_text("0")
            if c.origin and self._alive(tgid):
                (self.root / c.origin.lstrip("/") / "cgroup.procs").write_text(str(tgid))
        except OSError as exc:
            raise ContainError(f"cannot thaw process {tgid}: {exc}") from exc
        self._cleanup(c)
        return f"released {tgid} back to {c.origin or '/'}"

    def kill(self, tgid: int) -> str:
        c = self.held.get(tgid)
        if c is None:
            raise ContainError(f"process {tgid} is not contained")
        try:
            os.kill(tgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 5
        while self._alive(tgid) and time.monotonic() < deadline:
            time.sleep(0.02)
        self._cleanup(c)
        return f"killed {tgid}"

    def _alive(self, tgid: int) -> bool:
        try:
            return (self.proc / str(tgid) / "stat").read_text().split(") ")[1][0] not in "ZX"
        except (OSError, IndexError):
            return False

    def _cleanup(self, c: Contained) -> None:
        self.held.pop(c.tgid, None)
        try:
            self._nft(f"flush chain inet {TABLE} {c.chain}\ndelete chain inet {TABLE} {c.chain}\n")
        except ContainError:
            pass
        try:
            (c.cgroup / "cgroup.freeze").write_text("0")
            c.cgroup.rmdir()
        except OSError:
            pass  # still holds a zombie or a child: left for the next cleanup

    def _nft(self, script: str) -> None:
        lib = _libnftables()
        if lib is None:  # no library: the binary
            p = subprocess.run([self.nft, "-f", "-"], input=script, capture_output=True, text=True)
            if p.returncode != 0:
                raise ContainError(f"nft: {p.stderr.strip()[:300]}")
            return
        ctx = lib.nft_ctx_new(0)
        try:
            lib.nft_ctx_buffer_error(ctx)
            if lib.nft_run_cmd_from_buffer(ctx, script.encode()) != 0:
                raise ContainError(f"nft: {(lib.nft_ctx_get_error_buffer(ctx) or b'').decode().strip()[:300]}")
        finally:
            lib.nft_ctx_free(ctx)


_LIB: list[ctypes.CDLL | None] = []


def _libnftables() -> ctypes.CDLL | None:
    if not _LIB:
        name = ctypes.util.find_library("nftables") or "libnftables.so.1"
        try:
            lib = ctypes.CDLL(name)
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
            _LIB.append(lib)
        except OSError:
            _LIB.append(None)
    return _LIB[0]
