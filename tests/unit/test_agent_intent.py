"""The agent's intent sampler on a /proc tree written by the test."""

from __future__ import annotations

from pathlib import Path

from neuraos_agent.intent import IntentSampler, next_timer_due_s


def write_proc(root: Path, running: int, procs: dict[int, tuple[str, int]], sectors: int, rx: int, tx: int) -> None:
    root.mkdir(exist_ok=True)
    (root / "stat").write_text(f"cpu 1 2 3 4\nprocs_running {running}\nprocs_blocked 0\n")
    for pid, (comm, ticks) in procs.items():
        d = root / str(pid)
        d.mkdir(exist_ok=True)
        fields = ["S"] + ["0"] * 10 + [str(ticks), "0"] + ["0"] * 30
        (d / "stat").write_text(f"{pid} ({comm}) " + " ".join(fields))
    (root / "diskstats").write_text(
        f" 254 0 vda 10 0 80 5 20 0 {sectors} 9 0 0 0\n 254 1 vda1 1 0 8 1 2 0 {sectors} 1 0 0 0\n")
    (root / "net").mkdir(exist_ok=True)
    (root / "net" / "dev").write_text(
        "Inter-|   Receive\n face |bytes packets\n"
        f"    lo: 999 0 0 0 0 0 0 0 999 0 0 0 0 0 0 0\n  eth0: {rx} 0 0 0 0 0 0 0 {tx} 0 0 0 0 0 0 0\n")


def test_rates_come_from_deltas_and_the_busiest_process_wins(tmp_path: Path):
    proc = tmp_path / "proc"
    write_proc(proc, 3, {1: ("init", 100), 42: ("stress (ng)", 1000)}, sectors=0, rx=0, tx=0)
    s = IntentSampler(proc, pending_rlm_jobs=lambda: 2, timers=lambda: 30.0)
    first = s.sample()
    assert first.run_queue == 2.0 and first.top_cpu_pct == 0.0 and first.pending_rlm_jobs == 2
    write_proc(proc, 5, {1: ("init", 101), 42: ("stress (ng)", 1100), 77: ("new", 50)},
               sectors=2048, rx=10_000, tx=5_000)
    second = s.sample()
    assert second.top_comm == "stress (ng)" and second.top_cpu_pct > 0
    assert second.file_write_bps > 0 and second.net_rx_bps > second.net_tx_bps > 0
    assert 29.0 < second.jobs_due_s <= 30.0 and second.run_queue == 4.0  # counts down between asks


def test_no_systemctl_means_unknown_due_time(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda _n: None)
    assert next_timer_due_s() == -1.0
