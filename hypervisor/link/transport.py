"""How a guest's link traffic reaches the controller, and how the controller knows who sent it.

Two transports sit behind one interface:

* `UnixForwardTransport` (hosts without /dev/vhost-vsock, e.g. this one): QEMU user-mode
  networking forwards the guest's 10.0.2.100:50051 to `socat - UNIX-CONNECT:<dir>/<guest>.sock`,
  and the controller runs one gRPC server per socket. The socket a call arrives on *is* the
  guest's identity.
* `VsockTransport`: one gRPC server on `vsock:-1:PORT` for every guest; the guest is the peer's
  CID, which the hypervisor assigns and the guest cannot forge.

The LinkServer asks a transport for a `Listener` per guest and binds whatever it returns; a
listener with `guest=None` is shared, and its guests are told apart by `guest_for_peer`.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Protocol

from hypervisor.errors import LinkError

log = logging.getLogger("neuraos.link")

LINK_PORT = 50051
GUEST_LINK_IP = "10.0.2.100"  # slirp address the guest dials; never routed anywhere
VHOST_VSOCK = Path("/dev/vhost-vsock")
DEFAULT_SOCKET_DIR = Path("/run/neuraos/link")

GUEST_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,40}$")
# Characters safe inside a QEMU -netdev value (no ',' option separator) and a socat address
# (no ':' '!' or spaces): anything else could smuggle options into either parser.
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/+-]*$")
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL


def check_guest_name(name: str) -> str:
    """Return `name` if it may appear in a socket path and a QEMU argument, else raise."""
    if not isinstance(name, str) or not GUEST_NAME.fullmatch(name):
        raise LinkError(
            f"invalid guest name {name!r}",
            hint="guest names are 1-41 characters: lowercase letters, digits and '-', "
            "starting with a letter or digit",
        )
    return name


@dataclass(frozen=True)
class Listener:
    """One address a gRPC server binds; `guest` is None when the address serves every guest."""

    address: str
    guest: str | None
    socket_path: Path | None = None


class Transport(Protocol):
    """What the LinkServer and the domain template need from a transport."""

    kind: str
    guest_link_address: str  # what the agent in the guest dials (NEURAOS_LINK)

    def server_address(self, guest: str) -> str: ...

    def listener(self, guest: str) -> Listener: ...

    def before_bind(self, listener: Listener) -> None: ...

    def after_bind(self, listener: Listener) -> None: ...

    def after_stop(self, listener: Listener) -> None: ...

    def guest_for_peer(self, peer: str, cid_map: Mapping[int, str]) -> str | None: ...

    def qemu_netdev_args(self, guest: str, ssh_port: int | None) -> str | None: ...


@dataclass(frozen=True)
class SocketOwner:
    """Who must be able to connect to a guest's socket: the user QEMU (and so socat) runs as."""

    uid: int
    gid: int

    @classmethod
    def lookup(cls, user: str | None, group: str | None) -> SocketOwner | None:
        """Resolve names; None when the user does not exist (unit tests, non-libvirt hosts)."""
        if not user:
            return None
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            return None
        gid = pw.pw_gid
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                pass
        return cls(pw.pw_uid, gid)


def ssh_hostfwd(ssh_port: int | None) -> str:
    if ssh_port is None:
        return ""
    if not isinstance(ssh_port, int) or not 1 <= ssh_port <= 65535:
        raise LinkError(f"invalid ssh port {ssh_port!r}", hint="use a TCP port in 1..65535")
    return f",hostfwd=tcp:127.0.0.1:{ssh_port}-:22"


class UnixForwardTransport:
    """QEMU guestfwd → socat → one unix socket (and one gRPC server) per guest."""

    kind = "unix-forward"

    def __init__(
        self,
        socket_dir: Path = DEFAULT_SOCKET_DIR,
        *,
        port: int = LINK_PORT,
        socat: str = "socat",
        qemu_user: str | None = "libvirt-qemu",
        qemu_group: str | None = "kvm",
    ) -> None:
        self.socket_dir = Path(socket_dir).absolute()
        if not _SAFE_PATH.fullmatch(str(self.socket_dir)):
            raise LinkError(
                f"link socket directory {self.socket_dir} has characters QEMU or socat would misread",
                hint="use a directory path of letters, digits and . _ - + /",
            )
        if not re.fullmatch(r"[A-Za-z0-9._/+-]+", socat):
            raise LinkError(f"unsafe socat path {socat!r}", hint="give an absolute path without spaces")
        self.port = port
        self.socat = socat
        self.guest_link_address = f"{GUEST_LINK_IP}:{port}"
        self._owner_names = (qemu_user, qemu_group)

    def socket_path(self, guest: str) -> Path:
        path = self.socket_dir / f"{check_guest_name(guest)}.sock"
        if len(str(path).encode()) > _SUN_PATH_MAX:
            raise LinkError(
                f"link socket path {path} is longer than a unix socket allows",
                hint="choose a shorter link socket directory",
            )
        return path

    def server_address(self, guest: str) -> str:
        return f"unix:{self.socket_path(guest)}"

    def qemu_netdev_args(self, guest: str, ssh_port: int | None) -> str:
        """The `-netdev` value: one argv element (it contains spaces; never pass it to a shell)."""
        return (
            f"user,id=neura0,restrict=on{ssh_hostfwd(ssh_port)},"
            f"guestfwd=tcp:{GUEST_LINK_IP}:{self.port}-cmd:{self.socat} - "
            f"UNIX-CONNECT:{self.socket_path(guest)}"
        )

    def listener(self, guest: str) -> Listener:
        path = self.socket_path(guest)
        return Listener(address=f"unix:{path}", guest=guest, socket_path=path)

    def before_bind(self, listener: Listener) -> None:
        """Make the directory traversable (not listable) by QEMU, and clear a stale socket."""
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.socket_dir, 0o711)
        path = listener.socket_path
        assert path is not None
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise LinkError(f"{path} exists and is not a socket", hint="move it out of the link socket directory")
        path.unlink()  # left behind by a controller that did not stop cleanly

    def after_bind(self, listener: Listener) -> None:
        """Let QEMU's user (socat runs as it) connect, and nobody else."""
        path = listener.socket_path
        assert path is not None
        owner = SocketOwner.lookup(*self._owner_names)
        if owner is None:
            os.chmod(path, 0o600)
            return
        try:
            os.chown(path, owner.uid, owner.gid)
        except PermissionError:
            try:  # not root: group access still works if the controller's user is in that group
                os.chown(path, -1, owner.gid)
            except PermissionError:
                log.warning("cannot hand %s to uid %d/gid %d; QEMU may fail to connect", path, owner.uid, owner.gid)
        os.chmod(path, 0o660)

    def after_stop(self, listener: Listener) -> None:
        if listener.socket_path is not None:
            listener.socket_path.unlink(missing_ok=True)

    def guest_for_peer(self, peer: str, cid_map: Mapping[int, str]) -> str | None:
        """Unused: each unix listener already belongs to one guest."""
        return None


