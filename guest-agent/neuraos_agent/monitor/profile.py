"""Each profile's learned baseline of normal behaviour, stored versioned as JSON on disk.

A profile is who and what runs: user, service unit, executable. In learning mode a
baseline accumulates, from the guest's own normal activity, the process scores the model
gave that profile after each window (the statistic decisions are made on; a bounded
reservoir sample) and its syscall and n-gram counts.
`freeze()` turns the scores into the profile's own threshold at a target false-positive
rate — the per-profile calibration: a profile whose normal work the shared model finds
surprising (a compiler, say) gets a higher bar than a quiet daemon — and stores it as a
new version. Older versions stay on disk for review and rollback.

Layout: `<root>/<slug>/v000001.json`, ...; the highest version is current. While a
profile learns, the running monitor keeps its progress in `<slug>/draft.json` (rewritten,
not versioned); freezing it (`neuraos-agent profiles --freeze`) makes the next version.
Files are written whole to a temporary name and renamed, so a crash never leaves half a
baseline.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from neuraos_agent.monitor.scorer import Syscall, Threshold, WindowScore, calibrate

SCHEMA = 1
NGRAM = 3
MAX_SCORES = 4096  # reservoir of process scores kept for calibration
MAX_NGRAMS = 20000  # past this, n-grams seen once are pruned (counted in `pruned_ngrams`)
MAX_DIRS = 20000  # folders kept per profile (past this, new ones are not learned)
_DIGITS = re.compile(r"\d+")
STAMP = "generation"  # rewritten by every save of a version


def folder_of(path: str) -> str | None:
    """The folder a path opens in, with digit runs as N (/proc/123/stat -> /proc/N); None if relative."""
    if not path.startswith("/"):
        return None
    return _DIGITS.sub("N", os.path.dirname(path)) or "/"


class ProfileError(Exception):
    """A stored baseline is unreadable or of another schema."""


@dataclass(frozen=True, order=True)
class ProfileKey:
    """Who and what: the user, the service unit (empty outside systemd services), the executable."""

    user: str
    unit: str = ""
    exe: str = ""

    @property
    def name(self) -> str:
        return f"user={self.user} unit={self.unit or '-'} exe={self.exe or '-'}"

    @property
    def slug(self) -> str:
        """A file-system-safe, stable and still readable folder name."""
        readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.user}_{self.unit}_{Path(self.exe).name}")[:60]
        digest = hashlib.sha256(self.name.encode()).hexdigest()[:10]
        return f"{readable}-{digest}"


@dataclass
class Baseline:
    key: ProfileKey
    model: str = ""  # which model's scores these are (a threshold means nothing for another)
    version: int = 0  # 0 until first saved
    learning: bool = True
    windows: int = 0
    syscalls: int = 0
    scores: list[float] = field(default_factory=list)  # reservoir sample of process scores
    calls: Counter[str] = field(default_factory=Counter)
    ngrams: Counter[str] = field(default_factory=Counter)  # "a b c" -> count
    pruned_ngrams: int = 0
    dirs: Counter[str] = field(default_factory=Counter)  # folders the profile opened files in
    dests: Counter[str] = field(default_factory=Counter)  # addr:port it connected to
    threshold: Threshold | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)

    def observe(self, window: WindowScore) -> None:
        """Learn from one window of normal activity (learning mode only)."""
        self.observe_calls(window.syscalls, window.process_score)

    def observe_calls(self, syscalls: Sequence[Syscall], process_score: float | None = None) -> None:
        """Learn one window's calls, and the model's process score when it was scored."""
        if not self.learning:
            raise ProfileError(f"{self.key.name}: baseline v{self.version} is frozen; call learn() first")
        self.windows += 1
        self.syscalls += len(syscalls)
        if process_score is not None:
            self.note_score(process_score)
        names = [str(c) for c in syscalls]
        self.calls.update(names)
        self.ngrams.update(" ".join(names[i:i + NGRAM]) for i in range(len(names) - NGRAM + 1))
        if len(self.ngrams) > MAX_NGRAMS:
            once = [g for g, n in self.ngrams.items() if n == 1]
            for g in once:
                del self.ngrams[g]
            self.pruned_ngrams += len(once)
        self.updated = time.time()

    def note_score(self, process_score: float) -> None:
        """Keep a process score of this profile's normal activity (a bounded reservoir)."""
        if len(self.scores) < MAX_SCORES:
            self.scores.append(process_score)
        else:  # reservoir sampling, seeded by the count: the same stream keeps the same sample
            j = int(np.random.default_rng(self.windows).integers(self.windows))
            if j < MAX_SCORES:
                self.scores[j] = process_score

    def freeze(self, target_fpr: float = 0.01) -> Threshold | None:
        """Stop learning and fix this profile's threshold from its own normal process scores
        (None when the model scored none of its windows: then only novelty judges it)."""
        self.threshold = calibrate(self.scores, target_fpr) if self.scores else None
        self.learning = False
        self.updated = time.time()
        return self.threshold

    def learn(self) -> None:
        """Back to learning mode: keep what was learned, add more (a new version when saved)."""
        self.learning = True

    def is_anomalous(self, process_score: float) -> bool:
        """Judge a `WindowScore.process_score`; only a frozen baseline judges, while
        learning nothing is anomalous."""
        return self.threshold is not None and not self.learning and self.threshold.exceeded(process_score)

    def observe_open(self, path: str) -> None:
        folder = folder_of(path)
        if folder is not None and (folder in self.dirs or len(self.dirs) < MAX_DIRS):
            self.dirs[folder] += 1

    def observe_connect(self, dest: str) -> None:
        if dest in self.dests or len(self.dests) < MAX_DIRS:
            self.dests[dest] += 1

    def knows_dest(self, dest: str) -> bool:
        return dest in self.dests

    def knows_folder(self, path: str) -> bool:
        """Whether the profile opened files in this path's folder while learning (relative paths: yes)."""
        folder = folder_of(path)
        return folder is None or folder in self.dirs

    def novelty(self, syscalls: Sequence[Syscall]) -> float:
        """Share of the window's n-grams this profile never showed (evidence for an alert)."""
        names = [str(c) for c in syscalls]
        grams = [" ".join(names[i:i + NGRAM]) for i in range(len(names) - NGRAM + 1)]
        return sum(g not in self.ngrams for g in grams) / len(grams) if grams else 0.0

    def summary(self, top: int = 5) -> dict[str, Any]:
        """What an operator reviews: mode, how much was learned, the bar, typical behaviour."""
        q = np.quantile(self.scores, [0.5, 0.9, 0.99]).round(4).tolist() if self.scores else None
        return {
            "profile": self.key.name, "version": self.version, "mode": "learning" if self.learning else "frozen",
            "model": self.model, "windows": self.windows, "syscalls": self.syscalls,
            "score_p50_p90_p99": q,
            "threshold": None if self.threshold is None else round(self.threshold.value, 4),
            "target_fpr": None if self.threshold is None else self.threshold.target_fpr,
            "distinct_syscalls": len(self.calls), "distinct_ngrams": len(self.ngrams), "folders": len(self.dirs),
            "destinations": len(self.dests),
            "top_syscalls": [c for c, _ in self.calls.most_common(top)],
            "top_ngrams": [g for g, _ in self.ngrams.most_common(top)],
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.updated)),
        }

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA, "key": {"user": self.key.user, "unit": self.key.unit, "exe": self.key.exe},
            "model": self.model, "version": self.version, "learning": self.learning,
            "windows": self.windows, "syscalls": self.syscalls, "scores": self.scores,
            "calls": dict(self.calls), "ngrams": dict(self.ngrams), "pruned_ngrams": self.pruned_ngrams,
            "dirs": dict(self.dirs), "dests": dict(self.dests),
            "threshold": None if self.threshold is None else {
                "target_fpr": self.threshold.target_fpr, "value": self.threshold.value, "n": self.threshold.n},
            "created": self.created, "updated": self.updated,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Baseline:
        if d.get("schema") != SCHEMA:
            raise ProfileError(f"baseline schema {d.get('schema')!r}, this agent reads {SCHEMA}")
        t = d["threshold"]
        return cls(key=ProfileKey(**d["key"]), model=d["model"], version=d["version"], learning=d["learning"],
                   windows=d["windows"], syscalls=d["syscalls"], scores=list(d["scores"]),
                   calls=Counter(d["calls"]), ngrams=Counter(d["ngrams"]), pruned_ngrams=d["pruned_ngrams"],
                   dirs=Counter(d.get("dirs", {})), dests=Counter(d.get("dests", {})),
                   threshold=None if t is None else Threshold(t["target_fpr"], t["value"], t["n"]),
                   created=d["created"], updated=d["updated"])


