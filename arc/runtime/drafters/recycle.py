"""`recycle`: Token Recycling (Luo et al. 2024, "Turning Trash into Treasure: Accelerating
Inference of Large Language Models with Token Recycling").

Every verify computes the model's distribution after each tree node; plain speculative decoding
throws all but the accepted ones away. Here the top-k candidates after each node's token are
kept in an adjacency table over the vocabulary (token -> its k likeliest successors, with
their probabilities), newest observation wins. A draft tree is then grown from the last token
by lookup alone, no extra forward: best-first by the product of recorded probabilities along a
path (EAGLE-2's dynamic tree with draft-side scores), or, with `static`, by fixed rank priors
(the same tree shape every step, as the paper's static template). The table persists across
requests of one engine (a hot start).
"""

from __future__ import annotations

import heapq

import torch

from arc.runtime.tree import Tree

K = 4  # successors kept per token
RANK_PRIOR = (0.6, 0.2, 0.1, 0.05)  # static trees: score of the r-th successor


class Recycle:
    name = "recycle"

    def __init__(self, vocab: int, static: bool = False):
        self.next = torch.full((vocab, K), -1, dtype=torch.long)  # [V, K] successor tokens
        self.prob = torch.zeros(vocab, K)  # [V, K] their probabilities when last seen
        self.static = static
        self._cache: dict[int, list[tuple[int, float]]] = {}

    def successors(self, token: int) -> list[tuple[int, float]]:
        got = self._cache.get(token)
        if got is None:
            toks, probs = self.next[token].tolist(), self.prob[token].tolist()
            got = [
                (t, RANK_PRIOR[r] if self.static else p)
                for r, (t, p) in enumerate(zip(toks, probs, strict=True))
                if t >= 0
            ]
            self._cache[token] = got
        return got

    def propose(self, history: list[int], depth: int, budget: int) -> dict:
        out: dict[tuple[int, ...], float] = {}
        heap = [(-1.0, ())]
        while heap and len(out) < budget:
            neg, path = heapq.heappop(heap)
            if path:
                out[path] = -neg
            if len(path) >= depth:
                continue
            last = path[-1] if path else history[-1]
            for tok, p in self.successors(last):
                heapq.heappush(heap, (neg * p, (*path, tok)))
        return out

    def record(self, tokens: list[int], top_tokens: torch.Tensor, top_probs: torch.Tensor):
        """The model's top-K successors [n, K] (and probabilities) after each of `tokens`."""
        idx = torch.tensor(tokens, dtype=torch.long)
        self.next[idx] = top_tokens
        self.prob[idx] = top_probs
        for t in tokens:
            self._cache.pop(t, None)

    def observe(self, tree: Tree, topk) -> None:
        tokens, probs = topk
        self.record(tree.tokens, tokens[: len(tree)], probs[: len(tree)])
