"""Seeded draws near a boundary a verify's rounding can move (arc/runtime/near_draws.py): never
settled where a row within the error draws otherwise, and left to a decode step by the loop."""

from __future__ import annotations

import math
import random

import pytest
import torch

from arc.runtime.near_draws import DRAW_ERR, draw_settled
from arc.runtime.sampling import SamplingParams, dists, position_uniform
from arc.runtime.steps import Steps
from tests.runtime.test_speculative import REPEAT, _gen

SETTINGS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=0.5, top_k=5),
    SamplingParams(temperature=1.5, top_k=40, top_p=0.5),
]


def _noises(x, d, j: int, err: float, gen) -> list[torch.Tensor]:
    """Perturbations of row x within err: the worst for the boundaries around entry j and for
    the support's membership (every logit ahead of a boundary, or in the support, up and every
    other one down, and the reverse), and random ones."""
    order = torch.arange(len(x)) if d.tokens is None else d.tokens
    out = []
    for cut in (j, j + 1, len(order)):
        up = torch.full((len(x),), -err, dtype=torch.float64)
        up[order[:cut]] = err
        out += [up, -up]
    for _ in range(4):
        out.append((torch.rand(len(x), generator=gen, dtype=torch.float64) * 2 - 1) * err)
    return out


@pytest.mark.parametrize("p", SETTINGS)
def test_a_settled_draw_is_every_near_rows_draw(p):
    """Rows with planted near ties, uniforms near boundaries: wherever draw_settled says yes,
    every perturbation within the error bound draws the same token; and it says no often
    enough near boundaries to matter. With near_draws._membership answering (0, 0) (no
    membership checks) 3 of the 4 settings fail."""
    gen, rng = torch.Generator().manual_seed(0), random.Random(0)
    unsettled = 0
    for _ in range(150):
        vocab, scale = rng.choice([50, 300]), rng.choice([0.5, 3.0, 20.0])
        x = torch.randn(vocab, generator=gen) * scale
        i, k = rng.randrange(vocab), rng.randrange(vocab)
        x[k] = x[i] + rng.uniform(-1, 1) * 1e-4 * scale  # a near tie somewhere
        d = dists(x[None], p)[0]
        cdf = torch.cumsum(d.w.double(), 0) / d.w.double().sum()
        for _ in range(4):
            u = min(
                max(float(cdf[rng.randrange(len(cdf))]) + rng.uniform(-1, 1) * 1e-3, 0.0), 0.999
            )
            token = d.draw(u)
            if not draw_settled(d, u, p):
                unsettled += 1
                continue
            j = min(int(torch.searchsorted(cdf, u, right=True)), len(cdf) - 1)
            err = DRAW_ERR * max(1.0, float(x.max().abs()))
            for noise in _noises(x, d, j, err, gen):
                y = (x.double() + noise).float()
                assert dists(y[None], p)[0].draw(u) == token, (p, u)
    assert unsettled > 20


def test_a_nucleus_edge_moves_no_settled_draw():
    """top-p set within a row's reach of a cumulative sum, so tokens may join or leave the
    nucleus: a settled draw stays under every perturbation that moves the edge (each sorted
    prefix up and the rest down, and the reverse). Ignoring the join / leave widening
    (near_draws._membership answering 0, 0) fails here."""
    gen, rng = torch.Generator().manual_seed(1), random.Random(1)
    for _ in range(300):
        vocab, scale, temp = rng.choice([30, 200]), rng.choice([1.0, 3.0, 20.0]), 0.5
        x = torch.randn(vocab, generator=gen) * scale
        w, _ = torch.sort(torch.exp((x.double() - x.max()) / temp), descending=True)
        edge = float(torch.cumsum(w, 0)[rng.randrange(min(vocab - 1, 20))] / w.sum())
        top_p = min(max(edge + rng.uniform(-1, 1) * 3e-3, 1e-3), 0.999)
        p = SamplingParams(temperature=temp, top_p=top_p)
        d = dists(x[None], p)[0]
        err = DRAW_ERR * max(1.0, float(x.max().abs()))
        ranked = torch.argsort(x, descending=True)
        for _ in range(4):
            u = rng.random()
            if not draw_settled(d, u, p):
                continue
            token = d.draw(u)
            for cut in range(max(0, len(d.w) - 3), min(vocab, len(d.w) + 4)):
                up = torch.full((vocab,), -err, dtype=torch.float64)
                up[ranked[:cut]] = err
                for noise in (up, -up):
                    y = (x.double() + noise).float()
                    assert dists(y[None], p)[0].draw(u) == token, (p, u)


