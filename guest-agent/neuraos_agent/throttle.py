"""How long the host asks us to wait when it throttles a model call.

The host's model service refuses an over-quota call with RESOURCE_EXHAUSTED and a message
ending "retry in N s"; every caller in the agent reads it the same way, from here.
Dependency-free, so the RLM client can use it in processes that never load the link stubs.
"""

from __future__ import annotations

import re

_RETRY_IN = re.compile(r"retry in ([0-9.]+)\s*s")


def retry_after_s(code: str, message: str) -> float | None:
    """The seconds the host named for a RESOURCE_EXHAUSTED refusal; None if it named none or is not throttling."""
    if code != "RESOURCE_EXHAUSTED":
        return None
    m = _RETRY_IN.search(message)
    return float(m.group(1)) if m else None
