"""The live scheduler: every tick collect → forecast → decide → act, for all guests at once.

One tick: libvirt's bulk stats and each agent's last intent report become one `Sample`
per guest (kept in the bounded ring and its on-disk log); the live forecaster runs one
batched pass over the guests; the planner turns forecasts into allocations; the
actuators apply what changed through the controller; every change goes to the action
log with the forecast that caused it, and the tick's picture to the live-state file
that `neuraos top` reads. The GPU headroom guard runs on the same tick.

A guest's bad tick is that guest's alone: vanished mid-tick, no policy, no balloon
stats, garbage intent: each is skipped (or partly skipped) with a reason in the log
and the live state, and the loop goes on with the others.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from hypervisor.errors import GuestNotFound, GuestVanished, NeuraError
from hypervisor.scheduler.action_log import ActionLog, ActionRecord
from hypervisor.scheduler.actuators import Actuator, current_allocation
from hypervisor.scheduler.live_forecast import Explained, LiveForecastConfig, LiveForecaster, used_mib
from hypervisor.scheduler.live_state import write_live
from hypervisor.scheduler.planners import PlanInput, Planner
from hypervisor.scheduler.policy import Allocation, GuestForecast, HostCapacity
from hypervisor.telemetry.collectors import LibvirtCollector, Sample
from hypervisor.telemetry.nvml import HeadroomGuard, Nvml, open_nvml
from hypervisor.telemetry.ring import TelemetryRing
from hypervisor.virt import domains
from hypervisor.virt.connection import Connection
from hypervisor.virt.templates import GuestPolicy

log = logging.getLogger("neuraos.scheduler")

IntentSource = Callable[[str], tuple[object, "float | None"]]  # guest -> (raw intent, when it was received)


@dataclass(frozen=True)
class LoopConfig:
    tick_s: float = 5.0
    history_ticks: int = 720        # the ring: an hour of 5 s ticks, enough for periods up to 20 min
    min_cores: float = 0.1          # never cap a guest below this (its agent must still run)
    saturated_frac: float = 0.9     # use at this share of the allocation: demand is censored
    vcpu_timeout_s: float = 10.0


@dataclass(frozen=True)
class Paths:
    """Where the loop keeps its files, under the controller's state dir."""

    root: Path

    @property
    def actions(self) -> Path:
        return self.root / "actions.jsonl"

    @property
    def live(self) -> Path:
        return self.root / "live.json"

    @property
    def telemetry(self) -> Path:
        return self.root / "telemetry"


def scheduler_paths(state_dir: Path) -> Paths:
    return Paths(state_dir / "scheduler")


@dataclass
class TickReport:
    at: float
    planned: dict[str, Allocation] = field(default_factory=dict)
    applied: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    took_s: float = 0.0


