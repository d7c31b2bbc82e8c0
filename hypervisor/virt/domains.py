"""Guest lifecycle and live resizing through libvirt-python.

Every call takes the `Connection` and a guest name and turns libvirt's errors
into NeuraOS errors: a guest that is gone raises GuestVanished/GuestNotFound,
never a raw libvirtError.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import libvirt

from hypervisor.errors import GuestNotFound, GuestVanished, NeuraError
from hypervisor.virt.connection import Connection
from hypervisor.virt.templates import METADATA_NS, GuestPolicy

LIVE = libvirt.VIR_DOMAIN_AFFECT_LIVE
STATE_NAMES = {
    libvirt.VIR_DOMAIN_NOSTATE: "nostate",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "blocked",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "shutting-down",
    libvirt.VIR_DOMAIN_SHUTOFF: "shut-off",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended",
}


@dataclass(frozen=True)
class DomainInfo:
    name: str
    state: str
    vcpus: int          # vCPUs QEMU has plugged
    max_vcpus: int
    memory_mib: int     # balloon target
    max_memory_mib: int
    neuraos: bool       # carries NeuraOS metadata
    ssh_port: int | None


def _lookup(c: Connection, name: str) -> libvirt.virDomain:
    try:
        return c.conn.lookupByName(name)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise GuestNotFound(f"no guest named {name!r}") from None
        raise NeuraError(f"libvirt: {e.get_error_message()}") from None


def _vanished(name: str, e: libvirt.libvirtError) -> NeuraError:
    if e.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
        return GuestVanished(f"guest {name!r} vanished: {e.get_error_message()}")
    return NeuraError(f"libvirt on {name!r}: {e.get_error_message()}")


def define(c: Connection, xml: str) -> str:
    try:
        return c.conn.defineXML(xml).name()
    except libvirt.libvirtError as e:
        raise NeuraError(f"libvirt refused the domain: {e.get_error_message()}") from None


def start(c: Connection, name: str) -> None:
    dom = _lookup(c, name)
    if dom.isActive():
        return
    try:
        dom.create()
    except libvirt.libvirtError as e:
        raise NeuraError(f"guest {name!r} failed to start: {e.get_error_message()}",
                         "the QEMU log is in /var/log/libvirt/qemu/") from None


def stop(c: Connection, name: str, timeout: float = 30.0) -> None:
    """ACPI shutdown, then destroy after timeout."""
    try:
        dom = _lookup(c, name)
    except GuestNotFound:
        return
    try:
        if not dom.isActive():
            return
        dom.shutdown()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not dom.isActive():
                return
            time.sleep(0.5)
        dom.destroy()
    except libvirt.libvirtError as e:
        if e.get_error_code() in (libvirt.VIR_ERR_NO_DOMAIN, libvirt.VIR_ERR_OPERATION_INVALID):
            return
        raise _vanished(name, e) from None


def undefine(c: Connection, name: str) -> None:
    try:
        dom = _lookup(c, name)
    except GuestNotFound:
        return
    try:
        if dom.isActive():
            dom.destroy()
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_NO_DOMAIN:
            raise _vanished(name, e) from None


def _metadata(dom: libvirt.virDomain) -> ET.Element | None:
    try:
        raw = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS)
    except libvirt.libvirtError:
        return None
    return ET.fromstring(raw)


def _child(meta: ET.Element | None, tag: str) -> ET.Element | None:
    """libvirt hands the metadata element back without its namespace prefix."""
    if meta is None:
        return None
    found = meta.find(tag)
    return found if found is not None else meta.find(f"{{{METADATA_NS}}}{tag}")


def policy(c: Connection, name: str) -> GuestPolicy:
    """The guest's bounds from its <metadata>, defaults where absent."""
    meta = _metadata(_lookup(c, name))
    el = _child(meta, "policy")
    if el is None:
        return GuestPolicy()
    d = GuestPolicy()
    return GuestPolicy(
        min_vcpus=int(el.get("min-vcpus", d.min_vcpus)),
        max_vcpus=int(el.get("max-vcpus", d.max_vcpus)),
        min_memory_mib=int(el.get("min-memory-mib", d.min_memory_mib)),
        max_memory_mib=int(el.get("max-memory-mib", d.max_memory_mib)),
        priority=int(el.get("priority", d.priority)),
    )


