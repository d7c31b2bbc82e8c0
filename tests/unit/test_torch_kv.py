"""KV state of a transformers model round-trips through pager pages without changing the answer."""

from __future__ import annotations

import pytest
import torch

from benchmarks.kvpager_gpu import build
from hypervisor.inference.torch_kv import PageShapeError, cache_tokens, from_pages, to_pages


@pytest.fixture(scope="module")
def tiny():
    return build("tiny", "cpu", torch.float32, seed=0)


def test_restored_cache_gives_the_same_next_token_logits_as_a_full_prefill(tiny):
    model, layout = tiny
    hist = torch.randint(0, 512, (1, 1100))
    turn = torch.randint(0, 512, (1, 7))
    with torch.inference_mode():
        cache = model(input_ids=hist, use_cache=True).past_key_values
        pages = to_pages(cache, layout, block_tokens=512)
        assert [len(p) // layout.bytes_per_token for p in pages] == [512, 512, 76]
        restored = from_pages(pages, layout, "cpu")
        assert cache_tokens(restored) == 1100
        got = model(input_ids=turn, past_key_values=restored, use_cache=True).logits[0, -1]
        ref = model(input_ids=torch.cat([hist, turn], 1), use_cache=True).logits[0, -1]
    assert torch.allclose(got, ref, atol=1e-4)
    # Another session's pages change the answer: the check above can fail.
    with torch.inference_mode():
        other = model(input_ids=torch.randint(0, 512, (1, 1100)), use_cache=True).past_key_values
        mixed = from_pages(to_pages(other, layout)[:2] + pages[2:], layout, "cpu")
        bad = model(input_ids=turn, past_key_values=mixed, use_cache=True).logits[0, -1]
    assert not torch.allclose(bad, ref, atol=1e-4)


def test_a_page_of_the_wrong_size_is_refused_with_a_clear_error(tiny):
    _, layout = tiny
    with pytest.raises(PageShapeError, match="not a whole number"):
        from_pages([b"\0" * (layout.bytes_per_token + 3)], layout, "cpu")
