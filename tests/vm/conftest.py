"""One real guest for all VM tests: libvirtd, QEMU (TCG here), the image, the agent, the link.

The controller runs in the test process with its real collaborators, so tests can
both drive its API and look inside the guest over ssh (testinfra) on 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from hypervisor.config import Config, GuestDefaults
from hypervisor.controller import Controller
from hypervisor.inference.host import ModelHost, ModelHostConfig
from hypervisor.link.server import LinkServer
from hypervisor.link.transport import UnixForwardTransport
from hypervisor.state import Store
from hypervisor.virt import domains
from hypervisor.virt.accel import Accel, detect_accel
from hypervisor.virt.connection import Connection
from hypervisor.virt.daemons import ensure_daemons, ensure_qemu_conf, restart_libvirtd
from hypervisor.virt.image import GuestImage, ensure_image

REPO = Path(__file__).resolve().parents[2]
# Concurrent runs on one host (several checkouts) each name their own guest.
GUEST = os.environ.get("NEURAOS_TEST_GUEST", "neura-test")


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/vm/" in str(item.fspath):
            item.add_marker(pytest.mark.vm)


@dataclass
class Host:
    config: Config
    conn: Connection
    store: Store
    transport: UnixForwardTransport
    link: LinkServer
    controller: Controller
    accel: Accel
    models: ModelHost
    image: GuestImage
    name: str
    ssh_port: int
    boot_to_agent_s: float

    def restart_controller(self) -> None:
        """Stop the link server and controller and start fresh ones, as a process restart would."""
        self.controller.close()
        self.link.stop()
        self.link = LinkServer(self.transport, heartbeat_interval_s=self.config.heartbeat_s,
                               services=self.models.service.handlers)
        self.link.start()
        self.controller = Controller(self.config, self.conn, self.link, self.store, self.transport, self.accel)
        self.controller.reattach()


def _work_dir() -> Path:
    # QEMU runs as libvirt-qemu: the disk and socket dirs must be traversable by it,
    # which pytest's 0700 tmp dirs are not.
    d = Path(f"/var/tmp/neuraos-test-{os.getpid()}")
    d.mkdir(mode=0o755, parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="session")
def host():
    if os.geteuid() != 0:
        pytest.skip("VM tests need root (libvirt qemu:///system)")
    if ensure_qemu_conf():
        ensure_daemons()
        restart_libvirtd()
    ensure_daemons()
    accel = detect_accel("auto")
    image = ensure_image(REPO)
    work = _work_dir()
    cfg = Config(state_dir=work / "state", run_dir=work / "run", agent_timeout_s=240.0,
                 heartbeat_s=1.0, guest=replace(GuestDefaults(), vcpus=1, max_vcpus=3, memory_mib=768,
                                                max_memory_mib=1024))
    for d in (cfg.state_dir, cfg.run_dir, cfg.guests_dir):
        d.mkdir(mode=0o755, parents=True, exist_ok=True)
    conn = Connection(cfg.uri)
    conn.open()
    store = Store(cfg.store_path)
    transport = UnixForwardTransport(cfg.run_dir / "link")
    models = ModelHost(ModelHostConfig(kv_nvme_dir=work / "kv", kv_nvme_mib=256))
    link = LinkServer(transport, heartbeat_interval_s=1.0, services=models.service.handlers)
    link.start()
    ctl = Controller(cfg, conn, link, store, transport, accel)
    domains.undefine(conn, GUEST)  # leftovers of an interrupted earlier run
    boot = ctl.up(GUEST, image)
    rec = store.guest(GUEST)
    h = Host(cfg, conn, store, transport, link, ctl, accel, models, image, GUEST, rec.spec["ssh_port"], boot)
    print(f"\n[vm] {accel.kind}: {accel.reason}; image {image.key[:12]}; boot-to-agent {boot:.1f} s")
    yield h
    try:
        h.controller.down(GUEST)
    finally:
        h.link.stop()
        models.close()
        store.close()
        conn.close()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def guest(host: Host):
    """testinfra host for the guest over ssh on 127.0.0.1 (ready once sshd answers)."""
    import testinfra

    g = testinfra.get_host(
        f"ssh://root@127.0.0.1:{host.ssh_port}",
        ssh_identity_file=str(host.image.ssh_key),
        ssh_extra_args="-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "
                       "-o ConnectTimeout=10 -o LogLevel=ERROR",
    )
    deadline = time.monotonic() + 120
    while True:
        try:
            if g.run("true").rc == 0:
                return g
        except Exception:
            pass
        if time.monotonic() > deadline:
            pytest.fail("sshd in the guest did not answer within 120 s")
        time.sleep(2)


def wait_until(fn, timeout: float = 60.0, interval: float = 1.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")
