"""KV pager: agent sessions' KV state as pages across fast memory, host RAM and NVMe.

`KVPager` carries the bytes and the sessions, `Placement` decides which tier holds
each page, a policy per tier names victims (`RelevancePolicy` for NeuraOS; LRU,
LFU and ARC as baselines; Belady's optimal only in `simulate`), and the tiers
store the bytes with enforced capacities.
"""

from hypervisor.kvpager.cost import CostAdmission, CostChoice, RestoreCost
from hypervisor.kvpager.pager import KVPager, Move, Placement, PrefixLookup, SessionAccessDenied, UnknownSession
from hypervisor.kvpager.pages import BLOCK_TOKENS, Access, PageKey, SessionKey
from hypervisor.kvpager.policy import (
    ARCPolicy,
    BeladyPolicy,
    EvictionPolicy,
    LFUPolicy,
    LRUPolicy,
    RelevancePolicy,
    ReuseModel,
    SessionHints,
)
from hypervisor.kvpager.tiers import KVPagerError, MemoryTier, NvmeTier, PageWriteError, SlowTier, Tier, TierFull

__all__ = [
    "ARCPolicy", "Access", "BLOCK_TOKENS", "BeladyPolicy", "CostAdmission", "CostChoice", "EvictionPolicy",
    "KVPager", "KVPagerError", "LFUPolicy",
    "LRUPolicy", "MemoryTier", "Move", "NvmeTier", "PageKey", "PageWriteError", "Placement", "PrefixLookup",
    "RelevancePolicy", "RestoreCost", "ReuseModel", "SessionAccessDenied", "SessionHints", "SessionKey", "SlowTier",
    "Tier", "TierFull",
    "UnknownSession",
]
