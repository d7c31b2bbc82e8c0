"""Per-guest model quotas: a token bucket on compute (tokens/s) and caps on sessions and calls.

A request is admitted while the guest's bucket is positive and is charged for what it really
cost (prompt tokens prefilled plus tokens generated), so the balance may go negative: a guest
that overspent waits for the refill before its next call, and other guests never notice.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from hypervisor.inference.errors import QuotaExceeded


@dataclass(frozen=True)
class GuestQuota:
    tokens_per_s: float = 200.0  # refill rate
    burst_tokens: float = 4000.0  # bucket size
    max_sessions: int = 32  # conversations kept at once
    max_inflight: int = 4  # Complete/Embed calls at once


class TokenBucket:
    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._level = burst
        self._at = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self.clock()
        self._level = min(self.burst, self._level + (now - self._at) * self.rate)
        self._at = now

    @property
    def level(self) -> float:
        with self._lock:
            self._refill()
            return self._level

    def admit(self) -> float:
        """0 if a call may start now, else the seconds until it may."""
        with self._lock:
            self._refill()
            if self._level > 0:
                return 0.0
            return (1e-3 - self._level) / self.rate if self.rate > 0 else float("inf")

    def charge(self, tokens: float) -> None:
        with self._lock:
            self._refill()
            self._level -= tokens


class GuestLimits:
    """One guest's bucket and in-flight count; `enter()` raises QuotaExceeded to refuse a call."""

    def __init__(self, guest: str, quota: GuestQuota, clock: Callable[[], float] = time.monotonic) -> None:
        self.guest = guest
        self.quota = quota
        self.bucket = TokenBucket(quota.tokens_per_s, quota.burst_tokens, clock)
        self.inflight = 0
        self.refused = 0
        self._lock = threading.Lock()

    def enter(self) -> None:
        wait = self.bucket.admit()
        with self._lock:
            if wait > 0:
                self.refused += 1
                raise QuotaExceeded(f"guest {self.guest} is over its model quota of "
                                    f"{self.quota.tokens_per_s:g} tokens/s; retry in {wait:.1f}s")
            if self.inflight >= self.quota.max_inflight:
                self.refused += 1
                raise QuotaExceeded(f"guest {self.guest} already has {self.inflight} model calls running "
                                    f"(limit {self.quota.max_inflight})")
            self.inflight += 1

    def set_quota(self, quota: GuestQuota) -> None:
        """A new quota from now on, with a full bucket; calls already running finish as they were."""
        with self._lock:
            self.quota = quota
            self.bucket = TokenBucket(quota.tokens_per_s, quota.burst_tokens, self.bucket.clock)

    def leave(self) -> None:
        with self._lock:
            self.inflight -= 1
