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


def top_successors(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(tokens [n, k] i64, probabilities [n, k] f32) of the k largest of `logits` [n, V], in
    decreasing order (ties in any order)."""
    x = logits.float()
    n, vocab = x.shape
    if vocab % CHUNK or vocab // CHUNK < 2 * k:  # small or odd vocabularies: plain topk
        top = torch.topk(x, k, dim=-1)
        values, tokens = top.values, top.indices
    else:
        chunks = x.view(n, vocab // CHUNK, CHUNK)  # [n, C, CHUNK]
        best = torch.topk(chunks.amax(dim=-1), k, dim=-1).indices  # [n, k] chunk ids
        picked = chunks.gather(1, best[..., None].expand(n, k, CHUNK))  # [n, k, CHUNK]
        top = torch.topk(picked.reshape(n, k * CHUNK), k, dim=-1)
        values = top.values
        tokens = best.gather(1, top.indices // CHUNK) * CHUNK + top.indices % CHUNK
    probs = torch.exp(values - torch.logsumexp(x, dim=-1, keepdim=True))
    return tokens, probs
