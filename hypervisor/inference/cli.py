"""`neuraos models` and `neuraos kv`: what the model service can run and where KV state lives.

The CLI is a separate process from the controller, so it reads the service's snapshot file
(`<run_dir>/inference.json`, rewritten by the running service at most once a second) and adds
what it can probe by itself (which backends are installed). Both commands take --json.
Wired into hypervisor/cli.py as `cmd_models(args, cfg)` and `cmd_kv(args, cfg)`.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from hypervisor.config import Config

SNAPSHOT_NAME = "inference.json"
out = Console()


def snapshot_path(cfg: Config) -> Path:
    return cfg.run_dir / SNAPSHOT_NAME


def read_snapshot(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def models_report(cfg: Config) -> dict:
    """Installed backends (probed here) and the running service's loaded models (if any)."""
    from hypervisor.inference.backends import probe_backends
    from hypervisor.inference.embed import MINILM, minilm_missing, packaged_minilm

    snap = read_snapshot(snapshot_path(cfg))
    missing = minilm_missing()
    return {
        "backends": [asdict(b) for b in probe_backends()],
        "embedders": [{"name": MINILM, "available": missing is None,
                       "detail": missing or str(packaged_minilm())}],
        "running": None if snap is None else {
            "backend": snap.get("backend"), "embedder": snap.get("embedder"), "at_unix": snap.get("at_unix")},
    }


def kv_report(cfg: Config) -> dict:
    """Tiers, their occupancy and per-guest hit rates, from the running service's snapshot."""
    snap = read_snapshot(snapshot_path(cfg))
    if snap is None:
        return {"running": False, "slots": [], "tiers": {}, "guests": {}}
    return {"running": True, "at_unix": snap.get("at_unix"), "slots": snap.get("slots", []),
            "tiers": snap.get("tiers", {}), "restores": snap.get("restores", {}), "guests": snap.get("guests", {}),
            "restore_cost": snap.get("restore_cost")}


def cmd_models(args: argparse.Namespace, cfg: Config) -> int:
    doc = models_report(cfg)
    if args.json:
        print(json.dumps(doc))
        return 0
    t = Table(title="model backends")
    for col in ("backend", "model", "available", "KV save/restore", "detail"):
        t.add_column(col)
    for b in doc["backends"] + [{**e, "model": e["name"], "name": "embeddings", "kv_state": None}
                                for e in doc["embedders"]]:
        t.add_row(b["name"], b["model"], "yes" if b["available"] else "[red]no[/]",
                  "" if b["kv_state"] is None else ("yes" if b["kv_state"] else "in engine"), b["detail"])
    out.print(t)
    running = doc["running"]
    if running is None:
        out.print(f"no running model service (no {snapshot_path(cfg)})")
    else:
        b, e = running.get("backend") or {}, running.get("embedder") or {}
        age = time.time() - (running.get("at_unix") or 0)
        out.print(f"running: {b.get('name', 'no LM')} {b.get('model', '')} ({b.get('slots', 0)} slots, "
                  f"n_ctx {b.get('n_ctx', 0)}); embeddings {e.get('model', 'none')} "
                  f"({e.get('batches', 0)} batches); snapshot {age:.0f}s old")
    return 0


def cmd_kv(args: argparse.Namespace, cfg: Config) -> int:
    doc = kv_report(cfg)
    if args.json:
        print(json.dumps(doc))
        return 0
    if not doc["running"]:
        out.print(f"no running model service (no {snapshot_path(cfg)})")
        return 0
    tiers = Table(title="KV tiers")
    for col in ("tier", "used MiB", "capacity MiB", "items"):
        tiers.add_column(col)
    slots = doc["slots"]
    tiers.add_row("slot (live)", "", "", f"{sum(s is not None for s in slots)}/{len(slots)}")
    for name, u in doc["tiers"].items():
        tiers.add_row(name, f"{u['used_bytes'] / 2**20:.1f}", f"{u['capacity_bytes'] / 2**20:.0f}", str(u["items"]))
    out.print(tiers)
    guests = Table(title="KV per guest")
    for col in ("guest", "sessions", "slot/ram/nvme", "KV tokens", "hit rate", "restored ram/nvme", "re-prefilled"):
        guests.add_column(col)
    for name, g in doc["guests"].items():
        by, kv = g["sessions_by_tier"], g["kv"]
        hit = "" if g["kv_hit_rate"] is None else f"{g['kv_hit_rate']:.0%}"
        guests.add_row(name, str(g["sessions"]), f"{by['slot']}/{by['ram']}/{by['nvme']}", str(g["kv_tokens"]),
                       hit, f"{kv['ram']}/{kv['nvme']}", str(kv["prefill"] + kv.get("recompute", 0)))
    out.print(guests)
    cost = doc.get("restore_cost")
    if cost:  # what the service measured, and so how it brings a parked session back
        reads = ", ".join(f"{n} {t['mib_per_s']} MiB/s" for n, t in cost["tiers"].items()) or "no restore yet"
        out.print(f"measured: prefill {cost['prefill_tok_per_s'] or '?'} tok/s; restore from {reads}; "
                  f"re-prefilled by choice {cost['decisions']['recompute']}")
    return 0