def test_draws_far_from_boundaries_are_settled():
    p = SamplingParams(temperature=1.0)
    x = torch.tensor([0.0, math.log(3.0), -1e4])  # weights 1 : 3 : 0, boundary at 0.25
    d = dists(x[None], p)[0]
    assert draw_settled(d, 0.1, p) and draw_settled(d, 0.6, p)
    assert not draw_settled(d, 0.25 + 1e-6, p) and not draw_settled(d, 0.25 - 1e-6, p)
    nan = dists(torch.tensor([[0.0, float("nan")]]), p)[0]  # the float64 path: a decode step's
    assert not draw_settled(nan, 0.1, p)


class _Boundary(Steps):
    """Steps whose decode and verify draw differently where u sits on a boundary: after the
    token at every slot s with s % 3 == 0, the row holds two tokens (the row's two best) whose
    cumulative boundary lies GAP (in logit) either side of the uniform of position s + 1, the
    decode step's one way and a verify's the other."""

    GAP = 2e-5  # below DRAW_ERR's bound (the tiny model's logits are below 1)
    seed, temperature = 7, 0.5

    def _plant(self, row, slot: int, sign: float) -> None:
        if slot % 3:
            return
        u = position_uniform(self.seed, slot + 1)
        a, b = sorted(row.topk(2).indices.tolist())
        row.fill_(-1e4)
        row[a] = 0.0  # weights 1 : (1 - u) / u e^{sign GAP / T}: a drawn iff its share > u
        row[b] = self.temperature * math.log((1 - u) / u) + sign * self.GAP

    def decode(self, token, pos):
        logits = super().decode(token, pos).clone()
        self._plant(logits, pos, -1.0)
        return logits

    def verify_tree(self, tree, prefix, size):
        logits = super().verify_tree(tree, prefix, size).clone()
        for node, depth in enumerate(tree.depths[: len(tree)]):
            self._plant(logits[node], prefix + depth, 1.0)
        return logits


def test_boundary_draws_are_left_to_a_decode_step(traced):
    """Where a target's verify is not the decode step bit for bit (torch, onnx), a seeded draw
    whose uniform lies within the verify's rounding of a boundary is not the verify's: the
    walk stops before it and a decode step draws it, so a seeded run is still plain sampling's.
    Without the rule (a verify said to be exact) those draws go the verify's way."""
    spec = "kv-fusion,spec-tree{draft=ngram,budget=7,depth=6,adaptive=false}"
    gen, tok = _gen(traced, "tiny-llama", spec, steps_class=_Boundary)
    steps, ids = gen.steps, tok.encode(REPEAT)
    kw = {
        "max_new_tokens": 90,
        "ignore_eos": True,
        "sampling": SamplingParams(temperature=_Boundary.temperature, seed=_Boundary.seed),
    }
    with torch.inference_mode():
        plain = gen.generate(ids, speculative=False, **kw)
        spec_run = gen.generate(ids, **kw)
        steps.verify_exact = True
        gen.forget()
        trusted = gen.generate(ids, **kw)
    assert spec_run.token_ids == plain.token_ids
    assert spec_run.verify_passes > 0 and trusted.verify_passes > 0
    assert trusted.token_ids != plain.token_ids
