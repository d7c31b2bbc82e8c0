"""Live KV paging benchmark (part b of benchmarks/kvpager.py): real llama.cpp sessions.

16 agent sessions of one guest share a long system document and each has its own history; 4
live slots hold KV state. The same seeded stream of turns is replayed through the real model
service four ways, so the only difference is what happens to a session displaced from a slot:

* `neuraos-ram`  its KV state is parked in host RAM and restored when it speaks again;
* `neuraos-nvme` parked as a checksummed file instead;
* `prefix-reuse` nothing is kept, but a slot's sibling prefix (the shared document) is reused,
  as a plain prefix cache would;
* `re-prefill`   nothing is kept: the whole history is prefilled again;
* `neuraos-slow-tier` parked on a tier that reads back slower than this engine prefills (an
  emulated device, `SlowTier`, capped at half the bandwidth at which a restore would
  break even with the prefill speed measured at the start of the run); the service measures
  its restores and prefills (`RestoreCost`) and chooses per turn: restore or re-prefill;
* `slow-tier-restore` the same tier, always restored (no cost model): what the choice saves;
* `unbounded-slots` (the limit) one live slot per session, so nobody is ever displaced.

The NeuraOS rows all run with the cost model, learning from their own operations only; each
row reports what it learned (`restore_cost`) and how many turns re-prefilled by choice
(`recomputes`). Every agent's first turn (its history) is computed once and handed to each system as it
would stand after that turn: parked in the store for the NeuraOS rows (and for the limit,
whose first touch of each session is a restore), absent for the others.

Time to first token is the service's own measure (request in to first token out, slot swap
and restore included). Answers are greedy. A restored session holds exactly the KV it had
when it left its slot, so it must answer as if it had never left: `same_as_unbounded_frac`
(the correctness check: 1.0). Recomputing a history in one batch instead of turn by turn
rounds differently, so a long re-prefilled history can flip a near-tie: `same_answer_frac`
compares with re-prefill and is reported, not required to be 1. Parked states go through the KV pager
(hypervisor/kvpager, relevance policy) where it is present, else the service's ParkingStore;
with the pager, the agents' shared document is stored once (`kv_stored_mib` vs `parked_mib`).
"""

from __future__ import annotations

import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from hypervisor.inference.backends import (
    GenParams, KVState, LlamaCppBackend, LlamaCppConfig, Message, llama_cpp_missing,
)
from hypervisor.inference.parking import ParkingStore, StateStore
from hypervisor.inference.quotas import GuestQuota
from hypervisor.inference.service import CompleteArgs, ModelService, ServiceConfig, Usage
from hypervisor.kvpager.cost import RestoreCost

GUEST = "agents"
SYSTEMS = ("neuraos-ram", "neuraos-nvme", "prefix-reuse", "re-prefill", "neuraos-slow-tier", "slow-tier-restore",
           "unbounded-slots")
SLOW_TIER_X = 2.0  # the emulated slow tier reads back this many times slower than a prefill

_WORDS = ("kernel scheduler memory balloon vcpu latency guest agent vector index journal cache page tier "
          "policy forecast quota session token prefill restore checksum sandbox syscall profile baseline "
          "network storage snapshot migrate throughput request budget replica shard queue worker commit "
          "alert operator metric trace window horizon quantile demand capacity headroom eviction prefetch").split()


@dataclass(frozen=True)
class LiveConfig:
    sessions: int = 16
    slots: int = 4
    shared_words: int = 700  # the document every agent's system prompt carries
    own_words: int = 120  # each agent's own background
    requests: int = 48
    max_tokens: int = 8
    n_ctx: int = 2048
    threads: int = 2
    speed_gen_tokens: int = 64


def live_config(quick: bool) -> LiveConfig:
    if quick:
        return LiveConfig(shared_words=200, own_words=40, requests=12, max_tokens=4, n_ctx=1024,
                          speed_gen_tokens=32)
    return LiveConfig()


def _text(rng: random.Random, words: int) -> str:
    out = []
    while len(out) < words:
        n = rng.randint(6, 14)
        sentence = [rng.choice(_WORDS) for _ in range(n)]
        out.append(sentence[0].capitalize())
        out.extend(sentence[1:-1])
        out.append(sentence[-1] + ".")
    return " ".join(out[:words])


def _schedule(rng: random.Random, cfg: LiveConfig) -> list[int]:
    """Which session speaks at each step: skewed (a few agents are chatty), never twice in a row."""
    weights = [1 / (i + 1) ** 0.6 for i in range(cfg.sessions)]
    order: list[int] = []
    while len(order) < cfg.requests:
        pick = rng.choices(range(cfg.sessions), weights)[0]
        if not order or pick != order[-1]:
            order.append(pick)
    return order


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _ask(service: ModelService, args: CompleteArgs) -> tuple[str, Usage]:
    text, usage = [], None
    for chunk in service.complete(GUEST, args):
        text.append(chunk.text)
        usage = chunk.usage or usage
    assert usage is not None
    return "".join(text), usage


