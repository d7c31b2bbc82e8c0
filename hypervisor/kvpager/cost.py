"""Restore or recompute: what getting a session's KV back costs, measured on this host as it runs.

A parked KV state can come back two ways: read from its tier and loaded into the engine, or
prefilled again from the conversation's tokens. Which is cheaper depends on the machine: on a
CPU host a llama.cpp prefill runs at a few hundred tokens/s and any restore wins by far; on a
GPU a short history re-prefills in milliseconds while a slow disk needs seconds to read its KV.
So no constant can decide it. `RestoreCost` keeps, from real operations only, the seconds a
restore from each tier took per byte and the engine's prefill tokens/s, each as an EWMA of
amounts and seconds (a ratio of averages, so a long operation counts more than a tiny one
dominated by fixed overheads), and answers two questions with the same numbers:

* per request (`choose`): restore this state from its tier, or re-prefill it?
* per tier (`worth_keeping`): is a page in this tier worth its space at all, or is recomputing
  it cheaper than reading it back? The pager's placement declines such pages (admission).

Before a tier has been measured, restoring is assumed worth it (that restore then measures it).
A tier judged too slow is no longer read, so it would never be measured again: every
`explore_every`-th decision against it restores (or keeps) anyway, to follow a tier that got
faster (a busy disk that calmed down).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Hashable

from hypervisor.kvpager.pages import Access
from hypervisor.kvpager.policy import EvictionPolicy

Key = Hashable


@dataclass(frozen=True, slots=True)
class CostChoice:
    """One decision: `restore` or re-prefill, with the estimates it was made from (None: unmeasured)."""

    restore: bool
    restore_s: float | None
    prefill_s: float | None
    reason: str  # "cheaper" | "unmeasured" | "explore"


class _Ratio:
    """EWMA of an amount and of the seconds it took; their ratio is the rate."""

    __slots__ = ("amount", "seconds", "n")

    def __init__(self) -> None:
        self.amount = 0.0
        self.seconds = 0.0
        self.n = 0

    def add(self, amount: float, seconds: float, alpha: float) -> None:
        if self.n == 0:
            self.amount, self.seconds = amount, seconds
        else:
            self.amount += alpha * (amount - self.amount)
            self.seconds += alpha * (seconds - self.seconds)
        self.n += 1

    def seconds_per_unit(self) -> float | None:
        return self.seconds / self.amount if self.n and self.amount > 0 else None


class RestoreCost:
    """Online restore and recompute costs; thread-safe (the service's request threads share one)."""

    def __init__(self, *, alpha: float = 0.3, explore_every: int = 8, min_prefill_tokens: int = 16) -> None:
        if not 0.0 < alpha <= 1.0 or explore_every < 1:
            raise ValueError("alpha in (0, 1] and explore_every >= 1")
        self.alpha = alpha
        self.explore_every = explore_every
        self.min_prefill_tokens = min_prefill_tokens  # shorter prefills are mostly fixed overhead
        self._lock = threading.Lock()
        self._tiers: dict[str, _Ratio] = {}
        self._prefill = _Ratio()
        self._state = _Ratio()  # bytes per token of KV (amount: tokens, "seconds": bytes)
        self._declined: dict[str, int] = {}
        self._last_keep: dict[str, tuple[object, bool]] = {}
        self.decisions = {"restore": 0, "recompute": 0, "explore": 0}

    # -- measurements (real operations only)

    def observe_restore(self, tier: str, nbytes: int, seconds: float, tokens: int = 0) -> None:
        """A state of `nbytes` (`tokens` of KV) came back from `tier` in `seconds` (read + load)."""
        if nbytes <= 0 or seconds < 0:
            return
        with self._lock:
            self._tiers.setdefault(tier, _Ratio()).add(nbytes, seconds, self.alpha)
            if tokens > 0:
                self._state.add(tokens, nbytes, self.alpha)

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        """The engine prefilled `tokens` in `seconds`."""
        if tokens < self.min_prefill_tokens or seconds <= 0:
            return
        with self._lock:
            self._prefill.add(tokens, seconds, self.alpha)

    def observe_state(self, nbytes: int, tokens: int) -> None:
        """A state of `tokens` took `nbytes` (learns the KV size per token, for per-tier judgements)."""
        if nbytes > 0 and tokens > 0:
            with self._lock:
                self._state.add(tokens, nbytes, self.alpha)

    # -- estimates

    def restore_s(self, tier: str, nbytes: int) -> float | None:
        with self._lock:
            r = self._tiers.get(tier)
            per = r.seconds_per_unit() if r else None
        return None if per is None else per * nbytes

    def prefill_s(self, tokens: int) -> float | None:
        with self._lock:
            per = self._prefill.seconds_per_unit()
        return None if per is None else per * tokens

    def prefill_tok_per_s(self) -> float | None:
        with self._lock:
            per = self._prefill.seconds_per_unit()
        return 1.0 / per if per else None

    # -- decisions

    def choose(self, tier: str, nbytes: int, tokens: int) -> CostChoice:
        """Restore `nbytes` from `tier`, or re-prefill its `tokens`? Restore unless measured slower."""
        restore_s, prefill_s = self.restore_s(tier, nbytes), self.prefill_s(tokens)
        with self._lock:
            if restore_s is None or prefill_s is None:
                self.decisions["restore"] += 1
                return CostChoice(True, restore_s, prefill_s, "unmeasured")
            if restore_s <= prefill_s:
                self._declined[tier] = 0
                self.decisions["restore"] += 1
                return CostChoice(True, restore_s, prefill_s, "cheaper")
            if self._explore(tier):
                return CostChoice(True, restore_s, prefill_s, "explore")
            self.decisions["recompute"] += 1
            return CostChoice(False, restore_s, prefill_s, "cheaper")

    def worth_keeping(self, tier: str, unit: object = None) -> bool:
        """Is reading a page back from `tier` cheaper than prefilling its tokens again?

        `unit` names what the page belongs to (a session): consecutive questions about one unit
        get one answer, so an exploring tier keeps a whole state, not scattered pages of it.
        """
        with self._lock:
            r = self._tiers.get(tier)
            per_byte = r.seconds_per_unit() if r else None
            per_token = self._prefill.seconds_per_unit()
            bytes_per_token = self._state.seconds_per_unit()
            if per_byte is None or per_token is None or bytes_per_token is None:
                return True
            if per_byte * bytes_per_token <= per_token:
                return True
            last = self._last_keep.get(tier)
            if unit is not None and last is not None and last[0] == unit:
                return last[1]
            keep = self._explore(tier)
            self._last_keep[tier] = (unit, keep)
            return keep

    def _explore(self, tier: str) -> bool:
        """Every explore_every-th decision against a tier goes its way anyway, to measure it again."""
        n = self._declined.get(tier, 0) + 1
        if n >= self.explore_every:
            self._declined[tier] = 0
            self.decisions["explore"] += 1
            return True
        self._declined[tier] = n
        return False

    def snapshot(self) -> dict:
        """The learned figures, for `neuraos kv` and the benchmark's JSON."""
        with self._lock:
            tiers = {}
            for name, r in sorted(self._tiers.items()):
                per = r.seconds_per_unit()
                tiers[name] = {"mib_per_s": round(1 / per / 2**20, 1) if per else None, "restores": r.n}
            per_token = self._prefill.seconds_per_unit()
            bpt = self._state.seconds_per_unit()
            return {"tiers": tiers, "prefill_tok_per_s": round(1 / per_token, 1) if per_token else None,
                    "prefills": self._prefill.n, "kv_bytes_per_token": round(bpt) if bpt else None,
                    "decisions": dict(self.decisions)}


class CostAdmission(EvictionPolicy):
    """A tier's policy that first asks the cost model whether the tier is worth keeping a page in.

    Everything else (victims, order) is the wrapped policy's. A declined page is offered to the
    next tier, and out of the last one it is dropped: its session re-prefills it when it returns,
    which the measurements said is the cheaper way back anyway.
    """

    def __init__(self, inner: EvictionPolicy, cost: RestoreCost, tier: str) -> None:
        self.inner = inner
        self.cost = cost
        self.tier = tier
        self.name = inner.name
        self.declined = 0

    def admit(self, key: Key, access: Access) -> bool:
        if not self.cost.worth_keeping(self.tier, access.session):
            self.declined += 1
            return False
        return self.inner.admit(key, access)

    def insert(self, key: Key, access: Access) -> None:
        self.inner.insert(key, access)

    def touch(self, key: Key, access: Access) -> None:
        self.inner.touch(key, access)

    def pop_victim(self, incoming: Key | None = None, access: Access | None = None) -> Key:
        return self.inner.pop_victim(incoming, access)

    def discard(self, key: Key) -> None:
        self.inner.discard(key)

    def __contains__(self, key: Key) -> bool:
        return key in self.inner

    def __len__(self) -> int:
        return len(self.inner)
