"""KV pager: tier capacities, checksummed NVMe pages, isolation, prefix hits, policies, prefetch."""

from __future__ import annotations

import errno
import random
import threading
import time
from pathlib import Path

import pytest

from hypervisor.kvpager import (
    Access,
    ARCPolicy,
    BeladyPolicy,
    KVPager,
    LFUPolicy,
    LRUPolicy,
    MemoryTier,
    NvmeTier,
    PageKey,
    Placement,
    RelevancePolicy,
    ReuseModel,
    SessionHints,
    SessionKey,
    TierFull,
    UnknownSession,
)
from hypervisor.kvpager.pages import checksum
from hypervisor.kvpager.simulate import SYSTEMS, TraceRequest, make_policies, replay

PAGE = 64  # bytes per page in these tests


def page(i: int) -> bytes:
    return (f"kv{i:06d}".encode() * PAGE)[:PAGE]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make_pager(tmp_path: Path, fast: int = 4, ram: int = 4, nvme: int = 8, nvme_tier: type = NvmeTier,
               clock: Clock | None = None) -> KVPager:
    tiers = [MemoryTier("fast", fast * PAGE), MemoryTier("ram", ram * PAGE),
             nvme_tier("nvme", nvme * PAGE, tmp_path / "pages")]
    return KVPager.relevance(tiers, clock=clock or Clock())


def chain(n: int, base: int = 0) -> list[int]:
    return [base + i for i in range(n)]


# ---------------------------------------------------------------- tiers and capacities


def test_memory_tier_refuses_past_capacity() -> None:
    tier = MemoryTier("fast", 2 * PAGE)
    tier.put(PageKey("g", 1), page(1))
    tier.put(PageKey("g", 2), page(2))
    with pytest.raises(TierFull):
        tier.put(PageKey("g", 3), page(3))
    tier.put(PageKey("g", 2), page(22))  # overwriting in place needs no extra room
    assert tier.used_bytes == 2 * PAGE and tier.get(PageKey("g", 2)) == page(22)


@pytest.mark.parametrize("system", SYSTEMS[:4])
def test_placement_never_exceeds_any_tier(system: str) -> None:
    caps = (5, 7, 11)
    policies, observers = make_policies(system, caps)
    placement = Placement(caps, policies, observers)
    rng = random.Random(1)
    for t in range(600):
        key = rng.randrange(60)
        placement.access(key, Access(now=float(t), depth=key % 4, request_blocks=4))
        assert all(used <= cap for used, cap in zip(placement.used, caps))
        assert [placement.resident(lv) for lv in range(3)] == placement.used
        if system != "neuraos":  # (neuraos may bypass a page worth less than all residents)
            assert placement.level(key) == 0  # what a request used is in the fast tier


def test_pager_keeps_every_tier_within_its_bytes(tmp_path: Path) -> None:
    pager = make_pager(tmp_path, fast=3, ram=3, nvme=4)
    pager.open_session("g1", "s1")
    for turn in range(6):
        blocks = chain(4, base=100 * turn)
        pager.store("g1", "s1", blocks, [page(b) for b in blocks])
        for tier in pager.tiers:
            assert tier.used_bytes <= tier.capacity_bytes
    assert [len(t) for t in pager.tiers] == [3, 3, 4]
    assert len(list((tmp_path / "pages").rglob("*.page"))) == 4
    assert pager.stats().dropped_pages == 6 * 4 - 10


# ---------------------------------------------------------------- NVMe pages: checksums and failures


def test_nvme_page_round_trip_and_header(tmp_path: Path) -> None:
    tier = NvmeTier("nvme", 10 * PAGE, tmp_path)
    key = PageKey("guest/../x", 7)
    tier.put(key, page(7))
    path = tier.path(key)
    assert path.parent.parent == tmp_path  # a hostile guest name stays one path component
    assert checksum(page(7)) in path.read_bytes()
    assert tier.get(key) == page(7)