def engine_speed(backend: LlamaCppBackend, rng: random.Random, gen_tokens: int = 64) -> dict:
    """Prompt (prefill) and generation tokens/s of the backend on this machine, slot 0."""
    prompt = backend.render([Message("user", _text(rng, 250))])
    backend.clear(0)
    t0 = time.perf_counter()
    pieces = backend.stream(prompt, GenParams(max_tokens=1), 0)
    first = next(pieces)
    t_first = time.perf_counter() - t0
    last = [p for p in pieces if p.done][-1] if not first.done else first
    backend.clear(0)
    gen = backend.stream(backend.render([Message("user", "Write a long story about a robot.")]),
                         GenParams(max_tokens=gen_tokens), 0)
    t1 = time.perf_counter()
    next(gen)
    t2 = time.perf_counter()
    done = [p for p in gen if p.done][-1]
    t3 = time.perf_counter()
    backend.clear(0)
    return {"prompt_tokens": last.prompt_tokens, "prompt_tok_per_s": round(last.prompt_tokens / t_first, 1),
            "gen_tokens": done.completion_tokens,
            "gen_tok_per_s": round((done.completion_tokens - 1) / max(t3 - t2, 1e-9), 1),
            "gen_first_token_ms": round((t2 - t1) * 1000, 1)}


def _store(system: str, root: Path, cost: RestoreCost | None, slow_mib_per_s: float):
    """The KV pager with RAM, NVMe or the slow tier as its only usable tier."""
    from hypervisor.inference.pager_store import PagerStore
    from hypervisor.kvpager.pager import KVPager
    from hypervisor.kvpager.tiers import MemoryTier, NvmeTier, SlowTier

    ram = 4 << 30 if system == "neuraos-ram" else 0
    lower = (SlowTier("nvme", 16 << 30, root / system, slow_mib_per_s) if "slow-tier" in system
             else NvmeTier("nvme", 16 << 30, root / system))
    pager = KVPager.relevance([MemoryTier("ram", ram), lower], cost=cost)
    return PagerStore(pager, ["ram", "nvme"])


def _service(backend: LlamaCppBackend, cfg: LiveConfig, store: StateStore | None,
             cost: RestoreCost | None = None) -> ModelService:
    quota = GuestQuota(tokens_per_s=1e9, burst_tokens=1e12, max_sessions=cfg.sessions + 1, max_inflight=4)
    service = ModelService(backend, None, ServiceConfig(quota=quota, max_tokens_limit=64,
                                                        max_prompt_chars=200_000), store=store, cost=cost)
    for slot in range(cfg.slots):
        backend.clear(slot)
    return service


@dataclass(frozen=True)
class _History:
    """One agent after its first turn: the conversation and the KV state that encodes it."""

    messages: tuple[Message, ...]
    tokens: int
    state: KVState


def _first_turns(backend: LlamaCppBackend, cfg: LiveConfig, shared: str, own: list[str]) -> list[_History]:
    store = ParkingStore(ram_bytes=16 << 30)
    service = _service(backend, cfg, store)
    for i in range(cfg.sessions):  # siblings reuse the shared document's prefix left in a slot
        _ask(service, CompleteArgs(prompt=own[i], system=shared, session=f"agent-{i}", max_tokens=cfg.max_tokens))
    out = []
    for session in sorted(service.sessions.of(GUEST), key=lambda s: int(s.key[1].split("-")[1])):
        state = backend.save(session.slot) if session.slot is not None else store.get(session.key)[0]
        assert state is not None
        out.append(_History(tuple(session.messages), session.tokens, state))
    return out


def _run_system(system: str, backend: LlamaCppBackend, cfg: LiveConfig, histories: list[_History],
                questions: list[str], order: list[int], nvme_root: Path, slow_mib_per_s: float) -> dict:
    store: StateStore | None = None
    cost = RestoreCost() if system.startswith("neuraos") else None
    if system.startswith("neuraos") or system == "slow-tier-restore":
        store = _store(system, nvme_root, cost, slow_mib_per_s)
    elif system == "unbounded-slots":
        store = ParkingStore(ram_bytes=16 << 30)
    service = _service(backend, cfg, store, cost)
    assert service.pool is not None
    seeded = 0
    for i, h in enumerate(histories):
        session = service.sessions.open(GUEST, f"agent-{i}", resume=False, raw=False, max_sessions=cfg.sessions)
        session.messages, session.turns, session.tokens = list(h.messages), 1, h.tokens
        service.sessions.done(session)
        if store is not None:
            store.put(session.key, h.state)
            seeded += h.state.nbytes
    service.pool.reuse_guest_prefix = system != "re-prefill"
    ttft, miss_ttft, answers, sources, prefilled = [], [], [], [], []
    t0 = time.perf_counter()
    for step, i in enumerate(order):
        answer, usage = _ask(service, CompleteArgs(prompt=questions[step], session=f"agent-{i}",
                                                   max_tokens=cfg.max_tokens))
        ttft.append(usage.ttft_ms)
        if usage.kv_source != "slot":
            miss_ttft.append(usage.ttft_ms)
        answers.append(answer)
        sources.append(usage.kv_source)
        prefilled.append(usage.prompt_tokens - usage.cached_tokens)
    wall = time.perf_counter() - t0
    return {
        "system": system,
        "ttft_ms_p50": round(_pct(ttft, 0.5), 1),
        "ttft_ms_p99": round(_pct(ttft, 0.99), 1),
        "miss_ttft_ms_p50": round(_pct(miss_ttft, 0.5), 1),
        "prefilled_tokens_mean": round(statistics.fmean(prefilled), 1),
        "restores": sum(s in ("ram", "nvme") for s in sources),
        "slot_hits": sources.count("slot"),
        "re_prefills": sources.count("prefill"),
        "recomputes": sources.count("recompute"),  # parked, but re-prefilled by the cost model's choice
        "wall_s": round(wall, 2),
        "parked_mib": round((seeded + service.pool.parked_bytes) / 2**20, 1),  # every state parked, in full
        "kv_store": type(store).__name__ if store is not None else None,
        "kv_stored_mib": round(sum(t["used_bytes"] for t in store.usage().values()) / 2**20, 1) if store else 0.0,
        **({"restore_cost": cost.snapshot()} if cost is not None else {}),
        "_answers": answers,
    }