class ProfileStore:
    """Baselines on disk, one folder per profile, one file per version."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def versions(self, key: ProfileKey) -> list[int]:
        folder = self.root / key.slug
        return sorted(int(p.stem[1:]) for p in folder.glob("v*.json")) if folder.is_dir() else []

    def save(self, baseline: Baseline) -> int:
        """Write `baseline` as the profile's next version; returns that version."""
        folder = self.root / baseline.key.slug
        folder.mkdir(parents=True, exist_ok=True)
        baseline.version = (self.versions(baseline.key) or [0])[-1] + 1
        path = folder / f"v{baseline.version:06d}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(baseline.to_json()))
        os.replace(tmp, path)
        (self.root / STAMP).write_text(f"{time.time_ns()}\n")
        return baseline.version

    def generation(self) -> str:
        """Changes whenever a version is saved: a running monitor rescans versions only then
        (a scan of every profile's folder at every sync cost seconds of TCG vCPU a minute)."""
        try:
            return (self.root / STAMP).read_text()
        except OSError:
            return ""

    def save_draft(self, baseline: Baseline) -> None:
        """Keep a learning baseline's progress without making a version of it."""
        folder = self.root / baseline.key.slug
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "draft.tmp"
        tmp.write_text(json.dumps(baseline.to_json()))
        os.replace(tmp, folder / "draft.json")

    def load_draft(self, key: ProfileKey) -> Baseline | None:
        path = self.root / key.slug / "draft.json"
        try:
            return Baseline.from_json(json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ProfileError(f"{path}: {e}") from e

    def drop_draft(self, key: ProfileKey) -> None:
        (self.root / key.slug / "draft.json").unlink(missing_ok=True)

    def current(self, key: ProfileKey) -> Baseline | None:
        """What the profile is now: its learning draft if newer than its last version, else that version."""
        draft, saved = self.load_draft(key), self.load(key)
        if draft is not None and (saved is None or draft.version >= saved.version):
            return draft
        return saved

    def load(self, key: ProfileKey, version: int | None = None) -> Baseline | None:
        """The current (or a given) version; None if the profile has never been saved."""
        versions = self.versions(key)
        if not versions:
            return None
        v = versions[-1] if version is None else version
        path = self.root / key.slug / f"v{v:06d}.json"
        try:
            return Baseline.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ProfileError(f"{path}: {e}") from e

    def keys(self) -> list[ProfileKey]:
        out = []
        for folder in sorted(p for p in self.root.glob("*") if p.is_dir()) if self.root.is_dir() else []:
            files = sorted(folder.glob("v*.json")) or sorted(folder.glob("draft.json"))
            if files:
                out.append(ProfileKey(**json.loads(files[-1].read_text())["key"]))
        return out

    def summaries(self, keys: Iterable[ProfileKey] | None = None) -> list[dict[str, Any]]:
        """The reviewable view behind `neuraos-agent profiles`."""
        out = []
        for k in keys if keys is not None else self.keys():
            b = self.current(k)
            if b is not None:
                out.append(b.summary() | {"versions": self.versions(k)})
        return out
