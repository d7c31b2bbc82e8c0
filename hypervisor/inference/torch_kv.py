"""A transformers model's KV state as pager pages, and back onto the GPU.

vLLM's KV offload is the production GPU path; where vLLM cannot be installed, a transformers
model on CUDA keeps each session's KV as per-layer tensors. This module cuts that state into
the pager's 512-token pages (bytes the RAM and NVMe tiers store and checksum) and rebuilds a
cache on the device from them, so a session resumes without prefilling its history again.
A page is raw K then V for its tokens, every layer: (2, layers, kv_heads, tokens, head_dim).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from hypervisor.kvpager.pages import BLOCK_TOKENS


class PageShapeError(ValueError):
    """A page whose size does not fit the model's KV layout (wrong model, or a torn page)."""


@dataclass(frozen=True)
class KVLayout:
    """What one token of KV state costs for a given model."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, config: Any, dtype: torch.dtype) -> KVLayout:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads,
                   head_dim, dtype)

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


def _layer_kv(cache: Any, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):           # transformers >= 4.56
        return cache.layers[i].keys, cache.layers[i].values
    return cache.key_cache[i], cache.value_cache[i]


def cache_tokens(cache: Any) -> int:
    return int(cache.get_seq_length())


def to_pages(cache: Any, layout: KVLayout, block_tokens: int = BLOCK_TOKENS) -> list[bytes]:
    """Pages of `block_tokens` tokens (the last one partial) from a batch-1 cache.

    One device-to-host copy of the whole state, then slices: many small copies over PCIe
    cost far more than one large one.
    """
    kv = torch.stack([torch.stack(_layer_kv(cache, i)) for i in range(layout.layers)], dim=1)
    if kv.shape[2] != 1:
        raise ValueError("to_pages pages one session at a time (batch size 1)")
    host = kv[:, :, 0].cpu()               # (2, layers, kv_heads, tokens, head_dim)
    pages = []
    for start in range(0, host.shape[3], block_tokens):
        part = host[:, :, :, start:start + block_tokens].contiguous()
        pages.append(part.view(torch.uint8).numpy().tobytes())
    return pages


def from_pages(pages: Sequence[bytes], layout: KVLayout, device: str | torch.device) -> Any:
    """A DynamicCache on `device` holding the pages' tokens, in order.

    Each page is copied once, straight from the tier's bytes into its slice of one
    preallocated device tensor: no concatenation, no pinned staging to allocate.
    """
    from transformers import DynamicCache

    per_token = layout.bytes_per_token
    counts = []
    for n, page in enumerate(pages):
        if len(page) % per_token:
            raise PageShapeError(f"page {n} holds {len(page)} bytes, not a whole number of "
                                 f"{per_token}-byte tokens for this model")
        counts.append(len(page) // per_token)
    shape = (2, layout.layers, layout.kv_heads)
    kv = torch.empty((*shape, sum(counts), layout.head_dim), dtype=layout.dtype, device=device)
    start = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # frombuffer on immutable bytes: we only read
        for page, t in zip(pages, counts):
            src = torch.frombuffer(page, dtype=torch.uint8).view(layout.dtype).view(*shape, t, layout.head_dim)
            kv[:, :, :, start:start + t].copy_(src)
            start += t
    cache = DynamicCache()
    for i in range(layout.layers):
        cache.update(kv[0, i].unsqueeze(0), kv[1, i].unsqueeze(0), i)
    return cache
