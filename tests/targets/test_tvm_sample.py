"""The tvm target's sampling kernel (targets/tvm_sample.py) against the runtime's float64
reference (`filter_logits`): the nucleus it keeps, the token it draws for a given uniform
(inverse CDF in index order), the masses it reports, rows it leaves to torch, and its draws'
distribution through the Sampler."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("tvm", reason="target tvm needs the [tvm] extra (apache-tvm)")

pytestmark = pytest.mark.extra

VOCAB, CHUNK = 71 * 128, 128  # 71 chunks: the row maximum's vector loop has a tail of 7
K = 4  # top tokens per row (Token Recycling's successors)


@pytest.fixture(scope="module")
def kernel():
    import tvm

    from arc.targets.tvm_sample import sample_rows

    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    mod = tvm.IRModule({"main": sample_rows(VOCAB, CHUNK, K).with_attr("global_symbol", "main")})
    fn = tvm.compile(mod, target=target)["main"]

    def run(x, temperature, top_p, us, top_k=0):
        """out [len(us), 5 + 2K]: row x [V] drawn with each uniform of `us`, or rows x [n, V]
        each with its own."""
        import torch

        rows = x if x.dim() == 2 else x.reshape(1, -1).expand(len(us), -1)
        rows = rows.contiguous()
        cfg = torch.tensor([[temperature, top_p, u, top_k] for u in us], dtype=torch.float64)
        out = torch.zeros(len(us), 5 + 2 * K, dtype=torch.float64)
        args = [rows, cfg, out]
        fn(*[tvm.runtime.from_dlpack(a) for a in args])
        return out

    return run


def _reference(x, temperature, top_p, top_k=0):
    """(kept [V] bool, weights [V] float64 over the kept tokens) by filter_logits."""
    import torch

    from arc.runtime.sampling import SamplingParams, filter_logits

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    f = filter_logits(x.double(), params)
    kept = torch.isfinite(f) & torch.isfinite(x)  # (filter_logits takes -inf as -1.8e308)
    return kept, torch.where(kept, f.exp(), torch.zeros_like(f))


def _rows():
    """Logit rows of several shapes: flat, peaked, a few strong tokens, a masked chunk."""
    import torch

    g = torch.Generator().manual_seed(0)
    for scale in (0.5, 2.0, 5.0, 10.0):
        yield torch.randn(VOCAB, generator=g) * scale
    x = torch.randn(VOCAB, generator=g)
    x[[5, 900, 4000, 9000]] += torch.tensor([9.0, 8.5, 8.0, 7.0])  # a few strong tokens
    x[128:256] = float("-inf")  # a masked chunk
    yield x


@pytest.mark.parametrize("top_k", [0, 1, 40, VOCAB - 1])
@pytest.mark.parametrize("top_p", [1.0, 0.99, 0.9, 0.5, 0.05])
@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5])
def test_nucleus_draws_and_masses_equal_the_reference(kernel, temperature, top_p, top_k):
    """Every token the reference keeps and no other (x >= cut); the drawn token is the first
    whose running sum of kept weights exceeds u * their sum (u = 0, 1 - 2^-53 and random);
    the nucleus mass and the total to float32 rounding; never a token of weight 0. Random
    u's draw the reference's own token (one may differ by rounding at a boundary)."""
    import torch

    us = [0.0, 1 - 2**-53, *torch.rand(30, generator=torch.Generator().manual_seed(1)).tolist()]
    for x in _rows():
        kept, w = _reference(x, temperature, top_p, top_k)
        out = kernel(x, temperature, top_p, us, top_k)
        assert torch.equal((x >= out[0, 2].item()) & (x > -math.inf), kept)
        cdf = torch.cumsum(w, 0)
        got = out[:, 0].long().tolist()
        for u, t in zip(us, got, strict=True):  # the inverse CDF at u, to float32 sums
            r, eps = u * float(cdf[-1]), 2e-6 * float(cdf[-1])
            assert w[t] > 0 and float(cdf[t]) > r - eps and float(cdf[t] - w[t]) <= r + eps
        want = [int(torch.searchsorted(cdf, u * cdf[-1], right=True)) for u in us[2:]]
        assert sum(a == b for a, b in zip(got[2:], want, strict=True)) >= len(want) - 1
        assert out[0, 1].item() == x.max().item()
        assert math.isclose(out[0, 3].item(), float(w.sum()), rel_tol=2e-6)
        total = float(((x.double() - x.max()) / temperature).exp().sum())
        assert math.isclose(out[0, 4].item(), total, rel_tol=2e-6)
        top = torch.topk(x, K).indices  # the successors: by logit, -1 past the nucleus
        want = [int(t) if kept[t] else -1 for t in top]
        assert out[0, 5 : 5 + K].long().tolist() == want
        probs = [float(w[t] / w.sum()) if kept[t] else 0.0 for t in top]
        torch.testing.assert_close(out[0, 5 + K :], torch.tensor(probs).double(), rtol=1e-5, atol=0)


def test_ties_at_the_cut_are_all_kept_and_tiny_temperatures_pick_the_max(kernel):
    """Tokens tied with the last one kept are all kept (a sort keeps some, in an order it
    does not define); with T = 1e-30 the nucleus is the maximal logits only."""
    import torch

    x = torch.full((VOCAB,), -20.0)
    x[[3, 700, 5000]] = 2.0  # three tied top tokens: 1/3 of the mass each
    x[8000] = 1.0
    out = kernel(x, 1.0, 0.5, [0.0, 0.5, 0.99])
    assert (x >= out[0, 2].item()).nonzero().flatten().tolist() == [3, 700, 5000]
    assert out[:, 0].long().tolist() == [3, 700, 5000]
    y = torch.randn(VOCAB, generator=torch.Generator().manual_seed(2))
    out = kernel(y, 1e-30, 0.9, [0.0, 0.999])
    assert out[:, 0].long().tolist() == [int(y.argmax())] * 2


def test_rows_with_nan_inf_or_nothing_finite_are_left_to_torch(kernel):
    import torch

    for bad in ("nan", "inf"):
        x = torch.randn(VOCAB)
        x[1234] = float(bad)
        assert kernel(x, 0.7, 0.9, [0.5])[0, 0].item() == -1
    assert kernel(torch.full((VOCAB,), float("-inf")), 0.7, 1.0, [0.5])[0, 0].item() == -1


def test_sampler_draws_follow_the_distribution(kernel):
    """Sampler.pick with the kernel: chi-square of 20k draws against filter_logits' softmax
    (a biased draw fails it: checked by drawing with u^2); the returned CutDist gives the
    reference probability of any token."""
    import torch

    from arc.runtime.sampling import CutDist, Sampler, SamplingParams

    x = torch.randn(VOCAB, generator=torch.Generator().manual_seed(3))
    x[[10, 20, 30, 40, 50, 60]] += torch.tensor([6.0, 5.5, 5.0, 4.5, 4.0, 3.0])
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=7)
    kept, w = _reference(x, 0.8, 0.9)
    probs = w / w.sum()

    def call(logits, t, p, k, us):
        return kernel(logits, t, p, us, k).tolist()

    def squared(logits, t, p, k, us):
        return kernel(logits, t, p, [u * u for u in us], k).tolist()

    def chi2(fn):
        sampler = Sampler(params, kernel=fn)
        counts = torch.zeros(VOCAB, dtype=torch.float64)
        for _ in range(20000):
            token, d = sampler.pick(x)
            counts[token] += 1
        assert isinstance(d, CutDist)
        return counts, d

    counts, d = chi2(call)
    assert counts[~kept].sum() == 0
    support = kept.nonzero().flatten()
    expected = probs[support] * 20000
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    df = len(support) - 1
    critical = df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3  # p ~ 0.001
    assert stat < critical
    tokens, got = d.top([10, 20, 60, 5])
    assert tokens[:2] == [10, 20]
    for t, q in zip(tokens, got, strict=True):
        want = float(probs[t]) if t >= 0 else 0.0
        assert math.isclose(q, want, rel_tol=1e-5, abs_tol=1e-12)
    counts, _ = chi2(squared)
    biased = float(((counts[support] - expected) ** 2 / expected).sum())
    assert biased > critical


def test_speculative_acceptance_over_kernel_rows_preserves_the_distribution(kernel):
    """Multi-branch acceptance (accept_sampled) over the kernel's rows (CutDist: the kernel's
    own draw at a node with nothing rejected, a residual drawn after a rejection) yields
    two-token outcomes with the model's joint distribution p(a) p(b | a): chi-square."""
    import torch

    from arc.runtime.accept import accept_sampled
    from arc.runtime.sampling import Sampler, SamplingParams, filter_logits
    from arc.runtime.tree import Tree

    g = torch.Generator().manual_seed(0)
    strong = [11, 300, 2000, 4100, 7000, 9000]  # every other token ~30 below: no mass
    logits = torch.full((8, VOCAB), -30.0)
    logits[:, strong] = torch.randn(8, len(strong), generator=g) * 1.5
    tree = Tree(0)
    for path in ([2000, 300], [2000, 7000], [4100, 4100], [9000]):
        tree.add_path(path)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=5)
    probs = filter_logits(logits.double(), params).softmax(-1)
    expect = {}
    for a in strong:
        child = tree.child(0, a)
        for b in strong:
            if child is None:  # a bonus token: nothing after it is sampled this step
                expect[(a,)] = float(probs[0, a])
                continue
            expect[(a, b)] = float(probs[0, a] * probs[child, b])

    def call(x, t, p, k, us):
        return kernel(x, t, p, us, k).tolist()

    sampler = Sampler(params, kernel=call)
    counts, n = dict.fromkeys(expect, 0), 6000
    for _ in range(n):
        rows = sampler.dists(logits)
        _, tokens = accept_sampled(tree, logits, params, sampler.gen, rows=rows)
        key = tuple(tokens[:2]) if tree.child(0, tokens[0]) is not None else (tokens[0],)
        counts[key] += 1
    cells = [k for k in expect if expect[k] * n >= 5]
    chi2 = sum((counts[k] - n * expect[k]) ** 2 / (n * expect[k]) for k in cells)
    df = len(cells) - 1
    assert chi2 < df * (1 - 2 / (9 * df) + 3.09 * math.sqrt(2 / (9 * df))) ** 3, (chi2, df)