class SchedulerLoop:
    def __init__(self, conn: Connection, actuator: Actuator, planner: Planner, forecaster: LiveForecaster,
                 paths: Paths, host: HostCapacity, guests: Callable[[], list[str]],
                 intents: IntentSource = lambda _n: (None, None), cfg: LoopConfig = LoopConfig(),
                 collector: LibvirtCollector | None = None, gpu: bool = True, nvml: Nvml | None = None,
                 bounds: Callable[[str], GuestPolicy] | None = None) -> None:
        """`gpu`: run the NVML headroom guard (on `nvml`, or the host's own where None)."""
        self.conn = conn
        self.actuator = actuator
        self.planner = planner
        self.forecaster = forecaster
        self.paths = paths
        self.host = host
        self.guests = guests
        self.intents = intents
        self.cfg = cfg
        self.collector = collector or LibvirtCollector(conn)
        self.bounds = bounds or (lambda name: domains.policy(conn, name))
        self.ring = TelemetryRing(cfg.history_ticks, paths.telemetry)
        self.log = ActionLog(paths.actions)
        self.current: dict[str, Allocation] = {}
        self.demand: dict[str, deque[float]] = {}
        self.guard = HeadroomGuard()
        if not gpu:
            self.nvml, self.gpu_status = None, "GPU guard off"
        elif nvml is None:
            self.nvml, self.gpu_status = open_nvml()
        else:
            self.nvml, self.gpu_status = nvml, "NVML"
        if self.nvml is None:
            log.info("GPU guard does nothing: %s", self.gpu_status)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.ticks = 0

    # -- lifetime ------------------------------------------------------------------

    def __enter__(self) -> SchedulerLoop:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="neuraos-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.cfg.tick_s + self.cfg.vcpu_timeout_s + 5)
            self._thread = None

    def run(self) -> None:
        """Tick on a fixed schedule until stopped; a slow tick skips, never piles up."""
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                self.tick()
            except NeuraError as e:  # libvirtd restarting: try again next tick
                log.warning("scheduler tick failed: %s", e)
            except Exception:  # never let one bad tick end the scheduler
                log.exception("scheduler tick crashed")
            next_at += self.cfg.tick_s
            now = time.monotonic()
            if next_at < now:
                next_at = now + self.cfg.tick_s - (now - next_at) % self.cfg.tick_s
            self._stop.wait(next_at - now)

    # -- one tick ------------------------------------------------------------------

    def tick(self) -> TickReport:
        t0 = time.monotonic()
        rep = TickReport(at=time.time())
        names = self.guests()
        intents, intent_at = {}, {}
        for name in names:
            raw, at = self.intents(name)
            clean, why = _raw_intent(raw)
            if why:
                rep.skipped[name] = f"intent ignored: {why}"
                log.warning("guest %s: intent ignored: %s", name, why)
            if clean:
                intents[name], intent_at[name] = clean, at
        samples = self.collector.collect(names, intents)
        for name, why in getattr(self.collector, "skipped", {}).items():
            rep.skipped[name] = why
            if why.startswith("guest vanished"):
                self._forget(name)

        bounds: dict[str, GuestPolicy] = {}
        for name, s in samples.items():
            try:
                bounds[name] = self.bounds(name)
                if name not in self.current:
                    self.current[name] = current_allocation(self.conn, name, s.vcpus, s.balloon_mib)
            except (GuestVanished, GuestNotFound) as e:
                self._skip(rep, name, f"vanished mid-tick: {e}")
                continue
            self.ring.add(s)
            self.forecaster.observe(s, bounds[name])
            self._observe_demand(s, bounds[name])
            if s.balloon_mib is None:
                rep.skipped.setdefault(name, "no balloon stats: memory left as it is")
        live = [n for n in samples if n in bounds]
        histories = {n: self.ring.history(n) for n in live}
        demand = {n: np.array(self.demand[n])[-len(histories[n]):] for n in live}
        forecasts = self.forecaster.forecast(histories, bounds, demand, intent_at)

        inputs = []
        for n in live:
            fc, _ = forecasts[n]
            fc = replace(fc, cpu_cores=np.maximum(fc.cpu_cores, self.cfg.min_cores))
            forecasts[n] = (fc, forecasts[n][1])
            inputs.append(PlanInput(n, bounds[n], fc, self.current[n], samples[n].cpu_used))
        actions = self.planner.plan(inputs, self.host) if inputs else []

        for a in actions:
            fc, why = forecasts[a.guest]
            before = self.current[a.guest]
            rep.planned[a.guest] = a.target
            if a.target == before:
                continue
            try:
                res = self.actuator.apply(a.guest, before, a.target, memory=why.memory_known)
            except (GuestVanished, GuestNotFound) as e:
                self._skip(rep, a.guest, f"vanished mid-tick: {e}")
                self.log.write(ActionRecord(time.time(), a.guest, self.planner.name, "skip",
                                            asdict(before), asdict(a.target), [], None, [str(e)],
                                            ["vanished mid-tick"], _forecast_doc(fc, why)))
                continue
            self.current[a.guest] = res.allocation
            rep.applied[a.guest] = res.applied
            if res.applied or res.errors:
                self.log.write(ActionRecord(time.time(), a.guest, self.planner.name, "resize", asdict(before),
                                            asdict(a.target), res.applied, asdict(res.allocation), res.errors,
                                            list(a.reasons), _forecast_doc(fc, why, a.forecast)))
        self._gpu(rep)
        rep.took_s = time.monotonic() - t0
        self.ticks += 1
        self._write_live(rep, samples, forecasts, bounds)
        return rep

    def _observe_demand(self, s: Sample, b: GuestPolicy) -> None:
        """The CPU the guest wanted this tick: its use, or twice its cap if it was held at the cap.

        A capped guest's use says only that it wanted at least its cap; doubling (up to its
        maximum) finds the real level in a few cycles without sending every noisy idle tick
        that brushes a low cap straight to the maximum.
        """
        cur = self.current.get(s.guest)
        cap = float(b.max_vcpus)
        held = cur is not None and cur.cpu_cores < cap and s.cpu_used >= self.cfg.saturated_frac * cur.cpu_cores
        want = min(cap, 2.0 * cur.cpu_cores) if held else s.cpu_used
        self.demand.setdefault(s.guest, deque(maxlen=self.cfg.history_ticks)).append(want)

    def _skip(self, rep: TickReport, name: str, why: str) -> None:
        rep.skipped[name] = why
        log.warning("guest %s skipped: %s", name, why)
        self._forget(name)

    def _forget(self, name: str) -> None:
        self.current.pop(name, None)
        self.demand.pop(name, None)
        self.ring.drop(name)
        self.forecaster.forget(name)
        self.planner.forget(name)

    def _gpu(self, rep: TickReport) -> None:
        if self.nvml is None:
            return
        try:
            done = self.guard.apply(self.nvml, self.guard.plan(self.nvml.samples()))
        except Exception as e:  # NVML errors are the GPU's, not the guests'
            rep.skipped["gpu"] = f"NVML: {e}"
            return
        for a in done:
            self.log.write(ActionRecord(time.time(), f"gpu{a.index}", "headroom-guard", "gpu",
                                        target={"power_limit_w": a.power_limit_w}, applied=["power_limit"],
                                        reasons=[a.reason]))

    def _write_live(self, rep: TickReport, samples: dict[str, Sample],
                    forecasts: dict[str, tuple[GuestForecast, Explained]], bounds: dict[str, GuestPolicy]) -> None:
        guests = {}
        for name, s in samples.items():
            if name not in forecasts:
                continue
            fc, why = forecasts[name]
            cur = self.current.get(name)
            guests[name] = {
                "usage": {"cpu_cores": s.cpu_used, "cpu_steal": s.cpu_steal, "vcpus_plugged": s.vcpus,
                          "memory_used_mib": used_mib(s), "balloon_mib": s.balloon_mib,
                          "run_queue": s.intent.run_queue, "jobs_due_s": s.intent.jobs_due_s},
                "allocation": asdict(cur) | {"cpu_cores": cur.cpu_cores} if cur else None,
                "planned": asdict(rep.planned[name]) if name in rep.planned else None,
                "bounds": asdict(bounds[name]),
                "forecast": _forecast_doc(fc, why),
            }
        doc = {"at": rep.at, "tick_s": self.cfg.tick_s, "planner": self.planner.name, "ticks": self.ticks,
               "took_s": rep.took_s, "gpu": self.gpu_status, "skipped": rep.skipped, "guests": guests}
        try:
            write_live(self.paths.live, doc)
        except OSError as e:
            log.warning("live state not written: %s", e.strerror)


