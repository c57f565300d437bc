"""Long-context perplexity for `arc eval --long-context N`: what sparse attention costs where it
acts, on a text longer than what it attends to.

Perplexity in cache-sized windows (arc/evaluate.py) never lets a ring cache wrap nor a Quest
decode step choose among many blocks: every window is one dense prefill. Here N tokens of the
corpus are streamed as generation reads them: the first `PREFIX` in one prefill call (logits at
every position), then one decode step per token, each predicting the next; the NLL of every
token after the first is summed. StreamingLLM (Xiao et al. 2023, Section 4) and Quest (Tang et
al. 2024, Section 5) measure perplexity the same way, token by token through the decode path.

The reference is the model with no passes and a dense cache of N slots; the candidate runs the
pipeline's Module: a ring (sink-window) keeps its own small cache, so the text runs far past
it; any other cache is made N slots long before the pipeline runs (block-topk then chooses
among N / block blocks).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

PREFIX = 128  # tokens prefilled at once before decoding one at a time (a prompt)


def stream_nll(s: Any, ids: list[int], first: int, tick: Callable[[], None] = lambda: None):
    """Summed NLL of ids[1:] for Subject `s`: ids[:first] prefilled (it must fit the cache),
    then one decode step per token; `tick()` after each token scored."""
    steps = s.generator.steps
    s.reset()
    tokens = torch.tensor([ids[:first]], dtype=torch.long)  # [1, P]
    pos = torch.arange(first, dtype=torch.long)  # [P]; slots read 0..P-1 (a ring: write = pos)
    with torch.inference_mode():
        logits = s.score(tokens, *((pos, pos, pos) if steps.ring else (pos, pos)))[0]  # [P, V]
        nll = F.cross_entropy(logits[:-1], tokens[0, 1:], reduction="sum").double()
        total = float(nll)
        last = logits[-1]  # predicts ids[first]
        for p in range(first, len(ids)):
            total += float(F.cross_entropy(last[None].double(), torch.tensor([ids[p]])))
            tick()
            if p + 1 < len(ids):
                last = steps.decode(ids[p], p)  # [V]: predicts ids[p + 1]
    return total


def long_context(
    reference: Any, candidate: Any, ids: list[int], tick: Callable[[str], None] = lambda s: None
) -> dict[str, Any]:
    """The `long_context` object of `arc eval --json`: streamed perplexity of `ids` for both
    Subjects and its relative change."""
    first = min(PREFIX, len(ids), reference.max_seq_len, candidate.max_seq_len)
    n = len(ids) - 1
    ref = stream_nll(reference, ids, first, lambda: tick("long context reference")) / n
    cand = stream_nll(candidate, ids, first, lambda: tick("long context passes")) / n
    ref, cand = math.exp(ref), math.exp(cand)
    return {
        "tokens": len(ids),
        "prefix": first,
        "cache": {"reference": reference.max_seq_len, "passes": candidate.max_seq_len},
        "reference": ref,
        "passes": cand,
        "delta_pct": 100.0 * (cand - ref) / ref,
    }