_VSOCK_PEER = re.compile(r"^vsock:(\d+):(\d+)$")


class VsockTransport:
    """One gRPC server on vsock for every guest; the peer CID names the guest."""

    kind = "vsock"

    def __init__(self, port: int = LINK_PORT) -> None:
        self.port = port
        self.guest_link_address = f"vsock:2:{port}"  # CID 2 is always the host

    @property
    def address(self) -> str:
        return f"vsock:-1:{self.port}"  # -1: VMADDR_CID_ANY

    def server_address(self, guest: str) -> str:
        check_guest_name(guest)
        return self.address

    def qemu_netdev_args(self, guest: str, ssh_port: int | None) -> str | None:
        """Only the ssh forward: the link itself runs over the domain's <vsock> device."""
        check_guest_name(guest)
        if ssh_port is None:
            return None
        return f"user,id=neura0,restrict=on{ssh_hostfwd(ssh_port)}"

    def listener(self, guest: str) -> Listener:
        check_guest_name(guest)
        return Listener(address=self.address, guest=None)

    def before_bind(self, listener: Listener) -> None:
        pass

    def after_bind(self, listener: Listener) -> None:
        pass

    def after_stop(self, listener: Listener) -> None:
        pass

    def guest_for_peer(self, peer: str, cid_map: Mapping[int, str]) -> str | None:
        """Map gRPC's peer string `vsock:CID:PORT` to the guest libvirt gave that CID."""
        match = _VSOCK_PEER.fullmatch(peer)
        if match is None:
            return None
        return cid_map.get(int(match.group(1)))


def grpc_supports_vsock() -> bool:
    """Whether this grpcio build can listen on vsock at all: PyPI wheels are built without it."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc

    executor = ThreadPoolExecutor(max_workers=1)
    server = grpc.server(executor)
    try:
        return server.add_insecure_port("vsock:-1:-1") != 0  # -1 port: VMADDR_PORT_ANY
    except RuntimeError:
        return False
    finally:
        server.stop(None)
        executor.shutdown(wait=False)


@dataclass(frozen=True)
class TransportChoice:
    transport: UnixForwardTransport | VsockTransport  # VsockRelayTransport is a UnixForwardTransport
    reason: str


def detect_transport(
    socket_dir: Path = DEFAULT_SOCKET_DIR,
    *,
    prefer: str = "auto",
    port: int = LINK_PORT,
    vhost_vsock: Path = VHOST_VSOCK,
    vsock_probe: Callable[[], bool] = grpc_supports_vsock,
) -> TransportChoice:
    """Pick vsock where both the host kernel and gRPC offer it, else the unix forward; say why."""
    if prefer not in ("auto", "vsock", "unix-forward"):
        raise LinkError(f"unknown link transport {prefer!r}", hint="use auto, vsock or unix-forward")
    why_not_vsock = "requested"
    if prefer != "unix-forward":
        if not vhost_vsock.exists():
            why_not_vsock = f"no {vhost_vsock} on this host"
            hint = "load the vhost_vsock module (modprobe vhost_vsock) or use transport = \"auto\""
        elif not vsock_probe():
            from hypervisor.link.vsock_relay import VsockRelayTransport

            return TransportChoice(
                VsockRelayTransport(socket_dir, port=port),
                f"{vhost_vsock} present but this gRPC build cannot listen on vsock: "
                f"a vsock relay on port {port} routes each guest's CID to its unix socket in {socket_dir}")
        else:
            return TransportChoice(VsockTransport(port), f"{vhost_vsock} present: gRPC over virtio-vsock port {port}")
        if prefer == "vsock":
            raise LinkError(f"link transport vsock requested but {why_not_vsock}", hint=hint)
    socat = shutil.which("socat")
    reason = f"{why_not_vsock}: QEMU guestfwd to per-guest unix sockets in {socket_dir}"
    if socat is None:
        reason += " (socat not found on PATH: guests cannot link until it is installed)"
    return TransportChoice(UnixForwardTransport(socket_dir, port=port, socat=socat or "socat"), reason)
