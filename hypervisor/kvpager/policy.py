"""Which page to evict: the relevance policy and the classic baselines, behind one interface.

A policy orders the pages of ONE tier; it never stores bytes nor knows about other
tiers (the placement in pager.py cascades a victim down to the next tier). The
interface is narrow, like vLLM's free-block queue: a policy hears every insert,
touch and removal, and names a victim when the tier needs room. Naming the
incoming page itself as the victim is admission control: the page bypasses this
tier. LRU, LFU and ARC are the baselines; Belady's optimal reads the future and
exists only for the simulator, as the limit no online policy can pass.

The relevance policy (NeuraOS) ranks a page by the probability that it is used
again soon, learned online by `ReuseModel` per page class (reuse count, request
size, partial tail) as a survival curve over page age, times its session's
priority, raised by the scheduler's next-use forecast (`SessionHints`); ties go
to the deeper block, since a prefix cache can use a block only when every block
before it is cached too.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, NamedTuple, Protocol

import numpy as np

from hypervisor.kvpager.pages import Access, SessionKey

Key = Hashable


class EvictionPolicy(ABC):
    """Orders the pages of one tier. Calls: admit → (pop_victim)* → insert; touch; discard."""

    name: str = "policy"
    needs_future: bool = False
    """True only for Belady: the simulator then fills `Access.next_use`, for it alone."""

    def admit(self, key: Key, access: Access) -> bool:
        """A page not in this tier is offered to it; False sends it straight to the next tier."""
        return True

    @abstractmethod
    def insert(self, key: Key, access: Access) -> None: ...

    @abstractmethod
    def touch(self, key: Key, access: Access) -> None:
        """A resident page was used again."""

    @abstractmethod
    def pop_victim(self, incoming: Key | None = None, access: Access | None = None) -> Key:
        """Remove and return the page to evict; returning `incoming` (not yet inserted) bypasses it."""

    @abstractmethod
    def discard(self, key: Key) -> None:
        """Forget a page that left for another reason (promoted, corrupt, dropped)."""

    @abstractmethod
    def __contains__(self, key: Key) -> bool: ...

    @abstractmethod
    def __len__(self) -> int: ...


class AccessObserver(Protocol):
    """Hears every page access once, in arrival order, before the tiers do."""

    def observe(self, key: Key, access: Access) -> None: ...


class LRUPolicy(EvictionPolicy):
    """Least recently used; within one request the deeper block is older, so it goes first."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def insert(self, key: Key, access: Access) -> None:
        self._order[key] = None

    def touch(self, key: Key, access: Access) -> None:
        self._order.move_to_end(key)

    def pop_victim(self, incoming: Key | None = None, access: Access | None = None) -> Key:
        return self._order.popitem(last=False)[0]

    def discard(self, key: Key) -> None:
        self._order.pop(key, None)

    def __contains__(self, key: Key) -> bool:
        return key in self._order

    def __len__(self) -> int:
        return len(self._order)


class LFUPolicy(EvictionPolicy):
    """Least frequently used (uses while resident), least recent first among equals; O(1) per call."""

    name = "lfu"

    def __init__(self) -> None:
        self._freq: dict[Key, int] = {}
        self._buckets: dict[int, OrderedDict[Key, None]] = {}
        self._min = 0

    def insert(self, key: Key, access: Access) -> None:
        self._freq[key] = 1
        self._buckets.setdefault(1, OrderedDict())[key] = None
        self._min = 1

    def touch(self, key: Key, access: Access) -> None:
        f = self._freq[key]
        self._unlink(key, f)
        self._freq[key] = f + 1
        self._buckets.setdefault(f + 1, OrderedDict())[key] = None
        if self._min not in self._buckets:
            self._min = f + 1

    def pop_victim(self, incoming: Key | None = None, access: Access | None = None) -> Key:
        if self._min not in self._buckets:
            self._min = min(self._buckets)
        key = next(iter(self._buckets[self._min]))
        self.discard(key)
        return key

    def discard(self, key: Key) -> None:
        f = self._freq.pop(key, None)
        if f is not None:
            self._unlink(key, f)

    def _unlink(self, key: Key, f: int) -> None:
        bucket = self._buckets[f]
        del bucket[key]
        if not bucket:
            del self._buckets[f]
            if self._min == f and self._buckets:
                self._min = min(self._buckets)

    def __contains__(self, key: Key) -> bool:
        return key in self._freq

    def __len__(self) -> int:
        return len(self._freq)


