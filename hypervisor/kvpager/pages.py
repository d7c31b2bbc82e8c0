"""What a KV page is: its identity, owner, size and checksum.

A page holds the KV state of one block of a prompt (512 tokens by default). Its
identity is the block's *prefix-chained* hash, as in vLLM's prefix cache: the hash
of a block covers every token before it, so one hash fixes a whole prefix and two
sessions that share a prefix share its pages. Pages are namespaced by guest, so a
prefix is never shared, nor its presence observable, across guests.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

BLOCK_TOKENS = 512
"""Tokens per page: the block size of the Mooncake traces and a common vLLM choice."""

BlockHash = int
"""A prefix-chained block hash (a block's hash fixes its whole prefix)."""


@dataclass(frozen=True, slots=True)
class SessionKey:
    """One agent session, owned by exactly one guest."""

    guest: str
    session: str


@dataclass(frozen=True, slots=True)
class PageKey:
    """A page's identity: the guest namespace plus the prefix-chained block hash."""

    guest: str
    block: BlockHash

    def filename(self) -> str:
        return f"{self.block & 0xFFFFFFFFFFFFFFFF:016x}.page"


@dataclass(frozen=True, slots=True)
class Access:
    """One use of a page by a request, as the placement and the policies see it.

    `depth` is the block's position in the request's prefix; `request_blocks` the
    request's length in blocks; `partial` marks a request's unfilled last block,
    which a longer follow-up prompt re-hashes and so almost never reuses.
    `next_use` is look-ahead: only the simulator fills it, and only for a policy
    that declares `needs_future` (Belady's optimal); every online policy sees None.
    """

    now: float
    depth: int = 0
    request_blocks: int = 1
    partial: bool = False
    session: SessionKey | None = None
    next_use: float | None = None


def checksum(data: bytes) -> bytes:
    """16-byte BLAKE2b digest: detects a torn or corrupted page file, cheaply."""
    return hashlib.blake2b(data, digest_size=16).digest()

