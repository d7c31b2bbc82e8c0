"""KV paging on a GPU (issue 4, part c): resume a session from GPU, host RAM or NVMe vs re-prefill.

16 agent sessions with long histories sharing a prefix, 4 of them resident on the GPU (the fast
slots); the others were paged out through the pager's own tiers: `MemoryTier` (host RAM) and
`NvmeTier` (checksummed page files, dropped from the page cache before each read). For each
session a new 64-token turn arrives; time-to-first-token is measured for each way of getting
its history's KV onto the GPU, against prefilling the whole history again, in the same run.
`neuraos-nvme-cost-aware`: a session parked on NVMe comes back by restore or by re-prefill, as
`RestoreCost` decides beforehand from the restores and prefills timed so far in the run (its
row is the time of the way it chose; the first sessions restore, unmeasured).

The model is the architecture of SmolLM2-135M (or a Llama-3-8B-shaped one) with *random*
weights: the real weights cannot travel to the lent GPU machine (no network there, a 64 MiB
limit on what is sent). Timings depend on shapes, not on weight values; and every restored
cache is checked against the re-prefill: the next-token logits must agree.
vLLM is not installable on that machine either, so this measures the transformers path.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.contract import DATASETS, Result, parser, seed_everything  # noqa: E402
from hypervisor.inference.torch_kv import KVLayout, from_pages, to_pages  # noqa: E402
from hypervisor.kvpager.cost import RestoreCost  # noqa: E402
from hypervisor.kvpager.pages import PageKey  # noqa: E402
from hypervisor.kvpager.tiers import MemoryTier, NvmeTier  # noqa: E402

ARCHS = {
    # SmolLM2-135M-Instruct's shape (the model the CPU path serves through llama.cpp).
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True),
    # Llama-3-8B's shape: where paging matters, KV is 128 KiB per token.
    "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                     max_position_embeddings=8192, rope_theta=500000.0),
    # For tests on a CPU: the same code path in a second.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=2048),
}


def build(arch: str, device: str, dtype: torch.dtype, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**ARCHS[arch])
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval(), KVLayout.of(cfg, dtype)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run(arch: str, device: str, sessions: int, slots: int, history: int, shared: int, turn: int,
        rounds: int, seed: int, nvme_dir: Path) -> dict:
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model, layout = build(arch, device, dtype, seed)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    prefix = torch.randint(0, vocab, (shared,), generator=gen)
    hist = [torch.cat([prefix, torch.randint(0, vocab, (history - shared,), generator=gen)]) for _ in range(sessions)]
    per_session = layout.bytes_per_token * history
    ram = MemoryTier("ram", per_session * sessions * 2)
    nvme = NvmeTier("nvme", per_session * sessions * 2, nvme_dir)
    slot_cache: dict[int, object] = {}
    pages: dict[int, int] = {}
    t_page_out = []
    with torch.inference_mode():
        for s in range(sessions):
            out = model(input_ids=hist[s].unsqueeze(0).to(device), use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            if s < slots:
                slot_cache[s] = cache
            _sync(device)
            t0 = time.perf_counter()
            ps = to_pages(cache, layout)
            for b, data in enumerate(ps):
                key = PageKey(f"guest-{s % 4}", (s << 20) | b)
                ram.put(key, data)
                nvme.put(key, data)
            t_page_out.append((time.perf_counter() - t0) * 1000)
            pages[s] = len(ps)
            if s >= slots:
                del cache, out

        def keys(s: int) -> list[PageKey]:
            return [PageKey(f"guest-{s % 4}", (s << 20) | b) for b in range(pages[s])]

        def first_token(ids: torch.Tensor, cache) -> torch.Tensor:
            out = model(input_ids=ids.unsqueeze(0).to(device), past_key_values=cache, use_cache=True, logits_to_keep=1)
            return out.logits[0, -1].float()

        times: dict[str, list[float]] = {"gpu-slot": [], "ram": [], "nvme": [], "re-prefill": [], "nvme-cost": []}
        # The cost-aware row: a session parked on NVMe comes back by restore or by re-prefill, as a
        # RestoreCost fed only with the operations timed so far in this run decides beforehand.
        cost = RestoreCost()
        worst_diff, prefill_diff, argmax_agree, checks = 0.0, 0.0, 0, 0
        for r in range(rounds):
            for s in range(sessions):
                ids = torch.randint(0, vocab, (turn,), generator=gen)
                choice = cost.choose("nvme", per_session, history) if s not in slot_cache else None
                _sync(device)
                t0 = time.perf_counter()
                prefill = first_token(torch.cat([hist[s], ids]), None)
                _sync(device)
                times["re-prefill"].append((time.perf_counter() - t0) * 1000)
                cost.observe_prefill(history + turn, time.perf_counter() - t0)
                # What the session would answer had its KV never left the device: the same
                # history prefill, then the turn on top (one-pass prefill differs in the last
                # bits under bf16, so it is not the reference for a restore).
                ref = first_token(ids, model(input_ids=hist[s].unsqueeze(0).to(device), use_cache=True,
                                             logits_to_keep=1).past_key_values)
                prefill_diff = max(prefill_diff, (prefill - ref).abs().max().item() / (ref.abs().max().item() or 1.0))
                if s in slot_cache:
                    c = slot_cache[s]
                    t0 = time.perf_counter()
                    got = first_token(ids, c)
                    _sync(device)
                    times["gpu-slot"].append((time.perf_counter() - t0) * 1000)
                    c.crop(-turn)  # drop the turn: negative works across transformers versions
                    continue
                for tier, name in ((ram, "ram"), (nvme, "nvme")):
                    if tier is nvme:
                        for k in keys(s):
                            _drop_cache(nvme.path(k))
                    _sync(device)
                    t0 = time.perf_counter()
                    data = [tier.get(k) for k in keys(s)]
                    c = from_pages(data, layout, device)
                    _sync(device)
                    loaded = time.perf_counter()
                    got = first_token(ids, c)
                    _sync(device)
                    times[name].append((time.perf_counter() - t0) * 1000)
                    if tier is nvme:
                        cost.observe_restore("nvme", per_session, loaded - t0, history)
                    scale = ref.abs().max().item() or 1.0
                    worst_diff = max(worst_diff, (got - ref).abs().max().item() / scale)
                    argmax_agree += int(got.argmax() == ref.argmax())
                    checks += 1
                    del c
                assert choice is not None
                times["nvme-cost"].append(times["nvme" if choice.restore else "re-prefill"][-1])

        # A corrupted page on disk is caught by its checksum, never served.
        victim = nvme.path(keys(sessions - 1)[0])
        raw = bytearray(victim.read_bytes())
        raw[-1] ^= 0xFF
        victim.write_bytes(bytes(raw))
        corrupt_detected = nvme.get(keys(sessions - 1)[0]) is None

    return {"times": times, "worst_rel_logit_diff": worst_diff, "prefill_vs_cached_rel_diff": prefill_diff, "argmax_agree": argmax_agree,
            "checks": checks, "corrupt_detected": corrupt_detected, "page_out_ms_p50": float(np.median(t_page_out)),
            "kv_mib_per_session": per_session / 2**20, "pages_per_session": pages[0],
            "restore_cost": cost.snapshot()}


def main(argv: list[str] | None = None) -> int:
    p = parser("kvpager_gpu", DATASETS, __doc__.splitlines()[0])
    p.add_argument("--arch", choices=sorted(ARCHS), default=None, help="model shape (default: smollm2-135m on CUDA, tiny on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--history", type=int, default=None, help="tokens of history per session")
    p.add_argument("--rounds", type=int, default=None)
    args = p.parse_args(argv)
    seed_everything(args.seed)
    arch = args.arch or ("smollm2-135m" if args.device.startswith("cuda") else "tiny")
    history = args.history or (1024 if args.quick or arch == "tiny" else 4096)
    rounds = args.rounds or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="kvpager-gpu-", dir=os.environ.get("NEURAOS_NVME_DIR")) as d:
        res = run(arch, args.device, args.sessions, args.slots, history, history // 2, 64, rounds, args.seed, Path(d))
    t = res["times"]
    prefill_p50 = float(np.percentile(t["re-prefill"], 50))
    rows = []
    for name, system in (("gpu-slot", "neuraos-gpu-slot"), ("ram", "neuraos-ram"), ("nvme", "neuraos-nvme"),
                         ("nvme-cost", "neuraos-nvme-cost-aware"), ("re-prefill", "re-prefill")):
        v = t[name]
        p50 = float(np.percentile(v, 50))
        rows.append({"system": system, "ttft_ms_p50": p50, "ttft_ms_p99": float(np.percentile(v, 99)),
                     "speedup_vs_prefill": prefill_p50 / p50, "n": len(v)})
    Result("kvpager_gpu",
           f"{args.sessions} sessions x {history} tokens ({history // 2} shared), {args.slots} GPU slots, "
           f"{arch} shape with random weights on {args.device}",
           args.quick, {"metric": "ttft_ms_p50", "better": "lower"}, rows,
           {"checks": {k: res[k] for k in ("worst_rel_logit_diff", "prefill_vs_cached_rel_diff", "argmax_agree", "checks", "corrupt_detected")},
            "kv_mib_per_session": res["kv_mib_per_session"], "page_out_ms_p50": res["page_out_ms_p50"],
            "restore_cost": res["restore_cost"],
            "arch": arch}).emit(args.json)
    ok = res["corrupt_detected"] and res["argmax_agree"] == res["checks"] and res["worst_rel_logit_diff"] < 1e-3
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
