"""Bitbrains GWA-T-12 per-VM traces as demand series on a common 5-minute grid.

Demand is usage over the VM's provisioned capacity (CPU MHz, memory KB), clipped to
[0, 1]: no allocation can exceed what the VM was provisioned, so demand above it is
unservable noise of the trace. Rows are placed on a global slot grid
(`round(timestamp / 300)`) so that every VM shares the same clock and time of day;
repeated timestamps keep the last valid row, and gaps or capacity-0 rows stay NaN.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "bitbrains-rnd"
STEP_S = 300
STEPS_PER_DAY = 86400 // STEP_S

# Column indices in a GWA-T-12 file (header: "Timestamp [ms]; CPU cores; ...").
_TS, _CPU_CAP, _CPU_USED, _MEM_CAP, _MEM_USED = 0, 2, 3, 5, 6


class DataMissing(FileNotFoundError):
    """The trace folder is absent or holds no `*.csv.gz` file."""


@dataclass(frozen=True)
class VmTrace:
    """One VM's demand series; index i is global slot `start_slot + i`."""

    vm_id: str
    path: Path
    start_slot: int
    cpu: np.ndarray  # float32, fraction of provisioned CPU, NaN where missing
    mem: np.ndarray  # float32, fraction of provisioned memory, NaN where missing
    cpu_capacity_mhz: float
    mem_capacity_kb: float

    def __len__(self) -> int:
        return len(self.cpu)

    def demand(self) -> np.ndarray:
        """(T, 2) array of (cpu, mem) fractions."""
        return np.stack([self.cpu, self.mem], axis=1)


@dataclass(frozen=True)
class Split:
    """Disjoint VM ids: the model never trains and tests on the same VM."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]


def vm_id(path: Path) -> str:
    """The VM's number: the same VM in another month's folder keeps its id."""
    return path.name.removesuffix(".csv.gz")


def _order(ident: str) -> tuple[int, int | str]:
    return (0, int(ident)) if ident.isdigit() else (1, ident)


def discover(folder: Path) -> list[Path]:
    """Every per-VM `*.csv.gz` under `folder`, in a stable order."""
    if not folder.exists():
        raise DataMissing(f"trace folder not found: {folder}")
    paths = sorted(folder.rglob("*.csv.gz"), key=lambda p: (_order(vm_id(p)), str(p)))
    if not paths:
        raise DataMissing(f"no *.csv.gz trace files under {folder}")
    return paths


def parse(path: Path) -> VmTrace | None:
    """Read one VM file; None when it holds no row with a provisioned capacity."""
    with gzip.open(path, "rb") as fh:
        fh.readline()  # header
        rows = np.loadtxt(fh, delimiter=";", ndmin=2, dtype=np.float64)
    if rows.size == 0:
        return None
    ok = (rows[:, _CPU_CAP] > 0) & (rows[:, _MEM_CAP] > 0) & np.isfinite(rows).all(axis=1)
    rows = rows[ok]
    if len(rows) == 0:
        return None
    cpu_cap = float(np.median(rows[:, _CPU_CAP]))
    mem_cap = float(np.median(rows[:, _MEM_CAP]))
    slots = np.round(rows[:, _TS] / STEP_S).astype(np.int64)
    start = int(slots.min())
    n = int(slots.max()) - start + 1
    cpu = np.full(n, np.nan, np.float32)
    mem = np.full(n, np.nan, np.float32)
    # Fancy assignment keeps the last row for a repeated slot.
    cpu[slots - start] = np.clip(rows[:, _CPU_USED] / cpu_cap, 0.0, 1.0)
    mem[slots - start] = np.clip(rows[:, _MEM_USED] / mem_cap, 0.0, 1.0)
    return VmTrace(vm_id(path), path, start, cpu, mem, cpu_cap, mem_cap)


def load(folder: Path = DEFAULT_DATA, ids: set[str] | None = None,
         min_steps: int = 0) -> list[VmTrace]:
    """Traces of the VMs under `folder` (only `ids` if given), at least `min_steps` long."""
    out = []
    for path in discover(folder):
        if ids is not None and vm_id(path) not in ids:
            continue
        trace = parse(path)
        if trace is not None and len(trace) >= min_steps:
            out.append(trace)
    return out


def split_vms(ids: list[str] | set[str] | tuple[str, ...], seed: int = 0,
              fractions: tuple[float, float, float] = (0.6, 0.15, 0.25)) -> Split:
    """Deterministic split of VM ids by seed; each id lands in exactly one part."""
    unique = sorted(set(ids), key=_order)
    perm = np.random.default_rng(seed).permutation(len(unique))
    shuffled = [unique[i] for i in perm]
    n_train = int(round(fractions[0] * len(unique)))
    n_val = int(round(fractions[1] * len(unique)))
    part = lambda xs: tuple(sorted(xs, key=_order))  # noqa: E731
    return Split(part(shuffled[:n_train]), part(shuffled[n_train:n_train + n_val]),
                 part(shuffled[n_train + n_val:]))


def time_of_day(slots: np.ndarray) -> np.ndarray:
    """(..., 4) features: sin/cos of the hour of day and of the day of week (UTC)."""
    t = slots.astype(np.float64) * STEP_S
    day = 2 * np.pi * (t % 86400) / 86400
    week = 2 * np.pi * (t % (7 * 86400)) / (7 * 86400)
    return np.stack([np.sin(day), np.cos(day), np.sin(week), np.cos(week)], axis=-1).astype(np.float32)


def windows(series: np.ndarray, ends: np.ndarray, length: int) -> np.ndarray:
    """History windows `series[end-length:end]` for each end, NaN before the start.

    `series` is (T, C); the result is (len(ends), length, C), a copy. A window ending
    at `end` holds data up to step end-1 only: what a policy may see at step `end`.
    """
    padded = np.concatenate([np.full((length, series.shape[1]), np.nan, series.dtype), series])
    view = np.lib.stride_tricks.sliding_window_view(padded, length, axis=0)  # (T+1, C, length)
    return np.ascontiguousarray(view[np.asarray(ends)].transpose(0, 2, 1))
