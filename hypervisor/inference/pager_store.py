"""The KV pager (hypervisor/kvpager) as the model service's `StateStore`.

A parked session's KV pages become pager pages keyed by prefix-chained hashes of their tokens,
so sessions of one guest that share a prefix (the agents' common system document) share its
pages, and the pager's relevance policy decides which tier (RAM, NVMe) holds each and what
leaves. A page that is missing or fails its checksum ends the usable prefix there: the session
restores what precedes it and prefills the rest. The pager keys sessions by (guest, name), so
a parked session reaches only its own guest's pages.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from dataclasses import dataclass
from typing import Sequence

from hypervisor.inference.backends import KVState
from hypervisor.inference.parking import Key
from hypervisor.kvpager.pager import KVPager


def chain_hashes(state: KVState) -> list[int]:
    """63-bit ids of each page's prefix: page i's id covers the model and every token before it."""
    out, prev = [], state.model.encode()
    size = state.block_tokens
    for i in range(len(state.blocks)):
        chunk = state.tokens[i * size:(i + 1) * size]
        prev = hashlib.blake2b(prev + struct.pack(f"<{len(chunk)}i", *chunk), digest_size=8).digest()
        out.append(int.from_bytes(prev, "little") & 0x7FFF_FFFF_FFFF_FFFF)
    return out


@dataclass(frozen=True)
class _Parked:
    model: str
    tokens: tuple[int, ...]
    block_tokens: int
    hashes: tuple[int, ...]
    nbytes: int


class PagerStore:
    def __init__(self, pager: KVPager, tier_names: Sequence[str]) -> None:
        self.pager = pager
        self.tier_names = list(tier_names)
        self._parked: dict[Key, _Parked] = {}
        self._lock = threading.Lock()

    def hashes(self, key: Key) -> tuple[int, ...]:
        with self._lock:
            parked = self._parked.get(key)
        return parked.hashes if parked else ()

    def put(self, key: Key, state: KVState) -> str:
        hashes = tuple(chain_hashes(state))
        partial = len(state.tokens) % state.block_tokens != 0
        self.pager.open_session(key[0], key[1])
        self.pager.store(key[0], key[1], list(hashes), list(state.blocks), partial_tail=partial)
        with self._lock:
            self._parked[key] = _Parked(state.model, state.tokens, state.block_tokens, hashes, state.nbytes)
        return self.tier(key)

    def get(self, key: Key) -> tuple[KVState | None, str]:
        with self._lock:
            parked = self._parked.get(key)
        if parked is None:
            return None, "none"
        tier = self.tier(key)
        pages = self.pager.load(key[0], key[1], list(parked.hashes))
        if not pages:
            return None, tier
        n = len(pages) * parked.block_tokens
        return KVState(parked.model, parked.tokens[:n], tuple(pages), parked.block_tokens), tier

    def tier(self, key: Key) -> str:
        """Where the session's first page is (its prefix is read from there on)."""
        hashes = self.hashes(key)
        if not hashes:
            return "none"
        found = self.pager.lookup(key[0], key[1], list(hashes[:1]))
        return self.tier_names[found.tiers[0]] if found.tiers else "none"

    def nbytes(self, key: Key) -> int:
        """Size of the state as parked (some of its pages may since have left every tier)."""
        with self._lock:
            parked = self._parked.get(key)
        return parked.nbytes if parked else 0

    def drop(self, key: Key) -> None:
        """Forget the session's pages; they stay as cache for its siblings until the policy evicts them."""
        with self._lock:
            self._parked.pop(key, None)

    def usage(self) -> dict[str, dict[str, int]]:
        return {t.name: {"capacity_bytes": t.capacity_bytes, "used_bytes": t.used_bytes, "items": t.pages}
                for t in self.pager.stats().tiers}
