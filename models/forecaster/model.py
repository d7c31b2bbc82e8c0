"""A small Transformer that forecasts a guest's CPU and memory demand as quantiles.

Input: the last day of one guest's (cpu, mem) demand, as fractions of what the guest is
provisioned, one row per 5-minute step, NaN where unknown. The model reads two scales of
it: the recent steps one token each, and the whole day as hourly tokens (mean and max,
so a spike an hour ago is not averaged away), plus a token for "now" (time of day and
week, per-guest scale). Each guest's series is divided by its own recent peak before
the model sees it, so one set of weights serves idle and busy guests alike; the output
is scaled back. Output: for each of the next H steps and each resource, monotone
quantiles (p50 <= p90 <= p99 by construction), trained with the pinball loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.forecaster.data import STEP_S, time_of_day

WEIGHTS = Path(__file__).resolve().parent / "weights.pt"
RESOURCES = ("cpu", "mem")


@dataclass(frozen=True)
class ForecastConfig:
    context_steps: int = 288  # one day of 5-minute steps
    recent_steps: int = 12  # the last hour, one token per step
    block_steps: int = 12  # the whole day as hourly tokens
    horizon: int = 6  # steps ahead (30 minutes)
    quantiles: tuple[float, ...] = (0.5, 0.9, 0.95, 0.98, 0.99, 0.995)
    d_model: int = 32
    heads: int = 4
    layers: int = 2
    dropout: float = 0.1
    scale_floor: float = 0.01  # 1% of capacity: idle guests are not blown up into noise


@dataclass(frozen=True)
class Features:
    recent: np.ndarray  # (B, recent_steps, 7): cpu, mem, missing, tod x4
    blocks: np.ndarray  # (B, n_blocks, 9): mean/max cpu, mean/max mem, missing, tod x4
    now: np.ndarray  # (B, 10): last cpu/mem, log scale cpu/mem, tod x4 of the next step, known, mean
    scale: np.ndarray  # (B, 2): per-guest divisor, fraction of capacity


@dataclass(frozen=True)
class Forecast:
    """Demand quantiles, fractions of provisioned capacity: values[b, h, r, q]."""

    quantiles: tuple[float, ...]
    values: np.ndarray  # (B, H, 2, Q)

    def quantile(self, q: float) -> np.ndarray:
        """(B, H, 2) for one of the forecast's quantile levels."""
        return self.values[..., self.quantiles.index(q)]

    @property
    def upper(self) -> np.ndarray:
        return self.values[..., -1]