class ARCPolicy(EvictionPolicy):
    """Adaptive Replacement Cache (Megiddo & Modha, FAST'03), capacity counted in pages.

    T1 holds pages seen once recently, T2 pages seen at least twice; the ghost lists
    B1/B2 remember recent evictions from each, and a hit in a ghost list moves the
    target size p of T1 towards whichever side would have kept that page.
    """

    name = "arc"

    def __init__(self, capacity: int) -> None:
        self.c = max(1, capacity)
        self.p = 0.0
        self.t1: OrderedDict[Key, None] = OrderedDict()
        self.t2: OrderedDict[Key, None] = OrderedDict()
        self.b1: OrderedDict[Key, None] = OrderedDict()
        self.b2: OrderedDict[Key, None] = OrderedDict()

    def admit(self, key: Key, access: Access) -> bool:
        if key in self.b1:
            self.p = min(self.c, self.p + max(len(self.b2) / len(self.b1), 1.0))
        elif key in self.b2:
            self.p = max(0.0, self.p - max(len(self.b1) / len(self.b2), 1.0))
        return True

    def insert(self, key: Key, access: Access) -> None:
        if key in self.b1 or key in self.b2:
            self.b1.pop(key, None)
            self.b2.pop(key, None)
            self.t2[key] = None
        else:
            self.t1[key] = None
        # directory bounds: |T1|+|B1| <= c and |T1|+|T2|+|B1|+|B2| <= 2c
        while self.b1 and len(self.t1) + len(self.b1) > self.c:
            self.b1.popitem(last=False)
        while self.b2 and len(self.t1) + len(self.t2) + len(self.b1) + len(self.b2) > 2 * self.c:
            self.b2.popitem(last=False)

    def touch(self, key: Key, access: Access) -> None:
        if key in self.t1:
            del self.t1[key]
            self.t2[key] = None
        else:
            self.t2.move_to_end(key)

    def pop_victim(self, incoming: Key | None = None, access: Access | None = None) -> Key:
        if self.t1 and (len(self.t1) > self.p or (incoming in self.b2 and len(self.t1) == int(self.p))
                        or not self.t2):
            key = self.t1.popitem(last=False)[0]
            self.b1[key] = None
        else:
            key = self.t2.popitem(last=False)[0]
            self.b2[key] = None
        return key

    def discard(self, key: Key) -> None:
        self.t1.pop(key, None)
        self.t2.pop(key, None)

    def __contains__(self, key: Key) -> bool:
        return key in self.t1 or key in self.t2

    def __len__(self) -> int:
        return len(self.t1) + len(self.t2)


class BeladyPolicy(EvictionPolicy):
    """Belady's MIN with bypass: evict the page used furthest in the future, never cache one used never.

    For the simulator only (it reads `Access.next_use`). With prefix-chained block
    hashes a block's next use is never later than its descendants', and ties evict
    the deeper block, so the cache stays closed under prefixes and its prefix hits
    equal its plain hits: an upper bound on every online policy's prefix hits.
    """

    name = "belady"
    needs_future = True

    def __init__(self) -> None:
        self._next: dict[Key, tuple[float, int]] = {}
        self._heap: list[tuple[float, int, int, Key]] = []
        self._seq = itertools.count()

    def admit(self, key: Key, access: Access) -> bool:
        return access.next_use is not None and access.next_use != math.inf

    def insert(self, key: Key, access: Access) -> None:
        self._set(key, access)

    def touch(self, key: Key, access: Access) -> None:
        self._set(key, access)

    def _set(self, key: Key, access: Access) -> None:
        rank = (math.inf if access.next_use is None else access.next_use, access.depth)
        self._next[key] = rank
        heapq.heappush(self._heap, (-rank[0], -rank[1], next(self._seq), key))
        if len(self._heap) > 4 * len(self._next) + 64:
            self._heap = [(-r[0], -r[1], next(self._seq), k) for k, r in self._next.items()]
            heapq.heapify(self._heap)

    def pop_victim(self, incoming: Key | None = None, access: Access | None = None) -> Key:
        while True:
            neg_next, neg_depth, _, key = self._heap[0]
            if self._next.get(key) == (-neg_next, -neg_depth):
                break
            heapq.heappop(self._heap)
        if incoming is not None and access is not None:
            mine = math.inf if access.next_use is None else access.next_use
            if (mine, access.depth) >= (-neg_next, -neg_depth):
                return incoming
        heapq.heappop(self._heap)
        del self._next[key]
        return key

    def discard(self, key: Key) -> None:
        self._next.pop(key, None)

    def __contains__(self, key: Key) -> bool:
        return key in self._next

    def __len__(self) -> int:
        return len(self._next)


