"""Trace replay: the pager's own placement and policies, driven by a serving trace, with no bytes.

Each request is seen only when it arrives. Its prefix is looked up first (a block
is a fast-tier hit only along the prefix up to its first fast miss, as a prefix
cache serves it), then every block is used, deepest first, so that the request's
tail is the first of its pages to leave. Only Belady's optimal gets the future:
`Access.next_use` is filled for a policy that declares `needs_future`, for no other.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from hypervisor.kvpager.pages import BLOCK_TOKENS, Access
from hypervisor.kvpager.pager import Placement
from hypervisor.kvpager.policy import (
    AccessObserver,
    ARCPolicy,
    BeladyPolicy,
    EvictionPolicy,
    LFUPolicy,
    LRUPolicy,
    RelevancePolicy,
    ReuseModel,
)

SYSTEMS = ("neuraos", "lru", "lfu", "arc", "belady")


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One line of a Mooncake-format trace: arrival, lengths, and its prompt's prefix block hashes."""

    timestamp_ms: int
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def trace_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("*.jsonl"))


def load_trace(path: Path, limit: int | None = None) -> list[TraceRequest]:
    out: list[TraceRequest] = []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            out.append(TraceRequest(int(row["timestamp"]), int(row["input_length"]), int(row["output_length"]),
                                    tuple(int(h) for h in row["hash_ids"])))
            if limit is not None and len(out) >= limit:
                break
    out.sort(key=lambda r: r.timestamp_ms)
    return out


def distinct_blocks(requests: Iterable[TraceRequest]) -> int:
    return len({h for r in requests for h in r.hash_ids})


@dataclass(frozen=True)
class TtftModel:
    """Modelled time to first token of one request, in ms (no queueing, one request at a time).

    TTFT = base + sum of loads of the prefix blocks found in RAM or NVMe (a block in the
    fast tier costs nothing) + prefill of every prompt token from the first block no
    tier holds. Defaults: Llama-3.1-8B in bf16 on one H100 — KV is 128 KiB per token
    (32 layers x 8 KV heads x 128 dims x K,V x 2 B), so a 512-token block is 64 MiB;
    prefill ~10k tokens/s (0.1 ms/token); host RAM to GPU ~25 GB/s over PCIe 5
    (2.7 ms/block); NVMe ~6 GB/s (11.2 ms/block); base 25 ms (schedule + one decode step).
    """

    base_ms: float = 25.0
    prefill_ms_per_token: float = 0.1
    load_ms_per_block: tuple[float, ...] = (0.0, 2.7, 11.2)

    def ttft_ms(self, levels: Sequence[int], input_tokens: int) -> float:
        load = sum(self.load_ms_per_block[lv] for lv in levels)
        missed = max(0, input_tokens - BLOCK_TOKENS * len(levels))
        return self.base_ms + load + missed * self.prefill_ms_per_token


def make_policies(system: str, capacities: Sequence[int]) -> tuple[list[EvictionPolicy], list[AccessObserver]]:
    """One policy per tier for `system`; NeuraOS shares one online reuse model across its tiers."""
    if system == "neuraos":
        model = ReuseModel()
        return [RelevancePolicy(model) for _ in capacities], [model]
    if system == "lru":
        return [LRUPolicy() for _ in capacities], []
    if system == "lfu":
        return [LFUPolicy() for _ in capacities], []
    if system == "arc":
        return [ARCPolicy(c) for c in capacities], []
    if system == "belady":
        return [BeladyPolicy() for _ in capacities], []
    raise ValueError(f"unknown system {system!r}; one of {', '.join(SYSTEMS)}")


@dataclass
class ReplayResult:
    system: str
    blocks: int = 0
    fast_hits: int = 0
    lower_hits: int = 0  # prefix blocks served from RAM or NVMe instead of re-prefilled
    transfers: int = 0  # pages moved between tiers (promotions and demotions)
    ttft_ms: list[float] = field(default_factory=list)

    @property
    def hit_rate(self) -> float:
        return self.fast_hits / self.blocks if self.blocks else 0.0

    @property
    def lower_hit_rate(self) -> float:
        return self.lower_hits / self.blocks if self.blocks else 0.0

    def ttft_quantile(self, q: float) -> float:
        if not self.ttft_ms:
            return math.nan
        if len(self.ttft_ms) == 1:
            return self.ttft_ms[0]
        return statistics.quantiles(self.ttft_ms, n=100, method="inclusive")[round(q * 100) - 1]

    def merge(self, other: ReplayResult) -> ReplayResult:
        return ReplayResult(self.system, self.blocks + other.blocks, self.fast_hits + other.fast_hits,
                            self.lower_hits + other.lower_hits, self.transfers + other.transfers,
                            self.ttft_ms + other.ttft_ms)


def next_uses(requests: Sequence[TraceRequest]) -> list[list[float]]:
    """For each request and block, the index of the next request that uses the block (inf: none)."""
    upcoming: dict[int, float] = {}
    out: list[list[float]] = [[] for _ in requests]
    for i in range(len(requests) - 1, -1, -1):
        ids = requests[i].hash_ids
        out[i] = [upcoming.get(h, math.inf) for h in ids]
        for h in ids:
            upcoming[h] = float(i)
    return out


def replay(requests: Sequence[TraceRequest], system: str, capacities: Sequence[int],
           ttft: TtftModel = TtftModel()) -> ReplayResult:
    """Replay one trace through a fresh placement whose tiers hold `capacities` blocks each."""
    policies, observers = make_policies(system, capacities)
    placement = Placement(capacities, policies, observers)
    future = next_uses(requests) if any(p.needs_future for p in policies) else None
    result = ReplayResult(system)
    for i, req in enumerate(requests):
        now = req.timestamp_ms / 1000.0
        ids = req.hash_ids
        n = len(ids)
        levels: list[int] = []
        for h in ids:
            level = placement.level(h)
            if level is None:
                break
            levels.append(level)
        fast = 0
        while fast < len(levels) and levels[fast] == 0:
            fast += 1
        result.blocks += n
        result.fast_hits += fast
        result.lower_hits += len(levels) - fast
        result.ttft_ms.append(ttft.ttft_ms(levels, req.input_length))
        partial_tail = req.input_length % BLOCK_TOKENS != 0
        nexts = future[i] if future is not None else None
        for d in range(n - 1, -1, -1):
            access = Access(now, d, n, partial_tail and d == n - 1, None, nexts[d] if nexts is not None else None)
            for move in placement.access(ids[d], access):
                result.transfers += move.src is not None and move.dst is not None
    return result
