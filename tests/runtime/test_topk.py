"""arc.runtime.topk: the chunked top-k equals torch.topk and a full softmax, on vocabularies
it chunks (49152, as SmolLM2's) and ones it does not (a tiny model's, an odd size)."""

from __future__ import annotations

import pytest
import torch

from arc.runtime.topk import top_successors


@pytest.mark.parametrize("vocab", [49152, 1024, 1000, 300])
@pytest.mark.parametrize("rows", [1, 8])
def test_equals_topk_and_softmax(vocab, rows):
    gen = torch.Generator().manual_seed(vocab + rows)
    x = torch.randn(rows, vocab, generator=gen) * 4
    x[0, 7] = x[0, 8] = x.max() + 1  # the top two in one chunk
    tokens, probs = top_successors(x, 4)
    ref = torch.topk(x, 4, dim=-1)
    assert torch.equal(torch.sort(tokens[:, :2]).values, torch.sort(ref.indices[:, :2]).values)
    assert torch.equal(x.gather(1, tokens), ref.values)  # the same values in the same order
    # the reference in float64: torch's own fp32 softmax is off by up to 1.9e-5 relative here
    # with its AVX2 kernels (9e-6 with AVX-512), ours by under 1e-6
    full = torch.softmax(x.double(), dim=-1).gather(1, tokens)
    torch.testing.assert_close(probs.double(), full, rtol=2e-6, atol=1e-9)


def test_all_top_logits_in_one_chunk():
    x = torch.full((1, 49152), -5.0)
    x[0, 1000:1004] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    x[0, 40000] = 0.5  # the next best, in another chunk, must not displace them
    tokens, _ = top_successors(x, 4)
    assert tokens.tolist() == [[1000, 1001, 1002, 1003]]


@pytest.mark.parametrize("vocab", [49152, 1000])
def test_argmax_is_torch_s_first_maximal_index(vocab):
    from arc.runtime.topk import argmax_and_successors

    x = torch.randn(6, vocab, generator=torch.Generator().manual_seed(1))
    x[1, 900] = x[1, 5] = x[1].max() + 1  # a tie in two chunks: the first index wins
    x[2, 3] = x[2, 2] = x[2].max() + 1  # a tie in one chunk
    x[3] = 0.0  # all equal
    best, (tokens, _) = argmax_and_successors(x, 4)
    assert best == x.argmax(-1).tolist()
    assert best[1] == 5 and best[2] == 2 and best[3] == 0
    assert torch.equal(x.gather(1, tokens[:, :1]).reshape(-1), x.max(-1).values)


def test_target_stats_give_the_same_tokens_and_probabilities():
    """`stats` (a target's kernel: argmax, top-k tokens and probabilities, tvm's logits_stats)
    in place of the torch passes: used as it answers when its k is the one asked for."""
    import torch

    from arc.runtime.topk import CHUNK, argmax_and_successors

    x = torch.randn(5, 64 * CHUNK) * 4
    x[2, 3 * CHUNK + 7] = x[2].max() + 1  # a clear max
    x[3, 10] = x[3, 5000] = x[3].max() + 2  # a tie: the first index wins
    best, (tok, p) = argmax_and_successors(x, 4)
    assert best == x.argmax(-1).tolist()

    class Stats:
        k, calls = 4, 0

        def __call__(self, t):
            self.calls += 1
            return t.argmax(-1), tok, p

    stats = Stats()
    best2, (tok2, p2) = argmax_and_successors(x, 4, stats)
    assert stats.calls == 1 and best2 == best and tok2 is tok and p2 is p
    argmax_and_successors(x, 3, stats)  # another k: torch passes, not the kernel
    assert stats.calls == 1


def test_a_row_the_target_kernel_leaves_goes_to_torch():
    """The kernel's argmax is -1 for a row with a nan, +inf or only -inf: argmax_rows and
    argmax_and_successors then take torch's answer (a nan is torch's maximum), not -1."""
    import torch

    from arc.runtime.topk import CHUNK, argmax_and_successors, argmax_rows

    x = torch.randn(3, 8 * CHUNK)
    x[1, 700] = float("nan")

    class Stats:
        k = 4

        def __call__(self, t):
            best = torch.where(torch.isnan(t).any(-1), -1, t.argmax(-1))
            return best, torch.zeros(t.shape[0], 4, dtype=torch.long), torch.zeros(t.shape[0], 4)

    stats = Stats()
    assert argmax_rows(x, stats) == x.argmax(-1).tolist() == argmax_rows(x)
    assert argmax_rows(x, stats)[1] == 700
    assert argmax_rows(x[:1], stats) == [int(x[0].argmax())]
    best, (tokens, _) = argmax_and_successors(x, 4, stats)
    assert best == x.argmax(-1).tolist() and tokens[0].tolist() == x[0].topk(4).indices.tolist()
