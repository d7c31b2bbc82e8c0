"""The agent's local view of its guest: /proc and /sys parsing, CPU on/offlining, `status --json`."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from neuraos_agent.cpus import CpuError, online_count, parse_cpu_list, set_online_cpus
from neuraos_agent.link import CommandRunner, status_message
from neuraos_agent.status import GuestStatus, read_status

MEMINFO = """\
MemTotal:        2030592 kB
MemFree:          912340 kB
MemAvailable:    1523012 kB
Buffers:           21108 kB
HugePages_Total:       0
"""


def fake_proc(root: Path, meminfo: str = MEMINFO) -> Path:
    (root / "sys" / "kernel" / "random").mkdir(parents=True)
    (root / "uptime").write_text("1234.56 4000.01\n")
    (root / "loadavg").write_text("0.52 0.33 0.10 2/187 4242\n")
    (root / "meminfo").write_text(meminfo)
    (root / "sys" / "kernel" / "random" / "boot_id").write_text("5d2c0a7e-0000-4000-8000-000000000001\n")
    return root


def fake_sysfs(root: Path, present: str, online: str, hotplug: dict[int, str]) -> Path:
    cpus = root / "devices" / "system" / "cpu"
    cpus.mkdir(parents=True)
    (cpus / "present").write_text(present + "\n")
    (cpus / "online").write_text(online + "\n")
    for cpu in parse_cpu_list(present):
        (cpus / f"cpu{cpu}").mkdir()
        if cpu in hotplug:
            (cpus / f"cpu{cpu}" / "online").write_text(hotplug[cpu] + "\n")
    return root


def online_of(root: Path, cpu: int) -> str:
    return (root / "devices" / "system" / "cpu" / f"cpu{cpu}" / "online").read_text().strip()


@pytest.mark.parametrize("text, cpus", [
    ("0", [0]), ("0-3", [0, 1, 2, 3]), ("0-1,4,6-7\n", [0, 1, 4, 6, 7]), ("", []), ("2,0", [0, 2]),
])
def test_parse_cpu_list(text: str, cpus: list[int]) -> None:
    assert parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["a", "3-1", "0-", "1-x"])
def test_parse_cpu_list_rejects_garbage(text: str) -> None:
    with pytest.raises(CpuError):
        parse_cpu_list(text)


def test_read_status_from_fake_proc_and_sys(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "proc")
    sysfs = fake_sysfs(tmp_path / "sys", "0-3", "0-1", {1: "1", 2: "0", 3: "0"})
    status = read_status(proc, sysfs)
    assert status.uptime_s == 1234.56
    assert (status.load1, status.load5, status.load15) == (0.52, 0.33, 0.10)
    assert (status.mem_total_kib, status.mem_available_kib) == (2030592, 1523012)
    assert (status.cpus_online, status.cpus_present) == (2, 4)
    assert status.boot_id == "5d2c0a7e-0000-4000-8000-000000000001"
    assert status.kernel.startswith("Linux ") and status.agent_version == "0.1.0"


def test_mem_available_falls_back_to_mem_free_on_old_kernels(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "proc", meminfo="MemTotal: 1000 kB\nMemFree: 400 kB\n")
    sysfs = fake_sysfs(tmp_path / "sys", "0", "0", {})
    assert read_status(proc, sysfs).mem_available_kib == 400


def test_read_status_of_this_machine() -> None:
    status = read_status()
    assert status.uptime_s > 0 and status.mem_total_kib > 0 and status.cpus_present >= status.cpus_online >= 1
    assert len(status.boot_id) == 36


def test_status_message_carries_every_field(tmp_path: Path) -> None:
    status = read_status(fake_proc(tmp_path / "proc"), fake_sysfs(tmp_path / "sys", "0-1", "0-1", {1: "1"}))
    msg = status_message(status)
    assert {name: getattr(msg, name) for name in GuestStatus.__dataclass_fields__} == asdict(status)


def test_set_online_cpus_down_and_up(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path, "0-3", "0-3", {1: "1", 2: "1", 3: "1"})
    assert set_online_cpus(1, sysfs) == 1
    assert [online_of(sysfs, n) for n in (1, 2, 3)] == ["0", "0", "0"]
    assert set_online_cpus(3, sysfs) == 3
    assert [online_of(sysfs, n) for n in (1, 2, 3)] == ["1", "1", "0"]
    assert set_online_cpus(3, sysfs) == 3  # idempotent
    assert online_count(sysfs) == 3


def test_set_online_cpus_refuses_what_cannot_be(tmp_path: Path) -> None:
    sysfs = fake_sysfs(tmp_path, "0-1", "0-1", {1: "1"})
    with pytest.raises(CpuError, match="only 2 are present"):
        set_online_cpus(3, sysfs)
    with pytest.raises(CpuError, match="at least 1"):
        set_online_cpus(0, sysfs)
    pinned = fake_sysfs(tmp_path / "pinned", "0-2", "0-2", {1: "1"})  # cpu2 is not hot-pluggable
    with pytest.raises(CpuError, match="cpu2 cannot be offlined"):
        set_online_cpus(1, pinned)


def test_command_runner_turns_failures_into_results(tmp_path: Path) -> None:
    from neuraos_agent._gen import link_pb2

    runner = CommandRunner(fake_sysfs(tmp_path, "0-1", "0-1", {1: "1"}))
    ok = runner.run(link_pb2.Command(id=7, set_online_cpus=link_pb2.SetOnlineCpus(count=1)))
    assert (ok.id, ok.ok, ok.output) == (7, True, "1")
    too_many = runner.run(link_pb2.Command(id=8, set_online_cpus=link_pb2.SetOnlineCpus(count=5)))
    assert not too_many.ok and "only 2 are present" in too_many.error
    empty = runner.run(link_pb2.Command(id=9))
    assert not empty.ok and "unknown command" in empty.error
    broken = CommandRunner(tmp_path / "nowhere").run(
        link_pb2.Command(id=10, set_online_cpus=link_pb2.SetOnlineCpus(count=1)))
    assert not broken.ok and broken.error


def test_status_cli_prints_json() -> None:
    out = subprocess.run([sys.executable, "-m", "neuraos_agent.main", "status", "--json"],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    data = json.loads(out)
    assert set(data) == set(GuestStatus.__dataclass_fields__)
    assert data["cpus_present"] >= 1 and data["agent_version"] == "0.1.0"
    text = subprocess.run([sys.executable, "-m", "neuraos_agent.main", "status"],
                          capture_output=True, text=True, timeout=30, check=True).stdout
    assert "cpus" in text and "online of" in text
