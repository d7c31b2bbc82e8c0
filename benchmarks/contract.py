"""The benchmark contract shared by every script (../shared/BENCHMARKS.md).

Command line `[--quick] [--data DIR] [--json PATH] [--seed N]`, a rich table on
stdout, and the result document with one row per system and a `primary` metric.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO.parent / "shared" / "datasets"


def parser(name: str, default_data: Path, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"benchmarks/{name}.py", description=description)
    p.add_argument("--quick", action="store_true", help="a smaller slice, under 60 s on 2 cores")
    p.add_argument("--data", type=Path, default=default_data, help=f"data set folder (default {default_data})")
    p.add_argument("--json", type=Path, help="write the result document here")
    p.add_argument("--seed", type=int, default=0, help="fixes every random choice")
    return p


def seed_everything(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:
        pass


def require_data(path: Path, what: str) -> None:
    """Exit with one clear line when the data set is absent."""
    if not path.exists():
        print(f"error: {what} not found at {path}", file=sys.stderr)
        print("hint: pass --data DIR, or place ../shared/datasets beside the repository", file=sys.stderr)
        sys.exit(2)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True)
        gpu = out.stdout.strip() or None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu}


@dataclass
class Result:
    benchmark: str
    data: str
    quick: bool
    primary: dict[str, str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def document(self) -> dict[str, Any]:
        doc = {"benchmark": self.benchmark, "data": self.data, "quick": self.quick,
               "machine": machine(), "rows": self.rows, "primary": self.primary}
        doc.update(self.extra)
        return doc

    def table(self, columns: list[str] | None = None, title: str | None = None) -> Table:
        cols = columns or list(dict.fromkeys(k for r in self.rows for k in r))
        t = Table(title=title or f"{self.benchmark} — {self.data}{' (quick)' if self.quick else ''}")
        for c in cols:
            t.add_column(c, justify="left" if c == "system" else "right")
        for r in self.rows:
            t.add_row(*[_fmt(r.get(c)) for c in cols])
        return t

    def emit(self, json_path: Path | None, columns: list[str] | None = None) -> None:
        Console().print(self.table(columns))
        m = self.primary
        Console().print(f"primary: {m.get('metric')} ({m.get('better')} is better)"
                        + (f"; constraint: {m['constraint']}" if m.get("constraint") else ""))
        if json_path:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(self.document(), indent=2))


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return str(v)
