"""The foundation on a real guest: libvirt, QEMU, the agent, the link, live resizing, faults."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from hypervisor.errors import NeuraError
from hypervisor.virt import domains
from hypervisor.virt.daemons import ensure_daemons

from .conftest import Host, wait_until


def test_guest_is_running_under_the_detected_accelerator(host: Host):
    info = domains.info(host.conn, host.name)
    assert info.state == "running" and info.neuraos
    xml = host.conn.conn.lookupByName(host.name).XMLDesc()
    assert f"type='{host.accel.domain_type}'" in xml.splitlines()[0]
    if host.accel.kind == "tcg":
        assert "<tb-cache unit='KiB'>131072</tb-cache>" in xml


def test_agent_unit_is_active_in_the_guest(guest):
    assert guest.service("neuraos-agent").is_running
    assert guest.service("neuraos-agent").is_enabled


def test_controller_receives_heartbeats_and_status_over_the_link(host: Host):
    st = host.link.wait_for_heartbeat(host.name, timeout=30)
    first = st.heartbeats
    wait_until(lambda: host.link.state(host.name).heartbeats > first, 15, what="another heartbeat")
    st = wait_until(lambda: host.link.state(host.name).status, 30, what="a status report")
    assert st.mem_total_kib > 0 and st.cpus_online >= 1 and st.agent_version
    st = wait_until(lambda: (s := host.link.state(host.name).status) and s.intent and s, 30,
                    what="a status report carrying intent signals")
    assert st.intent["run_queue"] >= 0 and st.intent["jobs_due_s"] >= -1
    rec = host.store.guest(host.name)
    assert rec.heartbeats > 0 and rec.status["mem_total_kib"] == st.mem_total_kib


def test_vcpu_hotplug_up_and_back_down_is_seen_inside(host: Host, guest):
    assert guest.check_output("nproc") == "1"
    view = host.controller.set_vcpus(host.name, 2)
    wait_until(lambda: guest.check_output("nproc") == "2", 60, what="nproc == 2")
    assert view.plugged == 2
    host.controller.set_vcpus(host.name, 1)
    wait_until(lambda: guest.check_output("nproc") == "1", 60, what="nproc == 1")
    view = wait_until(lambda: (v := host.controller.cpu_view(host.name)).online == 1 and v, 30,
                      what="the controller's view of 1 online vCPU")
    assert view.online == 1


def test_vcpus_outside_policy_refused(host: Host):
    with pytest.raises(NeuraError, match="outside"):
        host.controller.set_vcpus(host.name, 9)


def _mem_total_mib(guest) -> int:
    line = next(ln for ln in guest.file("/proc/meminfo").content_string.splitlines() if ln.startswith("MemTotal"))
    return int(line.split()[1]) // 1024


def test_balloon_resize_is_seen_inside(host: Host, guest):
    before = _mem_total_mib(guest)
    target = domains.info(host.conn, host.name).memory_mib - 256
    host.controller.set_memory(host.name, target)
    wait_until(lambda: _mem_total_mib(guest) <= before - 200, 60, what="MemTotal to drop by the balloon")
    host.controller.set_memory(host.name, target + 256)
    wait_until(lambda: _mem_total_mib(guest) >= before - 16, 60, what="MemTotal to come back")


def _run_in_guest(guest, code: str) -> str:
    """Run Python in the guest's agent venv (which has grpc and the link stubs)."""
    out = guest.run("/opt/neuraos-agent/venv/bin/python - <<'PYEOF'\n" + code + "\nPYEOF")
    return out.stdout + out.stderr


