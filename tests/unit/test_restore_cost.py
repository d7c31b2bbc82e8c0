"""Restore or recompute: the cost model learns from timed operations, and the pager's tiers obey it.

The model-service side (a slow tier makes the service re-prefill and answer the same) is in
test_inference.py, with the real llama.cpp backend.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from hypervisor.kvpager import KVPager, MemoryTier, NvmeTier, PageKey, RestoreCost, SlowTier

MIB = 2**20


def test_unmeasured_restores_then_the_cheaper_way_wins() -> None:
    cost = RestoreCost()
    assert cost.choose("nvme", 10 * MIB, 400).reason == "unmeasured"  # nothing known: restore, and measure it
    cost.observe_prefill(400, 1.0)  # 400 tokens/s
    cost.observe_restore("ram", 10 * MIB, 0.05)  # 200 MiB/s
    cost.observe_restore("nvme", 10 * MIB, 4.0)  # 2.5 MiB/s
    fast, slow = cost.choose("ram", 10 * MIB, 400), cost.choose("nvme", 10 * MIB, 400)
    assert fast.restore and fast.restore_s == pytest.approx(0.05) and fast.prefill_s == pytest.approx(1.0)
    assert not slow.restore and slow.restore_s == pytest.approx(4.0)
    # the same tier is worth it for a long history whose prefill would take longer than its read
    assert cost.choose("nvme", 10 * MIB, 2000).restore


def test_rates_are_ewmas_of_amounts_and_seconds() -> None:
    cost = RestoreCost(alpha=0.5, min_prefill_tokens=16)
    cost.observe_prefill(1000, 1.0)
    cost.observe_prefill(8, 1.0)  # a tiny prefill is mostly fixed overhead: ignored
    assert cost.prefill_tok_per_s() == pytest.approx(1000)
    cost.observe_prefill(100, 1.0)  # the engine slowed down (load): amounts 550, seconds 1.0
    assert cost.prefill_tok_per_s() == pytest.approx(550)
    cost.observe_restore("nvme", 100 * MIB, 1.0)
    cost.observe_restore("nvme", 100 * MIB, 3.0)  # the disk got busy
    assert cost.restore_s("nvme", 100 * MIB) == pytest.approx(2.0)
    assert cost.snapshot()["tiers"]["nvme"] == {"mib_per_s": 50.0, "restores": 2}


def test_a_tier_judged_slow_is_still_tried_now_and_then() -> None:
    cost = RestoreCost(explore_every=4)
    cost.observe_prefill(1000, 1.0)
    cost.observe_restore("nvme", 100 * MIB, 10.0)
    picks = [cost.choose("nvme", 100 * MIB, 1000) for _ in range(8)]
    assert [p.restore for p in picks] == [False, False, False, True] * 2
    assert {p.reason for p in picks if p.restore} == {"explore"}
    for n in range(1, 20):  # the exploring restores found it fast again: the EWMA follows
        cost.observe_restore("nvme", 100 * MIB, 0.01)
        pick = cost.choose("nvme", 100 * MIB, 1000)
        if pick.restore and pick.reason == "cheaper":
            break
    assert 3 <= n <= 8  # neither at once (one fast read is not a trend) nor never
    assert cost.choose("nvme", 100 * MIB, 1000).restore


def test_worth_keeping_compares_per_token_costs_and_answers_once_per_session() -> None:
    cost = RestoreCost(explore_every=2)
    assert cost.worth_keeping("nvme")  # unmeasured
    cost.observe_prefill(1000, 1.0)  # 1 ms a token
    cost.observe_state(20 * MIB, 1000)  # 20 KiB a token
    cost.observe_restore("ram", 20 * MIB, 0.02)  # 20 us a token
    cost.observe_restore("nvme", 20 * MIB, 4.0)  # 4 ms a token: recomputing is 4x cheaper
    assert cost.worth_keeping("ram")
    answers = [cost.worth_keeping("nvme", s) for s in ("a", "a", "a", "b", "b", "c")]
    assert answers == [False, False, False, True, True, False]  # every 2nd session explores, whole


def _pages(n: int, size: int = 4096) -> list[bytes]:
    return [bytes([i]) * size for i in range(n)]


def test_pager_drops_pages_a_slow_tier_is_not_worth_keeping(tmp_path: Path) -> None:
    """RAM is full, so pages go to NVMe; once NVMe is measured slower than a re-prefill, it declines them."""
    cost = RestoreCost(explore_every=1000)
    pager = KVPager.relevance([MemoryTier("ram", 0), NvmeTier("nvme", 1 << 20, tmp_path)], cost=cost)
    pager.open_session("g", "kept")
    pager.store("g", "kept", [1, 2, 3], _pages(3))
    assert pager.lookup("g", "kept", [1, 2, 3]).tiers == (1, 1, 1)
    cost.observe_prefill(1000, 1.0)
    cost.observe_state(4096, 512)  # 8 B a token
    cost.observe_restore("nvme", 4096, 1.0)  # 2 ms a token vs 1 ms to prefill
    pager.open_session("g", "dropped")
    pager.store("g", "dropped", [11, 12, 13], _pages(3))
    assert pager.lookup("g", "dropped", [11, 12, 13]).tiers == ()
    assert pager.stats().dropped_pages == 3
    assert pager.stats().tiers[1].pages == 3  # pages kept before the measurement stay readable
    assert pager.load("g", "kept", [1, 2, 3]) == _pages(3)


def test_slow_tier_reads_at_its_capped_bandwidth_and_still_checks_pages(tmp_path: Path) -> None:
    tier = SlowTier("slow", 8 << 20, tmp_path, read_mib_per_s=8.0)
    key = PageKey("g", 7)
    tier.put(key, b"x" * MIB)
    t0 = time.perf_counter()
    assert tier.get(key) == b"x" * MIB
    assert time.perf_counter() - t0 >= 0.12  # 1 MiB at 8 MiB/s
    path = tier.path(key)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert tier.get(key) is None
