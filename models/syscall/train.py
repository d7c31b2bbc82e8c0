"""Train the syscall LSTM on normal traces only, then save it (.pt) and export it (.npz).

Training reads each fitted trace from its start, in chunks of `chunk` calls, carrying the
LSTM state from one chunk of a trace to the next (truncated backprop through time): the
model learns exactly what the guest runs, a state carried over the whole process. Each of
`batch` lanes holds one trace at a time and starts the next one from a zero state.
Held-out normal calibration traces pick the best epoch; attacks are never read here.

    python -m models.syscall.train [--data DIR] [--seed N] [--minutes M]
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from models.syscall.data import DEFAULT_DATA, Split, SplitConfig, load, split
from models.syscall.export import export
from models.syscall.model import PAD, UNK, N_SPECIAL, WEIGHTS_NPZ, WEIGHTS_PT, Checkpoint, ModelConfig, SyscallLM, Vocab


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 16
    minutes: float = 11.0  # wall-clock safety stop (checked after each epoch); the best epoch is kept
    batch: int = 64
    chunk: int = 64
    lr: float = 3e-3
    seed: int = 0
    threads: int = 1  # on a shared 2-core machine, 2 threads ran 5x slower (spinning)


def lanes(traces: Sequence[np.ndarray], batch: int, chunk: int, order: Sequence[int]
          ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(tokens (B, chunk+1), fresh (B,)): `fresh` marks lanes that start a new trace, whose
    state must be zeroed. Traces are taken in `order`; a finished lane idles on PAD."""
    queue = list(order)[::-1]
    cur: list[int | None] = [None] * batch
    pos = [0] * batch
    while True:
        x = np.full((batch, chunk + 1), PAD, np.int64)
        fresh = np.zeros(batch, bool)
        for b in range(batch):
            if cur[b] is None or pos[b] >= len(traces[cur[b]]) - 1:  # type: ignore[index]
                cur[b] = queue.pop() if queue else None
                pos[b], fresh[b] = 0, True
            if cur[b] is not None:
                seg = traces[cur[b]][pos[b]:pos[b] + chunk + 1]  # type: ignore[index]
                x[b, :len(seg)] = seg
                pos[b] += chunk
        if all(c is None for c in cur):
            return
        yield torch.from_numpy(x), torch.from_numpy(fresh)


def count_steps(lengths: Sequence[int], batch: int, chunk: int, order: Sequence[int]) -> int:
    """How many batches `lanes` yields for this order (for the learning-rate schedule)."""
    left = [0] * batch  # chunks still to come in each lane's current trace
    queue, steps = list(order)[::-1], 0
    while True:
        for b in range(batch):
            if left[b] == 0 and queue:
                left[b] = -(-(lengths[queue.pop()] - 1) // chunk)
        if not any(left):
            return steps
        left = [max(n - 1, 0) for n in left]
        steps += 1


def mean_nll(model: SyscallLM, traces: Sequence[Sequence[int]]) -> float:
    s = model.surprise(traces)
    return float(np.concatenate(s).mean())


def train(sp: Split, model_cfg: ModelConfig = ModelConfig(), cfg: TrainConfig = TrainConfig(),
          show: bool = True) -> Checkpoint:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    fit = [t.syscalls for t in sp.fit]
    vocab = Vocab.fit(fit)
    model = SyscallLM(vocab, model_cfg)
    encoded = [vocab.encode(t) for t in fit]
    orders = [rng.permutation(len(encoded)) for _ in range(cfg.epochs)]
    steps = [count_steps([len(e) for e in encoded], cfg.batch, cfg.chunk, o) for o in orders]
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=sum(steps), pct_start=0.05)
    calib = [t.syscalls for t in sp.calib]
    H = model_cfg.hidden
    log: list[dict[str, float]] = []
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    t0 = time.monotonic()
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                        TimeElapsedColumn(), disable=not show)
    with progress:
        task = progress.add_task("train syscall LSTM", total=sum(steps))
        for epoch in range(cfg.epochs):
            model.train()
            h = c = torch.zeros(model_cfg.layers, cfg.batch, H)
            total = count = 0.0
            for x, fresh in lanes(encoded, cfg.batch, cfg.chunk, orders[epoch]):
                keep = (~fresh).float()[None, :, None]
                h, c = h.detach() * keep, c.detach() * keep
                inp, tgt = x[:, :-1].clone(), x[:, 1:].clone()
                if model_cfg.unk_rate > 0:  # teach a bounded surprise for never-seen calls
                    inp[(torch.rand(inp.shape) < model_cfg.unk_rate) & (inp >= N_SPECIAL)] = UNK
                    tgt[(torch.rand(tgt.shape) < model_cfg.unk_rate) & (tgt >= N_SPECIAL)] = UNK
                logits, (h, c) = model(inp, (h, c))
                mask = tgt != PAD
                loss = nn.functional.cross_entropy(logits[mask], tgt[mask])
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                sched.step()
                total += loss.item() * int(mask.sum())
                count += int(mask.sum())
                progress.advance(task)
            calib_nll = mean_nll(model, calib)
            log.append({"epoch": epoch + 1, "train_nll": total / count, "calib_nll": calib_nll,
                        "elapsed_s": round(time.monotonic() - t0, 1)})
            progress.console.print(f"epoch {epoch + 1}: train nll {total / count:.4f}  calib nll {calib_nll:.4f}")
            if best is None or calib_nll < best[0]:
                best = (calib_nll, {k: v.detach().clone() for k, v in model.state_dict().items()})
            if time.monotonic() - t0 > cfg.minutes * 60:
                progress.console.print(f"time budget of {cfg.minutes} min reached after epoch {epoch + 1}")
                break
    assert best is not None
    meta = {"split": asdict(sp.config), "fit_digest": sp.fit_digest(), "fit_traces": len(sp.fit),
            "fit_syscalls": int(sum(len(t) for t in fit)), "train": asdict(cfg), "log": log,
            "best_calib_nll": best[0], "train_s": round(time.monotonic() - t0, 1),
            "torch": str(torch.__version__), "machine": platform.processor() or platform.machine()}
    return Checkpoint(model_cfg, vocab, best[1], meta)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--seed", type=int, default=0, help="split and training seed")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--minutes", type=float, default=TrainConfig.minutes)
    p.add_argument("--hidden", type=int, default=ModelConfig.hidden)
    p.add_argument("--embed", type=int, default=ModelConfig.embed)
    p.add_argument("--layers", type=int, default=ModelConfig.layers)
    p.add_argument("--lr", type=float, default=TrainConfig.lr)
    p.add_argument("--out", type=Path, default=WEIGHTS_PT)
    p.add_argument("--npz", type=Path, default=WEIGHTS_NPZ)
    args = p.parse_args()
    sp = split(load(args.data), SplitConfig(seed=args.seed))
    ckpt = train(sp, ModelConfig(embed=args.embed, hidden=args.hidden, layers=args.layers),
                 TrainConfig(epochs=args.epochs, minutes=args.minutes, seed=args.seed, lr=args.lr))
    ckpt.save(args.out)
    export(ckpt, args.npz)
    print(f"saved {args.out} and {args.npz} (best calib nll {ckpt.meta['best_calib_nll']:.4f}, "
          f"{ckpt.meta['train_s']:.0f} s)")


if __name__ == "__main__":
    main()
