"""`neuraos-agent profiles` (review, freeze, relearn baselines) and `neuraos-agent monitor` (mode, counters).

Both work on the monitor's state folder (root only); the running agent picks changes up
at its next sync (2 s): a frozen profile starts being judged, a mode change applies.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_monitor_parsers(sub: argparse._SubParsersAction) -> None:
    from neuraos_agent.monitor.engine import MODES, STATE_DIR

    p = sub.add_parser("profiles", help="review the behaviour profiles; freeze or relearn their baselines")
    p.add_argument("match", nargs="*", help="profiles whose name contains any of these (default: all)")
    p.add_argument("--state", type=Path, default=STATE_DIR, help=argparse.SUPPRESS)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    act = p.add_mutually_exclusive_group()
    act.add_argument("--freeze", action="store_true", help="stop learning: fix each matched profile's threshold")
    act.add_argument("--learn", action="store_true", help="back to learning (a new version)")
    p.add_argument("--min-windows", type=int, default=8, help="--freeze skips profiles with fewer windows")
    p.add_argument("--fpr", type=float, default=0.001, help="--freeze's target false-positive rate")
    p.set_defaults(func=cmd_profiles)

    m = sub.add_parser("monitor", help="the behaviour monitor's mode and counters")
    m.add_argument("--mode", choices=MODES, help="set the mode (observe: alert only; contain: freeze and cut)")
    m.add_argument("--state", type=Path, default=STATE_DIR, help=argparse.SUPPRESS)
    m.add_argument("--json", action="store_true", help="machine-readable output")
    m.set_defaults(func=cmd_monitor)


def cmd_profiles(args: argparse.Namespace) -> int:
    from neuraos_agent.monitor.profile import ProfileError, ProfileStore

    store = ProfileStore(args.state / "profiles")
    try:
        keys = [k for k in store.keys() if not args.match or any(m in k.name for m in args.match)]
        changed = []
        for k in keys if (args.freeze or args.learn) else ():
            b = store.current(k)
            if b is None:
                continue
            if args.freeze and b.learning and b.windows >= args.min_windows:
                b.freeze(args.fpr)
            elif args.learn and not b.learning:
                b.learn()
            else:
                continue
            store.save(b)
            store.drop_draft(k)
            changed.append(k.name)
        rows = store.summaries(keys)
    except (OSError, ProfileError, ValueError) as exc:
        print(f"neuraos-agent: profiles: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"profiles": rows, "changed": changed}, indent=1))
        return 0
    for r in rows:
        bar = "" if r["threshold"] is None else f" threshold {r['threshold']}"
        print(f"{r['profile']}  v{r['version']} {r['mode']}  {r['windows']} windows{bar}  "
              f"top {' '.join(r['top_syscalls'][:4])}")
    for name in changed:
        print(f"changed: {name}")
    if not rows:
        print("no profiles yet: the monitor learns them from this guest's activity")
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    if args.mode:
        try:
            args.state.mkdir(parents=True, exist_ok=True, mode=0o700)
            (args.state / "mode").write_text(args.mode + "\n")
        except OSError as exc:
            print(f"neuraos-agent: cannot set the monitor's mode: {exc}", file=sys.stderr)
            return 1
    try:
        stats = json.loads((args.state / "stats.json").read_text())
    except (OSError, ValueError):
        stats = None
    if args.json:
        print(json.dumps({"mode_set": args.mode, "stats": stats}))
        return 0
    if stats is None:
        print("the monitor has not written its counters yet (is the agent running with it?)")
        return 0 if args.mode else 1
    age = time.time() - stats.get("at_unix", 0)
    print(f"mode {args.mode or stats['mode']}  ({age:.0f}s ago)  events {stats['events']}  "
          f"windows {stats['windows']}  alerts {stats['alerts']}  contained {stats['contained']}  "
          f"dropped {stats['collector'].get('dropped')}  lost {stats['collector'].get('lost_kernel')}  "
          f"malformed {stats['collector'].get('malformed')}")
    return 0