def run_live(quick: bool, seed: int) -> dict:
    """Measure TTFT with paging vs re-prefill; returns {"rows", "engine", "config", "primary", ...}.

    Raises `BackendUnavailable` (a NeuraError) where llama-cpp-python or the model is missing.
    """
    from hypervisor.inference.errors import BackendUnavailable

    missing = llama_cpp_missing()
    if missing:
        raise BackendUnavailable(f"live KV benchmark: {missing}")
    cfg = live_config(quick)
    rng = random.Random(seed)
    shared = "You are one of several agents sharing this operations log:\n" + _text(rng, cfg.shared_words)
    own = [f"Agent {i}. Your own notes: {_text(rng, cfg.own_words)} Reply briefly." for i in range(cfg.sessions)]
    order = _schedule(rng, cfg)
    questions = [f"Step {k}: which component in the log matters most for {rng.choice(_WORDS)}?"
                 for k in range(len(order))]
    backend = LlamaCppBackend(LlamaCppConfig(slots=cfg.slots, n_ctx=cfg.n_ctx, n_threads=cfg.threads))
    try:
        engine = engine_speed(backend, random.Random(seed), cfg.speed_gen_tokens)
        histories = _first_turns(backend, cfg, shared, own)
        kv_per_token = statistics.fmean(h.state.nbytes / len(h.state.tokens) for h in histories)
        slow_mib_per_s = kv_per_token * engine["prompt_tok_per_s"] / SLOW_TIER_X / 2**20
        with tempfile.TemporaryDirectory(prefix="neuraos-kv-", dir="/var/tmp") as tmp:
            rows = [_run_system(s, backend, cfg, histories, questions, order, Path(tmp), slow_mib_per_s)
                    for s in SYSTEMS[:-1]]
            backend.close()  # the limit: as many live contexts as sessions
            unbounded = replace(cfg, slots=cfg.sessions)
            backend = LlamaCppBackend(LlamaCppConfig(slots=unbounded.slots, n_ctx=cfg.n_ctx, n_threads=cfg.threads))
            rows.append(_run_system(SYSTEMS[-1], backend, unbounded, histories, questions, order, Path(tmp),
                                    slow_mib_per_s))
    finally:
        backend.close()
    answers = {r["system"]: r.pop("_answers") for r in rows}
    reference, limit = answers["re-prefill"], answers["unbounded-slots"]
    base = next(r for r in rows if r["system"] == "re-prefill")["ttft_ms_p50"]
    for row in rows:
        mine = answers[row["system"]]
        row["same_as_unbounded_frac"] = round(sum(a == b for a, b in zip(mine, limit)) / len(limit), 3)
        row["same_answer_frac"] = round(sum(a == b for a, b in zip(mine, reference)) / len(reference), 3)
        row["speedup_p50_vs_reprefill"] = round(base / row["ttft_ms_p50"], 2) if row["ttft_ms_p50"] else None
    return {
        "data": f"live llama.cpp {backend.model}: {cfg.sessions} sessions, {cfg.slots} slots, "
                f"{cfg.requests} turns (seed {seed})",
        "config": asdict(cfg),
        "engine": engine,
        "slow_tier": {"read_mib_per_s": round(slow_mib_per_s, 2), "kv_bytes_per_token": round(kv_per_token),
                      "doc": f"emulated device (SlowTier): reads back {SLOW_TIER_X:g}x slower than the engine "
                             f"prefilled at the start of this run"},
        "rows": rows,
        "primary": {"metric": "ttft_ms_p50", "better": "lower",
                    "goal": "neuraos-ram and neuraos-nvme at least 3x lower than re-prefill"},
    }
