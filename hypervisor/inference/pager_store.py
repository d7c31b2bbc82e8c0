"""The KV pager (hypervisor/kvpager) as the model service's `StateStore`.

llama.cpp hands over a session's KV state as one sequence-state blob, so a parked session is
one page, keyed by a chained hash of all its tokens: the pager's relevance policy decides
which tier (RAM, NVMe) holds it and what leaves, and its checksums turn a damaged page into a
miss (a re-prefill). The pager's session ids are global, so they are namespaced per guest here.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from typing import Sequence

from hypervisor.inference.backends import KVState
from hypervisor.inference.parking import Key, decode, encode
from hypervisor.kvpager.pager import KVPager


def state_block(state: KVState) -> int:
    """A 63-bit id for the exact prefix (model + tokens) the state encodes."""
    h = hashlib.blake2b(state.model.encode() + struct.pack(f"<{len(state.tokens)}i", *state.tokens), digest_size=8)
    return int.from_bytes(h.digest(), "little") & 0x7FFF_FFFF_FFFF_FFFF


class PagerStore:
    def __init__(self, pager: KVPager, tier_names: Sequence[str]) -> None:
        self.pager = pager
        self.tier_names = list(tier_names)
        self._blocks: dict[Key, int] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _sid(key: Key) -> str:
        return f"{key[0]}/{key[1]}"

    def put(self, key: Key, state: KVState) -> str:
        block = state_block(state)
        self.pager.open_session(key[0], self._sid(key))
        self.pager.store(key[0], self._sid(key), [block], [encode(state)])
        with self._lock:
            self._blocks[key] = block
        return self.tier(key)

    def get(self, key: Key) -> tuple[KVState | None, str]:
        with self._lock:
            block = self._blocks.get(key)
        if block is None:
            return None, "none"
        tier = self.tier(key)
        pages = self.pager.load(key[0], self._sid(key), [block])
        return (decode(pages[0]) if pages else None), tier

    def tier(self, key: Key) -> str:
        with self._lock:
            block = self._blocks.get(key)
        if block is None:
            return "none"
        found = self.pager.lookup(key[0], self._sid(key), [block])
        return self.tier_names[found.tiers[0]] if found.tiers else "none"

    def drop(self, key: Key) -> None:
        """Forget the session's page id; the page itself stays as cache until the policy evicts it."""
        with self._lock:
            self._blocks.pop(key, None)

    def usage(self) -> dict[str, dict[str, int]]:
        return {t.name: {"capacity_bytes": t.capacity_bytes, "used_bytes": t.used_bytes, "items": t.pages}
                for t in self.pager.stats().tiers}
