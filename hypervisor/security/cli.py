"""`neuraos alerts`, `neuraos release NAME PID`, `neuraos kill NAME PID`.

Alerts are read from the alert store. Release and kill are queued there and carried out
by the running controller (`neuraos up`), which holds the guests' links; the command
waits for its answer.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict

from rich.console import Console
from rich.table import Table

from hypervisor.config import Config
from hypervisor.errors import NeuraError

out = Console()


def store_path(cfg: Config):
    return cfg.state_dir / "security.db"


def cmd_alerts(args: argparse.Namespace, cfg: Config) -> int:
    from hypervisor.security.alerts import AlertStore

    store = AlertStore(store_path(cfg))
    try:
        rows = store.alerts(args.name, limit=args.limit)
    finally:
        store.close()
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))
        return 0
    if not rows:
        out.print("no alerts")
        return 0
    t = Table(title="behaviour alerts")
    for col in ("when", "guest", "pid", "state", "profile", "score / bar", "novelty", "files", "bytes out",
                "to", "freeze ms"):
        t.add_column(col)
    for r in rows:
        d = r.report
        t.add_row(time.strftime("%H:%M:%S", time.localtime(r.received)), r.guest, str(r.pid), r.state,
                  d.get("profile", ""), f"{d.get('score', 0):.2f} / {d.get('threshold', 0):.2f}",
                  f"{d.get('novelty', 0):.2f}", str(d.get("files_total", 0)), str(d.get("bytes_out", 0)),
                  " ".join(d.get("destinations", [])[:3]), f"{d.get('freeze_ms', -1):.0f}")
    out.print(t)
    return 0


def _queued(kind: str):
    def cmd(args: argparse.Namespace, cfg: Config) -> int:
        from hypervisor.security.alerts import AlertStore

        if args.pid <= 0:
            raise NeuraError(f"{args.pid} is not a process id")
        store = AlertStore(store_path(cfg))
        try:
            seq = store.request(args.name, args.pid, kind)
            deadline = time.monotonic() + args.timeout
            while (a := store.action(seq)) is not None and a.done is None:
                if time.monotonic() > deadline:
                    raise NeuraError(f"no controller carried out {kind} {args.name} {args.pid} within "
                                     f"{args.timeout:g}s", "the controller runs with `neuraos up`; the request "
                                     "stays queued until one does")
                time.sleep(0.2)
        finally:
            store.close()
        if a is None or not a.ok:
            raise NeuraError(a.result if a else "the request vanished", "`neuraos alerts` lists contained processes")
        if args.json:
            print(json.dumps({"guest": args.name, "pid": args.pid, "action": kind, "result": a.result}))
        else:
            out.print(f"{args.name}: {a.result}")
        return 0

    return cmd


def register(add) -> None:
    al = add("alerts", cmd_alerts, "behaviour alerts from the guests' monitors (contained processes)")
    al.add_argument("name", nargs="?", help="only this guest's")
    al.add_argument("--limit", type=int, default=50)
    for kind, what in (("release", "thaw a contained process and restore its network"),
                       ("kill", "kill a contained process")):
        p = add(kind, _queued(kind), what)
        p.add_argument("name", help="the guest")
        p.add_argument("pid", type=int, help="the process id in the guest (from `neuraos alerts`)")
        p.add_argument("--timeout", type=float, default=30.0)
