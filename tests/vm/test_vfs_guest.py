"""The vector file system in a real guest: the agent's FUSE mount at /srv/neura, Milvus Lite in the
guest, MiniLM embeddings from the host's model service over the link, systemd restarting the agent.

Each test prints the figures it measured ("[vfs] ..."); run with -s to see them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from hypervisor.control import ControlServer
from hypervisor.inference.quotas import GuestQuota
from hypervisor.search_cli import control_ops

from .conftest import Host, wait_until

AGENT = "/opt/neuraos-agent/venv/bin/neuraos-agent"
PY = "/opt/neuraos-agent/venv/bin/python"
MOUNT = "/srv/neura"
STATE = "/var/lib/neuraos/vfs/state"
BULK = 1000


def _py(guest, code: str, timeout: int = 900) -> str:
    out = guest.run(f"timeout {timeout} {PY} - <<'PYEOF'\n{code}\nPYEOF")
    assert out.rc == 0, out.stdout + out.stderr
    return out.stdout


def _status(guest, prefix: str = "") -> dict | None:
    out = guest.run(f"{AGENT} vfs-status --json --path-prefix '{prefix}'")
    return json.loads(out.stdout) if out.rc == 0 else None


def _main_pid(guest) -> int:
    return int(guest.check_output("systemctl show -p MainPID --value neuraos-agent"))


def _caught_up(guest, prefix: str, files: int):
    """The status once nothing is pending and `files` files under `prefix` have vectors, else None."""
    st = _status(guest, prefix)
    if st and st["reconciled"] and st["pending_records"] == 0 and st["vector_files"] == files:
        return st
    return None


def _search(guest, query: str, prefix: str = "", k: int = 5) -> list[dict]:
    out = guest.run(f"{AGENT} search --json -k {k} --path-prefix '{prefix}' '{query}'")
    assert out.rc == 0, out.stdout + out.stderr
    return json.loads(out.stdout)


def _agent_log(guest, since: str) -> str:
    return guest.run(f"journalctl -u neuraos-agent --no-pager -o cat --since '{since}'").stdout


@pytest.fixture(scope="module")
def vfs(host: Host, guest):
    """The agent has mounted the VFS and reconciled its index (its imports take a while under TCG)."""
    if host.models.service.embedder is None:
        pytest.skip(f"the host serves no embeddings here: {host.models.unavailable}")
    t0 = time.monotonic()
    wait_until(lambda: (s := _status(guest)) and s["reconciled"], 600, 3, what="the VFS to mount and reconcile")
    print(f"\n[vfs] mounted and reconciled {time.monotonic() - t0:.0f} s after the agent answered")
    assert guest.mount_point(MOUNT).exists and guest.mount_point(MOUNT).filesystem.startswith("fuse")
    return guest


@pytest.fixture(scope="module")
def neuraos_cli(host: Host, tmp_path_factory):
    """Runs the real `neuraos` CLI against this test process's controller (its control socket)."""
    run_dir = host.config.run_dir
    ops = {"search": lambda args: control_ops(host.link)["search"](args)}  # host.link may be replaced
    cfg = tmp_path_factory.mktemp("cli") / "neuraos.toml"
    cfg.write_text(f'state_dir = "{host.config.state_dir}"\nrun_dir = "{run_dir}"\n')
    with ControlServer(run_dir / "control.sock", ops):
        def run(*argv: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "hypervisor.cli", "--config", str(cfg), *argv],
                                  capture_output=True, text=True, timeout=180, env={**os.environ})
        yield run


TOPICS = {
    "a.txt": "Knead the dough for ten minutes, let it rise until doubled, then put the loaf in a hot oven "
             "until the crust turns golden brown.",
    "b.txt": "The telescope resolved the spiral arms of the distant galaxy and caught a supernova flaring "
             "in its outer disk.",
    "c.txt": "File your annual income tax return before the deadline; deductions for charitable donations "
             "lower the amount you owe.",
    "d.txt": "The striker scored twice in the second half and the club clinched the league title.",
}


