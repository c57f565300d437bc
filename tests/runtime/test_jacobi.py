"""The `jacobi` drafter's mechanics against a fake model whose next token depends on the last
one only: the guess is refined by each verify's outputs, the trajectories' n-grams enter the
pool, and once the pool holds the sequence's n-grams whole runs are accepted. (Greedy
identity with a real model, for every drafter: tests/runtime/test_speculative.py.)"""

from __future__ import annotations

import torch

from arc.runtime.drafters.jacobi import Jacobi, N
from arc.runtime.tree import best_first, build

CYCLE = [11, 4, 29, 8, 17, 2, 23]  # the fake model generates this cycle over and over


def _next(token: int) -> int:
    return CYCLE[(CYCLE.index(token) + 1) % len(CYCLE)] if token in CYCLE else CYCLE[0]


def _run(steps: int, depth: int = 4, budget: int = 8):
    """Draft, verify (the fake model's top-2 after every node), accept greedily, commit."""
    drafter, history, accepted = Jacobi(), [40, 41, CYCLE[0]], []
    for _ in range(steps):
        scored = drafter.propose(history, depth, budget)
        tree = build(history[-1], best_first(scored, budget))
        top = torch.tensor([[_next(t), 99] for t in tree.tokens])  # [n, 2]
        drafter.observe(tree, (top, torch.tensor([[0.9, 0.05]] * len(tree))))
        node, new = 0, []
        while (child := tree.child(node, _next(tree.tokens[node]))) is not None:
            node = child
            new.append(tree.tokens[node])
        new.append(_next(tree.tokens[node]))  # the bonus token
        accepted.append(len(new) - 1)
        history += new
    return drafter, history, accepted


def test_output_is_the_model_s_and_runs_are_accepted_once_pooled():
    drafter, history, accepted = _run(30)
    for a, b in zip(history[2:], history[3:], strict=False):
        assert b == _next(a)  # acceptance keeps exactly what the model generates
    assert any(len(rest) == N - 1 for rests in drafter.pool.values() for rest in rests)
    for key, rests in drafter.pool.items():  # pooled n-grams follow the model's trajectories
        for rest in rests:
            assert rest[0] == _next(key)
    assert accepted[:3] == [0, 0, 0]  # nothing pooled yet, guesses not yet refined
    # then most steps accept a pooled n-gram whole (N - 1 tokens; a key the trajectories
    # have not reached yet accepts none)
    assert sum(accepted[-10:]) / 10 >= 2.0


def test_guess_window_stays_full_and_a_new_request_starts_over():
    drafter, _, _ = _run(5, depth=4)
    assert len(drafter.guess) == 4 and len(drafter.trails) == 4
    scored = drafter.propose([7, 7, 7], 4, 8)  # a new request: a new history
    chain = max((p for p in scored if all(t == 7 for t in p)), key=len, default=())
    assert len(chain) == 4  # padded from scratch with the last token