def _raw_intent(raw: object) -> tuple[dict | None, str]:
    """The agent's raw intent as the collector takes it; -1 (the agent's "no timer") is absence."""
    if raw is None:
        return None, ""
    if not isinstance(raw, dict):
        return None, f"not a mapping: {type(raw).__name__}"
    out = dict(raw)
    if out.get("jobs_due_s") == -1:
        out.pop("jobs_due_s")
    return out, ""


def _forecast_doc(fc: GuestForecast, why: Explained, planned: GuestForecast | None = None) -> dict:
    """The forecast as logged; `planned` is what the planner acted on, when it moved the
    CPU quantile (the per-guest calibrated level) away from the forecast's own p98."""
    def path(a: np.ndarray) -> list[float | None]:
        return [None if not math.isfinite(v) else round(float(v), 4) for v in a]

    upper = fc.quantiles[-1] if fc.quantiles else None
    i98 = fc.quantiles.index(0.98) if 0.98 in fc.quantiles else -1
    i99 = fc.quantiles.index(0.99) if 0.99 in fc.quantiles else -1
    return {"source": why.source, "period_s": why.period_s, "period_strength": why.period_strength,
            "job_due_in_s": why.job_due_in_s, "transformer_cpu_next_step": why.transformer_cpu,
            "cpu_p98_cores": path(fc.cpu_cores[:, i98]), "memory_p99_mib": path(fc.memory_mib[:, i99]),
            "memory_known": why.memory_known, "upper_quantile": upper,
            **({"cpu_planned_cores": path(planned.cpu_cores[:, i98])}
               if planned is not None and i98 >= 0 and planned.quantiles == fc.quantiles else {})}


def host_capacity(cpu_overcommit: float = 4.0, memory_overcommit: float = 1.0) -> HostCapacity:
    """This host's CPUs and memory (vCPUs may overcommit CPUs; memory, by default, not)."""
    import os

    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    return HostCapacity(float(os.cpu_count() or 1), mem_kib / 1024, cpu_overcommit, memory_overcommit)


def load_forecaster():
    """The shipped Transformer, or None (with the reason logged) where it cannot load."""
    try:
        from models.forecaster import Forecaster

        return Forecaster.load()
    except Exception as e:  # no torch, or damaged weights: periodic and intent paths still work
        log.warning("forecaster not loaded (%s); scheduling on the periodic and intent paths only", e)
        return None


def controller_loop(ctl, state_dir: Path, cfg: LoopConfig = LoopConfig(), planner: Planner | None = None,
                    model=False) -> SchedulerLoop:
    """The loop for a running `Controller`: its guests, its link's intent reports, its resizing."""
    from hypervisor.scheduler.planners import ForecastPlanner

    def guests() -> list[str]:
        return [r.name for r in ctl.store.guests()]

    def intents(name: str):
        if name not in ctl.link.guests():
            return None, None
        st = ctl.link.state(name).status
        return (st.intent, st.received_unix) if st is not None else (None, None)

    return SchedulerLoop(
        ctl.conn, Actuator(ctl, cfg.vcpu_timeout_s), planner or ForecastPlanner(),
        LiveForecaster(load_forecaster() if model is False else model,
                       LiveForecastConfig(tick_s=cfg.tick_s)),
        scheduler_paths(state_dir), host_capacity(), guests, intents, cfg)
