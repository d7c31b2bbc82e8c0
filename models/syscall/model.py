"""A small LSTM language model over a process's syscalls, trained on normal traces only.

It reads a process's syscalls from its start (a BOS token, then one token per call) and
predicts each next call; the surprise of a call is its negative log-likelihood in nats.
Anomalous behaviour is behaviour the model finds surprising. The state is carried over
the whole process, so one step per syscall is all streaming costs, and the guest runs the
same recurrence in numpy (`neuraos_agent.monitor.scorer`) from the exported weights.

Syscalls never seen in training map to UNK. Training replaces a small share of inputs and
targets with UNK, so the model learns that "something new" happens at about that rate:
a new syscall then costs a bounded, known surprise instead of an arbitrary one.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
WEIGHTS_PT = HERE / "weights.pt"
WEIGHTS_NPZ = HERE / "weights.npz"
PAD, BOS, UNK = 0, 1, 2
N_SPECIAL = 3


@dataclass(frozen=True)
class Vocab:
    """Syscall numbers (i386, as in ADFA-LD) known to the model, in token order."""

    syscalls: tuple[int, ...]

    @classmethod
    def fit(cls, traces: Iterable[Sequence[int]]) -> Vocab:
        return cls(tuple(sorted({c for t in traces for c in t})))

    def __len__(self) -> int:
        return len(self.syscalls) + N_SPECIAL

    def encode(self, syscalls: Sequence[int], bos: bool = True) -> np.ndarray:
        index = {s: i + N_SPECIAL for i, s in enumerate(self.syscalls)}
        toks = [index.get(int(c), UNK) for c in syscalls]
        return np.array([BOS] + toks if bos else toks, dtype=np.int64)


@dataclass(frozen=True)
class ModelConfig:
    embed: int = 48
    hidden: int = 128
    layers: int = 2
    unk_rate: float = 1e-3  # share of tokens replaced by UNK while training
    window: int = 32  # syscalls per scored window


class SyscallLM(nn.Module):
    def __init__(self, vocab: Vocab, config: ModelConfig = ModelConfig()) -> None:
        super().__init__()
        self.vocab, self.config = vocab, config
        self.embed = nn.Embedding(len(vocab), config.embed)
        self.lstm = nn.LSTM(config.embed, config.hidden, num_layers=config.layers, batch_first=True)
        self.out = nn.Linear(config.hidden, len(vocab))

    def forward(self, tokens: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """tokens (B, T) -> logits (B, T, V) for the token after each position, and the state."""
        h, state = self.lstm(self.embed(tokens), state)
        return self.out(h), state

    @torch.no_grad()
    def surprise(self, traces: Sequence[Sequence[int]], batch: int = 64) -> list[np.ndarray]:
        """Per-syscall surprise (nats) of each whole trace, read from the process start."""
        self.eval()
        encoded = [self.vocab.encode(t) for t in traces]
        out: list[np.ndarray] = [np.zeros(0)] * len(encoded)
        order = np.argsort([len(e) for e in encoded], kind="stable")
        for lo in range(0, len(order), batch):
            group = order[lo:lo + batch]
            width = max(len(encoded[i]) for i in group)
            x = torch.full((len(group), width), PAD, dtype=torch.long)
            for j, i in enumerate(group):
                x[j, :len(encoded[i])] = torch.from_numpy(encoded[i])
            logp = torch.log_softmax(self(x[:, :-1])[0], dim=-1)
            nll = -logp.gather(-1, x[:, 1:, None])[..., 0].numpy()
            for j, i in enumerate(group):
                out[i] = nll[j, :len(encoded[i]) - 1].astype(np.float64)
        return out


@dataclass
class Checkpoint:
    """What a trained model is: weights plus the facts needed to trust and reuse them."""

    config: ModelConfig
    vocab: Vocab
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)  # split, digest, training log, metrics

    def model(self) -> SyscallLM:
        m = SyscallLM(self.vocab, self.config)
        m.load_state_dict(self.state_dict)
        return m.eval()

    def save(self, path: Path = WEIGHTS_PT) -> None:
        torch.save({"config": asdict(self.config), "vocab": list(self.vocab.syscalls),
                    "state_dict": self.state_dict, "meta": self.meta}, path)

    @classmethod
    def load(cls, path: Path = WEIGHTS_PT) -> Checkpoint:
        raw = torch.load(path, map_location="cpu", weights_only=True)
        return cls(ModelConfig(**raw["config"]), Vocab(tuple(raw["vocab"])), raw["state_dict"], raw["meta"])
