"""The KV pager: a request's prefix found across tiers, pages admitted, demoted, promoted, prefetched.

Two layers. `Placement` is metadata only: which tier holds each page, capacities
enforced, victims named by each tier's policy and cascaded down (fast → RAM → NVMe
→ dropped); it returns the moves it decided. `KVPager` carries the bytes: it runs
those moves on real tiers, owns sessions (a session is named by its guest and its
name together, so two guests' sessions of the same name are two sessions and neither
can reach the other's), and prefetches the pages of sessions predicted to speak
soon on a worker thread, so a request never waits for a tier move it did not need.
The trace simulator drives the same `Placement` with no bytes at all.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

from hypervisor.kvpager.cost import CostAdmission, RestoreCost
from hypervisor.kvpager.pages import Access, BlockHash, PageKey, SessionKey
from hypervisor.kvpager.policy import (
    AccessObserver,
    EvictionPolicy,
    RelevancePolicy,
    ReuseModel,
    SessionHints,
)
from hypervisor.kvpager.tiers import KVPagerError, PageWriteError, Tier, TierStats

Key = Hashable


class SessionAccessDenied(KVPagerError):
    """Kept for callers that catch it: sessions are keyed by (guest, name), so no guest can name another's."""

    hint = "a guest can read and resume only the sessions it opened itself"


class UnknownSession(KVPagerError):
    hint = "open the session first (the model service does so on the guest's first Complete)"


@dataclass(frozen=True, slots=True)
class Move:
    """One decision of the placement: `key` goes from tier `src` (None: new) to `dst` (None: dropped)."""

    key: Key
    src: int | None
    dst: int | None


class Placement:
    """Which tier holds each page; capacities in the pages' own size units, never exceeded.

    Tiers are exclusive: a page lives in exactly one. A page a request uses moves to
    tier 0; a tier's victim cascades to the next tier, and out of the last one it is
    dropped. A policy may decline a page (admission control): it is then offered to
    the next tier instead.
    """

    def __init__(self, capacities: Sequence[int], policies: Sequence[EvictionPolicy],
                 observers: Sequence[AccessObserver] = ()) -> None:
        if len(capacities) != len(policies) or not capacities:
            raise ValueError("one policy per tier, at least one tier")
        self.capacities = list(capacities)
        self.policies = list(policies)
        self.observers = list(observers)
        self.used = [0] * len(capacities)
        self._level: dict[Key, int] = {}
        self._size: dict[Key, int] = {}
        self._last: dict[Key, Access] = {}

    def level(self, key: Key) -> int | None:
        return self._level.get(key)

    def __contains__(self, key: Key) -> bool:
        return key in self._level

    def resident(self, level: int) -> int:
        return sum(1 for v in self._level.values() if v == level)

    def last_access(self, key: Key) -> Access | None:
        return self._last.get(key)

    def access(self, key: Key, access: Access, size: int = 1) -> list[Move]:
        """A request used `key`: touch it in tier 0, or promote it there, or admit it there."""
        for observer in self.observers:
            observer.observe(key, access)
        self._last[key] = access
        level = self._level.get(key)
        if level == 0:
            self.policies[0].touch(key, access)
            return []
        moves: list[Move] = []
        if level is not None:
            self._unlink(key)
        else:
            self._size[key] = size
        self._place(key, 0, access, level, moves)
        return moves

    def promote(self, key: Key) -> list[Move]:
        """Move a resident page to tier 0 without counting a use (a prefetch)."""
        level = self._level.get(key)
        if level is None or level == 0:
            return []
        moves: list[Move] = []
        self._unlink(key)
        self._place(key, 0, self._last[key], level, moves)
        return moves

    def remove(self, key: Key) -> None:
        """Forget a page (its bytes were lost or found corrupt)."""
        if key in self._level:
            self._unlink(key)
        self._size.pop(key, None)
        self._last.pop(key, None)

    def shrink(self, level: int, capacity: int) -> list[Move]:
        """Lower a tier's capacity (e.g. its disk filled up), evicting by policy down to it."""
        self.capacities[level] = capacity
        moves: list[Move] = []
        policy = self.policies[level]
        while self.used[level] > capacity and len(policy):
            victim = policy.pop_victim()
            self._evict(victim, level, moves)
        return moves

    def _unlink(self, key: Key) -> None:
        level = self._level.pop(key)
        self.policies[level].discard(key)
        self.used[level] -= self._size[key]

    def _evict(self, victim: Key, level: int, moves: list[Move]) -> None:
        del self._level[victim]
        self.used[level] -= self._size[victim]
        self._place(victim, level + 1, self._last[victim], level, moves)

    def _place(self, key: Key, level: int, access: Access, src: int | None, moves: list[Move]) -> None:
        size = self._size[key]
        while level < len(self.capacities):
            policy, capacity = self.policies[level], self.capacities[level]
            if size <= capacity and policy.admit(key, access):
                bypassed = False
                while self.used[level] + size > capacity:
                    victim = policy.pop_victim(key, access)
                    if victim == key:
                        bypassed = True
                        break
                    self._evict(victim, level, moves)
                if not bypassed:
                    policy.insert(key, access)
                    self._level[key] = level
                    self.used[level] += size
                    moves.append(Move(key, src, level))
                    return
            level += 1
        moves.append(Move(key, src, None))
        self._size.pop(key, None)
        self._last.pop(key, None)


