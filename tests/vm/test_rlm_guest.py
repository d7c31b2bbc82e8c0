"""`neuraos-agent ask` in a real guest: the RLM loop over the guest's own files, with its root
turns and sub-calls served by the host's llama.cpp (SmolLM2) through the guest's link.

Facts are planted at random in a copy of the guest's own documentation (hundreds of files,
megabytes: far beyond a 2048-token window), so an answer can only be right if the program the
root wrote found them (grep) and, for the second question, a sub-call read them.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import Host

CORPUS = "/root/rlm-corpus"
TRACES = "/var/tmp/rlm-traces"
AGENT = "/opt/neuraos-agent/venv/bin/neuraos-agent"
NEEDLE_WORD = "glacier"
WORDS = ("glacier", "lantern", "saffron", "quartz", "orchid", "falcon", "willow", "ember")
FIRST = ("Ingrid", "Tomas", "Aino", "Ravi", "Lucia", "Kenji", "Maren", "Oskar")
LAST = ("Solberg", "Halvorsen", "Lindqvist", "Okonkwo", "Varga", "Nakamura", "Brandt", "Moreau")


@dataclass(frozen=True)
class Planted:
    word: str
    number: str
    project: str
    maintainer: str
    files: int
    chars: int


def _python(guest, code: str) -> str:
    out = guest.run("/opt/neuraos-agent/venv/bin/python - <<'PYEOF'\n" + code + "\nPYEOF")
    assert out.rc == 0, out.stdout + out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def planted(host: Host, guest) -> Planted:
    if host.models.backend is None:
        pytest.skip(f"no language model on this host: {host.models.unavailable}")
    rng = random.Random()
    # The needle's number is random; its word is fixed to one SmolLM2 was measured to write a grep
    # for (on 31 of 32 word/corpus pairs it did; on "willow" over one corpus it wrote `show`).
    p = Planted(NEEDLE_WORD, str(rng.randrange(1_000_000, 10_000_000)), rng.choice(WORDS) + " mirror",
                f"{rng.choice(FIRST)} {rng.choice(LAST)}", 0, 0)
    out = _python(guest, f"""
import shutil
from pathlib import Path
dst = Path({CORPUS!r})
shutil.rmtree(dst, ignore_errors=True)
dst.mkdir()
for f in sorted(Path('/usr/share/common-licenses').iterdir()):
    if f.is_file():
        shutil.copy(f, dst / f.name)
for f in sorted(Path('/usr/share/doc').glob('*/copyright')):
    shutil.copy(f, dst / (f.parent.name + '.copyright'))
files = sorted(dst.iterdir())
def plant(f, line, at):
    lines = f.read_text(errors='replace').splitlines()
    lines.insert(int(len(lines) * at), line)
    f.write_text('\\n'.join(lines) + '\\n')
