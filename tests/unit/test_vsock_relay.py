"""The vsock relay and the guest's bridge carry real gRPC to the right guest's socket.

This host has no vhost-vsock, so the relay's listener is a loopback TCP socket with a
test-chosen CID per connection, and the guest bridge dials loopback TCP: the routing,
refusal and byte-splicing code is the one that runs over vsock.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path

from hypervisor.link.server import LinkServer
from hypervisor.link.vsock_relay import CidTable, VsockRelay, VsockRelayTransport
from neuraos_agent.link import AgentConfig, AgentLink
from neuraos_agent.vsock_bridge import VsockBridge, parse_vsock

from conftest import wait_until


def test_guest_reaches_its_own_socket_through_bridge_and_relay(tmp_path: Path):
    transport = VsockRelayTransport(tmp_path / "link")
    assert transport.guest_link_address == "vsock:2:50051"
    assert "guestfwd" not in transport.qemu_netdev_args("g1", 2222)
    table = CidTable(transport)
    table.set("g1", 7)
    listener = socket.create_server(("127.0.0.1", 0))
    cids = iter([7, 99])  # first connection is guest g1, the second an unknown CID
    with LinkServer(transport, heartbeat_interval_s=0.05) as link:
        link.add_guest("g1")
        with VsockRelay(listener, table.route, cid_of=lambda _peer: next(cids)) as relay:
            bridge = VsockBridge(*listener.getsockname(), family=socket.AF_INET)
            agent = AgentLink(AgentConfig(address=bridge.address, heartbeat_s=0.05, report_s=0.2))
            import threading
            t = threading.Thread(target=agent.run, daemon=True)
            t.start()
            try:
                wait_until(lambda: link.state("g1").heartbeats >= 3, 10, what="heartbeats over the relay")
                stranger = socket.create_connection(listener.getsockname(), timeout=5)
                assert stranger.recv(1) == b""  # closed at once: CID 99 is nobody
                wait_until(lambda: relay.refused == 1, 5, what="the refusal counted")
                beats = link.state("g1").heartbeats
                wait_until(lambda: link.state("g1").heartbeats > beats, 5, what="g1 still served")
            finally:
                agent.stop()
                t.join(timeout=5)
                bridge.close()


def test_cid_table_rejects_reserved_cids_and_moves_guests(tmp_path: Path):
    table = CidTable(VsockRelayTransport(tmp_path))
    table.set("g1", 3)
    table.set("g1", 5)  # libvirt gave it a new CID after a restart
    assert table.route(3) is None and table.route(5).name == "g1.sock"
    import pytest

    from hypervisor.errors import LinkError
    with pytest.raises(LinkError, match="reserved"):
        table.set("g2", 2)


def test_parse_vsock_address():
    assert parse_vsock("vsock:2:50051") == (2, 50051)
    assert parse_vsock("10.0.2.100:50051") is None


def test_agent_takes_the_link_address_from_the_kernel_command_line(tmp_path: Path, monkeypatch):
    from neuraos_agent.link import DEFAULT_LINK, default_link_address

    cmdline = tmp_path / "cmdline"
    cmdline.write_text("root=/dev/vda quiet neuraos.link=vsock:2:50051\n")
    monkeypatch.setenv("NEURAOS_LINK", "10.0.2.100:50051")
    assert default_link_address(cmdline) == "vsock:2:50051"
    cmdline.write_text("root=/dev/vda quiet\n")
    assert default_link_address(cmdline) == "10.0.2.100:50051"
    monkeypatch.delenv("NEURAOS_LINK")
    assert default_link_address(tmp_path / "absent") == DEFAULT_LINK