def featurise(history: np.ndarray, next_time_s: np.ndarray, cfg: ForecastConfig) -> Features:
    """Model inputs from (B, L, 2) histories ending at the step before `next_time_s`.

    Histories shorter than a day are padded as unknown; only the last day is read.
    """
    history = np.asarray(history, np.float32)
    b, length, _ = history.shape
    n = cfg.context_steps
    if length < n:
        history = np.concatenate([np.full((b, n - length, 2), np.nan, np.float32), history], axis=1)
    day = history[:, -n:]
    known = ~np.isnan(day)
    filled = np.where(known, day, 0.0).astype(np.float32)
    peak = np.where(known, day, -np.inf).max(axis=1)
    scale = np.maximum(np.where(np.isfinite(peak), peak, 0.0), cfg.scale_floor).astype(np.float32)
    norm = filled / scale[:, None, :]

    next_slot = np.round(np.asarray(next_time_s, np.float64) / STEP_S).astype(np.int64)
    slots = next_slot[:, None] - n + np.arange(n)[None, :]  # slot of each history step
    tod = time_of_day(slots)  # (B, n, 4)

    r = cfg.recent_steps
    miss = (~known[:, -r:, 0]).astype(np.float32)[..., None]
    recent = np.concatenate([norm[:, -r:], miss, tod[:, -r:]], axis=-1)

    k = cfg.block_steps
    nb = n // k
    bn = norm[:, -nb * k:].reshape(b, nb, k, 2)
    bk = known[:, -nb * k:].reshape(b, nb, k, 2)
    count = np.maximum(bk.sum(axis=2), 1)
    mean = bn.sum(axis=2) / count
    bmax = np.where(bk, bn, 0.0).max(axis=2)
    bmiss = 1.0 - bk[..., 0].mean(axis=2, keepdims=True)
    btod = tod[:, -nb * k:].reshape(b, nb, k, 4)[:, :, k // 2]
    blocks = np.concatenate([mean[..., :1], bmax[..., :1], mean[..., 1:], bmax[..., 1:], bmiss, btod],
                            axis=-1).astype(np.float32)

    frac_known = known[..., 0].mean(axis=1, keepdims=True)
    # The last known value of each resource: the median starts from it (a residual).
    last_idx = np.where(known, np.arange(n)[None, :, None], -1).max(axis=1)  # (B, 2)
    last = np.take_along_axis(norm, np.maximum(last_idx, 0)[:, None, :], axis=1)[:, 0] * (last_idx >= 0)
    now = np.concatenate([last, np.log10(scale), time_of_day(next_slot), frac_known,
                          np.log10(np.maximum(norm.mean(axis=1)[:, :1], 1e-4))], axis=-1).astype(np.float32)
    return Features(recent.astype(np.float32), blocks, now, scale)


class ForecastNet(nn.Module):
    """Encoder over [now, hourly blocks, recent steps]; the "now" token reads out."""

    def __init__(self, cfg: ForecastConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        n_tokens = 1 + cfg.context_steps // cfg.block_steps + cfg.recent_steps
        self.embed_recent = nn.Linear(7, d)
        self.embed_blocks = nn.Linear(9, d)
        self.embed_now = nn.Linear(10, d)
        self.position = nn.Parameter(torch.zeros(1, n_tokens, d))
        layer = nn.TransformerEncoderLayer(d, cfg.heads, 2 * d, cfg.dropout, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.horizon * 2 * len(cfg.quantiles))
        nn.init.normal_(self.position, std=0.02)

    def forward(self, recent: torch.Tensor, blocks: torch.Tensor, now: torch.Tensor) -> torch.Tensor:
        """(B, H, 2, Q) quantiles in the guest's scaled units, non-decreasing in Q."""
        tokens = torch.cat([self.embed_now(now)[:, None], self.embed_blocks(blocks),
                            self.embed_recent(recent)], dim=1) + self.position
        h = self.norm(self.encoder(tokens)[:, 0])
        raw = self.head(h).view(-1, self.cfg.horizon, 2, len(self.cfg.quantiles))
        base = raw[..., :1] + now[:, None, :2, None]  # residual on the last known value
        steps = nn.functional.softplus(raw[..., 1:])
        return torch.cat([base, base + torch.cumsum(steps, dim=-1)], dim=-1)


def pinball(pred: torch.Tensor, target: torch.Tensor, quantiles: tuple[float, ...],
            weight_q: torch.Tensor | None = None) -> torch.Tensor:
    """Mean pinball loss; `pred` (..., Q), `target` (...) with NaN ignored; optional (Q,) weights."""
    tau = torch.tensor(quantiles, dtype=pred.dtype, device=pred.device)
    known = ~torch.isnan(target)
    diff = torch.where(known, target, 0.0)[..., None] - pred
    loss = torch.maximum(tau * diff, (tau - 1) * diff)
    weight = known[..., None].to(pred.dtype).expand_as(loss)
    if weight_q is not None:
        loss = loss * weight_q.to(pred.dtype)
    return (loss * weight).sum() / weight.sum().clamp_min(1.0)


@dataclass
class Forecaster:
    """The shipped model: `Forecaster.load().predict(history, next_time_s)`."""

    cfg: ForecastConfig
    net: ForecastNet
    meta: dict = field(default_factory=dict)

    @classmethod
    def new(cls, cfg: ForecastConfig | None = None) -> Forecaster:
        cfg = cfg or ForecastConfig()
        return cls(cfg, ForecastNet(cfg))

    @classmethod
    def load(cls, path: Path = WEIGHTS) -> Forecaster:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        raw = dict(blob["config"])
        raw["quantiles"] = tuple(raw["quantiles"])
        cfg = ForecastConfig(**raw)
        net = ForecastNet(cfg)
        net.load_state_dict(blob["state_dict"])
        net.eval()
        return cls(cfg, net, dict(blob.get("meta", {})))

    def save(self, path: Path = WEIGHTS) -> None:
        state = {k: v.detach().to(torch.float32).clone() for k, v in self.net.state_dict().items()}
        torch.save({"config": asdict(self.cfg), "state_dict": state, "meta": self.meta}, path)

    @property
    def horizon(self) -> int:
        return self.cfg.horizon

    def predict(self, history: np.ndarray, next_time_s: np.ndarray | float,
                batch: int = 4096) -> Forecast:
        """Quantiles for the next H steps of each guest, one batched pass.

        `history`: (B, L, 2) cpu/mem demand fractions up to the step before
        `next_time_s` (Unix seconds of the first step forecast), NaN where unknown.
        """
        history = np.asarray(history, np.float32)
        times = np.broadcast_to(np.asarray(next_time_s, np.float64), (history.shape[0],))
        out = []
        self.net.eval()
        with torch.inference_mode():
            for i in range(0, len(history), batch):
                f = featurise(history[i:i + batch], times[i:i + batch], self.cfg)
                y = self.net(torch.from_numpy(f.recent), torch.from_numpy(f.blocks), torch.from_numpy(f.now))
                out.append(y.numpy() * f.scale[:, None, :, None])
        values = np.concatenate(out) if out else np.zeros((0, self.horizon, 2, len(self.cfg.quantiles)))
        return Forecast(self.cfg.quantiles, np.clip(values, 0.0, 1.0).astype(np.float32))
