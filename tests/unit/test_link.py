"""The host–guest link end to end: real gRPC over real unix sockets, real agents in threads."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import HEARTBEAT_S, wait_until

from hypervisor.errors import AgentTimeout, LinkError
from hypervisor.link._gen import link_pb2, link_pb2_grpc
from hypervisor.link.server import SERVICE, LinkServer
from hypervisor.link.transport import (
    Listener,
    UnixForwardTransport,
    VsockTransport,
    check_guest_name,
    detect_transport,
    grpc_supports_vsock,
)

BOOT_ID = Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def raw_channel(path: Path) -> grpc.Channel:
    """A client that is not our agent: no size limits of its own, nothing the server can trust."""
    return grpc.insecure_channel(f"unix:{path}", options=[("grpc.max_send_message_length", -1)])


def fake_sysfs(root: Path, present: int) -> Path:
    cpus = root / "devices" / "system" / "cpu"
    cpus.mkdir(parents=True)
    (cpus / "present").write_text(f"0-{present - 1}\n")
    (cpus / "online").write_text(f"0-{present - 1}\n")
    (cpus / "cpu0").mkdir()  # cpu0: no online file, as on most x86 guests
    for n in range(1, present):
        (cpus / f"cpu{n}").mkdir()
        (cpus / f"cpu{n}" / "online").write_text("1\n")
    return root


def online_files(root: Path) -> dict[int, str]:
    cpus = root / "devices" / "system" / "cpu"
    return {int(p.parent.name[3:]): p.read_text().strip() for p in sorted(cpus.glob("cpu*/online"))}


# -- transport ----------------------------------------------------------------------------


def test_qemu_netdev_arg_is_one_argv_element(tmp_path: Path) -> None:
    t = UnixForwardTransport(tmp_path, socat="/usr/bin/socat")
    assert t.server_address("web-1") == f"unix:{tmp_path}/web-1.sock"
    assert t.qemu_netdev_args("web-1", 2222) == (
        "user,id=neura0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22,"
        f"guestfwd=tcp:10.0.2.100:50051-cmd:/usr/bin/socat - UNIX-CONNECT:{tmp_path}/web-1.sock"
    )
    assert "hostfwd" not in t.qemu_netdev_args("web-1", None)
    assert t.guest_link_address == "10.0.2.100:50051"


@pytest.mark.parametrize("name", ["", "Web", "-a", "a_b", "a,b", "a b", "../etc", "a/b", "a:b", "x" * 42, "é"])
def test_guest_names_that_could_inject_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(LinkError):
        check_guest_name(name)
    with pytest.raises(LinkError):
        UnixForwardTransport(tmp_path).qemu_netdev_args(name, 22)


def test_unsafe_socket_dirs_and_ports_are_refused(tmp_path: Path) -> None:
    for bad in ("/tmp/a,b", "/tmp/a b", "/tmp/a:b"):
        with pytest.raises(LinkError):
            UnixForwardTransport(Path(bad))
    with pytest.raises(LinkError):
        UnixForwardTransport(tmp_path / ("d" * 100)).socket_path("g")  # over sun_path's 108 bytes
    with pytest.raises(LinkError):
        UnixForwardTransport(tmp_path).qemu_netdev_args("g", 70000)


def test_vsock_transport_names_guests_by_peer_cid() -> None:
    t = VsockTransport()
    assert t.server_address("g") == "vsock:-1:50051"
    assert t.listener("g") == Listener(address="vsock:-1:50051", guest=None)
    assert t.guest_link_address == "vsock:2:50051"
    cids = {3: "alpha", 4: "beta"}
    assert t.guest_for_peer("vsock:4:1025", cids) == "beta"
    assert t.guest_for_peer("vsock:9:1025", cids) is None
    assert t.guest_for_peer("unix:/x.sock", cids) is None
    assert t.guest_for_peer("ipv4:127.0.0.1:3", cids) is None
    assert t.qemu_netdev_args("g", 2200) == "user,id=neura0,restrict=on,hostfwd=tcp:127.0.0.1:2200-:22"


def test_detect_transport_prefers_vsock_only_where_present(tmp_path: Path) -> None:
    device = tmp_path / "vhost-vsock"
    choice = detect_transport(tmp_path / "s", vhost_vsock=device, vsock_probe=lambda: True)
    assert isinstance(choice.transport, UnixForwardTransport)
    assert choice.reason.startswith(f"no {device}")
    with pytest.raises(LinkError):
        detect_transport(tmp_path / "s", prefer="vsock", vhost_vsock=device, vsock_probe=lambda: True)
    device.touch()
    choice = detect_transport(tmp_path / "s", vhost_vsock=device, vsock_probe=lambda: True)
    assert isinstance(choice.transport, VsockTransport) and "vsock" in choice.reason
    forced = detect_transport(tmp_path / "s", prefer="unix-forward", vhost_vsock=device, vsock_probe=lambda: True)
    assert isinstance(forced.transport, UnixForwardTransport) and forced.reason.startswith("requested")


def test_detect_transport_relays_vsock_when_grpc_lacks_it(tmp_path: Path) -> None:
    device = tmp_path / "vhost-vsock"
    device.touch()
    choice = detect_transport(tmp_path / "s", vhost_vsock=device, vsock_probe=lambda: False)
    assert choice.transport.kind == "vsock-relay" and "relay" in choice.reason
    assert choice.transport.guest_link_address == "vsock:2:50051"
    forced = detect_transport(tmp_path / "s", prefer="vsock", vhost_vsock=device, vsock_probe=lambda: False)
    assert forced.transport.kind == "vsock-relay"
    assert grpc_supports_vsock() in (True, False)  # the real probe answers without raising


def test_socket_is_handed_to_the_qemu_user(tmp_path: Path) -> None:
    me = os.getuid()
    import grp
    import pwd

    user, group = pwd.getpwuid(me).pw_name, grp.getgrgid(os.getgid()).gr_name
    t = UnixForwardTransport(tmp_path / "link", qemu_user=user, qemu_group=group)
    with LinkServer(t) as link:
        path = link.add_guest("g1")
        assert path is not None and path.is_socket()
        st = path.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (me, os.getgid(), 0o660)
        assert (tmp_path / "link").stat().st_mode & 0o777 == 0o711
    assert not path.exists()


def test_stale_socket_is_replaced_but_other_files_are_not(transport: UnixForwardTransport, server: LinkServer) -> None:
    transport.socket_dir.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(transport.socket_path("old")))
    stale.close()  # a crashed controller leaves its socket file behind
    assert server.add_guest("old") == transport.socket_path("old")
    transport.socket_path("file").write_text("not a socket")
    with pytest.raises(LinkError):
        server.add_guest("file")


# -- the honest path ----------------------------------------------------------------------


def test_register_heartbeat_and_status_arrive(server: LinkServer, start_agent, events) -> None:
    path = server.add_guest("web-1")
    assert server.guests() == ["web-1"]
    agent = start_agent(f"unix:{path}", claimed_guest="web-1")
    state = server.wait_for_heartbeat("web-1", timeout=5)
    assert state.connected and state.registrations == 1
    assert state.agent_version == "0.1.0" and state.boot_id == BOOT_ID
    assert agent.link.stats.guest == "web-1"
    wait_until(lambda: server.state("web-1").status is not None, what="a status report")
    status = server.state("web-1").status
    assert status.boot_id == BOOT_ID and status.cpus_present >= status.cpus_online >= 1
    assert status.mem_total_kib >= status.mem_available_kib > 0 and status.kernel.startswith("Linux")
    before = server.state("web-1").heartbeats
    wait_until(lambda: server.state("web-1").heartbeats >= before + 3, what="more heartbeats")
    kinds = {e.kind for e in events}
    assert {"connected", "heartbeat", "status"} <= kinds
    assert all(e.guest == "web-1" for e in events)


def test_wait_for_heartbeat_times_out_without_an_agent(server: LinkServer) -> None:
    server.add_guest("quiet")
    t0 = time.monotonic()
    with pytest.raises(AgentTimeout):
        server.wait_for_heartbeat("quiet", timeout=0.2)
    assert time.monotonic() - t0 < 1
    with pytest.raises(LinkError):
        server.wait_for_heartbeat("nobody", timeout=0.1)


def test_set_online_cpus_round_trip(server: LinkServer, start_agent, tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path / "sys", present=4)
    path = server.add_guest("cpu-guest")
    start_agent(f"unix:{path}", sysfs=sysfs)
    server.wait_for_heartbeat("cpu-guest", timeout=5)
    assert server.set_online_cpus("cpu-guest", 2, timeout=5) == 2
    assert online_files(sysfs) == {1: "1", 2: "0", 3: "0"}
    assert server.set_online_cpus("cpu-guest", 4, timeout=5) == 4
    assert online_files(sysfs) == {1: "1", 2: "1", 3: "1"}
    with pytest.raises(LinkError, match="only 4 are present"):
        server.set_online_cpus("cpu-guest", 9, timeout=5)
    result = server.ping("cpu-guest", "echo", timeout=5)
    assert result.ok and result.output == "echo"


def test_command_not_taken_in_time_is_dropped_not_delivered_later(server: LinkServer, start_agent) -> None:
    path = server.add_guest("late")
    t0 = time.monotonic()
    with pytest.raises(LinkError, match="did not complete"):
        server.ping("late", "first", timeout=0.2)
    assert time.monotonic() - t0 < 1
    agent = start_agent(f"unix:{path}")
    assert server.ping("late", "second", timeout=5).output == "second"
    assert agent.link.stats.commands == 1  # the timed-out ping never ran


def test_server_restart_on_same_socket_agent_reconnects(transport: UnixForwardTransport, start_agent) -> None:
    first = LinkServer(transport, heartbeat_interval_s=HEARTBEAT_S).__enter__()
    path = first.add_guest("phoenix")
    agent = start_agent(f"unix:{path}")
    first.wait_for_heartbeat("phoenix", timeout=5)
    t0 = time.monotonic()
    first.stop()  # the agent's Commands stream is open: it must not hold the stop up
    assert time.monotonic() - t0 < 2
    with LinkServer(transport, heartbeat_interval_s=HEARTBEAT_S) as second:
        assert second.add_guest("phoenix") == path
        state = second.wait_for_heartbeat("phoenix", timeout=5)
        assert state.registrations == 1 and state.connected
        assert agent.link.stats.registrations == 2
        assert second.ping("phoenix", "back", timeout=5).output == "back"
        # and the same again by dropping and re-adding just this guest
        second.remove_guest("phoenix")
        assert not path.exists()
        second.add_guest("phoenix")
        wait_until(lambda: agent.link.stats.registrations == 3, what="a third registration")
        second.wait_for_heartbeat("phoenix", timeout=5)


def test_agent_restart_is_a_new_registration(server: LinkServer, start_agent, events) -> None:
    path = server.add_guest("again")
    first = start_agent(f"unix:{path}")
    server.wait_for_heartbeat("again", timeout=5)
    first.stop()
    wait_until(lambda: not server.state("again").connected, what="the disconnect")
    assert "disconnected" in [e.kind for e in events]
    start_agent(f"unix:{path}")
    server.wait_for_heartbeat("again", timeout=5, after=time.monotonic())
    state = server.state("again")
    assert state.registrations == 2 and state.connected and state.refused == 0


def test_stop_releases_waiting_commands(transport: UnixForwardTransport) -> None:
    link = LinkServer(transport).__enter__()
    link.add_guest("gone")
    errors: list[Exception] = []

    def ask() -> None:
        try:
            link.ping("gone", timeout=30)
        except LinkError as exc:
            errors.append(exc)

    asker = threading.Thread(target=ask)
    asker.start()
    time.sleep(0.1)
    link.stop()
    asker.join(timeout=2)
    assert not asker.is_alive() and "abandoned" in str(errors[0])
    with pytest.raises(LinkError):
        link.add_guest("late")


def test_a_failing_event_hook_does_not_break_the_link(transport: UnixForwardTransport, start_agent) -> None:
    def hook(event: object) -> None:
        raise RuntimeError("store is down")

    with LinkServer(transport, heartbeat_interval_s=HEARTBEAT_S, on_event=hook) as link:
        path = link.add_guest("hooked")
        start_agent(f"unix:{path}")
        link.wait_for_heartbeat("hooked", timeout=5)
        assert link.ping("hooked", timeout=5).ok


# -- hostile peers ------------------------------------------------------------------------


@pytest.fixture
def honest(server: LinkServer, start_agent):
    """An honest guest whose heartbeats must keep arriving while someone attacks the link."""
    path = server.add_guest("honest")
    agent = start_agent(f"unix:{path}", claimed_guest="honest")
    server.wait_for_heartbeat("honest", timeout=5)
    return path, agent


def assert_still_served(server: LinkServer, name: str = "honest") -> None:
    server.wait_for_heartbeat(name, timeout=3, after=time.monotonic())
    assert server.ping(name, "still here", timeout=3).output == "still here"


def test_raw_random_bytes_on_the_socket(server: LinkServer, honest) -> None:
    path, _ = honest
    for payload in (os.urandom(65536), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + os.urandom(4096), b"\x00" * 9):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(path))
            try:
                s.sendall(payload)
                s.recv(1024)
            except OSError:
                pass  # the server may hang up on us mid-write: that is the point
    assert_still_served(server)


def test_oversized_message_is_refused(server: LinkServer, honest) -> None:
    path, _ = honest
    with raw_channel(path) as channel:
        report = channel.unary_unary(f"/{SERVICE}/Report")  # raw bytes in and out
        with pytest.raises(grpc.RpcError) as caught:
            report(os.urandom(1024 * 1024), timeout=5)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_still_served(server)


def test_undecodable_message_is_refused_and_counted(server: LinkServer, honest) -> None:
    path, _ = honest
    with raw_channel(path) as channel:
        register = channel.unary_unary(f"/{SERVICE}/Register")
        with pytest.raises(grpc.RpcError) as caught:
            register(b"\xff\xff\xff\xff", timeout=5)  # field 0x1f.. with wire type 7: not protobuf
        assert caught.value.code() != grpc.StatusCode.OK
    state = server.state("honest")
    assert state.refused == 1 and "undecodable Register" in state.last_refusal
    assert_still_served(server)


def test_hello_claiming_another_guest_is_refused(server: LinkServer, honest, start_agent, events) -> None:
    path, _ = honest
    server.add_guest("victim")
    with raw_channel(path) as channel:
        stub = link_pb2_grpc.LinkStub(channel)
        for call in (stub.Register, lambda hello, timeout: next(stub.Commands(hello, timeout=timeout))):
            with pytest.raises(grpc.RpcError) as caught:
                call(link_pb2.Hello(agent_version="evil", claimed_guest="victim"), timeout=5)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    state = server.state("honest")
    assert state.refused == 2 and "victim" in state.last_refusal
    assert state.agent_version == "0.1.0"  # the refused Hello changed nothing
    assert server.state("victim").registrations == 0
    assert [e.guest for e in events if e.kind == "refused"] == ["honest", "honest"]
    # an agent that believes it is someone else never gets registered
    impostor = start_agent(f"unix:{path}", claimed_guest="victim")
    wait_until(lambda: "PERMISSION_DENIED" in impostor.link.stats.last_error, what="the refusal")
    assert impostor.link.stats.registrations == 0
    assert_still_served(server)


def test_calls_before_register_and_foreign_completions_are_refused(server: LinkServer, honest) -> None:
    path, _ = honest
    other = server.add_guest("other")
    with raw_channel(other) as channel:
        stub = link_pb2_grpc.LinkStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Beat(link_pb2.Heartbeat(seq=1), timeout=5)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        stub.Register(link_pb2.Hello(boot_id="b"), timeout=5)
        # "other" cannot answer a command that was sent to "honest"
        assert not stub.Complete(link_pb2.CommandResult(id=1, ok=True), timeout=5).accepted
    assert server.state("other").heartbeats == 0
    assert_still_served(server)


def test_too_many_concurrent_calls_exhaust_only_that_guest(transport: UnixForwardTransport, start_agent) -> None:
    with LinkServer(transport, heartbeat_interval_s=HEARTBEAT_S, max_concurrent_rpcs=4) as link:
        path = link.add_guest("honest")
        start_agent(f"unix:{path}")
        flood = link.add_guest("flood")
        with raw_channel(flood) as channel:
            stub = link_pb2_grpc.LinkStub(channel)
            stub.Register(link_pb2.Hello(), timeout=5)
            streams = [stub.Commands(link_pb2.Hello()) for _ in range(8)]
            # each stream supersedes the last, and calls past the limit are turned away:
            # only one stays open, and the flooding guest ties up only its own server
            wait_until(lambda: sum(s.done() for s in streams) >= 7, what="the excess calls to end")
            codes = {s.code() for s in streams if s.done()}
            assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, codes
            assert_still_served(link)
            for s in streams:
                s.cancel()


# -- the agent as a program ---------------------------------------------------------------


def test_agent_cli_runs_and_stops_cleanly_on_sigterm(server: LinkServer) -> None:
    path = server.add_guest("cli")
    proc = subprocess.Popen(
        [sys.executable, "-m", "neuraos_agent.main", "run", "--link", f"unix:{path}",
         "--heartbeat", "0.05", "--report", "0.1", "--guest", "cli"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        server.wait_for_heartbeat("cli", timeout=10)
        wait_until(lambda: server.state("cli").status is not None, what="a status report")
        assert server.ping("cli", "pong", timeout=5).output == "pong"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "registered with controller" in err and "link stopped" in err
    wait_until(lambda: not server.state("cli").connected, what="the disconnect")


class SharedSocketTransport(UnixForwardTransport):
    """Stands in for vsock here: one listener for all guests, the test says which CID is calling."""

    kind = "shared-test"
    peer_cid: int | None = None

    def listener(self, guest: str) -> Listener:
        check_guest_name(guest)
        path = self.socket_dir / "shared.sock"
        return Listener(address=f"unix:{path}", guest=None, socket_path=path)

    def guest_for_peer(self, peer: str, cid_map) -> str | None:
        return cid_map.get(self.peer_cid)


def test_shared_listener_names_guests_by_peer(tmp_path: Path, start_agent) -> None:
    transport = SharedSocketTransport(tmp_path / "link", qemu_user=None)
    with LinkServer(transport, heartbeat_interval_s=HEARTBEAT_S) as link:
        with pytest.raises(LinkError, match="CID"):
            link.add_guest("no-cid")
        assert link.add_guest("a", cid=3) == link.add_guest("b", cid=4) == transport.socket_dir / "shared.sock"
        transport.peer_cid = 4
        agent = start_agent(f"unix:{transport.socket_dir / 'shared.sock'}")
        link.wait_for_heartbeat("b", timeout=5)
        assert link.ping("b", timeout=5).ok and link.state("a").registrations == 0
        link.remove_guest("a")  # the shared listener stays up for the others
        link.wait_for_heartbeat("b", timeout=5, after=time.monotonic())
        transport.peer_cid = 99  # a CID libvirt never gave to any guest of ours
        wait_until(lambda: "PERMISSION_DENIED" in agent.link.stats.last_error, what="the refusal")