def test_hostile_guest_is_refused_and_the_honest_agent_keeps_serving(host: Host, guest):
    refused0 = host.link.state(host.name).refused
    # 1. random bytes at the link address
    _run_in_guest(guest, """
import os, socket
for _ in range(3):
    s = socket.create_connection(("10.0.2.100", 50051), timeout=5)
    s.sendall(os.urandom(65536)); s.close()
""")
    # 2. a message far above the size limit, and 3. another guest's identity
    out = _run_in_guest(guest, """
import grpc
from neuraos_agent._gen import link_pb2, link_pb2_grpc
ch = grpc.insecure_channel("10.0.2.100:50051", options=[("grpc.max_send_message_length", 64 << 20)])
stub = link_pb2_grpc.LinkStub(ch)
try:
    stub.Report(link_pb2.StatusReport(kernel="x" * (8 << 20)), timeout=20)
    print("HUGE accepted")
except grpc.RpcError as e:
    print("HUGE", e.code().name)
try:
    stub.Register(link_pb2.Hello(agent_version="evil", claimed_guest="some-other-guest"), timeout=20)
    print("CLAIM accepted")
except grpc.RpcError as e:
    print("CLAIM", e.code().name)
""")
    assert "HUGE RESOURCE_EXHAUSTED" in out, out
    assert "CLAIM PERMISSION_DENIED" in out, out
    st = wait_until(lambda: (s := host.link.state(host.name)).refused > refused0 and s, 20, what="refusals counted")
    beats = st.heartbeats
    wait_until(lambda: host.link.state(host.name).heartbeats > beats + 1, 20,
               what="honest heartbeats after the attack")


def test_agent_restart_reconnects(host: Host, guest):
    beats = host.link.state(host.name).heartbeats
    guest.run("systemctl restart neuraos-agent")
    wait_until(lambda: host.link.state(host.name).heartbeats > beats + 1, 60, what="heartbeats after agent restart")
    assert guest.service("neuraos-agent").is_running


def test_cli_lists_the_guest_as_json(host: Host, tmp_path):
    cfg = tmp_path / "neuraos.toml"
    cfg.write_text(f'state_dir = "{host.config.state_dir}"\nrun_dir = "{host.config.run_dir}"\n')
    out = subprocess.run([sys.executable, "-m", "hypervisor.cli", "--config", str(cfg), "list", "--json"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows[host.name]["state"] == "running" and rows[host.name]["heartbeats"] > 0


def test_cli_unknown_guest_is_one_line_with_hint(host: Host, tmp_path):
    cfg = tmp_path / "neuraos.toml"
    cfg.write_text(f'state_dir = "{host.config.state_dir}"\n')
    out = subprocess.run([sys.executable, "-m", "hypervisor.cli", "--config", str(cfg), "status", "no-such-guest"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert lines[0].startswith("error: no guest named") and lines[1].startswith("hint:")
    assert "Traceback" not in out.stderr


def test_controller_restart_loses_nothing(host: Host):
    beats_before = host.store.guest(host.name).heartbeats
    host.restart_controller()
    st = host.link.wait_for_heartbeat(host.name, timeout=60, after=time.monotonic())
    assert st.heartbeats >= 1
    wait_until(lambda: host.store.guest(host.name).heartbeats > beats_before, 10,
               what="heartbeats recorded in the store after the restart")
    host.controller.set_vcpus(host.name, 1)  # commands flow on the new link


def test_libvirtd_killed_and_restarted_controller_reconnects(host: Host):
    reconnects = host.conn.reconnects
    pid = int(open("/run/libvirtd.pid").read())
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10, 0.1, what="libvirtd to die")
    with pytest.raises(NeuraError):
        domains.list_all(host.conn)
    ensure_daemons()
    wait_until(lambda: host.conn.reconnects > reconnects, 60, 0.5, what="the controller to reconnect")
    names = {d.name: d.state for d in domains.list_all(host.conn)}
    assert names.get(host.name) == "running"
    host.controller.set_memory(host.name, domains.info(host.conn, host.name).memory_mib)  # calls work again


def test_guest_destroyed_behind_the_controllers_back_is_reported(host: Host):
    name = "neura-victim"
    host.controller.up(name, host.image, wait=False)
    try:
        wait_until(lambda: domains.info(host.conn, name).state == "running", 30, what="victim running")
        subprocess.run(["virsh", "-c", host.config.uri, "destroy", name], check=True, capture_output=True)
        wait_until(lambda: name in host.controller.vanished, 20, 0.2, what="the vanish to be noticed")
        kinds = [e.kind for e in host.store.events(name)]
        assert "vanished" in kinds
        with pytest.raises(NeuraError):
            host.controller.set_vcpus(name, 2)
        beats = host.link.state(host.name).heartbeats
        wait_until(lambda: host.link.state(host.name).heartbeats > beats, 20, what="the other guest still served")
    finally:
        host.controller.down(name)
