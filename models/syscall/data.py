"""ADFA-LD system-call traces, read in place, and a deterministic normal-only split.

A trace is the sequence of i386 syscall numbers made by one process. The folder may hold
`adfa_ld.jsonl.gz` (preferred: one JSON line per trace), `ADFA-LD.tar.gz`, or the three
extracted `*_Data_Master` folders; all give the same traces in the same order.

The split pools the normal traces: every `train` trace plus a seeded share of the
`validation` traces are fitted (the guest learns from its own normal activity, and
validation holds programs that train lacks), a further share calibrates thresholds and
stops training early, and the rest is the held-out normal test set. Validation holds only
2,420 distinct sequences in 4,372 traces (one 343-call sequence alone 968 times), so the
shares are of distinct *sequences*: all copies of one sequence land on the same side, and
a copy of a train trace is always fitted.
Otherwise about half the "held-out" normals would be exact copies of fitted traces and
the test would measure memory, not generalisation. Attacks are split by
attack *run* (`Adduser_3`, ...), never by trace, into a small model-selection share and
the test share, so that nothing is tuned on the attacks that are reported. Traces are
never dropped or deduplicated: `quirks()` measures what the README warns about instead.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "adfa-ld"
JSONL = "adfa_ld.jsonl.gz"
TARBALL = "ADFA-LD.tar.gz"
FOLDERS = {"train": "Training_Data_Master", "validation": "Validation_Data_Master",
           "attack": "Attack_Data_Master"}


class DataMissing(FileNotFoundError):
    """The folder holds none of the three accepted layouts."""


@dataclass(frozen=True)
class Trace:
    """One process's syscalls, with where it came from."""

    split: str  # train | validation | attack
    path: str  # relative to ADFA-LD/, unique per trace
    syscalls: tuple[int, ...]
    attack_type: str | None = None  # e.g. Adduser
    attack_instance: str | None = None  # the attack run, e.g. Adduser_1

    @property
    def label(self) -> int:
        return int(self.split == "attack")

    def __len__(self) -> int:
        return len(self.syscalls)


@dataclass(frozen=True)
class Dataset:
    train: tuple[Trace, ...]
    validation: tuple[Trace, ...]
    attack: tuple[Trace, ...]
    source: str  # the file or folder actually read

    @property
    def normal(self) -> tuple[Trace, ...]:
        return self.train + self.validation


@dataclass(frozen=True)
class SplitConfig:
    seed: int = 0
    fit_frac: float = 0.5  # of distinct validation sequences, fitted beside every train trace
    calib_frac: float = 0.1  # of distinct validation sequences: early stopping and thresholds
    dev_attack_frac: float = 0.2  # of attack runs: model selection, never reported


@dataclass(frozen=True)
class Split:
    """Disjoint sets of traces (by path); only `fit` and `calib` are ever learned from."""

    config: SplitConfig
    fit: tuple[Trace, ...]
    calib: tuple[Trace, ...]
    test_normal: tuple[Trace, ...]
    dev_attack: tuple[Trace, ...]
    test_attack: tuple[Trace, ...]

    def fit_digest(self) -> str:
        """Names the fitted traces, so shipped weights can tell which split they saw."""
        return hashlib.sha256("\n".join(sorted(t.path for t in self.fit)).encode()).hexdigest()[:16]


def load(folder: Path = DEFAULT_DATA) -> Dataset:
    """Every trace in `folder`, in a stable order (by split, then path)."""
    folder = Path(folder)
    if (folder / JSONL).exists():
        traces, source = list(_from_jsonl(folder / JSONL)), folder / JSONL
    elif (folder / TARBALL).exists():
        traces, source = list(_from_tar(folder / TARBALL)), folder / TARBALL
    elif root := _extracted_root(folder):
        traces, source = list(_from_folders(root)), root
    else:
        raise DataMissing(f"no {JSONL}, {TARBALL} or *_Data_Master folders under {folder}")
    by = {s: tuple(sorted((t for t in traces if t.split == s), key=lambda t: t.path)) for s in FOLDERS}
    if not by["train"] or not by["attack"]:
        raise DataMissing(f"{source} holds no train or no attack traces")
    return Dataset(by["train"], by["validation"], by["attack"], str(source))


def split(ds: Dataset, config: SplitConfig = SplitConfig()) -> Split:
    """The same config on the same data always gives the same split."""
    rng = np.random.default_rng(config.seed)
    groups: dict[tuple[int, ...], list[Trace]] = {}
    for t in ds.validation:  # insertion order = path order: stable
        groups.setdefault(t.syscalls, []).append(t)
    in_train = {t.syscalls for t in ds.train}
    forced = [g for s, g in groups.items() if s in in_train]
    free = [g for s, g in groups.items() if s not in in_train]
    n_fit = round(config.fit_frac * len(free))
    n_cal = round(config.calib_frac * len(free))
    order = rng.permutation(len(free))
    fit = [t for g in forced for t in g] + [t for i in order[:n_fit] for t in free[i]]
    cal = [t for i in order[n_fit:n_fit + n_cal] for t in free[i]]
    test = [t for i in order[n_fit + n_cal:] for t in free[i]]
    runs = sorted({t.attack_instance or t.path for t in ds.attack})
    dev_runs = {runs[i] for i in rng.permutation(len(runs))[: int(round(config.dev_attack_frac * len(runs)))]}
    is_dev = lambda t: (t.attack_instance or t.path) in dev_runs  # noqa: E731
    return Split(config=config, fit=ds.train + tuple(fit), calib=tuple(cal), test_normal=tuple(test),
                 dev_attack=tuple(t for t in ds.attack if is_dev(t)),
                 test_attack=tuple(t for t in ds.attack if not is_dev(t)))


