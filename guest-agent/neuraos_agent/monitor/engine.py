"""The monitor's loop: events -> per-process windows -> learn, or judge and contain.

Each process (by tgid; an exec starts a new stream) is cut into windows of the model's
length (32 calls). What happens to a window depends on its profile's baseline
(`profile.Baseline`, by user / service unit / executable):
- learning: the window is learned (the baseline's draft is saved every few seconds);
- frozen: the window is judged, and the process's evidence goes to `verdict.judge`:
  its novelty (share of the window's syscall 3-grams the profile never showed,
  smoothed over windows), its model process score against the profile's calibrated
  threshold, the folders it opened files in that the profile never used (digit runs
  count as one: /proc/N) and the destinations it connected to that the profile never
  used. Only sustained deviation in behaviour corroborated by new reach contains
  (see `verdict.py` for why no single signal may).
Novelty is a few dict lookups per window and judges every window in real time. The
syscall model (numpy LSTM) costs far more per window (about 1.5 s per window in a TCG
guest, milliseconds on KVM), so it runs on a CPU budget (`model_cpu`, a share of one
CPU): a sample of windows, each scored on its own from the model's start state, feeds
the profiles' score reservoirs (their thresholds) and the model decision; and the
window that crossed is scored for the alert's evidence after the process is contained.
In `contain` mode an anomalous process is frozen and cut off at once, in this thread;
either way one alert with the evidence goes to `on_alert` (the link) and to alerts.jsonl.

The mode (observe | contain) is read from `<state>/mode` at every sync, so an operator
(root: the folder is 0700) changes it without restarting the agent.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import threading
import time
from collections import OrderedDict

import numpy as np
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from neuraos_agent.monitor.collector import (
    BpftraceCollector, Calls, Connected, Event, Exec, Exited, Opened, Sent, Syscall,
)
from neuraos_agent.monitor.contain import Containment, ContainError
from neuraos_agent.monitor.identity import ProcessInfo, process_info
from neuraos_agent.monitor.profile import Baseline, ProfileError, ProfileKey, ProfileStore
from neuraos_agent.monitor.scorer import SyscallModel
from neuraos_agent.monitor.verdict import Rule, Track, judge
from neuraos_agent.monitor.syscalls import model_name

log = logging.getLogger("neuraos.monitor")

STATE_DIR = Path("/var/lib/neuraos/monitor")
MODEL_PATH = Path(__file__).with_name("syscall_model.npz")
MODES = ("observe", "contain")
PROTECTED = frozenset({1})  # init: freezing it freezes the guest's service management (and shutdown)
MAX_FILES = 64  # files / destinations kept per process as evidence (all are counted)


@dataclass
class MonitorConfig:
    state_dir: Path = STATE_DIR
    model_path: Path = MODEL_PATH
    mode: str = "observe"  # the default when <state>/mode is absent
    rule: Rule = field(default_factory=Rule)
    novelty_alpha: float = 0.3  # weight of the newest window in the smoothed novelty
    max_processes: int = 4096
    queue_events: int = 200_000
    model_cpu: float = 0.02  # share of one CPU the syscall model may use
    model_batch: int = 16  # windows scored together at most
    sync_s: float = 2.0
    batch_s: float = 0.02  # judge at most this often: each wake-up is a thread switch, dear under TCG


@dataclass
class Alert:
    id: str
    at_unix: float
    pid: int
    uid: int
    comm: str
    profile: str
    mode: str
    contained: bool
    score: float
    threshold: float
    novelty: float
    novelty_bar: float
    window: list[str]
    files: list[str]
    files_total: int
    destinations: list[str]
    bytes_out: int
    freeze_ms: float
    egress_cut_ms: float
    reason: str
    error: str = ""
    detect_ms: float = -1.0


@dataclass
class MonitorStats:
    started_unix: float = field(default_factory=time.time)
    mode: str = ""
    events: int = 0
    syscalls: int = 0
    windows: int = 0
    learned_windows: int = 0
    judged_windows: int = 0
    model_windows: int = 0  # windows the syscall model scored (within its CPU budget)
    model_cpu_s: float = 0.0
    processes_seen: int = 0
    execs: int = 0
    exits: int = 0
    evicted: int = 0
    alerts: int = 0
    contained: int = 0
    released: int = 0
    killed: int = 0
    contain_errors: int = 0
    behaviour_only: int = 0  # processes whose behaviour deviated, sustained, with no new reach: not held
    reach_only: int = 0  # processes that reached new folders / destinations, behaving as learned: not held
    batches: int = 0
    max_batch: int = 0
    queue_len: int = 0
    cpu_s: float = 0.0  # this process's CPU time (user + system) since it started: the whole agent
    monitor_cpu_s: float = 0.0  # the monitor's own threads in it (judge loop, bpftrace readers)
    bpftrace_cpu_s: float = 0.0
    collector: dict = field(default_factory=dict)
    last_freeze_ms: float = -1.0


@dataclass
class _Proc:
    info: ProcessInfo
    gen: int = 0
    pending: list[str] = field(default_factory=list)
    windows: int = 0
    novelty: float = 0.0
    score_num: float = 0.0  # EWMA of the model's window scores (those it scored)
    score_den: float = 0.0
    files: list[str] = field(default_factory=list)
    files_total: int = 0
    seen_files: set[str] = field(default_factory=set)
    track: Track = field(default_factory=lambda: Track(Rule().n))
    last: list[str] = field(default_factory=list)  # the last full window judged (an alert's evidence)
    noted: set[str] = field(default_factory=set)  # which half-verdicts were counted in the stats
    dests: list[str] = field(default_factory=list)
    bytes_out: int = 0
    alerted: bool = False


class Monitor:
    """Runs in its own thread; `on_alert` is called from it (keep it quick: queue and return)."""

    def __init__(self, config: MonitorConfig, on_alert: Callable[[Alert], None] = lambda a: None,
                 collector: BpftraceCollector | None = None, containment: Containment | None = None,
                 model: SyscallModel | None = None, boot_id: str = "") -> None:
        self.config = config
        self.on_alert = on_alert
        self.collector = collector or BpftraceCollector(config.state_dir, capacity=config.queue_events)
        self.containment = containment or Containment()
        self.model = model or SyscallModel.load(config.model_path)
        self.model_id = f"{config.model_path.name}:{self.model.meta.get('fit_digest', '')}"
        self.window = self.model.window
        self._decay = 0.5 ** (1.0 / self.model.half_life)
        self._budget = 0.0  # seconds of model time available now
        self._budget_at = time.monotonic()
        self.store = ProfileStore(config.state_dir / "profiles")
        self.stats = MonitorStats(mode=config.mode)
        self.boot_id = boot_id or str(int(time.time()))
        self._procs: OrderedDict[int, _Proc] = OrderedDict()
        self._baselines: dict[ProfileKey, Baseline] = {}
        self._dirty: set[ProfileKey] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # release/kill come from the link's thread
        self._thread: threading.Thread | None = None
        self._alert_seq = 0
        self._generation: str | None = None  # the profile store's, at the last sync

    # -- lifetime ---------------------------------------------------------------------

    def start(self) -> None:
        d = self.config.state_dir
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o700)  # baselines and mode: root's only
        self.containment.prepare()
        self.collector.start()
        self._thread = threading.Thread(target=self._run, name="neuraos-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.collector.stop()
        if self._thread is not None:
            self._thread.join(5)
        self._sync()

    # -- operator actions (from the link) -----------------------------------------------

    def release(self, pid: int) -> str:
        with self._lock:
            out = self.containment.release(pid)
            self.stats.released += 1
            p = self._procs.get(pid)
            if p is not None:
                p.alerted = False  # judged afresh from here
                p.windows = 0
                p.novelty = 0.0
                p.score_num = p.score_den = 0.0
                p.track.reset()
            return out

    def kill(self, pid: int) -> str:
        with self._lock:
            out = self.containment.kill(pid)
            self.stats.killed += 1
            return out

    # -- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        self.collector.tids.add(threading.get_native_id())  # its CPU time is the monitor's
        _raise_priority()
        next_sync = time.monotonic()
        while not self._stop.is_set():
            batch = self.collector.queue.drain(timeout=0.05)
            if batch:
                try:
                    with self._lock:
                        self.process(batch)
                except Exception:  # one bad batch must not end the monitor
                    log.exception("monitor: batch failed")
                self._stop.wait(self.config.batch_s)
            if time.monotonic() >= next_sync:
                self._sync()
                next_sync = time.monotonic() + self.config.sync_s

    def process(self, batch: list[tuple[float, Event]]) -> int:
        """Apply a batch of (arrival, event); judge or learn every window completed. Returns
        how many windows completed. Public for tests."""
        self.stats.events += len(batch)
        self.stats.batches += 1
        self.stats.max_batch = max(self.stats.max_batch, len(batch))
        ready: list[tuple[_Proc, list[str], float]] = []
        W = self.window
        for at, ev in batch:
            if isinstance(ev, Calls):
                p = self._proc(ev.tgid, ev.uid, ev.comm)
                p.pending.extend(model_name(nr) for nr in ev.nrs)
                p.bytes_out += ev.nbytes
                while len(p.pending) >= W:
                    ready.append((p, p.pending[:W], at))
                    del p.pending[:W]
                self.stats.syscalls += len(ev.nrs)
            elif isinstance(ev, Syscall):
                p = self._proc(ev.tgid, ev.uid, ev.comm)
                p.pending.append(model_name(ev.nr))
                if len(p.pending) >= W:
                    ready.append((p, p.pending[:W], at))
                    del p.pending[:W]
                self.stats.syscalls += 1
            elif isinstance(ev, Opened):
                p = self._procs.get(ev.tgid)
                if p is not None and ev.path not in p.seen_files:
                    p.files_total += 1
                    if len(p.seen_files) < 4096:
                        p.seen_files.add(ev.path)
                    if len(p.files) < MAX_FILES:
                        p.files.append(ev.path)
                    self._opened(p, ev.path, at)
            elif isinstance(ev, Connected):
                p = self._procs.get(ev.tgid)
                if p is not None and ev.dest not in p.dests and len(p.dests) < MAX_FILES:
                    p.dests.append(ev.dest)
                    self._connected(p, ev.dest, at)
            elif isinstance(ev, Sent):
                p = self._procs.get(ev.tgid)
                if p is not None:
                    p.bytes_out += ev.nbytes
            elif isinstance(ev, Exec):
                self.stats.execs += 1
                old = self._procs.pop(ev.tgid, None)
                if old is not None:
                    self._finish(old)
                    info = process_info(ev.tgid, old.info.uid, os.path.basename(ev.path)[:15],
                                        exe=os.path.realpath(ev.path))
                    self._procs[ev.tgid] = _Proc(info, gen=old.gen + 1, track=Track(self.config.rule.n))
            elif isinstance(ev, Exited):
                self.stats.exits += 1
                old = self._procs.pop(ev.tgid, None)
                if old is not None:
                    self._finish(old)
        for p, calls, at in ready:
            self._judge(p, calls, at)
        self.stats.windows += len(ready)
        self._model_sample(ready)
        return len(ready)

    def _model_sample(self, ready: list[tuple[_Proc, list[str], float]]) -> None:
        """Score some of this batch's windows with the model, as far as its CPU budget goes."""
        now = time.monotonic()
        self._budget = min(2.0, self._budget + (now - self._budget_at) * self.config.model_cpu)
        self._budget_at = now
        if self._budget <= 0 or not ready:
            return
        step = max(1, len(ready) // self.config.model_batch)
        chosen = ready[::step][:self.config.model_batch]
        scores = self._score([c for _, c, _ in chosen])
        for (p, calls, at), score in zip(chosen, scores):
            p.score_num = self._decay * p.score_num + len(calls) * score
            p.score_den = self._decay * p.score_den + len(calls)
            ps = p.score_num / p.score_den
            b = self._baseline(p.info.key)
            rule = self.config.rule
            if b.learning:
                b.note_score(ps)
            elif b.threshold is not None and b.threshold.n >= rule.min_calibration:
                p.track.model.append(ps > b.threshold.value + rule.model_margin)
                self._decide(p, calls, b, at)

    def _score(self, windows: list[list[str]]) -> list[float]:
        """Mean surprise of each window, read from the model's start state; charged to the budget."""
        t0 = time.monotonic()
        tokens = np.stack([self.model.encode(w) for w in windows])
        s, _, _ = self.model.run(tokens, *self.model.start_state(len(windows)))
        took = time.monotonic() - t0
        self._budget -= took
        self.stats.model_cpu_s += took
        self.stats.model_windows += len(windows)
        return [float(x) for x in s.mean(axis=1)]

    def _proc(self, tgid: int, uid: int, comm: str) -> _Proc:
        p = self._procs.get(tgid)
        if p is not None:
            self._procs.move_to_end(tgid)
            return p
        while len(self._procs) >= self.config.max_processes:
            self._procs.popitem(last=False)
            self.stats.evicted += 1
        self.stats.processes_seen += 1
        p = self._procs[tgid] = _Proc(process_info(tgid, uid, comm), track=Track(self.config.rule.n))
        return p

    def _finish(self, p: _Proc) -> None:
        """A process ended or exec'd: learn its last partial window (if its profile learns)."""
        if len(p.pending) >= 8:
            b = self._baseline(p.info.key)
            if b.learning:
                b.observe_calls(p.pending)
                self._dirty.add(b.key)

    def _baseline(self, key: ProfileKey) -> Baseline:
        b = self._baselines.get(key)
        if b is None:
            try:
                b = self.store.current(key)
            except ProfileError as exc:
                log.warning("monitor: %s; learning %s afresh", exc, key.name)
                b = None
            if b is None or b.model != self.model_id:
                b = Baseline(key, model=self.model_id)
            self._baselines[key] = b
        return b

    def _opened(self, p: _Proc, path: str, at: float) -> None:
        b = self._baseline(p.info.key)
        if b.learning:
            b.observe_open(path)
            self._dirty.add(b.key)
        elif not b.knows_folder(path) and len(p.track.new_folders) < MAX_FILES:
            p.track.new_folders.add(os.path.dirname(path))
            self._decide(p, p.last or p.pending[-self.window:], b, at)

    def _connected(self, p: _Proc, dest: str, at: float) -> None:
        b = self._baseline(p.info.key)
        if b.learning:
            b.observe_connect(dest)
            self._dirty.add(b.key)
        elif not b.knows_dest(dest):
            p.track.new_dests.add(dest)
            self._decide(p, p.last or p.pending[-self.window:], b, at)

    def _decide(self, p: _Proc, calls: list[str], b: Baseline, at: float) -> None:
        if p.alerted:
            return
        v = judge(self.config.rule, p.track, b.windows)
        if v.act:
            self._act(p, calls, b, at, v.reason, hold=v.hold)
            return
        for half, held, counter in (("behaviour", v.behaviour, "behaviour_only"), ("reach", v.reach, "reach_only")):
            if held and half not in p.noted:
                p.noted.add(half)
                setattr(self.stats, counter, getattr(self.stats, counter) + 1)

    def _judge(self, p: _Proc, calls: list[str], arrived: float) -> None:
        p.windows += 1
        b = self._baseline(p.info.key)
        if b.learning:
            b.observe_calls(calls)
            self._dirty.add(b.key)
            self.stats.learned_windows += 1
            return
        self.stats.judged_windows += 1
        a = self.config.novelty_alpha
        p.novelty = (1 - a) * p.novelty + a * b.novelty(calls)
        p.track.novelty.append(p.novelty > self.config.rule.novelty_bar)
        p.last = calls
        self._decide(p, calls, b, arrived)

    def _act(self, p: _Proc, calls: list[str], b: Baseline, arrived: float, reason: str, hold: bool = True) -> None:
        p.alerted = True
        mode = self.stats.mode
        freeze_ms = cut_ms = -1.0
        error = ""
        contained = False
        decided = time.monotonic()
        if mode == "contain" and p.info.tgid in PROTECTED:
            error = f"pid {p.info.tgid} (init) is never frozen: alert only"
        elif mode == "contain" and not hold:
            error = "its profile has learned too little to hold anyone: alert only"
        elif mode == "contain":
            try:
                c = self.containment.contain(p.info.tgid)
                if c.frozen_at is not None:
                    freeze_ms = (c.frozen_at - decided) * 1000
                if c.cut_at is not None:
                    cut_ms = (c.cut_at - decided) * 1000
                contained = c.frozen_at is not None and c.cut_at is not None
                error = "; ".join(c.errors)
            except ContainError as exc:
                error = str(exc)
            if contained:
                self.stats.contained += 1
                self.stats.last_freeze_ms = freeze_ms
            else:
                self.stats.contain_errors += 1
        # evidence, after the process is held: the model's view of the window that crossed
        score = -1.0
        if p.score_den > 0:
            score = p.score_num / p.score_den
        elif self._budget > 0 and len(calls) >= 8:
            score = self._score([calls])[0]
        bar = b.threshold.value + self.config.rule.model_margin if b.threshold is not None else -1.0
        self._alert_seq += 1
        alert = Alert(
            id=f"{self.boot_id[:8]}-{self._alert_seq}", at_unix=time.time(), pid=p.info.tgid, uid=p.info.uid,
            comm=p.info.comm, profile=p.info.key.name, mode=mode, contained=contained,
            score=score, threshold=bar, novelty=p.novelty, novelty_bar=self.config.rule.novelty_bar,
            window=list(calls), files=list(p.files), files_total=p.files_total,
            destinations=list(p.dests), bytes_out=p.bytes_out, freeze_ms=freeze_ms, egress_cut_ms=cut_ms,
            reason=reason, error=error, detect_ms=(decided - arrived) * 1000)
        self.stats.alerts += 1
        log.warning("monitor: %s pid %d (%s): %s; %s%s", "contained" if contained else "alert", p.info.tgid,
                    p.info.key.name, reason, f"frozen in {freeze_ms:.0f} ms" if contained else mode,
                    f"; errors: {error}" if error else "")
        try:
            with open(self.config.state_dir / "alerts.jsonl", "a") as f:
                f.write(json.dumps(asdict(alert)) + "\n")
        except OSError as exc:
            log.warning("monitor: cannot log alert: %s", exc)
        self.on_alert(alert)

    # -- sync: mode, baselines, stats ------------------------------------------------------

    def _sync(self) -> None:
        d = self.config.state_dir
        try:
            mode = (d / "mode").read_text().strip()
            if mode in MODES:
                self.stats.mode = mode
        except OSError:
            pass
        generation = self.store.generation()
        rescan, self._generation = generation != self._generation, generation
        with self._lock:
            for key, b in list(self._baselines.items()):
                if not rescan and key not in self._dirty:
                    continue
                try:
                    versions = self.store.versions(key) if rescan else []
                    if versions and versions[-1] > b.version:  # frozen or reset by the operator
                        newer = self.store.load(key)
                        if newer is not None:
                            self._baselines[key] = newer
                            self._dirty.discard(key)
                            continue
                    if key in self._dirty and b.learning:
                        self.store.save_draft(b)
                except (OSError, ProfileError) as exc:
                    log.warning("monitor: profile %s: %s", key.name, exc)
            self._dirty.clear()
        self._write_stats()

    def _write_stats(self) -> None:
        st = self.stats
        ru = resource.getrusage(resource.RUSAGE_SELF)
        st.cpu_s = ru.ru_utime + ru.ru_stime
        st.bpftrace_cpu_s = _cpu_of(self.collector.child_pid)
        st.monitor_cpu_s = sum(_cpu_of(os.getpid(), tid) for tid in list(self.collector.tids))
        st.queue_len = len(self.collector.queue)
        st.collector = asdict(self.collector.stats)
        doc = asdict(st) | {"at_unix": time.time(), "attached": self.collector.attached.is_set(),
                            "contained_pids": sorted(self.containment.held)}
        tmp = self.config.state_dir / "stats.tmp"
        try:
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, self.config.state_dir / "stats.json")
        except OSError as exc:
            log.warning("monitor: cannot write stats: %s", exc)


def _raise_priority(nice: int = -15) -> None:
    """The calling thread (Linux: per thread) before the workload it watches, so that it keeps up."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as exc:
        log.warning("monitor: cannot raise priority: %s", exc)


def _cpu_of(pid: int | None, tid: int | None = None) -> float:
    """CPU seconds (user + system) of a process, or of one of its threads."""
    if pid is None:
        return 0.0
    try:
        path = f"/proc/{pid}/task/{tid}/stat" if tid is not None else f"/proc/{pid}/stat"
        f = Path(path).read_text().rsplit(") ", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0
