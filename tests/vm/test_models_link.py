"""The host's model service reached from inside a real guest over its link."""

from __future__ import annotations

from .conftest import Host
from .test_foundation import _run_in_guest


def test_guest_agent_completes_a_prompt_and_embeds_through_the_link(host: Host, guest):
    if host.models.backend is None or host.models.batcher is None:
        import pytest

        pytest.skip(f"model service incomplete here: {host.models.unavailable}")
    out = _run_in_guest(guest, """
from neuraos_agent.models import ModelsClient
with ModelsClient("10.0.2.100:50051", timeout_s=240) as c:
    comp = c.complete("Name one primary colour.", max_tokens=12, session="s1")
    text = "".join(comp)
    print("TEXT", repr(text))
    v = c.embed(["a cat sat on the mat", "a kitten rested on the rug", "quarterly tax filing"])
    print("DIM", v.shape[1])
    print("SIM", float(v[0] @ v[1]) > float(v[0] @ v[2]))
    print("SESSIONS", [s.session for s in c.sessions()])
""")
    assert "TEXT '" in out and "TEXT ''" not in out, out
    assert "DIM 384" in out and "SIM True" in out, out
    assert "SESSIONS ['s1']" in out, out
