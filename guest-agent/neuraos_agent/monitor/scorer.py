"""Scores a process's syscalls in real time with the exported syscall model, numpy only.

The guest carries no torch: `models/syscall/export.py` writes the LSTM as plain arrays,
and this module runs the same recurrence. The embedding, the first layer's input weights
and its biases are folded into one table (token -> gate pre-activations), so the first
layer's step is a row lookup plus one small matrix product. Each process keeps its own LSTM state from the moment it was first seen.

Scoring is done a window at a time (`window` syscalls, 32 by default): the recurrence
steps through the window, then the surprises of all its calls come from one batched
matrix product. Windows of many processes step together. A window's score is its mean
surprise; the process score is an exponentially weighted mean of its window scores
(half-life 64 windows by default, from the model's metadata): for a process of a few
thousand calls it is its mean surprise so far, for a long-lived daemon it follows recent
behaviour, and one odd window does not make it jump. The process score is the decision
statistic: a `Threshold` learned from a profile's own normal process scores (see
`profile.py`) turns it into a decision after every window.

Run the agent with OPENBLAS_NUM_THREADS=1: these matrices are small, and BLAS threads
only spin on them (measured 5-10x slower with 2 threads on a busy 2-core machine).
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Hashable, Iterable, Mapping, Sequence

import numpy as np

FORMAT = 1
BOS, UNK, N_SPECIAL = 1, 2, 3

Syscall = int | str  # an i386 number (as in the training data) or a syscall name


class ModelFormatError(ValueError):
    """The file is not an exported syscall model this scorer understands."""


@dataclass(frozen=True)
class Threshold:
    """A score above `value` is anomalous; learned so that at most `target_fpr` of the
    normal scores it came from lie above it."""

    target_fpr: float
    value: float
    n: int  # normal scores it was learned from

    def exceeded(self, score: float) -> bool:
        return score > self.value


def calibrate(normal_scores: Iterable[float], target_fpr: float) -> Threshold:
    """The threshold that flags at most `target_fpr` of these normal scores.

    With n scores, k = floor(target_fpr * n) of them may lie above it: the threshold is the
    (k+1)-th largest. Its false-positive rate on the same scores is at most the target, and
    (without ties) above target - 1/n.
    """
    s = np.sort(np.asarray(list(normal_scores), dtype=np.float64))
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in (0, 1), not {target_fpr}")
    if len(s) == 0:
        raise ValueError("no normal scores to calibrate on")
    k = int(math.floor(target_fpr * len(s) + 1e-9))
    return Threshold(target_fpr=target_fpr, value=float(s[len(s) - 1 - min(k, len(s) - 1)]), n=len(s))


class SyscallModel:
    """The exported LSTM language model over syscalls."""

    def __init__(self, table: np.ndarray, w_hh: Sequence[np.ndarray], w_out: np.ndarray, b_out: np.ndarray,
                 syscalls: Sequence[int], names: Sequence[str], meta: Mapping[str, object],
                 w_ih: Sequence[np.ndarray] = (), b: Sequence[np.ndarray] = ()) -> None:
        """`w_hh`: one recurrent matrix per layer; `w_ih`, `b`: input weights and summed
        biases of the layers above the first (the first layer's are folded into `table`)."""
        f32 = lambda a: np.ascontiguousarray(np.asarray(a, dtype=np.float32))  # noqa: E731
        self.table = f32(table)  # (V, 4H): embed @ W_ih.T + b_ih + b_hh of layer 0
        self.w_hh_t = [f32(w.T) for w in w_hh]  # per layer (H, 4H)
        self.w_ih_t = [f32(w.T) for w in w_ih]  # per layer above the first (H, 4H)
        self.b = [f32(x) for x in b]
        self.w_out_t = f32(np.asarray(w_out).T)  # (H, V)
        self.b_out = f32(b_out)
        self.hidden = self.w_hh_t[0].shape[0]
        self.layers = len(self.w_hh_t)
        self.syscalls = tuple(int(s) for s in syscalls)
        self.meta = dict(meta)
        self._index: dict[Syscall, int] = {s: i + N_SPECIAL for i, s in enumerate(self.syscalls)}
        self._index.update({n: i + N_SPECIAL for i, n in enumerate(names) if n})
        zero = np.zeros((1, self.layers, self.hidden), np.float32)
        h0, c0 = self._step(zero, zero, np.array([BOS]))
        self._start = (h0[0], c0[0])  # the state (layers, H) of every process once BOS is read

    @classmethod
    def load(cls, path: Path) -> SyscallModel:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != FORMAT:
                raise ModelFormatError(f"{path}: format {meta.get('format')!r}, this scorer reads {FORMAT}")
            layers = int(meta.get("layers", 1))
            return cls(z["table"], [z["w_hh"]] + [z[f"w_hh_{i}"] for i in range(1, layers)], z["w_out"],
                       z["b_out"], z["syscalls"], z["names"].tolist(), meta,
                       w_ih=[z[f"w_ih_{i}"] for i in range(1, layers)], b=[z[f"b_{i}"] for i in range(1, layers)])

    @property
    def window(self) -> int:
        return int(self.meta.get("window", 32))  # type: ignore[call-overload]

    @property
    def half_life(self) -> float:
        return float(self.meta.get("half_life_windows", 64))  # type: ignore[arg-type]

    def encode(self, syscalls: Iterable[Syscall]) -> np.ndarray:
        """Tokens for syscalls given by i386 number or name; unknown ones become UNK."""
        return np.fromiter((self._index.get(c, UNK) for c in syscalls), dtype=np.int64)

    def start_state(self, n: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """States (n, layers, H) of processes that have just started."""
        return np.tile(self._start[0], (n, 1, 1)), np.tile(self._start[1], (n, 1, 1))

    def _step(self, h: np.ndarray, c: np.ndarray, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        H = self.hidden
        h_new, c_new = np.empty_like(h), np.empty_like(c)
        for layer in range(self.layers):
            if layer == 0:
                g = self.table[tokens] + h[:, 0] @ self.w_hh_t[0]
            else:
                g = h_new[:, layer - 1] @ self.w_ih_t[layer - 1] + self.b[layer - 1] + h[:, layer] @ self.w_hh_t[layer]
            i, f, o = _sigmoid(g[:, :H]), _sigmoid(g[:, H:2 * H]), _sigmoid(g[:, 3 * H:])
            c_new[:, layer] = f * c[:, layer] + i * np.tanh(g[:, 2 * H:3 * H])
            h_new[:, layer] = o * np.tanh(c_new[:, layer])
        return h_new, c_new

    def run(self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Read tokens (B, T) from states (B, layers, H); return surprises (B, T) and the new states."""
        B, T = tokens.shape
        before = np.empty((B, T, self.hidden), np.float32)  # the top state each token is predicted from
        for t in range(T):
            before[:, t] = h[:, -1]
            h, c = self._step(h, c, tokens[:, t])
        logits = before @ self.w_out_t + self.b_out
        m = logits.max(-1, keepdims=True)
        logz = m[..., 0] + np.log(np.exp(logits - m).sum(-1))
        picked = np.take_along_axis(logits, tokens[..., None], -1)[..., 0]
        return (logz - picked).astype(np.float64), h, c

    def surprise(self, syscalls: Sequence[Syscall]) -> np.ndarray:
        """Per-syscall surprise (nats) of a whole process, read from its start."""
        return self.surprise_many([syscalls])[0]

    def surprise_many(self, traces: Sequence[Sequence[Syscall]], batch: int = 64) -> list[np.ndarray]:
        """`surprise` for many processes, stepped together (padding never reaches a real call)."""
        enc = [self.encode(t) for t in traces]
        out: list[np.ndarray] = [np.zeros(0)] * len(enc)
        order = np.argsort([len(e) for e in enc], kind="stable")
        for lo in range(0, len(order), batch):
            group = order[lo:lo + batch]
            width = max(len(enc[i]) for i in group)
            x = np.full((len(group), width), UNK, np.int64)
            for j, i in enumerate(group):
                x[j, :len(enc[i])] = enc[i]
            s, _, _ = self.run(x, *self.start_state(len(group)))
            for j, i in enumerate(group):
                out[i] = s[j, :len(enc[i])]
        return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow warnings, same values


@dataclass(frozen=True)
class WindowScore:
    """One scored window of one process: the evidence and the numbers."""

    process: Hashable
    index: int  # window number within the process, from 0
    start: int  # offset of the window's first syscall since the process was first seen
    syscalls: tuple[Syscall, ...]
    score: float  # mean surprise of the window's syscalls, nats per syscall
    peak: float  # the largest single-syscall surprise in the window
    process_score: float  # exponentially weighted mean of the process's window scores


def process_scores(window_scores: Sequence[float], lengths: Sequence[int], half_life: float) -> np.ndarray:
    """The process score after each window: an EWMA of window scores, weighted by length
    (a short last window counts for less), starting at the first window's score."""
    decay = 0.5 ** (1.0 / half_life)
    out = np.empty(len(window_scores))
    num = den = 0.0
    for i, (s, n) in enumerate(zip(window_scores, lengths)):
        num, den = decay * num + n * s, decay * den + n
        out[i] = num / den
    return out


def trace_score(surprise: np.ndarray, window: int, half_life: float) -> float:
    """What the stream reports for a whole process when it exits: its last process score.

    (The highest process score along the way was tried too, as "when would a threshold
    have fired": the first windows of a process are few calls and noisy, so on held-out
    normal traces that maximum ranks worse than the score at exit.)"""
    if len(surprise) == 0:
        return 0.0
    bounds = list(range(0, len(surprise), window))
    scores = [float(surprise[b:b + window].mean()) for b in bounds]
    lengths = [len(surprise[b:b + window]) for b in bounds]
    return float(process_scores(scores, lengths, half_life)[-1])


@dataclass
class _Process:
    h: np.ndarray
    c: np.ndarray
    pending: list[Syscall] = field(default_factory=list)
    seen: int = 0  # syscalls already scored
    windows: int = 0
    num: float = 0.0  # EWMA numerator and denominator
    den: float = 0.0


@dataclass
class StreamStats:
    windows: int = 0
    syscalls: int = 0
    evicted: int = 0  # processes dropped to stay under max_processes (oldest first)


class StreamScorer:
    """Feed syscalls per process as they arrive; get a `WindowScore` per full window.

    Bounded: at most `max_processes` states are kept; the least recently fed process is
    dropped (and counted) to make room. `close()` scores what is left of a process that
    exited and forgets it.
    """

    def __init__(self, model: SyscallModel, window: int | None = None, max_processes: int = 4096) -> None:
        self.model = model
        self.window = window or model.window
        self.max_processes = max_processes
        self.stats = StreamStats()
        self._procs: OrderedDict[Hashable, _Process] = OrderedDict()
        self._decay = 0.5 ** (1.0 / model.half_life)

    def __len__(self) -> int:
        return len(self._procs)

    def feed(self, process: Hashable, syscalls: Sequence[Syscall]) -> list[WindowScore]:
        return self.feed_many({process: syscalls})

    def feed_many(self, events: Mapping[Hashable, Sequence[Syscall]]) -> list[WindowScore]:
        """Append each process's new syscalls; score every window that is now full,
        all processes stepping together."""
        for key, calls in events.items():
            self._proc(key).pending.extend(calls)
        out: list[WindowScore] = []
        while ready := [k for k, p in self._procs.items() if len(p.pending) >= self.window]:
            out.extend(self._score(ready, self.window))
        return out

    def close(self, process: Hashable) -> WindowScore | None:
        """Score a process's last, partial window (if any) and forget the process."""
        if process not in self._procs:
            return None
        p = self._procs[process]
        score = self._score([process], len(p.pending))[0] if p.pending else None
        del self._procs[process]
        return score

    def _proc(self, key: Hashable) -> _Process:
        if key in self._procs:
            self._procs.move_to_end(key)
            return self._procs[key]
        while len(self._procs) >= self.max_processes:
            self._procs.popitem(last=False)
            self.stats.evicted += 1
        h, c = self.model.start_state(1)
        self._procs[key] = p = _Process(h[0], c[0])
        return p

    def _score(self, keys: list[Hashable], n: int) -> list[WindowScore]:
        procs = [self._procs[k] for k in keys]
        calls = [p.pending[:n] for p in procs]
        tokens = np.stack([self.model.encode(w) for w in calls])
        s, h, c = self.model.run(tokens, np.stack([p.h for p in procs]), np.stack([p.c for p in procs]))
        out = []
        for j, (key, p) in enumerate(zip(keys, procs)):
            p.h, p.c = h[j], c[j]
            score = float(s[j].mean())
            p.num, p.den = self._decay * p.num + n * score, self._decay * p.den + n
            out.append(WindowScore(key, p.windows, p.seen, tuple(calls[j]), score, float(s[j].max()),
                                   p.num / p.den))
            del p.pending[:n]
            p.seen += n
            p.windows += 1
        self.stats.windows += len(keys)
        self.stats.syscalls += n * len(keys)
        return out
