"""Token Recycling's drafter (arc/runtime/drafters/recycle.py): paths grown from the table by
lookup, best first by the product of recorded probabilities, no longer than MAX_DEPTH."""

from __future__ import annotations

import torch

from arc.runtime.drafters import recycle
from arc.runtime.drafters.recycle import Recycle


def _chain_table(n: int) -> Recycle:
    """Token t is followed by t + 1 with probability 0.99 (and t + 100 with 0.01)."""
    r = Recycle(vocab=1000)
    toks = torch.tensor([[t + 1, t + 100, -1, -1] for t in range(n)])
    probs = torch.tensor([[0.99, 0.01, 0.0, 0.0]] * n)
    r.record(list(range(n)), toks, probs)
    return r


def test_paths_stop_at_max_depth():
    r = _chain_table(20)
    got = r.propose([5, 0], depth=7, budget=7)
    longest = max(got, key=len)
    assert len(longest) == recycle.MAX_DEPTH == 2
    assert longest == (1, 2)
    assert all(p[:-1] in got for p in got if len(p) > 1)  # closed under prefixes
    assert abs(got[(1,)] - 0.99) < 1e-6 and abs(got[(1, 2)] - 0.99**2) < 1e-6


def test_max_depth_zero_follows_the_tree(monkeypatch):
    monkeypatch.setattr(recycle, "MAX_DEPTH", 0)
    got = _chain_table(20).propose([0], depth=7, budget=7)
    assert max(len(p) for p in got) == 7