def set_policy(c: Connection, name: str, pol: GuestPolicy) -> None:
    """Rewrite the <policy> in the guest's NeuraOS metadata, live and persistent."""
    dom = _lookup(c, name)
    meta = _metadata(dom)
    if meta is None:
        raise NeuraError(f"guest {name!r} has no NeuraOS metadata", "only guests NeuraOS defined have a policy")
    el = _child(meta, "policy")
    if el is None:
        el = ET.SubElement(meta, "policy")
    el.attrib.clear()
    el.attrib.update({"min-vcpus": str(pol.min_vcpus), "max-vcpus": str(pol.max_vcpus),
                      "min-memory-mib": str(pol.min_memory_mib), "max-memory-mib": str(pol.max_memory_mib),
                      "priority": str(pol.priority)})
    flags = libvirt.VIR_DOMAIN_AFFECT_CONFIG | (LIVE if dom.isActive() else 0)
    try:
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, ET.tostring(meta, encoding="unicode"),
                        "neuraos", METADATA_NS, flags)
    except libvirt.libvirtError as e:
        raise _vanished(name, e) from None


def info(c: Connection, name: str) -> DomainInfo:
    dom = _lookup(c, name)
    try:
        state, max_kib, cur_kib, nvcpu, _cpu = dom.info()
        maxv = dom.maxVcpus() if dom.isActive() else dom.vcpusFlags(libvirt.VIR_DOMAIN_VCPU_MAXIMUM)
    except libvirt.libvirtError as e:
        raise _vanished(name, e) from None
    meta = _metadata(dom)
    ssh_port = None
    ssh = _child(meta, "ssh")
    if ssh is not None and ssh.get("port", "0") != "0":
        ssh_port = int(ssh.get("port"))
    return DomainInfo(name, STATE_NAMES.get(state, str(state)), nvcpu, maxv,
                      cur_kib // 1024, max_kib // 1024, meta is not None, ssh_port)


def list_all(c: Connection) -> list[DomainInfo]:
    out = []
    for dom in c.conn.listAllDomains():
        try:
            out.append(info(c, dom.name()))
        except (GuestNotFound, GuestVanished):
            continue  # went away between listing and asking
    return sorted(out, key=lambda d: d.name)


def plug_vcpus(c: Connection, name: str, count: int) -> None:
    """Hot-plug vCPUs up to `count` (QEMU side). Unplug is done in the guest, see controller."""
    dom = _lookup(c, name)
    try:
        dom.setVcpusFlags(count, LIVE)
    except libvirt.libvirtError as e:
        raise _vanished(name, e) from None


def guest_set_vcpus(c: Connection, name: str, count: int) -> None:
    """Online/offline vCPUs inside the guest through qemu-guest-agent (setvcpus --guest)."""
    dom = _lookup(c, name)
    try:
        dom.setVcpusFlags(count, libvirt.VIR_DOMAIN_VCPU_GUEST)
    except libvirt.libvirtError as e:
        raise _vanished(name, e) from None


def set_balloon(c: Connection, name: str, mib: int) -> None:
    dom = _lookup(c, name)
    try:
        dom.setMemoryFlags(mib * 1024, LIVE)
    except libvirt.libvirtError as e:
        raise _vanished(name, e) from None


def memory_stats(c: Connection, name: str) -> dict[str, int]:
    dom = _lookup(c, name)
    try:
        return dict(dom.memoryStats())
    except libvirt.libvirtError as e:
        raise _vanished(name, e) from None


def set_cpu_quota(c: Connection, name: str, quota_us: int | None, period_us: int = 100_000) -> None:
    """Per-vCPU CFS quota (schedinfo vcpu_quota/vcpu_period); None removes the cap."""
    dom = _lookup(c, name)
    params = {"vcpu_period": period_us, "vcpu_quota": -1 if quota_us is None else int(quota_us)}
    try:
        dom.setSchedulerParametersFlags(params, LIVE)
    except libvirt.libvirtError as e:
        raise _vanished(name, e) from None


def cpu_quota(c: Connection, name: str) -> tuple[int | None, int]:
    dom = _lookup(c, name)
    try:
        p = dom.schedulerParameters()
    except libvirt.libvirtError as e:
        raise _vanished(name, e) from None
    q = int(p.get("vcpu_quota", -1))
    return (None if q < 0 else q), int(p.get("vcpu_period", 100_000))


def vsock_cid(c: Connection, name: str) -> int:
    """The CID libvirt gave the running guest's <vsock> device."""
    dom = _lookup(c, name)
    try:
        root = ET.fromstring(dom.XMLDesc())
    except libvirt.libvirtError as e:
        raise _vanished(name, e) from None
    cid = root.find("devices/vsock/cid")
    if cid is None or not cid.get("address"):
        raise NeuraError(f"guest {name!r} has no vsock CID", "is it running, with a <vsock> device?")
    return int(cid.get("address"))
