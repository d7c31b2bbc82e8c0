"""`neuraos top` and `neuraos forecast NAME`: the running scheduler, read from its files.

The loop inside `neuraos up` writes its last tick (live.json) and its action log under
the state dir; these commands only read them, so they need no socket into the
controller and work from any shell on the host.
"""

from __future__ import annotations

import argparse
import json
import time

from rich.console import Console
from rich.live import Live
from rich.table import Table

from hypervisor.config import Config
from hypervisor.errors import NeuraError
from hypervisor.scheduler.action_log import read_actions
from hypervisor.scheduler.live_state import read_live
from hypervisor.scheduler.loop import scheduler_paths

out = Console()


def _f(v: float | None, fmt: str = "{:.2f}") -> str:
    return "–" if v is None else fmt.format(v)


def _top_table(doc: dict) -> Table:
    t = Table(title=f"NeuraOS scheduler ({doc.get('planner')}, tick {doc.get('tick_s')} s, "
                    f"#{doc.get('ticks')}, {time.time() - doc['at']:.0f} s ago) — GPU: {doc.get('gpu')}")
    for col in ("guest", "CPU used", "alloc cores (vCPUs×quota)", "p98 next ticks", "source",
                "mem used/balloon MiB", "mem p99", "run queue", "job due"):
        t.add_column(col)
    for name, g in sorted(doc.get("guests", {}).items()):
        u, a, f = g["usage"], g.get("allocation") or {}, g["forecast"]
        cpu_path = " ".join(_f(v, "{:.1f}") for v in f["cpu_p98_cores"][:4])
        src = f["source"] + (f" {f['period_s']:.0f}s" if f.get("period_s") else "")
        alloc = (f"{a['cpu_cores']:.2f} ({a['vcpus']}×{a['cpu_quota_us'] / a['cpu_period_us']:.0%})"
                 if a else "–")
        mem_p99 = f["memory_p99_mib"][0] if f["memory_p99_mib"] else None
        t.add_row(name, _f(u["cpu_cores"]), alloc, cpu_path, src,
                  f"{_f(u['memory_used_mib'], '{:.0f}')}/{_f(u['balloon_mib'], '{:.0f}')}",
                  _f(mem_p99, "{:.0f}"), _f(u.get("run_queue"), "{:.0f}"), _f(u.get("jobs_due_s"), "{:.0f}s"))
    for name, why in sorted(doc.get("skipped", {}).items()):
        t.add_row(name, f"[yellow]skipped: {why}[/]", *[""] * 7)
    return t


def cmd_top(args: argparse.Namespace, cfg: Config) -> int:
    paths = scheduler_paths(cfg.state_dir)
    doc = read_live(paths.live)
    if args.json:
        print(json.dumps(doc))
        return 0
    if args.once:
        out.print(_top_table(doc))
        return 0
    with Live(_top_table(doc), console=out, auto_refresh=False) as live:
        while True:
            time.sleep(max(float(doc.get("tick_s", 5.0)), 0.5))
            doc = read_live(paths.live)
            live.update(_top_table(doc), refresh=True)


def cmd_forecast(args: argparse.Namespace, cfg: Config) -> int:
    paths = scheduler_paths(cfg.state_dir)
    doc = read_live(paths.live)
    g = doc.get("guests", {}).get(args.name)
    if g is None:
        why = doc.get("skipped", {}).get(args.name)
        raise NeuraError(f"the scheduler has no forecast for {args.name!r}"
                         + (f": {why}" if why else " (not running, or not a NeuraOS guest)"),
                         "`neuraos top` lists the guests it schedules")
    actions = read_actions(paths.actions, args.name, limit=args.limit)
    result = {"guest": args.name, "at": doc["at"], "planner": doc.get("planner"), "usage": g["usage"],
              "allocation": g["allocation"], "planned": g["planned"], "bounds": g["bounds"],
              "forecast": g["forecast"], "actions": [a.__dict__ for a in actions]}
    if args.json:
        print(json.dumps(result))
        return 0
    f, a, p = g["forecast"], g["allocation"] or {}, g["planned"] or {}
    out.print(f"[bold]{args.name}[/]: {f['source']} forecast"
              + (f", period {f['period_s']:.0f} s (strength {f['period_strength']:.2f})" if f.get("period_s") else "")
              + (f", timer due in {f['job_due_in_s']:.0f} s" if f.get("job_due_in_s") else ""))
    t = Table(title=f"next ticks ({doc.get('tick_s')} s each)")
    t.add_column("tick")
    t.add_column("CPU p98 (cores)")
    t.add_column("memory p99 (MiB)")
    for i, (c, m) in enumerate(zip(f["cpu_p98_cores"], f["memory_p99_mib"]), 1):
        t.add_row(f"+{i}", _f(c), _f(m, "{:.0f}"))
    out.print(t)
    if f.get("transformer_cpu_next_step"):
        out.print("Transformer, next 5 min (cores): " + ", ".join(
            f"{k} {v:.2f}" for k, v in f["transformer_cpu_next_step"].items() if v == v))
    if a:
        out.print(f"in effect: {a['vcpus']} vCPUs × {a['cpu_quota_us'] / a['cpu_period_us']:.0%}, "
                  f"balloon {a['memory_mib']} MiB")
    if p:
        out.print(f"planned:   {p['vcpus']} vCPUs × {p['cpu_quota_us'] / p['cpu_period_us']:.0%}, "
                  f"balloon {p['memory_mib']} MiB")
    for r in actions:
        tgt = r.target or {}
        out.print(f"  {time.strftime('%H:%M:%S', time.localtime(r.at))} {r.kind} → "
                  f"{tgt.get('vcpus')} vCPUs × {(tgt.get('cpu_quota_us') or 0) / (tgt.get('cpu_period_us') or 1):.0%}, "
                  f"{tgt.get('memory_mib')} MiB [{', '.join(r.reasons)}] applied {r.applied or '-'}"
                  + (f" [red]errors: {'; '.join(r.errors)}[/]" if r.errors else "")
                  + f" (from {r.forecast.get('source')})")
    return 0


def register(add) -> None:
    top = add("top", cmd_top, "live per-guest usage, allocation and forecast from the running scheduler")
    top.add_argument("--once", action="store_true", help="print one table and exit")
    fc = add("forecast", cmd_forecast, "a guest's forecast, what is in effect, what is planned, recent actions")
    fc.add_argument("name")
    fc.add_argument("--limit", type=int, default=10, help="recent actions to show")