plant(files[len(files) // 3], {f"The special magic number for {p.word} is {p.number}."!r}, 0.6)
plant(files[2 * len(files) // 3], {f"The {p.project} project is maintained by {p.maintainer} from the north office."!r}, 0.4)
print(len(files), sum(f.stat().st_size for f in files))
""")
    files, chars = map(int, out.split())
    assert files > 50 and chars > 200_000, out  # hundreds of files, far past the window
    return Planted(p.word, p.number, p.project, p.maintainer, files, chars)


def _ask(host: Host, guest, question: str) -> tuple[dict, float, int]:
    """Run `neuraos-agent ask` in the guest; (its --json document, wall seconds, host-side calls)."""
    before = host.models.service.counters(host.name).requests
    t0 = time.monotonic()
    cmd = (f"{AGENT} ask {shlex.quote(question)} --context {CORPUS} --json --trace --trace-dir {TRACES} "
           f"--max-wall 600")
    out = guest.run(cmd)
    wall = time.monotonic() - t0
    served = host.models.service.counters(host.name).requests - before
    assert out.rc == 0, f"rc {out.rc}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    doc = json.loads(out.stdout)
    u = doc["usage"]
    print(f"\n[rlm] {question!r}: {doc['answer']!r} in {wall:.1f} s (loop {u['wall_s']:.1f} s); "
          f"{u['model_calls']} model calls ({u['root_calls']} root, {u['sub_calls']} sub), {u['tokens']} tokens; "
          f"host served {served}")
    return doc, wall, served


def test_guest_ask_finds_a_needle_in_its_own_files(host: Host, guest, planted: Planted):
    doc, wall, served = _ask(host, guest, f"What is the special magic number for {planted.word} "
                                          "mentioned in the provided text?")
    assert doc["finished"] and doc["answer"].strip() == planted.number, doc["trace"]
    trace = doc["trace"]
    assert trace["context"]["kind"] == "corpus" and trace["context"]["items"] == planted.files
    assert any("grep(" in t["code"] for t in trace["turns"])
    # every model call of the loop was served by the host's model service over this guest's link
    assert doc["usage"]["model_calls"] >= 1 and served == doc["usage"]["model_calls"]
    # the root never saw the context: every prompt it was charged for is a small fraction of it
    assert all(t["prompt_tokens"] < 2048 for t in trace["turns"])
    assert trace["confinement"].get("namespaces") is True
    assert guest.file(doc["trace_path"]).exists
    stored = json.loads(guest.file(doc["trace_path"]).content_string)
    assert stored["answer"] == doc["answer"] and stored["usage"]["model_calls"] == doc["usage"]["model_calls"]


def test_guest_ask_reads_what_it_found_with_a_sub_call(host: Host, guest, planted: Planted):
    doc, wall, served = _ask(host, guest, f"Who maintains the {planted.project} project?")
    surname = planted.maintainer.split()[1]
    assert surname in doc["answer"], doc["trace"]
    subs = [s for t in doc["trace"]["turns"] for s in t["sub_calls"]]
    assert any(s["kind"] == "llm_query" and s["prompt_tokens"] > 0 for s in subs), doc["trace"]
    assert doc["usage"]["sub_calls"] >= 1 and served == doc["usage"]["model_calls"]


def test_host_side_rlm_over_the_live_link(host: Host, guest, planted: Planted, tmp_path: Path):
    """The agent's `ask` run as a host process, its LinkClient dialled into the guest's live link
    socket (the channel names the guest, so the host charges these calls to it). A process of
    its own: the agent's and the controller's generated stubs share one proto package."""
    docs = tmp_path / "docs"
    docs.mkdir()
    for f in sorted(Path("/usr/share/common-licenses").iterdir()):
        if f.is_file():
            (docs / f.name).write_text(f.read_text(errors="replace"))
    target = sorted(docs.iterdir())[len(list(docs.iterdir())) // 2]
    target.write_text(target.read_text() + f"\nThe special magic number for {planted.word} is {planted.number}.\n")
    env = {**os.environ, "NEURAOS_LINK": host.transport.server_address(host.name),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "guest-agent")}
    before = host.models.service.counters(host.name).requests
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "neuraos_agent.rlm.cli", "ask",
                           f"What is the special magic number for {planted.word} mentioned in the provided text?",
                           "--context", str(docs), "--json", "--trace-dir", str(tmp_path / "traces")],
                          env=env, capture_output=True, text=True, timeout=600)
    served = host.models.service.counters(host.name).requests - before
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = json.loads(proc.stdout)
    print(f"\n[rlm] host side over the link: {doc['answer']!r} in {time.monotonic() - t0:.1f} s; {doc['usage']}")
    assert doc["finished"] and doc["answer"].strip() == planted.number
    assert served == doc["usage"]["model_calls"] >= 1 and Path(doc["trace_path"]).exists()


def test_guest_sandbox_stops_escapes_and_the_agent_survives(host: Host, guest):
    """The REPL sandbox on the guest's own kernel: a socket, a read outside the view, a fork bomb
    and a memory blow-up are each stopped and reported, and the REPL and the agent live on."""
    out = _python(guest, """
import json
from neuraos_agent.rlm.confine import Limits
from neuraos_agent.rlm.sandbox import Sandbox, SandboxConfig
cfg = SandboxConfig(limits=Limits(memory_mib=256, turn_wall_s=20.0, turn_cpu_s=20.0), startup_timeout_s=120.0)
attempts = {
    "network": "import socket\\nsocket.create_connection(('10.0.2.100', 50051), timeout=3)",
    "filesystem": "print(open('/etc/shadow').read())",
    "process": "import os\\nwhile True:\\n    os.fork()",
    "memory": "hog = []\\nwhile True:\\n    hog.append(bytearray(16 << 20))",
}
report = {}
with Sandbox("the context " * 100, config=cfg) as sb:
    report["confinement"] = sb.confinement.get("namespaces")
    for want, code in attempts.items():
        r = sb.run(code)
        report[want] = [v.kind for v in r.violations]
        report[want + "_out"] = r.output[:200]
    report["alive"] = sb.run("print(len(context))").output.strip()
print(json.dumps(report))
""")
    report = json.loads(out.strip().splitlines()[-1])
    assert report["confinement"] is True, report
    for kind in ("network", "filesystem", "process", "memory"):
        assert kind in report[kind], report
    assert "root:" not in report["filesystem_out"]
    assert report["alive"] == str(len("the context " * 100))
    assert guest.service("neuraos-agent").is_running