def test_files_written_through_the_mount_are_found_by_meaning(host: Host, vfs, neuraos_cli):
    guest = vfs
    _py(guest, f"""
import json, os
os.makedirs("{MOUNT}/meaning", exist_ok=True)
for name, text in json.loads({json.dumps(json.dumps(TOPICS))}).items():
    with open(os.path.join("{MOUNT}/meaning", name), "w") as f:
        f.write(text)
""")
    assert guest.file(f"{MOUNT}/meaning/b.txt").content_string == TOPICS["b.txt"]
    assert guest.file(f"/var/lib/neuraos/vfs/files/meaning/b.txt").content_string == TOPICS["b.txt"]
    wait_until(lambda: _caught_up(guest, "meaning/", 4), 300, 1, what="4 files indexed with vectors")

    queries = {"how do I make bread at home": "meaning/a.txt",
               "astronomy observations of deep space": "meaning/b.txt",
               "paying the government part of what you earn": "meaning/c.txt",
               "who won the football match": "meaning/d.txt"}
    for query, want in queries.items():  # no query shares a content word with its file
        hits = _search(guest, query, "meaning/", k=4)
        assert hits[0]["path"] == want, (query, hits)
        assert hits[0]["vector_score"] is not None

    out = neuraos_cli("search", "--guest", host.name, "how do I make bread at home", "-k", "3",
                      "--path-prefix", "meaning/", "--json")
    assert out.returncode == 0, out.stderr
    hits = json.loads(out.stdout)
    assert hits[0]["path"] == "meaning/a.txt" and hits[0]["vector_score"] > hits[1]["vector_score"], hits
    out = neuraos_cli("search", "--guest", host.name, "paying the government part of what you earn",
                      "--path-prefix", "meaning/")
    assert out.returncode == 0 and "meaning/c.txt" in out.stdout.splitlines()[0], out.stdout + out.stderr
    out = neuraos_cli("search", "--guest", "no-such-guest", "bread")
    assert out.returncode == 1 and out.stderr.startswith("error:") and "Traceback" not in out.stderr, out.stderr
    out = neuraos_cli("search", "--guest", host.name, "bread", "-k", "0")
    assert out.returncode == 1 and "-k must be" in out.stderr, out.stderr


