"""The model's top-k successors after each verified node, with their probabilities, cheaply:
Token Recycling (arc/runtime/drafters/recycle.py) records them after every decode step and
every tree node, so on a prompt where nothing drafts this runs once per generated token.

`torch.topk(k=4)` over a 49152-token vocabulary and a full softmax cost ~0.25 ms per row on
one thread (2-3% of a 10 ms decode step). Exact and cheaper: split the vocabulary into chunks
of CHUNK, take each chunk's max (one contiguous pass), keep the k chunks with the largest
maxima, and take the top k of those k * CHUNK logits. Every top-k logit lies in one of those
chunks: the k largest chunk maxima are k distinct logits, so the k-th largest logit v_k is at
least the k-th largest chunk max, and a chunk holding a logit >= v_k has a max >= v_k. The
probabilities are exp(logit - logsumexp) for the k kept only, no [n, V] softmax written.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 128
TOPK = 4  # successors kept per node for Token Recycling (arc/runtime/speculative.py)


def top_successors(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(tokens [n, k] i64, probabilities [n, k] f32) of the k largest of `logits` [n, V], in
    decreasing order (ties in any order)."""
    return argmax_and_successors(logits, k)[1]


def argmax_rows(logits: Tensor, stats=None) -> list[int]:
    """The first maximal index of each row of `logits` [n, V] (torch.argmax's), by the
    target's kernel (`stats`, Steps.logit_stats) where it has one and the row is one it
    answers for (every logit finite or -inf, not all -inf), else by torch's max."""
    if stats is not None:
        best = stats(logits)[0].tolist()
        if min(best) >= 0:
            return best
    return logits.max(dim=-1).indices.tolist()


def argmax_and_successors(
    logits: Tensor, k: int, stats=None
) -> tuple[list[int], tuple[Tensor, Tensor]]:
    """(argmax of each row, exactly torch.argmax's: the first maximal index; top_successors)
    from one pass for the chunk maxima and one for the normalizer: a step's logits have left the
    cache by the time the runtime reads them (the LM head streamed 30 MB after writing its
    first rows), and every pass over them costs ~0.1 ms. `stats` (Steps.logit_stats): a
    target kernel giving the argmax, the top `stats.k` tokens and their probabilities in one
    call (tvm: a decode step's in 0.1 against ~0.33 ms of torch calls, each slowed by the
    caches the step evicted), used unless a row holds a nan or +inf or nothing but -inf
    (its argmax is then -1)."""
    if stats is not None and stats.k == k:
        best, tokens, probs = stats(logits)
        found = best.tolist()
        if min(found) >= 0:
            return found, (tokens, probs)
    x = logits.float()
    n, vocab = x.shape
    if vocab % CHUNK or vocab // CHUNK < 2 * k:  # small or odd vocabularies: plain topk
        top = torch.topk(x, k, dim=-1)
        values, tokens = top.values, top.indices
        best = x.argmax(dim=-1).tolist()
    else:
        chunks = x.view(n, vocab // CHUNK, CHUNK)  # [n, C, CHUNK]
        # amax, not max(dim) with indices: 0.10 against 0.45 ms for 8 rows
        cmax = chunks.amax(dim=-1)  # [n, C]: each chunk's max
        first = cmax.argmax(dim=-1)  # [n]: the first chunk holding the row's max
        rows = torch.arange(n)
        inner = chunks[rows, first].argmax(dim=-1)  # [n]: its first maximal index
        best = (first * CHUNK + inner).tolist()
        ids = torch.topk(cmax, k, dim=-1).indices  # [n, k] chunk ids
        picked = chunks.gather(1, ids[..., None].expand(n, k, CHUNK))  # [n, k, CHUNK]
        top = torch.topk(picked.reshape(n, k * CHUNK), k, dim=-1)
        values = top.values
        tokens = ids.gather(1, top.indices // CHUNK) * CHUNK + top.indices % CHUNK
    # with the row max known: one pass that exponentiates in place (0.30 against
    # torch.logsumexp's 0.38 ms for 8 rows)
    top1 = values[:, :1]  # [n, 1]: the row max
    lse = top1 + (x - top1).exp_().sum(dim=-1, keepdim=True).log()
    probs = torch.exp(values - lse)
    return best, (tokens, probs)
