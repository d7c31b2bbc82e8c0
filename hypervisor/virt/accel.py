"""Choose KVM or TCG, and say why.

`/dev/kvm` existing is not enough: a PVM host (module `kvm_pvm`, a paravirtual KVM
for running inside another VM) exposes /dev/kvm but cannot run a stock Debian guest
kernel (QEMU aborts on MSR 0x10a, or the kernel hangs in its decompressor). Such a
host, and one whose KVM cannot create a VM, gets TCG.
"""

from __future__ import annotations

import fcntl
import grp
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from hypervisor.errors import AccelError

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_API_VERSION = 12


@dataclass(frozen=True)
class Accel:
    kind: str  # "kvm" | "tcg"
    reason: str

    @property
    def domain_type(self) -> str:
        """libvirt's <domain type=…>: "qemu" is TCG."""
        return "kvm" if self.kind == "kvm" else "qemu"


def fix_kvm_node(dev: Path = Path("/dev/kvm")) -> bool:
    """Give /dev/kvm the group and mode udev would (root:kvm 0660); True when changed."""
    try:
        st = dev.stat()
        gid = grp.getgrnam("kvm").gr_gid
    except (OSError, KeyError):
        return False
    changed = False
    if st.st_gid != gid:
        os.chown(dev, -1, gid)
        changed = True
    if stat.S_IMODE(st.st_mode) & 0o660 != 0o660:
        os.chmod(dev, stat.S_IMODE(st.st_mode) | 0o660)
        changed = True
    return changed


def _kvm_can_create_vm(dev: Path) -> str | None:
    """None when KVM answers and creates a VM, else why not."""
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        return f"cannot open {dev}: {e.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
        if version != KVM_API_VERSION:
            return f"{dev} speaks KVM API {version}, not {KVM_API_VERSION}"
        vm = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        os.close(vm)
    except OSError as e:
        return f"KVM_CREATE_VM failed: {e.strerror}"
    finally:
        os.close(fd)
    return None


def detect_accel(
    requested: str = "auto",
    dev: Path = Path("/dev/kvm"),
    sys_module: Path = Path("/sys/module"),
) -> Accel:
    """Pick the accelerator for new guests. `requested` is "auto", "kvm" or "tcg"."""
    if requested == "tcg":
        return Accel("tcg", "TCG requested in the configuration")
    why_not = None
    if dev.exists() and os.geteuid() == 0:
        fix_kvm_node(dev)
    if not dev.exists():
        why_not = f"{dev} does not exist (no KVM module, or nested virtualisation is off)"
    elif (sys_module / "kvm_pvm").exists():
        why_not = ("/dev/kvm is PVM (module kvm_pvm), which cannot run a stock Debian guest "
                   "kernel; using TCG")
    else:
        why_not = _kvm_can_create_vm(dev)
    if why_not is None:
        return Accel("kvm", f"{dev} creates VMs (KVM API {KVM_API_VERSION})")
    if requested == "kvm":
        raise AccelError(f"KVM requested but unusable: {why_not}")
    return Accel("tcg", why_not)