# ---------------------------------------------------------------- relevance


class PageClass(NamedTuple):
    """What the reuse model conditions on: all of it known when the page is used, none of it the future."""

    reuse: int  # bucket of how often this block has been used (1, 2, 3-4, 5-9, 10+)
    size: int  # bucket of the using request's length in blocks
    partial: bool  # a request's unfilled last block: a longer follow-up re-hashes it


_REUSE_EDGES = (2, 3, 5, 10)
_SIZE_EDGES = (7, 16, 41, 81)
AGE_EDGES_S = (0, 10, 20, 30, 45, 60, 90, 120, 180, 240, 300, 400, 500, 650, 800, 1000, 1300,
               1700, 2200, 3000, 3600)
"""Age bins (seconds) of the survival curves; a page unused for the last edge counts as gone."""


def classify(access: Access, uses: int) -> PageClass:
    if access.partial:
        return PageClass(0, 0, True)
    return PageClass(bisect.bisect_right(_REUSE_EDGES, uses), bisect.bisect_right(_SIZE_EDGES, access.request_blocks),
                     False)


class _Group:
    """Open episodes of one class that started at one instant (one request's pages, mostly)."""

    __slots__ = ("open", "bin")

    def __init__(self) -> None:
        self.open = 0
        self.bin = 0  # the age bin the group is in now


class _ClassStats:
    """Reuses and exposure (page-seconds at risk) per age bin, for one page class."""

    __slots__ = ("reused", "exposed", "open", "open_t0")

    def __init__(self, bins: int) -> None:
        self.reused = [0.0] * bins
        self.exposed = [0.0] * bins  # page-seconds of completed stays in each bin
        self.open = [0.0] * bins  # pages now in each bin ...
        self.open_t0 = [0.0] * bins  # ... and the sum of their start times: open exposure is (now - edge) * open - open_t0

    def exposure(self, now: float, edges: tuple[float, ...]) -> list[float]:
        return [e + ((now - edges[j]) * o - t if o else 0.0)
                for j, (e, o, t) in enumerate(zip(self.exposed, self.open, self.open_t0))]


