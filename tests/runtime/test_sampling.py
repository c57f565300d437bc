"""The sampler is numerically safe for every valid setting and refuses invalid ones."""

from __future__ import annotations

import math

import pytest
import torch

from arc.errors import ArcError
from arc.runtime.sampling import SEED_MAX, Dist, Sampler, SamplingParams, dists, filter_logits


def _draws(logits: torch.Tensor, params: SamplingParams, n: int = 50) -> set[int]:
    sample = Sampler(params)
    return {sample(logits) for _ in range(n)}


def test_tiny_temperature_is_the_argmax_not_nan():
    logits = torch.tensor([1.0, 3.0, 2.9999, -5.0])
    for t in (1e-6, 1e-40, 1e-300, 5e-324):
        x = filter_logits(logits, SamplingParams(temperature=t))
        assert not torch.isnan(x).any() and x[1] == 0, (t, x)
        assert _draws(logits, SamplingParams(temperature=t, seed=0)) == {1}


def test_huge_logits_do_not_overflow():
    logits = torch.tensor([3.0e38, -3.0e38, 1.0e38, float("inf"), float("nan")])
    x = filter_logits(logits, SamplingParams(temperature=0.7))
    assert not torch.isnan(x).any()
    assert _draws(logits, SamplingParams(temperature=0.7, seed=1)) == {3}  # the +inf logit
    big = torch.tensor([1e30, 1e30 - 1e24, -1e30])
    assert _draws(big, SamplingParams(temperature=1e-3, seed=2)) <= {0, 1}


def test_tiny_top_p_keeps_the_top_token():
    logits = torch.tensor([0.1, 0.3, 0.2])
    x = filter_logits(logits, SamplingParams(temperature=1.0, top_p=1e-12))
    assert torch.isfinite(x).tolist() == [False, True, False]
    assert _draws(logits, SamplingParams(temperature=1.0, top_p=1e-12, seed=0)) == {1}


def test_all_masked_logits_fall_back_to_argmax():
    logits = torch.full((4,), float("-inf"))
    assert Sampler(SamplingParams(temperature=1.0, seed=0))(logits) in range(4)


def test_filters_work_on_a_batch_of_rows():
    """Speculative sampling filters several positions at once: rows are independent."""
    rows = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0]])
    x = filter_logits(rows, SamplingParams(temperature=1.0, top_k=2))
    assert torch.isfinite(x).tolist() == [[True, True, False, False], [False, False, True, True]]
    one = filter_logits(rows[1], SamplingParams(temperature=1.0, top_p=0.5))
    both = filter_logits(rows, SamplingParams(temperature=1.0, top_p=0.5))
    assert torch.equal(both[1], one) and x.dtype == torch.float32


@pytest.mark.parametrize(
    "params, flag",
    [
        (SamplingParams(temperature=math.nan), "--temperature"),
        (SamplingParams(temperature=math.inf), "--temperature"),
        (SamplingParams(temperature=-1.0), "--temperature"),
        (SamplingParams(top_k=-3), "--top-k"),
        (SamplingParams(top_p=0.0), "--top-p"),
        (SamplingParams(top_p=-0.5), "--top-p"),
        (SamplingParams(top_p=1.5), "--top-p"),
        (SamplingParams(top_p=math.nan), "--top-p"),
        (SamplingParams(seed=-1), "--seed"),
        (SamplingParams(seed=SEED_MAX + 1), "--seed"),
    ],
)
def test_invalid_settings_are_refused(params, flag):
    with pytest.raises(ArcError, match=flag):
        params.validate()
    with pytest.raises(ArcError, match=flag):
        Sampler(params)


def test_extreme_valid_seed_is_accepted():
    for seed in (0, SEED_MAX):
        Sampler(SamplingParams(temperature=1.0, seed=seed))(torch.zeros(5))


def test_greedy_is_torch_argmax_with_ties_and_nan():
    """Greedy picks torch.argmax's token (the first maximal index; NaN counts as the max),
    though it computes it with max(dim)."""
    gen = torch.Generator().manual_seed(0)
    sampler = Sampler(SamplingParams())
    for i in range(300):
        x = torch.randint(-3, 3, (int(torch.randint(2, 400, (1,), generator=gen)),), generator=gen)
        x = x.float()
        if i % 5 == 0:
            x[int(torch.randint(0, len(x), (1,), generator=gen))] = float("nan")
        if i % 13 == 0:
            x[:] = float("-inf")
        assert sampler(x) == int(torch.argmax(x))


def test_greedy_asks_the_targets_argmax_when_given():
    """A target's argmax (Generator passes tvm's logits_stats kernel through
    arc/runtime/topk.argmax_rows) decides greedy steps; sampling does not use it."""
    rows = []

    def argmax(x):
        rows.append(tuple(x.shape))
        return [7]

    logits = torch.zeros(32)
    assert Sampler(SamplingParams(), argmax)(logits) == 7 and rows == [(1, 32)]
    logits[3] = 50.0
    assert Sampler(SamplingParams(temperature=1.0, seed=0), argmax)(logits) == 3
    assert rows == [(1, 32)]