def quirks(ds: Dataset, sp: Split | None = None) -> dict[str, object]:
    """The README's warnings, measured on these files (and on the split, if given)."""
    seq = lambda ts: Counter(t.syscalls for t in ts)  # noqa: E731
    tr, va, at = seq(ds.train), seq(ds.validation), seq(ds.attack)
    normal = tr + va
    both = [s for s in at if s in normal]
    calls = lambda ts: {c for t in ts for c in t.syscalls}  # noqa: E731
    c_tr, c_va, c_at = calls(ds.train), calls(ds.validation), calls(ds.attack)
    out: dict[str, object] = {
        "traces": {"train": len(ds.train), "validation": len(ds.validation), "attack": len(ds.attack)},
        "syscalls_total": sum(len(t) for t in ds.train + ds.validation + ds.attack),
        "distinct_sequences": {"train": len(tr), "validation": len(va), "attack": len(at)},
        "validation_traces_identical_to_a_train_trace": sum(n for s, n in va.items() if s in tr),
        "validation_sequences_identical_to_a_train_trace": sum(1 for s in va if s in tr),
        "largest_validation_duplicate": {"copies": va.most_common(1)[0][1] if va else 0,
                                         "length": len(va.most_common(1)[0][0]) if va else 0},
        "sequences_labelled_normal_and_attack": [
            {"length": len(s), "normal_copies": normal[s], "attack_copies": at[s]} for s in both],
        "distinct_syscalls": len(c_tr | c_va | c_at),
        "syscalls_in_train": len(c_tr),
        "syscalls_only_in_validation": sorted(c_va - c_tr - c_at),
        "syscalls_in_validation_and_attack_not_train": sorted((c_va & c_at) - c_tr),
        "syscalls_only_in_attack": sorted(c_at - c_tr - c_va),
        "median_length": {"train": _median(ds.train), "validation": _median(ds.validation),
                          "attack": _median(ds.attack)},
    }
    if sp is not None:
        fitted = {t.syscalls for t in sp.fit}
        c_fit = calls(sp.fit)
        out["split"] = {
            "seed": sp.config.seed, "fit": len(sp.fit), "calib": len(sp.calib),
            "test_normal": len(sp.test_normal), "dev_attack": len(sp.dev_attack),
            "test_attack": len(sp.test_attack),
            "dev_attack_runs": sorted({t.attack_instance or t.path for t in sp.dev_attack}),
            "validation_copies_of_train_forced_into_fit": sum(t.syscalls in {u.syscalls for u in ds.train}
                                                              for t in ds.validation),
            "test_normal_identical_to_a_fitted_trace": sum(t.syscalls in fitted for t in sp.test_normal),
            "test_attack_identical_to_a_fitted_trace": sum(t.syscalls in fitted for t in sp.test_attack),
            "test_normal_distinct_sequences": len({t.syscalls for t in sp.test_normal}),
            "largest_validation_duplicate_in": next(
                (side for side, ts in (("fit", sp.fit), ("calib", sp.calib), ("test_normal", sp.test_normal))
                 if va and va.most_common(1)[0][0] in {t.syscalls for t in ts}), None),
            "test_normal_with_syscall_never_fitted": sum(bool(set(t.syscalls) - c_fit) for t in sp.test_normal),
            "test_attack_with_syscall_never_fitted": sum(bool(set(t.syscalls) - c_fit) for t in sp.test_attack),
        }
    return out


def _median(ts: Iterable[Trace]) -> float:
    return float(np.median([len(t) for t in ts]))


def _parse_calls(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split())


def _from_jsonl(path: Path) -> Iterator[Trace]:
    with gzip.open(path, "rt") as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                yield Trace(r["split"], r["path"], tuple(r["syscalls"]), r.get("attack_type"),
                            r.get("attack_instance"))


_ATTACK_RUN = re.compile(r"Attack_Data_Master/(?P<run>(?P<type>.+)_\d+)/")


def _trace_from(rel: str, text: str) -> Trace | None:
    """A trace from its path relative to ADFA-LD/ (None for files outside the three folders)."""
    for split_name, folder in FOLDERS.items():
        if rel.startswith(folder + "/") and rel.endswith(".txt"):
            m = _ATTACK_RUN.match(rel) if split_name == "attack" else None
            return Trace(split_name, rel, _parse_calls(text), m["type"] if m else None, m["run"] if m else None)
    return None


def _from_tar(path: Path) -> Iterator[Trace]:
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            if member.isfile():
                rel = member.name.split("ADFA-LD/", 1)[-1]
                f = tar.extractfile(member)
                if f is not None and (t := _trace_from(rel, io.TextIOWrapper(f).read())):
                    yield t


def _extracted_root(folder: Path) -> Path | None:
    for root in (folder, folder / "ADFA-LD"):
        if (root / FOLDERS["train"]).is_dir():
            return root
    return None


def _from_folders(root: Path) -> Iterator[Trace]:
    for folder in FOLDERS.values():
        for p in sorted((root / folder).rglob("*.txt")):
            if t := _trace_from(p.relative_to(root).as_posix(), p.read_text()):
                yield t