def test_nvme_page_is_fsynced_with_its_directory_before_it_counts_as_stored(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from hypervisor.kvpager import tiers

    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(tiers.os, "fsync", fsync)
    tier = NvmeTier("nvme", 10 * PAGE, tmp_path)
    key = PageKey("g1", 7)
    tier.put(key, page(7))
    path = tier.path(key)
    # the new guest folder's entry, the data (written as .tmp, then renamed), the rename
    assert synced == [str(tmp_path), str(path.with_suffix(".tmp")), str(path.parent)]
    assert tier.get(key) == page(7) and not path.with_suffix(".tmp").exists()
    synced.clear()
    tier.put(PageKey("g1", 8), page(8))  # the folder exists now: file, then folder
    assert synced == [str(tier.path(PageKey("g1", 8)).with_suffix(".tmp")), str(path.parent)]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "swap"])
def test_damaged_page_file_is_a_miss_never_wrong_data(tmp_path: Path, damage: str) -> None:
    pager = make_pager(tmp_path, fast=1, ram=1, nvme=8)
    pager.open_session("g1", "s1")
    blocks = chain(6)
    pager.store("g1", "s1", blocks, [page(b) for b in blocks])
    # stored deepest first: the root stays in fast memory, block 1 in RAM, the tail on NVMe
    assert pager.lookup("g1", "s1", blocks).tiers == (0, 1, 2, 2, 2, 2)
    victim = pager.tiers[2].path(PageKey("g1", 2))
    raw = victim.read_bytes()
    if damage == "flip":
        victim.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    elif damage == "truncate":
        victim.write_bytes(raw[: len(raw) // 2])
    elif damage == "delete":
        victim.unlink()
    else:  # a valid page file of another block, under this block's name
        victim.write_bytes(pager.tiers[2].path(PageKey("g1", 3)).read_bytes())
    got = pager.load("g1", "s1", blocks)
    assert got == [page(0), page(1)]  # stops at the bad block: the caller re-prefills from there
    assert pager.stats().corrupt_reads == 1
    assert pager.lookup("g1", "s1", blocks).cached == 2
    pager.store("g1", "s1", blocks[2:], [page(b) for b in blocks[2:]], first_depth=2)  # re-prefilled
    assert pager.load("g1", "s1", blocks) == [page(b) for b in blocks]


def test_nvme_full_evicts_by_policy_without_crashing(tmp_path: Path) -> None:
    pager = make_pager(tmp_path, fast=2, ram=2, nvme=3)
    pager.open_session("g1", "hot")
    pager.open_session("g1", "cold")
    pager.hint("g1", "hot", priority=10.0)
    hot = chain(3, base=1000)
    pager.store("g1", "hot", hot, [page(b) for b in hot])
    for turn in range(8):
        cold = chain(3, base=100 * turn)
        pager.store("g1", "cold", cold, [page(b) for b in cold])
        assert pager.tiers[2].used_bytes <= 3 * PAGE
    # the high-priority session's pages outlived many low-priority ones in the full tiers
    assert pager.lookup("g1", "hot", hot).cached == 3
    assert pager.stats().dropped_pages > 0


def test_disk_full_drops_the_page_and_shrinks_the_tier(tmp_path: Path) -> None:
    class FillingDisk(NvmeTier):
        room = 2

        def _store(self, key: PageKey, data: bytes) -> None:
            if len(self) >= self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            super()._store(key, data)

    pager = make_pager(tmp_path, fast=1, ram=1, nvme=8, nvme_tier=FillingDisk)
    pager.open_session("g1", "s1")
    blocks = chain(8)
    pager.store("g1", "s1", blocks, [page(b) for b in blocks])
    stats = pager.stats()
    assert stats.failed_writes >= 1
    assert pager.placement.capacities[2] == 2 * PAGE  # believes the disk, not the config
    assert len(pager.tiers[2]) == 2 and pager.placement.used[2] == 2 * PAGE
    # the NVMe tier kept the two shallowest of the demoted blocks (deepest go first): the
    # prefix loads up to the first lost block, the rest is re-prefilled
    assert pager.load("g1", "s1", blocks) == [page(b) for b in range(4)]


# ---------------------------------------------------------------- isolation


def test_a_guest_cannot_read_or_resume_another_guests_session(tmp_path: Path) -> None:
    pager = make_pager(tmp_path)
    pager.open_session("alice", "s-1")
    blocks = chain(3)
    pager.store("alice", "s-1", blocks, [page(b) for b in blocks])
    # mallory has opened nothing: naming alice's session reaches nothing of it
    for call in (lambda: pager.lookup("mallory", "s-1", blocks), lambda: pager.load("mallory", "s-1", blocks),
                 lambda: pager.store("mallory", "s-1", [9], [page(9)]),
                 lambda: pager.hint("mallory", "s-1", next_use_in_s=1), lambda: pager.prefetch("mallory", "s-1"),
                 lambda: pager.close_session("mallory", "s-1")):
        with pytest.raises(UnknownSession, match="'mallory' has no session 's-1'"):
            call()
    # sessions are keyed by (guest, name): mallory's own "s-1" is another session, and the same
    # prefix hashes find nothing there, since pages are per guest too
    pager.open_session("mallory", "s-1")
    assert pager.lookup("mallory", "s-1", blocks).cached == 0
    assert pager.load("mallory", "s-1", blocks) == []
    pager.store("mallory", "s-1", blocks, [page(100 + b) for b in blocks])  # her own, different KV
    pager.close_session("mallory", "s-1")  # closing hers leaves alice's open
    assert pager.load("alice", "s-1", blocks) == [page(b) for b in blocks]
    pager.open_session("mallory", "s-1")
    assert pager.load("mallory", "s-1", blocks) == [page(100 + b) for b in blocks]
    assert pager.stats().guests["alice"].blocks == 3


# ---------------------------------------------------------------- prefix hits


def test_a_hit_counts_only_along_the_prefix_up_to_the_first_miss() -> None:
    # capacity 3, LRU: after r2 the fast tier holds 0, 5, 6 (1 and 2 were evicted), so r3
    # finds block 0, misses 1, and blocks 5, 6 do not count although they are cached
    reqs = [TraceRequest(0, 1536, 1, (0, 1, 2)), TraceRequest(1000, 1536, 1, (0, 5, 6)),
            TraceRequest(2000, 2048, 1, (0, 1, 5, 6))]
    result = replay(reqs, "lru", (3, 0, 0))
    assert (result.fast_hits, result.blocks) == (1 + 1, 10)
    assert result.lower_hits == 0


def test_prefix_lookup_reports_tiers_and_fast_prefix(tmp_path: Path) -> None:
    pager = make_pager(tmp_path, fast=2, ram=2, nvme=8)
    pager.open_session("g1", "s1")
    blocks = chain(5)
    pager.store("g1", "s1", blocks, [page(b) for b in blocks])
    look = pager.lookup("g1", "s1", blocks + [99])
    assert look.tiers == (0, 0, 1, 1, 2)
    assert look.cached == 5 and look.blocks == 6 and look.fast == 2
    pager.load("g1", "s1", blocks)
    g = pager.stats().guests["g1"]  # what `neuraos kv` shows per guest
    assert (g.blocks, g.fast_hits, g.lower_hits) == (5, 2, 3) and g.fast_hit_rate == 0.4
    # the load used every block, deepest first: the front of the prefix ends in fast memory again
    assert pager.lookup("g1", "s1", blocks).tiers == (0, 0, 1, 1, 2)


# ---------------------------------------------------------------- policies on hand-made sequences


def run_policy(policy, capacity: int, keys: list[str]) -> list[bool]:
    placement = Placement([capacity], [policy])
    hits = []
    for t, k in enumerate(keys):
        hits.append(placement.level(k) == 0)
        placement.access(k, Access(now=float(t)))
    return hits


def resident(policy) -> set:
    return {k for k in "abcdefghijklmnopqrstuvwxyz" if k in policy}


def test_lru_evicts_least_recent() -> None:
    lru = LRUPolicy()
    hits = run_policy(lru, 2, list("abacab"))
    assert hits == [False, False, True, False, True, False]
    assert resident(lru) == {"a", "b"}


def test_lfu_evicts_least_frequent_then_least_recent() -> None:
    lfu = LFUPolicy()
    hits = run_policy(lfu, 2, list("aabcbd"))
    # c evicts b (freq 1 < a's 2); b evicts c; d evicts b again: a, used twice, stays throughout
    assert hits == [False, True, False, False, False, False]
    assert resident(lfu) == {"a", "d"}


def test_arc_keeps_its_frequent_pages_through_a_scan_and_adapts() -> None:
    arc = ARCPolicy(4)
    placement = Placement([4], [arc])
    for t, k in enumerate("abab" + "cdefghij"):
        placement.access(k, Access(now=float(t)))
    assert set(arc.t2) == {"a", "b"}  # LRU would have lost them to the one-off scan
    assert set(arc.t1) == {"i", "j"} and set(arc.b1) == {"g", "h"} and arc.p == 0
    placement.access("h", Access(now=20.0))  # a hit in ghost list B1: recency deserves more room
    assert arc.p == 1 and "h" in arc.t2 and "i" in arc.b1


def test_belady_evicts_the_page_used_furthest_ahead() -> None:
    keys = list("abcadbca")
    future: dict[int, float] = {}
    nxt = [0.0] * len(keys)
    for i in range(len(keys) - 1, -1, -1):
        nxt[i] = future.get(keys[i], float("inf"))
        future[keys[i]] = i
    belady = BeladyPolicy()
    placement = Placement([2], [belady])
    hits = 0
    for t, k in enumerate(keys):
        hits += placement.level(k) == 0
        placement.access(k, Access(now=float(t), next_use=nxt[t]))
    assert hits == 3  # a at 3, b at 5 (c bypassed at 2), a at 7
    lru_hits = sum(run_policy(LRUPolicy(), 2, keys))
    assert lru_hits < hits


def random_chains(seed: int, n: int = 300) -> list[TraceRequest]:
    """Conversations that grow turn by turn from a shared first block, with one-off requests mixed in."""
    rng = random.Random(seed)
    convs: list[list[int]] = []
    next_id = 1
    reqs = []
    for i in range(n):
        if convs and rng.random() < 0.6:
            conv = rng.choice(convs)
        else:
            conv = [0]
            convs.append(conv)
        for _ in range(rng.randint(1, 4)):
            conv.append(next_id)
            next_id += 1
        reqs.append(TraceRequest(i * 7000, 512 * len(conv) - rng.randint(0, 300), 10, tuple(conv)))
    return reqs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_online_policy_beats_belady(seed: int) -> None:
    reqs = random_chains(seed)
    for caps in ((30, 0, 0), (60, 60, 120)):
        limit = replay(reqs, "belady", caps).fast_hits
        for system in ("neuraos", "lru", "lfu", "arc"):
            assert replay(reqs, system, caps).fast_hits <= limit, (system, caps)


def test_only_belady_is_shown_the_future() -> None:
    seen: list[float | None] = []

    class Spy(LRUPolicy):
        def insert(self, key, access):  # type: ignore[no-untyped-def]
            seen.append(access.next_use)
            super().insert(key, access)

    import hypervisor.kvpager.simulate as simulate

    original = simulate.make_policies
    simulate.make_policies = lambda system, caps: ([Spy() for _ in caps], [])  # type: ignore[assignment]
    try:
        replay(random_chains(0, 40), "spy", (10, 0, 0))
    finally:
        simulate.make_policies = original
    assert seen and all(v is None for v in seen)


# ---------------------------------------------------------------- the relevance policy


def test_reuse_model_learns_which_class_comes_back() -> None:
    model = ReuseModel(refresh_s=0.0)
    t = 0.0
    for i in range(1000):  # small requests come back after 20 s; large ones never do
        model.observe(("small", i % 20), Access(now=t, request_blocks=2))
        model.observe(("large", i), Access(now=t, request_blocks=100))
        t += 1.0
    small = model.class_of(("small", 0))
    large = model.class_of(("large", 0))
    assert small is not None and large is not None and small != large
    assert model.p_reuse(small, 5.0, 60.0) > 0.9
    assert model.p_reuse(large, 5.0, 60.0) < 0.2  # not 0: shrunk towards the pooled rate
    assert model.p_reuse(small, 100.0, 60.0) <= model.p_reuse(small, 0.0, 60.0)  # never rises with age


def test_relevance_beats_lru_when_one_off_scans_flush_a_reused_set() -> None:
    # 8 conversations come back every ~40 s; between them, large one-off documents stream past
    reqs = []
    t = 0
    scan_id = 10_000
    for turn in range(120):
        conv = turn % 8
        reqs.append(TraceRequest(t, 512 * 6, 10, tuple([0] + [conv * 100 + j for j in range(1, 6)])))
        t += 5000
        reqs.append(TraceRequest(t, 512 * 40, 10, tuple([0] + list(range(scan_id, scan_id + 39)))))
        scan_id += 39
        t += 5000
    caps = (120, 0, 0)
    assert replay(reqs, "neuraos", caps).hit_rate > 1.5 * replay(reqs, "lru", caps).hit_rate


def test_forecast_hint_and_priority_protect_a_session() -> None:
    model, hints = ReuseModel(), SessionHints()
    policy = RelevancePolicy(model, hints)
    soon, idle = SessionKey("g", "soon"), SessionKey("g", "idle")
    for i, s in enumerate([soon, idle]):
        acc = Access(now=0.0, session=s)
        model.observe(i, acc)
        policy.insert(i, acc)
    hints.set(soon, next_use_at=50.0)
    assert policy.pop_victim(access=Access(now=10.0)) == 1  # the idle session goes first
    policy.insert(1, Access(now=10.0, session=idle))
    hints.set(soon, priority=0.0)  # a paused guest's session is worth nothing
    assert policy.pop_victim(access=Access(now=10.0)) == 0


# ---------------------------------------------------------------- prefetch


def test_prefetch_runs_on_the_worker_not_on_the_request_path(tmp_path: Path) -> None:
    read_threads: list[str] = []
    delay = 0.3

    class SlowDisk(NvmeTier):
        def _load(self, key: PageKey) -> bytes | None:
            read_threads.append(threading.current_thread().name)
            time.sleep(delay)
            return super()._load(key)

    clock = Clock()
    with make_pager(tmp_path, fast=4, ram=0, nvme=16, nvme_tier=SlowDisk, clock=clock) as pager:
        pager.open_session("g1", "agent")
        pager.open_session("g1", "other")
        mine = chain(2, base=500)
        pager.store("g1", "agent", mine, [page(b) for b in mine])
        clock.t += 60
        for turn in range(2):  # another session pushes the agent's pages out to NVMe
            other = chain(2, base=10 * turn)
            pager.store("g1", "other", other, [page(b) for b in other])
        assert pager.lookup("g1", "agent", mine).tiers == (2, 2)

        start = time.monotonic()
        pager.hint("g1", "agent", next_use_in_s=5.0)  # the scheduler: this agent speaks in 5 s
        assert time.monotonic() - start < delay / 3
        time.sleep(0.05)  # the worker is now inside the slow read
        start = time.monotonic()
        assert pager.lookup("g1", "other", chain(2, base=10)).fast == 2
        assert time.monotonic() - start < delay / 3  # a request is not held up by the tier move
        pager.drain()
        assert pager.lookup("g1", "agent", mine).tiers == (0, 0)
        assert read_threads and set(read_threads) == {"kvpager-prefetch"}
        assert pager.stats().prefetched_pages == 2
        assert pager.load("g1", "agent", mine) == [page(b) for b in mine]
    assert pager._worker is None  # the context manager stopped its thread