def _reference(rows: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution as filter_logits defines it: float64 softmax of the filtered logits."""
    return torch.softmax(filter_logits(rows.double(), params), dim=-1)


@pytest.mark.parametrize(
    "vocab, scale, params",
    [
        (50, 2.0, SamplingParams(temperature=0.7)),
        (50, 2.0, SamplingParams(temperature=1.3, top_k=5)),
        (50, 2.0, SamplingParams(temperature=1.0, top_p=0.9)),
        (50, 2.0, SamplingParams(temperature=0.8, top_k=20, top_p=0.7)),
        (12800, 6.0, SamplingParams(temperature=1.0, top_p=0.95)),  # in the top 256
        (12800, 3.0, SamplingParams(temperature=1.0, top_p=0.9)),  # in the top 4096
        (12800, 0.05, SamplingParams(temperature=1.0, top_p=0.95)),  # a full sort
        (5000, 3.0, SamplingParams(temperature=0.5, top_k=300, top_p=0.99)),
    ],
)
def test_dists_are_filter_logits_distributions(vocab, scale, params):
    """The fast distributions (float32 weights, top-k by topk, the nucleus among the top 256,
    4096 or all tokens) are filter_logits' softmax: same probabilities to 1e-6 and no weight
    outside its support."""
    gen = torch.Generator().manual_seed(vocab)
    rows = torch.randn(3, vocab, generator=gen) * scale
    want = _reference(rows, params)
    for d, ref in zip(dists(rows, params), want, strict=True):
        got = d.probs()
        assert torch.allclose(got, ref, atol=1e-6, rtol=1e-5), (got - ref).abs().max()
        assert not bool((got[ref == 0] > 0).any())  # nothing outside top-k / the nucleus
        if d.tokens is not None:  # a support: kept in decreasing order of logit
            assert len(d.tokens) == int((ref > 0).sum())


def test_dists_keep_every_tie_of_the_kth_logit():
    """top-k keeps every token tied with the k-th largest logit, as filter_logits' mask does."""
    rows = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0], [5.0, 4.0, 3.0, 2.0, 1.0]])
    params = SamplingParams(temperature=1.0, top_k=2)
    got = [d.probs() for d in dists(rows, params)]
    assert (got[0] > 0).tolist() == [True, True, True, True, False]
    assert (got[1] > 0).tolist() == [True, True, False, False, False]
    assert torch.allclose(torch.stack(got), _reference(rows, params), atol=1e-7)


def test_draws_never_pick_a_token_without_weight():
    d = Dist(torch.tensor([0.0, 1.0, 0.0, 0.0, 2.0, 0.0]), None, torch.zeros(6))
    us = [0.0, 1 - 2**-53, *torch.rand(300, generator=torch.Generator().manual_seed(0)).tolist()]
    assert {d.draw(u) for u in us} == {1, 4}
    assert d.draw(0.0) == 1 and d.draw(1 / 3) == 4 and d.draw(1 - 2**-53) == 4
    sparse = Dist(torch.tensor([0.5, 0.0, 0.25]), torch.tensor([9, 3, 7]), torch.zeros(12))
    assert {sparse.draw(u) for u in us} == {9, 7}
    assert Dist(torch.zeros(3), None, torch.zeros(3)).draw(0.5) is None


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8, seed=3),
        SamplingParams(temperature=1.2, top_k=4, seed=4),
        SamplingParams(temperature=1.0, top_p=0.8, seed=5),
    ],
)
@pytest.mark.parametrize("by_position", [False, True])
def test_sampler_draws_follow_the_distribution(params, by_position):
    """Chi-square over seeded draws of the Sampler against filter_logits' softmax: from its
    stream, and (by_position) with each position's own uniform, as the decoding loops draw."""
    logits = torch.tensor([2.0, 1.5, 0.3, -0.2, 1.1, -1.0, 0.0, 0.7])
    expect = _reference(logits, params).tolist()
    sampler, n = Sampler(params), 20000
    counts = [0] * len(expect)
    for i in range(n):
        counts[sampler(logits, 7 + i if by_position else None)] += 1
    assert all(c == 0 for c, e in zip(counts, expect, strict=True) if e == 0)
    cells = [i for i, e in enumerate(expect) if e * n >= 5]
    chi2 = sum((counts[i] - n * expect[i]) ** 2 / (n * expect[i]) for i in cells)
    df = len(cells) - 1
    critical = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3  # p ~ 0.001
    assert chi2 < critical, (chi2, counts, expect)


def test_position_uniforms_are_uniform_and_keyed():
    """position_uniform: in [0, 1), the same for the same (seed, position), another for
    another seed or position, and evenly spread (deciles of 20000 positions, chi-square)."""
    from arc.runtime.sampling import position_uniform

    us = [position_uniform(123, at) for at in range(20000)]
    assert all(0.0 <= u < 1.0 for u in us) and len(set(us)) == len(us)
    assert us[:50] == [position_uniform(123, at) for at in range(50)]
    other = [position_uniform(124, at) for at in range(20000)]
    assert sum(a == b for a, b in zip(us, other, strict=True)) == 0
    counts = [0] * 10
    for u in us:
        counts[int(u * 10)] += 1
    chi2 = sum((c - 2000) ** 2 / 2000 for c in counts)
    assert chi2 < 27.9  # 9 degrees of freedom, p ~ 0.001
    assert position_uniform(2**64 - 1, 2**40) < 1.0
