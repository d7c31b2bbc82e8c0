"""Train the forecaster on the train VMs, early-stop on the validation VMs, write weights.

    python -m models.forecaster.train [--data DIR] [--seed 0] [--steps 2400] [--minutes 9] [--out PATH]

The split is by VM and recorded in the weights, so the benchmark evaluates only VMs the
model never saw. Windows are drawn at random from the train VMs; every 200 steps the
pinball loss on a fixed set of windows from the validation VMs is measured, and the best
checkpoint is what is written (early stopping by checkpoint choice).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from models.forecaster.data import DEFAULT_DATA, STEP_S, DataMissing, VmTrace, load, split_vms, windows
from models.forecaster.model import WEIGHTS, ForecastConfig, Forecaster, featurise, pinball


@dataclass(frozen=True)
class Pool:
    """Several VMs laid end to end (NaN between them) so one gather serves a whole batch."""

    series: np.ndarray  # (T, 2)
    slots: np.ndarray  # (T,) global slot of each row
    ends: np.ndarray  # candidate positions: the step to forecast
    capacity: np.ndarray  # (len(ends),) CPU capacity of the VM each position belongs to, MHz


def pool(traces: list[VmTrace], cfg: ForecastConfig) -> Pool:
    gap = cfg.context_steps + cfg.horizon
    parts, slots, ends, capacity, offset = [], [], [], [], 0
    for tr in traces:
        parts += [np.full((gap, 2), np.nan, np.float32), tr.demand()]
        slots += [np.zeros(gap, np.int64), tr.start_slot + np.arange(len(tr))]
        offset += gap
        idx = np.arange(cfg.recent_steps, len(tr))
        idx = idx[~np.isnan(tr.cpu[idx])]
        ends.append(offset + idx)
        capacity.append(np.full(len(idx), tr.cpu_capacity_mhz))
        offset += len(tr)
    parts.append(np.full((cfg.horizon, 2), np.nan, np.float32))
    slots.append(np.zeros(cfg.horizon, np.int64))
    return Pool(np.concatenate(parts), np.concatenate(slots), np.concatenate(ends), np.concatenate(capacity))


def batch(p: Pool, ends: np.ndarray, cfg: ForecastConfig) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    hist = windows(p.series, ends, cfg.context_steps)
    f = featurise(hist, p.slots[ends] * STEP_S, cfg)
    target = p.series[ends[:, None] + np.arange(cfg.horizon)[None, :]]  # (B, H, 2)
    inputs = [torch.from_numpy(f.recent), torch.from_numpy(f.blocks), torch.from_numpy(f.now)]
    return inputs, torch.from_numpy(target / f.scale[:, None, :]), torch.from_numpy(f.scale)


def evaluate(net: torch.nn.Module, p: Pool, ends: np.ndarray, cfg: ForecastConfig,
             select: int = -1) -> tuple[float, float]:
    """(all quantiles, selected quantile) pinball loss in fractions of capacity.

    The selected quantile (default the highest) is the one the policy allocates from, so
    it picks the checkpoint.
    """
    net.eval()
    total, upper, n = 0.0, 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(ends), 4096):
            inputs, target, scale = batch(p, ends[i:i + 4096], cfg)
            pred = net(*inputs) * scale[:, None, :, None]
            y = target * scale[:, None, :]
            total += pinball(pred, y, cfg.quantiles).item() * len(y)
            q = select % len(cfg.quantiles)
            upper += pinball(pred[..., q:q + 1], y, cfg.quantiles[q:q + 1]).item() * len(y)
            n += len(y)
    return total / max(n, 1), upper / max(n, 1)


def train(data: Path, seed: int, steps: int, minutes: float, out: Path, cfg: ForecastConfig,
          batch_size: int = 256, eval_every: int = 200, lr: float = 3e-3, ema: float = 0.99,
          capacity_power: float = 1.0, select_quantile: float | None = None,
          tail_weight: float = 1.0, init: Path | None = None) -> dict:
    """Fixed number of steps (a wall-clock cap guards shared machines), cosine learning
    rate, and an exponential moving average of the weights, which is what is evaluated
    and shipped: the upper quantile is learnt from 1% of samples, and averaging the
    weights keeps it from jumping with the last few batches. Windows are drawn with
    probability proportional to the VM's capacity to the `capacity_power`: a host pays
    for MHz, and one large VM's burst outweighs many small VMs' noise. The checkpoint is
    picked on `select_quantile` (default the highest), and quantiles from 0.95 up weigh
    `tail_weight` times the others in the loss: the scheduler allocates from the tail.
    `init` starts from existing weights (same config) instead of from scratch: a
    fine-tune, on the same split."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    traces = load(data)
    split = split_vms([t.vm_id for t in traces], seed)
    train_pool = pool([t for t in traces if t.vm_id in set(split.train)], cfg)
    val_pool = pool([t for t in traces if t.vm_id in set(split.val)], cfg)
    val_ends = np.sort(rng.choice(val_pool.ends, size=min(20000, len(val_pool.ends)), replace=False))
    select = cfg.quantiles.index(select_quantile) if select_quantile is not None else -1
    qweight = torch.tensor([tail_weight if q >= 0.95 else 1.0 for q in cfg.quantiles])
    qweight = qweight / qweight.mean()
    draw = train_pool.capacity ** capacity_power
    draw /= draw.sum()

    model = Forecaster.load(init) if init is not None else Forecaster.new(cfg)
    if init is not None and model.cfg != cfg:
        raise ValueError(f"--init {init} has another config ({model.cfg}) than this run ({cfg})")
    averaged = torch.optim.swa_utils.AveragedModel(
        model.net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(ema))
    opt = torch.optim.AdamW(model.net.parameters(), lr=lr, weight_decay=1e-4)
    best, best_state, best_step, step = (float("inf"), float("inf")), None, 0, 0
    if init is not None:  # a fine-tune keeps its starting point unless it does better
        best = evaluate(model.net, val_pool, val_ends, cfg, select)
        best_state = {k: v.clone() for k, v in model.net.state_dict().items()}
        print(f"start ({init.name}): val {best[0]:.5f} selected quantile {best[1]:.5f}")
    started = time.monotonic()
    deadline = started + 60 * minutes
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn()) as bar:
        task = bar.add_task("training", total=steps)
        while step < steps and time.monotonic() < deadline:
            model.net.train()
            inputs, target, scale = batch(train_pool, rng.choice(train_pool.ends, batch_size, p=draw), cfg)
            # In fractions of capacity, as the scheduler pays: busy guests' errors count more.
            s = scale[:, None, :]
            loss = pinball(model.net(*inputs) * s[..., None], target * s, cfg.quantiles, qweight) / cfg.scale_floor
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.net.parameters(), 1.0)
            opt.step()
            # Cosine decay over whichever runs out first, the steps or the time cap, so a
            # run cut short on a busy machine still ends at a low learning rate.
            done = min(max(step / steps, (time.monotonic() - started) / (deadline - started)), 1.0)
            warm = min(1.0, (step + 1) / 50)
            for group in opt.param_groups:
                group["lr"] = lr * warm * (0.02 + 0.98 * 0.5 * (1 + np.cos(np.pi * done)))
            averaged.update_parameters(model.net)
            step += 1
            if step % eval_every == 0 or step == steps or time.monotonic() >= deadline:
                val = evaluate(averaged.module, val_pool, val_ends, cfg, select)
                if val[1] < best[1]:
                    best, best_step = val, step
                    best_state = {k: v.clone() for k, v in averaged.module.state_dict().items()}
                note = (f"step {step}: train {loss.item():.4f} val {val[0]:.5f} upper {val[1]:.5f} "
                        f"(best upper {best[1]:.5f}@{best_step})")
                bar.console.print(note)
            bar.update(task, completed=step)
    model.net.load_state_dict(best_state)
    model.meta = {"seed": seed, "train_vms": list(split.train), "val_vms": list(split.val),
                  "val_pinball": best[0], "val_pinball_upper": best[1], "steps": step, "best_step": best_step,
                  "batch_size": batch_size, "capacity_power": capacity_power,
                  "select_quantile": cfg.quantiles[select], "tail_weight": tail_weight,
                  "train_seconds": round(time.monotonic() - started, 1), "data": str(data.name),
                  "lr": lr, "init": init.name if init is not None else None}
    model.save(out)
    return model.meta


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m models.forecaster.train", description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2400, help="optimiser steps (batches of 256 windows)")
    p.add_argument("--minutes", type=float, default=9.0, help="wall-clock cap on the loop (shared machines)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--capacity-power", type=float, default=1.0, help="draw windows in proportion to capacity^this")
    p.add_argument("--select-quantile", type=float, default=None,
                   help="pick the checkpoint on this quantile's validation pinball (default: the highest)")
    p.add_argument("--tail-weight", type=float, default=1.0, help="loss weight of quantiles >= 0.95 vs the others")
    p.add_argument("--quantiles", type=str, default=None, help="comma-separated quantile levels to forecast")
    p.add_argument("--init", type=Path, default=None, help="fine-tune from these weights (same config)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--out", type=Path, default=WEIGHTS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        cfg = ForecastConfig()
        if args.quantiles:
            cfg = replace(cfg, quantiles=tuple(float(q) for q in args.quantiles.split(",")))
        meta = train(args.data, args.seed, args.steps, args.minutes, args.out, cfg,
                     capacity_power=args.capacity_power, select_quantile=args.select_quantile,
                     tail_weight=args.tail_weight, init=args.init, lr=args.lr)
    except DataMissing as e:
        print(f"error: {e}", file=sys.stderr)
        print("hint: pass --data DIR holding Bitbrains GWA-T-12 *.csv.gz files", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB): val pinball {meta['val_pinball']:.5f}, "
          f"{meta['steps']} steps in {meta['train_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