@dataclass(frozen=True, slots=True)
class PrefixLookup:
    """How much of a request's prefix the tiers hold: `tiers[i]` is the tier of block i."""

    tiers: tuple[int, ...]
    blocks: int

    @property
    def cached(self) -> int:
        return len(self.tiers)

    @property
    def fast(self) -> int:
        """Leading blocks already in the fast tier: what a prefix cache serves with no load."""
        n = 0
        for t in self.tiers:
            if t != 0:
                break
            n += 1
        return n


@dataclass
class GuestStats:
    blocks: int = 0
    fast_hits: int = 0
    lower_hits: int = 0

    @property
    def fast_hit_rate(self) -> float:
        return self.fast_hits / self.blocks if self.blocks else 0.0


@dataclass
class PagerStats:
    tiers: list[TierStats] = field(default_factory=list)
    guests: dict[str, GuestStats] = field(default_factory=dict)
    dropped_pages: int = 0
    failed_writes: int = 0
    corrupt_reads: int = 0
    prefetched_pages: int = 0


class KVPager:
    """Pages of every guest's sessions across tiers; a context manager that owns its prefetch worker.

    Bytes are opaque here: the model backend saves a block's KV state to bytes and
    restores it (llama.cpp's sequence state API, vLLM's KV connector). `load`
    returns the longest prefix of verified pages; the caller re-prefills the rest.
    """

    def __init__(self, tiers: Sequence[Tier], policies: Sequence[EvictionPolicy], *,
                 observers: Sequence[AccessObserver] = (), hints: SessionHints | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.tiers = list(tiers)
        self.placement = Placement([t.capacity_bytes for t in tiers], policies, observers)
        self.hints = hints if hints is not None else SessionHints()
        self.clock = clock
        self._lock = threading.Lock()
        self._sessions: set[SessionKey] = set()  # (guest, session): a guest names only its own
        self._prefix: dict[SessionKey, tuple[BlockHash, ...]] = {}
        self._stats = PagerStats()
        self._jobs: queue.Queue[SessionKey | None] = queue.Queue()
        self._worker: threading.Thread | None = None

    @classmethod
    def relevance(cls, tiers: Sequence[Tier], cost: RestoreCost | None = None, **kwargs: object) -> KVPager:
        """The NeuraOS wiring: one shared reuse model and hint table, a relevance policy per tier.

        With `cost`, a tier keeps a page only while reading it back is measured cheaper than
        prefilling it again (`CostAdmission`).
        """
        model, hints = ReuseModel(), SessionHints()
        policies: list[EvictionPolicy] = [RelevancePolicy(model, hints) for _ in tiers]
        if cost is not None:
            policies = [CostAdmission(p, cost, t.name) for p, t in zip(policies, tiers)]
        return cls(tiers, policies, observers=[model], hints=hints, **kwargs)  # type: ignore[arg-type]

    # -- lifetime

    def __enter__(self) -> KVPager:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, name="kvpager-prefetch", daemon=True)
            self._worker.start()

    def close(self) -> None:
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join(timeout=10)
            self._worker = None

    def drain(self, timeout: float = 10.0) -> None:
        """Wait until every queued prefetch has run (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while self._jobs.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.005)

    # -- sessions

    def open_session(self, guest: str, session: str, *, priority: float = 1.0) -> SessionKey:
        """Open (or reopen) `guest`'s session `session`; another guest's session of that name is another session."""
        with self._lock:
            key = SessionKey(guest, session)
            self._sessions.add(key)
            self.hints.set(key, priority=priority)
            return key

    def close_session(self, guest: str, session: str) -> None:
        """Forget the session; its pages stay as cache for the guest's other sessions, and age out."""
        with self._lock:
            key = self._session(guest, session)
            self._sessions.discard(key)
            self._prefix.pop(key, None)
            self.hints.clear(key)

    def hint(self, guest: str, session: str, *, next_use_in_s: float | None = None,
             priority: float | None = None) -> None:
        """The scheduler's forecast or the agent's intent: raise a session's pages, prefetch them."""
        with self._lock:
            key = self._session(guest, session)
            now = self.clock()
            self.hints.set(key, priority=priority,
                           next_use_at=None if next_use_in_s is None else now + next_use_in_s)
        if next_use_in_s is not None:
            self._jobs.put(key)

    def _session(self, guest: str, session: str) -> SessionKey:
        key = SessionKey(guest, session)
        if key not in self._sessions:
            raise UnknownSession(f"guest {guest!r} has no session {session!r}")
        return key

    # -- the request path

    def lookup(self, guest: str, session: str, blocks: Sequence[BlockHash]) -> PrefixLookup:
        """Where each leading block of this prefix is, up to the first one no tier holds."""
        with self._lock:
            self._session(guest, session)
            tiers: list[int] = []
            for block in blocks:
                level = self.placement.level(PageKey(guest, block))
                if level is None:
                    break
                tiers.append(level)
            return PrefixLookup(tuple(tiers), len(blocks))

    def load(self, guest: str, session: str, blocks: Sequence[BlockHash]) -> list[bytes]:
        """Bytes of the longest verified prefix, promoted to the fast tier; the caller prefills the rest."""
        with self._lock:
            skey = self._session(guest, session)
            now = self.clock()
            found: list[tuple[PageKey, bytes]] = []
            fast = 0
            for block in blocks:
                key = PageKey(guest, block)
                level = self.placement.level(key)
                if level is None:
                    break
                data = self.tiers[level].get(key)
                if data is None:  # missing or corrupt on disk: a miss, never wrong KV
                    self._stats.corrupt_reads += 1
                    self.placement.remove(key)
                    break
                fast += level == 0 and fast == len(found)
                found.append((key, data))
            for depth in reversed(range(len(found))):  # deepest first, as in `store`
                key, data = found[depth]
                self._use(key, self._access(skey, now, depth, len(blocks)), data)
            g = self._stats.guests.setdefault(guest, GuestStats())
            g.blocks += len(blocks)
            g.fast_hits += fast
            g.lower_hits += len(found) - fast
            self._prefix[skey] = tuple(blocks)
            return [data for _, data in found]

    def store(self, guest: str, session: str, blocks: Sequence[BlockHash], pages: Sequence[bytes], *,
              first_depth: int = 0, partial_tail: bool = False) -> None:
        """Admit freshly computed pages (blocks `first_depth`.. of the session's prefix) to the fast tier.

        Deepest first, so that among one request's pages the tail is the first to leave.
        """
        if len(blocks) != len(pages):
            raise ValueError("one page per block")
        with self._lock:
            skey = self._session(guest, session)
            now = self.clock()
            total = first_depth + len(blocks)
            for i in reversed(range(len(blocks))):
                key = PageKey(guest, blocks[i])
                access = self._access(skey, now, first_depth + i, total, partial_tail and i == len(blocks) - 1)
                self._use(key, access, pages[i])
            prev = self._prefix.get(skey, ())
            self._prefix[skey] = tuple(prev[:first_depth]) + tuple(blocks)

    def _access(self, skey: SessionKey, now: float, depth: int, blocks: int, partial: bool = False) -> Access:
        return Access(now=now, depth=depth, request_blocks=blocks, partial=partial, session=skey)

    def _use(self, key: PageKey, access: Access, data: bytes) -> None:
        """A request used this page, whose bytes the caller holds: it moves to (or stays in) the fast tier."""
        level = self.placement.level(key)
        if level is not None and level != 0:
            self.tiers[level].remove(key)  # the bytes travel with this call, free the slot first
        self._run_moves(self.placement.access(key, access, len(data)), {key: data})

    def _run_moves(self, moves: list[Move], payload: dict[Key, bytes]) -> None:
        """Carry out the placement's moves in order (they free room before they use it)."""
        for move in moves:
            key = move.key
            assert isinstance(key, PageKey)
            data = payload.get(key)
            if data is None and move.src is not None:
                data = self.tiers[move.src].get(key)
            if move.src is not None:
                self.tiers[move.src].remove(key)
            if move.dst is None:
                self._stats.dropped_pages += 1
                continue
            if data is None:  # the source copy was corrupt: drop it, it will be re-prefilled
                self._stats.corrupt_reads += 1
                self.placement.remove(key)
                continue
            try:
                self.tiers[move.dst].put(key, data)
            except PageWriteError:
                self._stats.failed_writes += 1
                self.placement.remove(key)
                # the disk holds less than configured: believe the disk from now on (the tier
                # stays this size), and evict by policy down to it
                self._run_moves(self.placement.shrink(move.dst, self.tiers[move.dst].used_bytes), {})

    # -- prefetch (worker thread)

    def prefetch(self, guest: str, session: str) -> None:
        """Queue the session's pages for promotion to the fast tier; returns at once."""
        with self._lock:
            key = self._session(guest, session)
        self._jobs.put(key)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                self._prefetch(job)
            except KVPagerError:
                pass  # a prefetch is an optimisation; a failed one leaves a miss, never an error
            finally:
                self._jobs.task_done()

    def _prefetch(self, skey: SessionKey) -> None:
        with self._lock:
            wanted = [(PageKey(skey.guest, b), self.placement.level(PageKey(skey.guest, b)))
                      for b in self._prefix.get(skey, ())]
        for key, level in wanted:
            if level is None:
                break  # prefix order: nothing past a missing block is usable
            if level == 0:
                continue
            data = self.tiers[level].peek(key)  # the slow part (an NVMe read), outside the lock
            with self._lock:
                if self.placement.level(key) != level:
                    continue  # the request path moved it meanwhile
                if data is None:
                    data = self.tiers[level].get(key)  # again, under the lock: removes a corrupt copy
                if data is None:
                    self._stats.corrupt_reads += 1
                    self.placement.remove(key)
                    break
                self.tiers[level].remove(key)
                self._stats.prefetched_pages += 1
                self._run_moves(self.placement.promote(key), {key: data})

    # -- observability

    def stats(self) -> PagerStats:
        with self._lock:
            s = PagerStats(tiers=[t.stats() for t in self.tiers],
                           guests={g: GuestStats(v.blocks, v.fast_hits, v.lower_hits)
                                   for g, v in self._stats.guests.items()},
                           dropped_pages=self._stats.dropped_pages, failed_writes=self._stats.failed_writes,
                           corrupt_reads=self._stats.corrupt_reads, prefetched_pages=self._stats.prefetched_pages)
            return s