def test_time_to_searchable_after_close(vfs):
    """Close a file, then ask by meaning until it is found with its vectors: the guest's own view."""
    out = _py(vfs, f"""
import json, os, time
from pathlib import Path
from neuraos_agent.vfs.query_socket import query
texts = ["Whales migrate thousands of kilometres between feeding and breeding waters each year.",
         "The new compiler release brings faster incremental builds and better error messages.",
         "Mountain villages hold a cheese festival every autumn with music and long tables outside.",
         "Heavy rain flooded the valley roads and the river burst its banks near the old mill.",
         "The violinist rehearsed the concerto slowly before the evening performance.",
         "Solar panels on the school roof now cover most of its electricity in summer.",
         "The detective noticed the muddy boots by the door and knew who had lied.",
         "A sourdough starter needs flour and water fed daily to stay lively."]
asks = ["ocean mammals travelling", "programming language tools", "food celebration in the alps",
        "storm damage to infrastructure", "classical music practice", "renewable energy at a school",
        "a crime mystery clue", "keeping yeast culture alive"]
os.makedirs("{MOUNT}/tts", exist_ok=True)
query(Path("/run/neuraos/vfs.sock"), "warm up", 1)  # the client's own imports are not the index's delay
lat = []
for i, (text, ask) in enumerate(zip(texts, asks)):
    path = f"tts/t{{i}}.txt"
    with open(f"{MOUNT}/" + path, "w") as f:
        f.write(text)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 120:
        hits = query(Path("/run/neuraos/vfs.sock"), ask, 3, "tts/")
        if any(h.path == path and h.vector_score is not None for h in hits):
            break
        time.sleep(0.05)
    lat.append(time.monotonic() - t0)
    time.sleep(1.0)
print(json.dumps(lat))
""")
    lat = sorted(json.loads(out.strip().splitlines()[-1]))
    p50 = lat[len(lat) // 2]
    print(f"\n[vfs] time-to-searchable by meaning (guest, TCG, host embeddings): p50 {p50:.2f} s, "
          f"max {lat[-1]:.2f} s over {len(lat)} files: {[round(x, 2) for x in lat]}")
    assert lat[-1] < 120, lat


def test_large_sequential_writes_through_the_mount_vs_the_plain_disk(vfs):
    """benchmarks/vfs.py (b) inside the guest: 1 MiB writes + fsync through the mount and into a plain
    directory on the backing file system, interleaved; the mount's copy must read back intact."""
    out = _py(vfs, f"""
import hashlib, json, os, statistics, time
mib = 64
plain = "/var/lib/neuraos/vfs/bench-plain"
os.makedirs(plain, exist_ok=True)
os.makedirs("{MOUNT}/bench", exist_ok=True)
block = os.urandom(1 << 20)
def write(path):
    t = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(block)
        os.fsync(f.fileno())
    return mib / (time.perf_counter() - t)
runs = {{"plain": [], "mount": []}}
for rep in range(3):
    runs["plain"].append(write(plain + "/seq.bin"))
    runs["mount"].append(write("{MOUNT}/bench/seq.bin"))
digest = hashlib.sha256()
with open("{MOUNT}/bench/seq.bin", "rb") as f:
    while part := f.read(1 << 20):
        digest.update(part)
intact = digest.hexdigest() == hashlib.sha256(block * mib).hexdigest()
os.unlink(plain + "/seq.bin")
os.unlink("{MOUNT}/bench/seq.bin")
print(json.dumps({{"intact": intact, **{{k: statistics.median(v) for k, v in runs.items()}}, "runs": runs}}))
""")
    got = json.loads(out.strip().splitlines()[-1])
    ratio = got["plain"] / got["mount"]
    print(f"\n[vfs] guest (TCG) 64 MiB write+fsync: plain {got['plain']:.0f} MB/s, mount {got['mount']:.0f} MB/s, "
          f"overhead {ratio:.2f}x (runs {got['runs']})")
    assert got["intact"], "the file written through the mount did not read back intact"
    assert ratio < 4, got  # a regression guard for the TCG guest; the < 2x goal is measured by the benchmark


def test_kill_9_while_indexing_1000_files_loses_nothing(vfs, host: Host, request):
    guest = vfs
    since = guest.check_output("date '+%Y-%m-%d %H:%M:%S'")
    # The host holds this guest's embeddings back while it writes (the operator's quota lever),
    # so the kill is sure to land mid-indexing however fast the host embeds.
    host.models.service.set_quota(host.name, GuestQuota(tokens_per_s=1e-3, burst_tokens=0.01))
    request.addfinalizer(lambda: host.models.service.set_quota(host.name, GuestQuota()))
    t0 = time.monotonic()
    out = _py(guest, f"""
import hashlib, os, random, time
rng = random.Random(5)
words = ("river stone garden engine budget signal harvest orbit ledger melody forest winter protein "
         "bridge canvas vaccine harbor circuit poem glacier market tensor pigment lantern census").split()
os.makedirs("{MOUNT}/bulk", exist_ok=True)
t0 = time.monotonic()
with open("/root/bulk.sha256", "w") as sums:
    for i in range({BULK}):
        text = f"note {{i}}: " + " ".join(rng.choice(words) for _ in range(15)) + "\\n"
        path = f"{MOUNT}/bulk/f{{i:04d}}.txt"
        with open(path, "w") as f:
            f.write(text)
        sums.write(f"{{hashlib.sha256(text.encode()).hexdigest()}}  {{path}}\\n")
print("WROTE", time.monotonic() - t0)
""")
    wrote_s = float(out.split("WROTE")[1])
    pid = _main_pid(guest)
    st = _status(guest, "bulk/")
    guest.run(f"kill -9 {pid}")
    killed_at = time.monotonic()
    host.models.service.set_quota(host.name, GuestQuota())
    print(f"\n[vfs] wrote {BULK} files through the mount in {wrote_s:.1f} s; killed the agent (pid {pid}) "
          f"with {st['vector_files']} of them indexed, {st['pending_records']} journal records pending")
    assert st["vector_files"] < BULK, "indexing finished before the kill; nothing was interrupted"

    wait_until(lambda: _main_pid(guest) not in (0, pid), 60, 1, what="systemd to restart the agent")
    st = wait_until(lambda: _caught_up(guest, "bulk/", BULK), 1200, 3, what=f"all {BULK} files indexed again")
    done = time.monotonic()
    print(f"[vfs] after the kill: all {BULK} indexed {done - killed_at:.0f} s later "
          f"({done - t0:.0f} s from the first write, restart included)")

    check = guest.run("sha256sum --quiet -c /root/bulk.sha256")
    assert check.rc == 0, check.stdout[-2000:] + check.stderr[-2000:]
    assert int(guest.check_output(f"ls {MOUNT}/bulk | wc -l")) == BULK
    assert _status(guest, "bulk/")["indexed_files"] == BULK
    log = _agent_log(guest, since)
    assert "index reconciled with the files" in log, log[-3000:]
    text = guest.check_output(f"cat {MOUNT}/bulk/f0421.txt")
    hits = _search(guest, text, "bulk/", k=3)
    assert hits[0]["path"] == "bulk/f0421.txt" and hits[0]["vector_score"] > 0.95, hits


def test_corrupt_index_is_noticed_and_rebuilt_from_the_files(vfs):
    guest = vfs
    manifest = f"{STATE}/index.db/collections/chunks/manifest.json"
    before = wait_until(lambda: _status(guest), 120, 2, what="the VFS status")
    guest.check_output("systemctl stop neuraos-agent")
    since = guest.check_output("date '+%Y-%m-%d %H:%M:%S'")
    size = int(guest.check_output(f"stat -c %s {manifest}"))
    guest.check_output(f"truncate -s {size // 2} {manifest}")  # a torn manifest: Milvus Lite would fall back
    guest.check_output("systemctl start neuraos-agent")
    t0 = time.monotonic()
    wait_until(lambda: (s := _status(guest)) and s["index_rebuilds"] >= 1, 600, 3, what="the agent to rebuild")
    st = wait_until(lambda: _caught_up(guest, "bulk/", BULK), 1200, 3, what="the rebuilt index to hold every file")
    print(f"\n[vfs] corrupt manifest noticed at start; index rebuilt from the files "
          f"({before['vector_files']} files) in {time.monotonic() - t0:.0f} s")
    assert _caught_up(guest, "meaning/", 4)
    log = _agent_log(guest, since)
    assert "vector index is corrupt" in log and "rebuilding it from the files" in log, log[-3000:]
    assert _search(guest, "how do I make bread at home", "meaning/", k=2)[0]["path"] == "meaning/a.txt"


def _restart_agent_with(guest, env: str) -> None:
    guest.check_output(f"printf '%s' '{env}' > /etc/neuraos/agent.env && systemctl restart neuraos-agent")


def test_full_disk_gives_enospc_loses_nothing_and_indexing_resumes(vfs):
    """Files, journal and index on one small file system (tmpfs) that the test fills up."""
    guest = vfs
    original_env = guest.file("/etc/neuraos/agent.env").content_string
    guest.check_output("mkdir -p /mnt/small && mount -t tmpfs -o size=24m,mode=0755 tmpfs /mnt/small")
    try:
        _restart_agent_with(guest, "NEURAOS_VFS_BACKING=/mnt/small/files\nNEURAOS_VFS_STATE=/mnt/small/state\n")
        wait_until(lambda: (s := _status(guest)) and s["reconciled"] and guest.file("/mnt/small/state").exists,
                   600, 3, what="the VFS on the small file system")
        _py(guest, f"""
import os
os.makedirs("{MOUNT}/kept", exist_ok=True)
for i in range(20):
    with open(f"{MOUNT}/kept/k{{i}}.txt", "w") as f:
        f.write(f"kept note {{i}} about lighthouse keepers and the sea " * 20)
""")
        wait_until(lambda: _caught_up(guest, "kept/", 20), 300, 1, what="20 files indexed")
        guest.check_output("cd /srv/neura/kept && sha256sum k*.txt > /root/kept.sha256")

        out = _py(guest, f"""
import errno, os
got = None
fd = os.open("{MOUNT}/filler", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
try:
    for _ in range(64):
        os.write(fd, bytes(1 << 20))  # NULs: a binary file, stored but not indexed
        os.fsync(fd)
except OSError as exc:
    got = exc.errno
try:
    os.close(fd)
except OSError as exc:
    got = got or exc.errno
print("ERRNO", got)
try:
    with open("{MOUNT}/kept/late.txt", "w") as f:
        f.write("written while the disk is full " * 400)
    print("LATE ok")
except OSError as exc:
    print("LATE", exc.errno)
""")
        assert f"ERRNO {28}" in out, out  # ENOSPC reached the writer
        print(f"\n[vfs] disk full: the writer got ENOSPC; a second writer got: {out.split('LATE')[1].strip()}")
        df = guest.check_output("df --output=avail -B1 /mnt/small | tail -1")
        assert int(df) < (1 << 20), df
        time.sleep(5)  # let the worker meet the full disk
        assert guest.run("cd /srv/neura/kept && sha256sum --quiet -c /root/kept.sha256").rc == 0
        journal = _py(guest, """
import json, zlib
bad = good = 0
for line in open("/mnt/small/state/journal/journal.log", "rb"):
    ok = line.endswith(b"\\n") and int(line[:8], 16) == zlib.crc32(line[9:-1])
    json.loads(line[9:-1]) if ok else None
    good, bad = good + ok, bad + (not ok)
print("JOURNAL", good, bad)
""")
        assert journal.split()[-1] == "0", journal  # every record whole (its CRC checks)

        guest.check_output(f"rm -f {MOUNT}/filler {MOUNT}/kept/late.txt")
        guest.check_output(f"echo 'The lighthouse beam swept across the stormy harbour at night.' > {MOUNT}/kept/after.txt")
        t0 = time.monotonic()
        wait_until(lambda: _caught_up(guest, "kept/", 21), 300, 1, what="indexing to resume once space returns")
        print(f"[vfs] space back: indexing resumed, new file searchable {time.monotonic() - t0:.1f} s later")
        assert guest.run("cd /srv/neura/kept && sha256sum --quiet -c /root/kept.sha256").rc == 0
        hits = _search(guest, "a light guiding ships in bad weather", "kept/", k=3)
        assert hits[0]["path"] == "kept/after.txt", hits
    finally:
        _restart_agent_with(guest, original_env)
        wait_until(lambda: (s := _status(guest)) and s["reconciled"], 600, 3, what="the VFS back on its disk")
        guest.run("umount -l /mnt/small")
