"""Behavioural zero trust without a guest: event parsing, syscall mapping, the monitor's
learn-then-judge loop on real model scores, and alerts and actions over a real link."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from hypervisor.link._gen import link_pb2
from hypervisor.link.server import LinkServer
from hypervisor.security.actions import ActionPump, release
from hypervisor.security.alerts import AlertStore
from neuraos_agent.monitor.collector import (
    BoundedEvents, CollectorStats, Connected, Exec, Exited, Opened, Sent, Syscall, parse_line,
)
from neuraos_agent.monitor.engine import Monitor, MonitorConfig
from neuraos_agent.monitor.identity import unit_of
from neuraos_agent.monitor.syscalls import X86_64, model_name
from neuraos_agent.monitor.service import alert_message
from tests.unit.conftest import wait_until

MODEL = Path(__file__).resolve().parents[2] / "models" / "syscall" / "weights.npz"


def test_lines_parse_into_events_and_garbage_does_not() -> None:
    assert parse_line(b"S 10 11 1000 4242 257 my prog\n") == Syscall(10, 11, 1000, 4242, 257, "my prog")
    assert parse_line(b"O 10 /etc/pass wd") == Opened(10, "/etc/pass wd")
    assert parse_line(b"C 10 4 10.0.0.2 8080") == Connected(10, "10.0.0.2:8080")
    assert parse_line(b"C 10 6 ::1 22") == Connected(10, "[::1]:22")
    assert parse_line(b"B 10 4096") == Sent(10, 4096)
    assert parse_line(b"E 10 /usr/bin/gcc") == Exec(10, "/usr/bin/gcc")
    assert parse_line(b"X 10") == Exited(10)
    rng = random.Random(0)
    for _ in range(2000):  # malformed input: never an exception
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        parse_line(rng.choice([b"S ", b"C ", b"B ", b"X ", b""]) + junk)
    assert parse_line(b"S 1 2 x 4 5 c") is None and parse_line(b"Attaching 7 probes...") is None
    # a line a process forged with a newline in its comm or a path lacks the nonce
    assert parse_line(b"ab12 X 10", b"ab12") == Exited(10) and parse_line(b"X 10", b"ab12") is None


def test_bounded_queue_drops_and_counts() -> None:
    stats = CollectorStats()
    q = BoundedEvents(10, stats)
    q.put_many([Exited(i) for i in range(7)], 0.0)
    q.put_many([Exited(i) for i in range(7)], 0.0)
    assert len(q) == 10 and stats.dropped == 4 and stats.events == 10
    assert len(q.drain(0.0)) == 10 and len(q) == 0


def test_x86_64_calls_map_to_the_i386_vocabulary() -> None:
    assert X86_64[257] == "openat" and model_name(257) == "open"
    assert model_name(42) == "socketcall" and model_name(44) == "socketcall"  # connect, sendto
    assert model_name(102) == "getuid32" and model_name(0) == "read"
    assert model_name(9999) == "sys_9999"
    assert unit_of("/system.slice/nginx.service") == "nginx.service"
    assert unit_of("/user.slice/user-0.slice/session-3.scope") == ""


def _events(tgid: int, names: list[str], comm: str = "svc") -> list:
    nr = {v: k for k, v in X86_64.items()}
    return [(0.0, Syscall(tgid, tgid, 0, 1, nr[n], comm)) for n in names]


LOOP = ["openat", "fstat", "read", "close", "write", "clock_nanosleep"]
EXFIL = ["openat", "fstat", "getdents64", "openat", "read", "read", "sendto", "close", "lseek"]


def test_learns_a_profile_then_flags_a_process_that_deviates(tmp_path: Path) -> None:
    alerts = []
    m = Monitor(MonitorConfig(state_dir=tmp_path, model_path=MODEL, mode="observe"), on_alert=alerts.append)
    m._sync()  # writes stats; no mode file: observe
    m.process(_events(100, LOOP * 200))  # learning
    key = next(iter(m._baselines))
    b = m._baselines[key]
    assert b.learning and b.windows >= 30 and alerts == []
    m._sync()
    assert m.store.load_draft(key) is not None
    # the operator freezes it (as `neuraos-agent profiles --freeze` does); the monitor picks it up
    d = m.store.current(key)
    d.freeze(0.001)
    m.store.save(d)
    m._sync()
    assert not m._baselines[key].learning
    m.process([(0.0, Exited(100))])
    m.process(_events(101, LOOP * 100))  # the same behaviour: judged, not flagged
    assert alerts == [] and m.stats.judged_windows > 10
    m.process(_events(102, LOOP * 10 + EXFIL * 40))
    assert len(alerts) == 1
    a = alerts[0]
    assert a.pid == 102 and a.mode == "observe" and not a.contained and "novelty" in a.reason
    assert a.novelty > 0.4 and len(a.window) == 32
    msg = alert_message(a)
    assert msg.pid == 102 and list(msg.window) == a.window


def test_a_process_opening_files_in_folders_its_profile_never_used_is_flagged(tmp_path: Path) -> None:
    alerts = []
    m = Monitor(MonitorConfig(state_dir=tmp_path, model_path=MODEL), on_alert=alerts.append)
    learn = _events(200, LOOP * 50)
    learn[5:5] = [(0.0, Opened(200, "/etc/nx.conf")), (0.0, Opened(200, "/proc/200/stat"))]
    m.process(learn)
    key = next(iter(m._baselines))
    m._baselines[key].freeze(0.01)
    m.process(_events(201, LOOP * 2) + [(0.0, Opened(201, "/etc/nx.conf")), (0.0, Opened(201, "/proc/201/stat"))])
    assert alerts == []  # the same folders (the pid is a digit run) and calls
    m.process([(0.0, Opened(201, f"/usr/share/doc/p{i}/copyright")) for i in range(7)])
    assert alerts == []  # 7 new folders: below the bar of 8
    m.process([(0.0, Opened(201, "/var/lib/secret/key"))])
    assert len(alerts) == 1 and "8 folders" in alerts[0].reason and alerts[0].files_total == 10


def test_a_flood_of_short_processes_is_bounded(tmp_path: Path) -> None:
    m = Monitor(MonitorConfig(state_dir=tmp_path, model_path=MODEL, max_processes=64), on_alert=lambda a: None)
    for i in range(1000, 1500):
        m.process(_events(i, ["execve", "brk", "mmap", "exit_group"]) + [(0.0, Exited(i))])
    assert len(m._procs) <= 64 and m.stats.exits == 500


def test_alerts_reach_the_host_store_and_release_goes_back(transport, start_agent, tmp_path: Path) -> None:
    store = AlertStore(tmp_path / "security.db")
    released = []

    class FakeMonitor:  # stands in only for the guest's cgroups; the link and store are real
        def release(self, pid: int) -> str:
            released.append(pid)
            return f"released {pid}"

        def kill(self, pid: int) -> str:
            raise RuntimeError(f"process {pid} is not contained")

    with LinkServer(transport, heartbeat_interval_s=0.05, on_alert=store.record) as link:
        path = link.add_guest("zt")
        agent = start_agent(f"unix:{path}")
        agent.link.runner.monitor = FakeMonitor()
        link.wait_for_heartbeat("zt", timeout=5)
        agent.link.send_alert(link_pb2.AlertReport(id="b-1", pid=77, contained=True, bytes_out=123,
                                                   files=["/etc/shadow"] * 500, comm="x" * 5000))
        wait_until(lambda: store.alerts(), what="the alert stored")
        (rec,) = store.alerts()
        assert rec.guest == "zt" and rec.pid == 77 and rec.state == "contained"
        assert int(rec.report["bytes_out"]) == 123 and len(rec.report["files"]) == 64
        assert len(rec.report["comm"]) == 512
        assert release(link, "zt", 77, timeout=5) == "released 77" and released == [77]
        with ActionPump(link, store, interval_s=0.05):
            seq = store.request("zt", 77, "kill")
            wait_until(lambda: store.action(seq).done, what="the queued kill answered")
        a = store.action(seq)
        assert a.ok is False and "not contained" in a.result
        with pytest.raises(Exception, match="not a process id"):
            release(link, "zt", 0)
    store.close()


def test_the_agent_ships_the_committed_model() -> None:
    shipped = Path(__file__).resolve().parents[2] / "guest-agent" / "neuraos_agent" / "monitor" / "syscall_model.npz"
    assert shipped.read_bytes() == MODEL.read_bytes(), "copy models/syscall/weights.npz into the agent package"
