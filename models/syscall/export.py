"""Export a trained checkpoint to the plain-numpy `.npz` that the guest scorer reads.

The guest has numpy but no torch, so the file holds arrays only (no pickles): the
embedding and the first LSTM layer's input weights and biases folded into one token ->
gate table, the recurrent weights (and input weights of any further layer), the output
weights, the vocabulary (i386 numbers and names, so a collector on another
architecture can map by name), and a JSON string of metadata: format, window, half-life,
the split the weights were fitted on, training facts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from models.syscall.data import DEFAULT_DATA
from models.syscall.model import WEIGHTS_NPZ, WEIGHTS_PT, Checkpoint

FORMAT = 1  # must match neuraos_agent.monitor.scorer.FORMAT
SYSCALL_TABLE = "syscalls-i386.tsv"


def syscall_names(data: Path = DEFAULT_DATA) -> dict[int, str]:
    """i386 number -> name, from the data set's table (lines without a number are skipped)."""
    names: dict[int, str] = {}
    path = Path(data) / SYSCALL_TABLE
    if path.exists():
        for line in path.read_text().splitlines():
            name, _, number = line.partition("\t")
            if number.strip().isdigit():
                names.setdefault(int(number), name.strip())
    return names


def export(ckpt: Checkpoint, path: Path = WEIGHTS_NPZ, names: dict[int, str] | None = None) -> Path:
    sd = {k: v.detach().to(torch.float64) for k, v in ckpt.state_dict.items()}
    table = sd["embed.weight"] @ sd["lstm.weight_ih_l0"].T + sd["lstm.bias_ih_l0"] + sd["lstm.bias_hh_l0"]
    names = names if names is not None else syscall_names()
    meta = {"format": FORMAT, "window": ckpt.config.window,
            "half_life_windows": ckpt.meta.get("half_life_windows", 64),
            "embed": ckpt.config.embed, "hidden": ckpt.config.hidden, "layers": ckpt.config.layers,
            **ckpt.meta}
    f32 = lambda t: t.numpy().astype(np.float32)  # noqa: E731
    upper = {}  # layers above the first: input weights, summed biases, recurrent weights
    for layer in range(1, ckpt.config.layers):
        upper[f"w_ih_{layer}"] = f32(sd[f"lstm.weight_ih_l{layer}"])
        upper[f"b_{layer}"] = f32(sd[f"lstm.bias_ih_l{layer}"] + sd[f"lstm.bias_hh_l{layer}"])
        upper[f"w_hh_{layer}"] = f32(sd[f"lstm.weight_hh_l{layer}"])
    np.savez_compressed(
        path, table=f32(table), **upper,
        w_hh=sd["lstm.weight_hh_l0"].numpy().astype(np.float32),
        w_out=sd["out.weight"].numpy().astype(np.float32), b_out=sd["out.bias"].numpy().astype(np.float32),
        syscalls=np.array(ckpt.vocab.syscalls, dtype=np.int32),
        names=np.array([names.get(s, "") for s in ckpt.vocab.syscalls]),
        meta=np.array(json.dumps(meta, sort_keys=True)))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", type=Path, default=WEIGHTS_PT)
    p.add_argument("--out", type=Path, default=WEIGHTS_NPZ)
    args = p.parse_args()
    print(export(Checkpoint.load(args.weights), args.out))


if __name__ == "__main__":
    main()
