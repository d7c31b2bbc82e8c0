"""Where a session's KV state waits after it leaves its live slot: host RAM or NVMe files.

This is the model service's own minimal store, the seam where `hypervisor/kvpager` plugs in:
anything with `put`/`get`/`drop`/`usage` will do. States are checksummed (sha256) when parked
and checked when fetched, so a corrupt or missing file means "re-prefill", never a wrong answer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from hypervisor.inference.backends import KVState

if TYPE_CHECKING:
    from hypervisor.kvpager.cost import RestoreCost

log = logging.getLogger("neuraos.inference")

Key = tuple[str, str]  # (guest, session)
_MAGIC = b"NKV2"


class StateStore(Protocol):
    def put(self, key: Key, state: KVState) -> str: ...  # returns the tier it went to, or "none"

    def get(self, key: Key) -> tuple[KVState | None, str]: ...  # (state or None, tier it was in)

    def drop(self, key: Key) -> None: ...

    def tier(self, key: Key) -> str: ...

    def nbytes(self, key: Key) -> int: ...  # size of the parked state (0: none), known without reading it

    def usage(self) -> dict[str, dict[str, int]]: ...


def encode(state: KVState) -> bytes:
    """Header (json: model, token count, page sizes, sha256 of the rest) + int32 tokens + pages."""
    tokens = struct.pack(f"<{len(state.tokens)}i", *state.tokens)
    body = tokens + b"".join(state.blocks)
    head = json.dumps({"model": state.model, "n": len(state.tokens), "block_tokens": state.block_tokens,
                       "sizes": [len(b) for b in state.blocks], "sha256": hashlib.sha256(body).hexdigest()}).encode()
    return _MAGIC + struct.pack("<I", len(head)) + head + body


def decode(blob: bytes) -> KVState | None:
    """The state, or None when the blob is truncated, foreign or fails its checksum."""
    try:
        if blob[:4] != _MAGIC:
            return None
        (hlen,) = struct.unpack_from("<I", blob, 4)
        head = json.loads(blob[8:8 + hlen])
        body = blob[8 + hlen:]
        if hashlib.sha256(body).hexdigest() != head["sha256"]:
            return None
        n = int(head["n"])
        tokens = struct.unpack_from(f"<{n}i", body, 0)
        blocks, at = [], 4 * n
        for size in head["sizes"]:
            blocks.append(bytes(body[at:at + size]))
            at += size
        return KVState(str(head["model"]), tuple(tokens), tuple(blocks), int(head["block_tokens"]))
    except (ValueError, KeyError, TypeError, struct.error, json.JSONDecodeError, UnicodeDecodeError):
        return None


@dataclass
class _Tier:
    capacity: int
    used: int = 0
    items: OrderedDict[Key, int] = field(default_factory=OrderedDict)  # key -> bytes, oldest first


class ParkingStore:
    """RAM first, then NVMe, each with a byte capacity; the oldest parked state moves down.

    `ram_bytes=0` parks straight to NVMe (how the live benchmark measures NVMe restores);
    `nvme_dir=None` keeps RAM only. A state that fits nowhere is dropped (it will be re-prefilled).
    With `cost` (a `RestoreCost`), NVMe keeps a state only while reading it back is measured
    cheaper than prefilling it again.
    """

    def __init__(self, ram_bytes: int = 1 << 30, nvme_dir: Path | None = None, nvme_bytes: int = 8 << 30,
                 durable: bool = True, cost: RestoreCost | None = None) -> None:
        self.durable = durable
        self.cost = cost
        self.ram = _Tier(ram_bytes)
        self.nvme = _Tier(nvme_bytes if nvme_dir is not None else 0)
        self.nvme_dir = nvme_dir
        self._blobs: dict[Key, bytes] = {}
        self._lock = threading.Lock()
        if nvme_dir is not None:
            nvme_dir.mkdir(parents=True, exist_ok=True)

    def path(self, key: Key) -> Path:
        assert self.nvme_dir is not None
        name = hashlib.sha256(f"{key[0]}\0{key[1]}".encode()).hexdigest()[:32]
        return self.nvme_dir / f"{key[0]}-{name}.kv"

    def put(self, key: Key, state: KVState) -> str:
        blob = encode(state)
        with self._lock:
            self._remove(key)
            if len(blob) <= self.ram.capacity:
                while self.ram.used + len(blob) > self.ram.capacity:
                    old, _ = self.ram.items.popitem(last=False)
                    old_blob = self._blobs.pop(old)
                    self.ram.used -= len(old_blob)
                    self._to_nvme(old, old_blob)
                self._blobs[key] = blob
                self.ram.items[key] = len(blob)
                self.ram.used += len(blob)
                return "ram"
            return "nvme" if self._to_nvme(key, blob) else "none"

    def _to_nvme(self, key: Key, blob: bytes) -> bool:
        if self.cost is not None and self.nvme.capacity and not self.cost.worth_keeping("nvme", key):
            log.info("kv: %s/%s is cheaper to re-prefill than to read back from NVMe; not kept", *key)
            return False
        if len(blob) > self.nvme.capacity:
            log.info("kv: %s/%s fits no tier (%d bytes); it will be re-prefilled", *key, len(blob))
            return False
        while self.nvme.used + len(blob) > self.nvme.capacity:
            old, size = self.nvme.items.popitem(last=False)
            self.nvme.used -= size
            self.path(old).unlink(missing_ok=True)
        path = self.path(key)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(blob)
            if self.durable:  # on the device, and out of the page cache: a restore really reads it
                f.flush()
                os.fdatasync(f.fileno())
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        os.replace(tmp, path)
        self.nvme.items[key] = len(blob)
        self.nvme.used += len(blob)
        return True

    def get(self, key: Key) -> tuple[KVState | None, str]:
        with self._lock:
            if key in self.ram.items:
                return decode(self._blobs[key]), "ram"
            if key in self.nvme.items:
                try:
                    blob = self.path(key).read_bytes()
                except OSError:
                    blob = b""
                state = decode(blob)
                if state is None:
                    log.warning("kv: parked state of %s/%s is missing or corrupt; re-prefilling", *key)
                return state, "nvme"
            return None, "none"

    def tier(self, key: Key) -> str:
        with self._lock:
            return "ram" if key in self.ram.items else "nvme" if key in self.nvme.items else "none"

    def nbytes(self, key: Key) -> int:
        with self._lock:
            return self.ram.items.get(key) or self.nvme.items.get(key) or 0

    def drop(self, key: Key) -> None:
        with self._lock:
            self._remove(key)

    def _remove(self, key: Key) -> None:
        if key in self.ram.items:
            self.ram.used -= self.ram.items.pop(key)
            self._blobs.pop(key, None)
        if key in self.nvme.items:
            self.nvme.used -= self.nvme.items.pop(key)
            self.path(key).unlink(missing_ok=True)

    def usage(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {name: {"capacity_bytes": t.capacity, "used_bytes": t.used, "items": len(t.items)}
                    for name, t in (("ram", self.ram), ("nvme", self.nvme))}
