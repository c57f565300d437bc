"""The rows convention's cache: writes and moves land at the slot dim of either layout."""

from __future__ import annotations

import pytest
import torch

from arc.ir import KVDecl
from arc.runtime.rows import RowCache, row_steps

DECL = KVDecl(layers=2, kv_heads=3, head_dim=4, max_seq_len=16)


@pytest.mark.parametrize("layout", ["heads", "slots"])
def test_write_and_move_hit_the_slots(layout):
    cache = RowCache(DECL, layout=layout)
    if layout == "heads":
        assert cache.tensor.shape == (4, 3, 17, 4)
        rows = torch.randn(4, 3, 2, 4)  # [2N, KV, T, D]
        at = lambda t, s: t[:, :, s]  # noqa: E731
    else:
        assert cache.tensor.shape == (4, 17, 12)
        rows = torch.randn(4, 2, 12)  # [2N, T, KV*D]
        at = lambda t, s: t[:, s]  # noqa: E731
    cache.write(torch.tensor([5, 9]), rows)
    assert torch.equal(at(cache.tensor, 5), at(rows, 0))
    assert torch.equal(at(cache.tensor, 9), at(rows, 1))
    assert at(cache.tensor, 6).abs().sum() == 0
    cache.move(torch.tensor([9]), torch.tensor([6]))
    assert torch.equal(at(cache.tensor, 6), at(rows, 1))
    cache.reset()
    assert cache.tensor.abs().sum() == 0


def test_steps_write_rows_where_each_call_wrote():
    """prefill/decode rows go to `pos`, a verify's to `write`; the function sees the cache."""
    seen = []

    def fn(*args):
        *feeds, cache = args
        seen.append(cache)
        t = feeds[0].shape[1]
        return torch.zeros(1, t, 7), torch.full((4, 3, t, 4), float(t))

    steps = row_steps({"prefill": fn, "decode": fn, "verify_2": fn}, DECL)
    steps.prefill([1, 2, 3], 0)
    steps.decode(4, 3)
    steps.verify([5, 6], [4, 5], [10, 11], torch.ones(2, 12, dtype=torch.bool))
    cache = seen[0]
    assert all(c is cache for c in seen)  # one cache, passed by reference
    assert cache[0, 0, :3].eq(3).all() and cache[0, 0, 3].eq(1).all()
    assert cache[0, 0, 10:12].eq(2).all() and cache[0, 0, 4:10].eq(0).all()