class ReuseModel:
    """Learns online, per page class, the chance that a page is used again within a horizon.

    Every access closes the page's previous episode (a reuse at that age) and opens a
    new one. The estimate is a piecewise-exponential survival curve: per age bin, the
    reuse rate is reuses / page-seconds at risk, where pages still waiting count for the
    time they have waited (censoring), so pages never used again count too, at once.
    Evicted pages keep their metadata here (a ghost list), so the estimate does not
    depend on what the cache happened to keep. In each bin a class's rate is shrunk,
    with `prior_weight` pages' worth of exposure, towards k_c / (age + scale): a rate
    that falls with age, at a level k_c fitted to the class's reuses at all ages seen
    so far (itself shrunk towards the pooled level). So a class whose pages came back
    often when young is expected to at ages no page has reached yet (the first hour of
    a trace), a rare class behaves like the average, and before any data every class
    ranks by age alone (LRU).
    """

    def __init__(self, *, edges: tuple[float, ...] = AGE_EDGES_S, prior_weight: float = 200.0,
                 prior_shape: float = 0.2, prior_scale_s: float = 60.0, max_keys: int = 4_000_000,
                 refresh_s: float = 10.0, age_step_s: float = 5.0) -> None:
        self.edges = edges
        self.age_step_s = age_step_s
        self.bins = len(edges) - 1
        self.widths = [edges[j + 1] - edges[j] for j in range(self.bins)]
        self.prior_exposure = [prior_weight * w for w in self.widths]
        self.prior_shape = prior_shape  # k before any data
        # mean of 1 / (age + scale) over each bin: the rate's shape in age
        self.prior_phi = [math.log((edges[j + 1] + prior_scale_s) / (edges[j] + prior_scale_s)) / w
                          for j, w in enumerate(self.widths)]
        self.max_keys = max_keys
        self.refresh_s = refresh_s
        self._last: OrderedDict[Key, tuple[PageClass, float, int]] = OrderedDict()
        self._groups: dict[tuple[PageClass, float], _Group] = {}
        self._boundaries: list[tuple[float, int, PageClass, float]] = []
        self._seq = itertools.count()
        self._stats: dict[PageClass, _ClassStats] = {}
        self._surv: dict[PageClass, list[float]] = {}
        self._pooled = self._to_survival([prior_shape * f for f in self.prior_phi])
        self._curves: dict[tuple[PageClass, float], list[float]] = {}
        self.version = 0  # bumped whenever the curves change
        self._dirty = True
        self._refreshed = -math.inf
        self.now = 0.0

    # -- learning

    def observe(self, key: Key, access: Access) -> None:
        now = access.now
        self._advance(now)
        prev = self._last.pop(key, None)
        uses = 1
        if prev is not None:
            cls0, t0, uses0 = prev
            uses = uses0 + 1
            group = self._groups.get((cls0, t0))
            if group is not None:  # a reuse in the group's current bin (boundaries are processed first)
                st, j = self._stats[cls0], group.bin
                st.reused[j] += 1
                st.exposed[j] += now - t0 - self.edges[j]
                st.open[j] -= 1
                st.open_t0[j] -= t0
                group.open -= 1
                self._dirty = True
        cls = classify(access, uses)
        st = self._stats.get(cls)
        if st is None:
            st = self._stats[cls] = _ClassStats(self.bins)
        group = self._groups.get((cls, now))
        if group is None:
            group = self._groups[(cls, now)] = _Group()
            heapq.heappush(self._boundaries, (now + self.edges[1], next(self._seq), cls, now))
        group.open += 1
        st.open[0] += 1
        st.open_t0[0] += now
        self._last[key] = (cls, now, uses)
        if len(self._last) > self.max_keys:
            self._last.popitem(last=False)

    def _advance(self, now: float) -> None:
        """Move every group whose age crossed a bin edge into its next bin."""
        self.now = max(self.now, now)
        heap = self._boundaries
        while heap and heap[0][0] <= now:
            _, _, cls, t0 = heapq.heappop(heap)
            group = self._groups.get((cls, t0))
            if group is None:
                continue
            st, j, n = self._stats[cls], group.bin, group.open
            st.exposed[j] += n * self.widths[j]
            st.open[j] -= n
            st.open_t0[j] -= n * t0
            self._dirty = True
            if n == 0 or j + 1 >= self.bins:
                del self._groups[(cls, t0)]  # empty, or expired: no reuse within the last edge
                continue
            group.bin = j + 1
            st.open[j + 1] += n
            st.open_t0[j + 1] += n * t0
            heapq.heappush(heap, (t0 + self.edges[j + 2], next(self._seq), cls, t0))

    # -- prediction

    def class_of(self, key: Key) -> PageClass | None:
        entry = self._last.get(key)
        return entry[0] if entry else None

    def p_reuse(self, cls: PageClass, age: float, horizon: float) -> float:
        """P(used within `horizon` seconds | class, unused for `age` seconds)."""
        curve = self.curve(cls, horizon)
        i = int(age / self.age_step_s)
        return curve[i] if i < len(curve) else curve[-1]

    def curve(self, cls: PageClass, horizon: float) -> list[float]:
        """`p_reuse` of one class at ages 0, step, 2 step, ... (tabulated: the victim search reads it a lot)."""
        self._refresh()
        hq = max(self.age_step_s, round(horizon / self.age_step_s) * self.age_step_s)
        curve = self._curves.get((cls, hq))
        if curve is None:
            surv = np.asarray(self._surv.get(cls, self._pooled))
            ages = np.arange(0.0, self.edges[-1] + self.age_step_s, self.age_step_s)
            edges = np.asarray(self.edges, dtype=float)
            now = np.interp(ages, edges, surv)
            later = np.interp(ages + hq, edges, surv)
            p = np.where(now > 0, 1.0 - later / np.maximum(now, 1e-300), 0.0)
            # never worth more for being older: keeps each class queue's oldest page its least valuable
            curve = self._curves[(cls, hq)] = np.minimum.accumulate(p).tolist()
        return curve

    def survival(self, cls: PageClass) -> list[float]:
        self._refresh()
        return list(self._surv.get(cls, self._pooled))

    def _refresh(self) -> None:
        if not self._dirty or self.now - self._refreshed < self.refresh_s:
            return
        self._dirty = False
        self._refreshed = self.now
        self.version += 1
        self._curves.clear()
        exposure = {cls: st.exposure(self.now, self.edges) for cls, st in self._stats.items()}
        phi, prior = self.prior_phi, self.prior_exposure
        w_k = sum(p * f for p, f in zip(prior, phi))  # the prior's weight on k, in the same units
        num = {cls: sum(st.reused) for cls, st in self._stats.items()}
        den = {cls: sum(e * f for e, f in zip(exposure[cls], phi)) for cls in self._stats}
        k_pooled = (sum(num.values()) + w_k * self.prior_shape) / (sum(den.values()) + w_k)
        self._pooled = self._to_survival([k_pooled * f for f in phi])
        self._surv = {}
        for cls, st in self._stats.items():
            k = (num[cls] + w_k * k_pooled) / (den[cls] + w_k)
            self._surv[cls] = self._to_survival([(st.reused[j] + prior[j] * k * phi[j]) / (exposure[cls][j] + prior[j])
                                                 for j in range(self.bins)])

    def _to_survival(self, rates: list[float]) -> list[float]:
        return _survival([1.0 - math.exp(-r * w) for r, w in zip(rates, self.widths)])


