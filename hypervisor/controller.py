"""The host controller: guests from template to running, with their links.

It owns the libvirt connection, the link server and the state store (all passed
in), and keeps them consistent: a guest defined here has a link channel and a
store record; a controller restart re-attaches channels for every running guest
in the store; libvirt lifecycle events are recorded, and a guest destroyed
behind the controller's back is reported as vanished, not crashed on.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hypervisor.config import Config
from hypervisor.errors import AgentTimeout, GuestNotFound, GuestVanished, LinkError, NeuraError
from hypervisor.link.server import LinkEvent, LinkServer
from hypervisor.link.transport import Transport
from hypervisor.link.vsock_relay import CidTable
from hypervisor.state import Store
from hypervisor.virt import domains
from hypervisor.virt.accel import Accel
from hypervisor.virt.connection import Connection, LifecycleEvent
from hypervisor.virt.image import GuestImage
from hypervisor.virt.templates import (
    DomainSpec, GuestPolicy, ImageRef, LinkSpec, PciAddress, render_validated,
)

log = logging.getLogger("neuraos.controller")
Notify = Callable[[str], None]


@dataclass(frozen=True)
class CpuView:
    """vCPUs as both sides see them: QEMU's plugged count and the guest's online count."""

    plugged: int
    online: int | None  # from the agent's last report; None before one arrived


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Controller:
    def __init__(self, config: Config, conn: Connection, link: LinkServer, store: Store,
                 transport: Transport, accel: Accel, cids: CidTable | None = None) -> None:
        self.config = config
        self.conn = conn
        self.link = link
        self.store = store
        self.transport = transport
        self.accel = accel
        self.cids = cids  # vsock relay routing, when the transport is "vsock-relay"
        self._expected_stop: set[str] = set()
        self._lock = threading.Lock()
        self.vanished: list[str] = []
        conn.subscribe(self._on_lifecycle)
        link.on_event = self._on_link_event

    def close(self) -> None:
        """Stop listening to libvirt and the link (the caller owns and closes those)."""
        self.conn.unsubscribe(self._on_lifecycle)
        if self.link.on_event == self._on_link_event:
            self.link.on_event = None

    # -- lifecycle -----------------------------------------------------------------

    def up(self, name: str, image: GuestImage, *, vcpus: int | None = None,
           memory_mib: int | None = None, gpu: str | None = None,
           policy: GuestPolicy | None = None, wait: bool = True,
           notify: Notify = lambda _m: None) -> float | None:
        """Define (if needed), boot and link a guest; returns seconds boot→agent, if waited."""
        g = self.config.guest
        gdir = self.config.guests_dir / name
        gdir.mkdir(parents=True, exist_ok=True)
        vsock = self.transport.kind != "unix-forward"
        socket_path = self.link.add_guest(name) if self.transport.kind != "vsock" else None
        if self._is_running(name):
            if vsock:
                self._route_vsock(name)
            notify(f"{name} is already running; re-attached its link")
            return self._wait_agent(name, time.monotonic(), notify, fresh=False) if wait else None
        disk = gdir / "disk.qcow2"
        record = self.store.guest(name)
        if record is None or record.spec.get("image_key") != image.key or not disk.exists():
            self._make_overlay(image, disk)
        ssh_port = (record.spec.get("ssh_port") if record else None) or free_loopback_port()
        pol = policy or GuestPolicy(min_vcpus=1, max_vcpus=g.max_vcpus, min_memory_mib=256,
                                    max_memory_mib=g.max_memory_mib)
        spec = DomainSpec(
            name=name,
            image=ImageRef(image.key, str(image.kernel), str(image.initrd),
                           image.cmdline + (f" neuraos.link={self.transport.guest_link_address}" if vsock else ""),
                           str(image.ssh_key)),
            disk=str(disk), accel=self.accel,
            link=LinkSpec("vsock") if vsock else LinkSpec("unix-fwd", str(socket_path)),
            console_log=str(gdir / "console.log"),
            vcpus=vcpus or g.vcpus, max_vcpus=g.max_vcpus,
            memory_mib=memory_mib or g.memory_mib, max_memory_mib=g.max_memory_mib,
            ssh_port=ssh_port, tb_cache_mib=g.tb_cache_mib,
            gpu=PciAddress.parse(gpu) if gpu else None, policy=pol,
            qemu_args=("-netdev", self.transport.qemu_netdev_args(name, ssh_port),
                       "-device", "virtio-net-pci,netdev=neura0,bus=pci.0,addr=0x1e"),
        )
        xml = render_validated(spec)
        domains.define(self.conn, xml)
        self.store.put_guest(name, {"image_key": image.key, "ssh_port": ssh_port,
                                    "ssh_key": str(image.ssh_key), "disk": str(disk),
                                    "vcpus": spec.vcpus, "memory_mib": spec.memory_mib,
                                    "accel": self.accel.kind, "gpu": gpu})
        self.store.event(name, "defined", f"accel={self.accel.kind}")
        t0 = time.monotonic()
        domains.start(self.conn, name)
        if vsock:
            self._route_vsock(name)
        notify(f"{name} started under {self.accel.kind.upper()}")
        return self._wait_agent(name, t0, notify) if wait else None

    def _route_vsock(self, name: str) -> None:
        """Tell the link which CID libvirt gave the guest (vsock transports only)."""
        cid = domains.vsock_cid(self.conn, name)
        if self.cids is not None:
            self.cids.set(name, cid)
        else:
            self.link.add_guest(name, cid)
        self.store.event(name, "vsock-cid", str(cid))

    def _wait_agent(self, name: str, t0: float, notify: Notify, fresh: bool = True) -> float:
        """Wait for a heartbeat (one sent after t0 when the guest was just booted)."""
        try:
            self.link.wait_for_heartbeat(name, timeout=self.config.agent_timeout_s,
                                         after=t0 if fresh else None)
        except AgentTimeout:
            raise AgentTimeout(
                f"agent in {name!r} sent no heartbeat within {self.config.agent_timeout_s:.0f} s") from None
        took = time.monotonic() - t0
        notify(f"agent in {name} answered after {took:.1f} s")
        return took

    def _make_overlay(self, image: GuestImage, disk: Path) -> None:
        disk.unlink(missing_ok=True)
        proc = subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2",
                               "-b", str(image.disk), str(disk)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise NeuraError(f"cannot create the guest disk {disk}: {proc.stderr.strip()}")

    def _is_running(self, name: str) -> bool:
        try:
            return domains.info(self.conn, name).state == "running"
        except GuestNotFound:
            return False

    def down(self, name: str, purge: bool = True) -> None:
        """Shut the guest down, undefine it, drop its link; purge its disk too."""
        with self._lock:
            self._expected_stop.add(name)
        domains.stop(self.conn, name)
        domains.undefine(self.conn, name)
        self.link.remove_guest(name)
        if self.cids is not None:
            self.cids.drop(name)
        if purge:
            for f in ("disk.qcow2", "console.log"):
                (self.config.guests_dir / name / f).unlink(missing_ok=True)
            self.store.drop_guest(name)
        self.store.event(name, "down", "purged" if purge else "")

    def reattach(self) -> list[str]:
        """After a controller restart: give every running NeuraOS guest its link back."""
        names = []
        for rec in self.store.guests():
            if self._is_running(rec.name):
                if self.transport.kind != "vsock":
                    self.link.add_guest(rec.name)
                if self.transport.kind != "unix-forward":
                    self._route_vsock(rec.name)
                names.append(rec.name)
        return names

    # -- live resizing ---------------------------------------------------------------

    def cpu_view(self, name: str) -> CpuView:
        d = domains.info(self.conn, name)
        st = self.link.state(name) if name in self.link.guests() else None
        online = st.status.cpus_online if st and st.status else None
        return CpuView(plugged=d.vcpus, online=online)

    def set_vcpus(self, name: str, count: int, timeout: float = 30.0) -> CpuView:
        """Bring the guest to `count` online vCPUs, within its policy.

        Up: QEMU hot-plugs (setVcpusFlags LIVE) and the guest's udev rule or the agent
        onlines them. Down: the agent offlines CPUs inside the guest; QEMU is not asked
        to unplug, since under TCG it may never report the vCPU gone and libvirt's
        count goes stale. Falls back to qemu-guest-agent when the link is down.
        """
        pol = domains.policy(self.conn, name)
        d = domains.info(self.conn, name)
        if not pol.min_vcpus <= count <= min(pol.max_vcpus, d.max_vcpus):
            raise NeuraError(f"{count} vCPUs is outside {name}'s policy "
                             f"[{pol.min_vcpus}, {min(pol.max_vcpus, d.max_vcpus)}]",
                             "change it with `neuraos policy`")
        if count > d.vcpus:
            domains.plug_vcpus(self.conn, name, count)
        try:
            self.link.set_online_cpus(name, count, timeout=timeout)
        except LinkError as e:
            log.warning("agent in %s could not set %d CPUs online (%s); using qemu-guest-agent",
                        name, count, e)
            domains.guest_set_vcpus(self.conn, name, count)
        self.store.set_desired(name, vcpus=count)
        self.store.event(name, "vcpus", str(count))
        return self.cpu_view(name)

    def set_memory(self, name: str, mib: int) -> None:
        pol = domains.policy(self.conn, name)
        d = domains.info(self.conn, name)
        hi = min(pol.max_memory_mib, d.max_memory_mib)
        if not pol.min_memory_mib <= mib <= hi:
            raise NeuraError(f"{mib} MiB is outside {name}'s policy [{pol.min_memory_mib}, {hi}] MiB")
        domains.set_balloon(self.conn, name, mib)
        self.store.set_desired(name, memory_mib=mib)
        self.store.event(name, "balloon", f"{mib} MiB")

    def set_cpu_quota(self, name: str, quota_frac: float | None) -> None:
        """Cap each vCPU at `quota_frac` of a host CPU (None: no cap)."""
        if quota_frac is not None and not 0.01 <= quota_frac <= 1.0:
            raise NeuraError(f"CPU quota {quota_frac} must be within [0.01, 1.0] of a CPU, or none")
        period = 100_000
        domains.set_cpu_quota(self.conn, name, None if quota_frac is None else round(quota_frac * period), period)
        self.store.event(name, "cpu-quota", "none" if quota_frac is None else f"{quota_frac:.2f}")

    # -- events ----------------------------------------------------------------------

    def _on_lifecycle(self, ev: LifecycleEvent) -> None:
        if self.store.guest(ev.domain) is None:
            return
        self.store.lifecycle(ev.domain, ev.event)
        self.store.event(ev.domain, f"libvirt-{ev.event}", ev.detail)
        with self._lock:
            expected = ev.domain in self._expected_stop
        if ev.event in ("stopped", "undefined") and not expected:
            log.warning("guest %s %s outside NeuraOS (%s)", ev.domain, ev.event, ev.detail)
            self.vanished.append(ev.domain)
            self.store.event(ev.domain, "vanished", f"{ev.event}/{ev.detail}")

    def _on_link_event(self, ev: LinkEvent) -> None:
        if self.store.guest(ev.guest) is None:
            return
        if ev.kind == "heartbeat":
            self.store.heartbeat(ev.guest, ev.state.last_heartbeat_unix or time.time())
        elif ev.kind == "status" and ev.state.status is not None:
            self.store.status(ev.guest, dataclasses.asdict(ev.state.status))
        elif ev.kind in ("connected", "disconnected", "refused"):
            self.store.event(ev.guest, f"link-{ev.kind}", ev.detail)


def require_running(c: Controller, name: str) -> None:
    try:
        if domains.info(c.conn, name).state != "running":
            raise GuestVanished(f"guest {name!r} is not running")
    except GuestNotFound:
        raise GuestVanished(f"guest {name!r} vanished") from None
