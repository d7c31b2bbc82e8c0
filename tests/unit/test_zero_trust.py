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
    SCRIPT, BoundedEvents, Calls, CollectorStats, Connected, Exec, Exited, Opened, Sent, Syscall, parse_line,
)
from neuraos_agent.monitor.engine import Monitor, MonitorConfig
from neuraos_agent.monitor.identity import unit_of
from neuraos_agent.monitor.syscalls import X86_64, model_name
from neuraos_agent.monitor.verdict import Rule, Track, judge
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


def _window_line(tgid: int, uid: int, nrs: list[int], comm: str, nbytes: int = 0) -> bytes:
    """A W line as the kernel side packs it: call i in bits 16*(i%4) of slot i//4."""
    slots = [0] * 8
    for i, nr in enumerate(nrs):
        slots[i // 4] |= nr << (16 * (i % 4))
    return f"W {tgid} {uid} {len(nrs)} {' '.join(map(str, slots))} {nbytes} {comm}".encode()


def test_window_lines_unpack_into_calls_in_order() -> None:
    nrs = [0, 1, 257, 3, 59, 435, 231, 60] * 4
    assert parse_line(_window_line(7, 1000, nrs, "my prog")) == Calls(7, 1000, "my prog", tuple(nrs))
    assert parse_line(_window_line(7, 0, nrs[:5], "sh", 4096)) == Calls(7, 0, "sh", tuple(nrs[:5]), 4096)
    assert parse_line(b"W 7 0 33 0 0 0 0 0 0 0 0 0 sh") is None and parse_line(b"W 7 0 0 0 0 0 0 0 0 0 0 0 sh") is None
    assert parse_line(b"W 7 0 3 1 2") is None
    # the kernel side flushes at 32 calls, at exec and at exit, and forgets a process at exit
    assert SCRIPT.count('printf("W ') == 3 and "$n == 32" in SCRIPT and "delete(@w[pid, 7])" in SCRIPT


def test_windows_of_calls_feed_the_monitor_as_single_syscalls_do(tmp_path: Path) -> None:
    nr = {v: k for k, v in X86_64.items()}
    calls = [nr[n] for n in LOOP * 40]
    singles = Monitor(MonitorConfig(state_dir=tmp_path / "a", model_path=MODEL), on_alert=lambda a: None)
    batched = Monitor(MonitorConfig(state_dir=tmp_path / "b", model_path=MODEL), on_alert=lambda a: None)
    singles.process(_events(5, LOOP * 40) + [(0.0, Exited(5))])
    batched.process([(0.0, Calls(5, 0, "svc", tuple(calls[i:i + 32]))) for i in range(0, len(calls), 32)]
                    + [(0.0, Exited(5))])
    (a,), (b,) = singles._baselines.values(), batched._baselines.values()
    assert a.windows == b.windows == 8  # 7 full windows and the last 16 calls at exit
    assert a.ngrams == b.ngrams and a.calls == b.calls


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


def _opens(tgid: int, folders: int) -> list:
    return [(0.0, Opened(tgid, f"/usr/share/doc/p{i}/copyright")) for i in range(folders)]


def _learned(tmp_path: Path, alerts: list, windows: int = 200, **config) -> tuple[Monitor, object]:
    """A monitor whose one profile (comm svc, uid 0) learned LOOP for `windows` windows, then was frozen."""
    m = Monitor(MonitorConfig(state_dir=tmp_path, model_path=MODEL, **config), on_alert=alerts.append)
    learn = _events(100, LOOP * (windows * 32 // len(LOOP) + 1))
    learn[5:5] = [(0.0, Opened(100, "/etc/nx.conf")), (0.0, Opened(100, "/proc/100/stat")),
                  (0.0, Connected(100, "10.0.0.2:9000"))]
    m.process(learn + [(0.0, Exited(100))])
    key = next(iter(m._baselines))
    return m, key


def test_learns_a_profile_then_flags_a_process_that_deviates_and_reaches_out(tmp_path: Path) -> None:
    alerts = []
    m, key = _learned(tmp_path, alerts, mode="observe")
    m._sync()  # writes stats and the draft; no mode file: observe
    b = m._baselines[key]
    assert b.learning and b.windows >= 200 and alerts == []
    assert m.store.load_draft(key) is not None
    # the operator freezes it (as `neuraos-agent profiles --freeze` does); the monitor picks it up
    d = m.store.current(key)
    d.freeze(0.001)
    m.store.save(d)
    m._sync()
    assert not m._baselines[key].learning
    m.process(_events(101, LOOP * 100) + _opens(101, 2))  # the same behaviour: judged, not flagged
    assert alerts == [] and m.stats.judged_windows > 10
    m.process(_events(102, LOOP * 10 + EXFIL * 40))  # deviates, sustained, but reaches nothing new
    assert alerts == [] and m.stats.behaviour_only == 1
    m.process(_opens(102, 4))  # ... then opens files in 4 never-seen folders: the exfiltration pattern
    assert len(alerts) == 1
    a = alerts[0]
    assert a.pid == 102 and a.mode == "observe" and not a.contained
    assert "novelty" in a.reason and "4 folders" in a.reason and "observe only" not in a.reason
    assert a.novelty > 0.2 and len(a.window) == 32
    msg = alert_message(a)
    assert msg.pid == 102 and list(msg.window) == a.window


def test_new_folders_or_destinations_alone_are_not_flagged(tmp_path: Path) -> None:
    alerts = []
    m, key = _learned(tmp_path, alerts)
    m._baselines[key].freeze(0.01)
    m.process(_events(201, LOOP * 2) + [(0.0, Opened(201, "/etc/nx.conf")), (0.0, Opened(201, "/proc/201/stat"))])
    m.process(_opens(201, 30) + [(0.0, Connected(201, "203.0.113.9:443"))] + _events(201, LOOP * 60))
    assert alerts == [] and m.stats.reach_only == 1  # behaves as learned: reach alone holds no one
    m.process(_events(202, EXFIL * 40) + [(0.0, Connected(202, "10.0.0.2:9000"))])
    assert alerts == []  # deviates, but to the destination its profile always used
    m.process([(0.0, Connected(202, "203.0.113.9:443"))])
    assert len(alerts) == 1 and "destinations its profile never used (203.0.113.9:443)" in alerts[0].reason


def test_one_high_model_window_does_not_contain_but_sustained_and_corroborated_does(tmp_path: Path) -> None:
    """The CI false containment: a python start's first window scored over its bar, novelty 0."""
    from neuraos_agent.monitor.scorer import Threshold

    alerts = []
    m, key = _learned(tmp_path, alerts)
    b = m._baselines[key]
    b.freeze(0.01)
    b.threshold = Threshold(0.01, value=-1.0, n=500)  # every window the model scores is over the bar
    m._budget = 100.0
    m.process(_events(301, LOOP * 6))  # one window, scored high
    assert m.stats.model_windows >= 1
    m.process(_opens(301, 10))  # even with new reach: one high window is not sustained
    assert alerts == []
    m._budget = 100.0
    m.process(_events(301, LOOP * 16))  # now k of the last n scored windows are over the bar
    assert len(alerts) == 1 and "model score above" in alerts[0].reason and alerts[0].novelty < 0.2
    # a bar calibrated from too few scores is not used at all
    b.threshold = Threshold(0.01, value=-1.0, n=20)
    m._budget = 100.0
    m.process(_events(302, LOOP * 40) + _opens(302, 10))
    assert len(alerts) == 1


def test_the_rule_needs_sustained_behaviour_and_reach_and_a_mature_profile() -> None:
    rule = Rule(k=3, n=5, folder_bar=4, min_learned_windows=100)
    t = Track(rule.n)
    t.novelty.extend([True, False, False, True, True])  # the first drops out next
    t.new_folders.update(f"/f{i}" for i in range(10))
    t.novelty.append(False)
    assert not judge(rule, t, 500).act  # 2 of the last 5: not sustained
    t.novelty.append(True)
    v = judge(rule, t, 500)
    assert v.act and v.hold and "3 of its last 5" in v.reason
    v = judge(rule, t, 40)
    assert v.act and not v.hold and "observe only" in v.reason  # too little learned: alert, never hold
    t.new_folders.clear()
    v = judge(rule, t, 500)
    assert not v.act and v.behaviour and not v.reach
    t.novelty.extend([False] * 5)
    t.new_dests.add("198.51.100.1:22")
    assert not judge(rule, t, 500).act


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