def _survival(hazard: list[float]) -> list[float]:
    s = [1.0]
    for h in hazard:
        s.append(s[-1] * (1.0 - h))
    return s


@dataclass
class SessionHint:
    """What the scheduler and the agent say about a session: its weight and when it will speak next."""

    priority: float = 1.0
    next_use_at: float | None = None  # same clock as Access.now


class SessionHints:
    """Per-session priority and predicted next use; written by the pager, read by the policy."""

    def __init__(self) -> None:
        self._hints: dict[SessionKey, SessionHint] = {}

    def set(self, session: SessionKey, *, priority: float | None = None, next_use_at: float | None = None) -> None:
        hint = self._hints.setdefault(session, SessionHint())
        if priority is not None:
            if priority < 0:
                raise ValueError("priority must be >= 0")
            hint.priority = priority
        if next_use_at is not None:
            hint.next_use_at = next_use_at

    def get(self, session: SessionKey | None) -> SessionHint | None:
        return self._hints.get(session) if session is not None else None

    def clear(self, session: SessionKey) -> None:
        self._hints.pop(session, None)

    def __bool__(self) -> bool:
        return bool(self._hints)


class RelevancePolicy(EvictionPolicy):
    """NeuraOS: evict the page least likely to be used soon, weighted by its session's priority.

    value = P(reuse within horizon | class, age) x session priority, raised to the
    forecast's value when the session is predicted to speak within the horizon;
    deeper blocks first among equals. A short horizon approximates the page's reuse
    hazard now; with hazards that fall with age, evicting the lowest hazard first is
    the greedy choice that is also right later. (Tracking the tier's eviction age
    as the horizon was tried and did worse on the Mooncake trace.) Pages wait in one LRU
    queue per class; a class's curve never rises with age, so each queue's oldest
    page is its least valuable and a victim is found by comparing queue heads (a few
    deep when sessions carry hints). The incoming page competes too: when it is
    worth less than every resident, it bypasses the tier (admission control).
    """

    name = "neuraos"

    def __init__(self, model: ReuseModel, hints: SessionHints | None = None, *, horizon_s: float = 300.0,
                 scan: int = 4) -> None:
        self.model = model
        self.hints = hints if hints is not None else SessionHints()
        self.horizon_s = horizon_s
        self.scan = scan
        self._queues: dict[PageClass, OrderedDict[Key, Access]] = {}
        self._where: dict[Key, PageClass] = {}
        # victim search state: each class's head rank, valid for one instant and one set of curves
        self._stamp: tuple[int, float] = (-1, -1.0)
        self._curves: dict[PageClass, list[float]] = {}
        self._heads: dict[PageClass, tuple[tuple[float, float, int], int, Key]] = {}
        self._seq = itertools.count()  # breaks rank ties without comparing keys
        self._stale: set[PageClass] = set()

    def _class(self, key: Key, access: Access) -> PageClass:
        return self.model.class_of(key) or classify(access, 1)

    def insert(self, key: Key, access: Access) -> None:
        cls = self._class(key, access)
        self._where[key] = cls
        queue = self._queues.get(cls)
        if queue is None:
            queue = self._queues[cls] = OrderedDict()
            self._stale.add(cls)
        queue[key] = access

    def touch(self, key: Key, access: Access) -> None:
        self.discard(key)
        self.insert(key, access)

    def discard(self, key: Key) -> None:
        cls = self._where.pop(key, None)
        if cls is None:
            return
        queue = self._queues[cls]
        if next(iter(queue)) == key:
            self._stale.add(cls)
        del queue[key]
        if not queue:
            del self._queues[cls]
            self._heads.pop(cls, None)

    def value(self, key: Key, access: Access, now: float) -> float:
        """What keeping this page is worth now: P(reuse within the horizon) x priority, forecast-raised."""
        cls = self._where.get(key) or self._class(key, access)
        return self._hinted(self.model.p_reuse(cls, max(0.0, now - access.now), self.horizon_s), access, now)

    def _hinted(self, p: float, access: Access, now: float) -> float:
        hint = self.hints.get(access.session)
        if hint is None:
            return p
        if hint.next_use_at is not None and hint.next_use_at >= now:
            eta = hint.next_use_at - now
            p = max(p, 1.0 if eta <= self.horizon_s else self.horizon_s / eta)
        return p * hint.priority

    def _head(self, cls: PageClass, now: float, hinted: bool) -> tuple[tuple[float, float, int], int, Key]:
        curve = self._curves.get(cls)
        if curve is None:
            curve = self._curves[cls] = self.model.curve(cls, self.horizon_s)
        step, last = self.model.age_step_s, len(curve) - 1
        queue = self._queues[cls]
        entries = itertools.islice(queue.items(), self.scan) if hinted else (next(iter(queue.items())),)
        best: tuple[tuple[float, float, int], int, Key] | None = None
        for key, acc in entries:
            i = int((now - acc.now) / step) if now > acc.now else 0
            p = curve[i if i < last else last]
            rank = (self._hinted(p, acc, now) if hinted else p, acc.now, -acc.depth)
            if best is None or rank < best[0]:
                best = (rank, next(self._seq), key)
        assert best is not None
        return best

    def pop_victim(self, incoming: Key | None = None, access: Access | None = None) -> Key:
        now = access.now if access is not None else self.model.now
        hinted = bool(self.hints)
        stamp = (self.model.version, now)
        if stamp != self._stamp or hinted:  # a new instant or new curves: every head is re-ranked
            if stamp[0] != self._stamp[0]:
                self._curves = {}
            self._stamp = stamp
            self._heads = {}
            self._stale = set(self._queues)
        for cls in self._stale:
            if cls in self._queues:
                self._heads[cls] = self._head(cls, now, hinted)
        self._stale = set()
        best_rank, _, best_key = min(self._heads.values())
        if incoming is not None and access is not None and incoming not in self._where:
            if (self.value(incoming, access, now), access.now, -access.depth) < best_rank:
                return incoming
        self.discard(best_key)
        return best_key

    def __contains__(self, key: Key) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)
