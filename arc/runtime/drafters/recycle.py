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
# longest path drafted (0: the tree's depth): the table's successors were seen in other
# contexts, so a chain of them is right ever less often (a cold table's top chain on the
# calibration prompts: 0.24-0.54 right as a first token, 0.33-0.84 as a later one), while
# its recorded probabilities stay high; with spec-tree's depth at the budget (7), such chains
# filled 8-node verifies on chat and instruction prompts that yielded 1-2 tokens. spec_ab,
# -O2 tvm, 10 prompts paired with plain, cold, two runs: geomean 1.301 / 1.307x at 4 against
# 1.269 / 1.292x unlimited (3: 1.297x, 2: 1.323x, one run each), instruction 2 0.955 ->
# 0.997x and 0.962 -> 0.968x (2026-12-05, Intel Xeon). 2 with prompt lookup's SHAPE and the
# loop's WAKE (2026-12-06): replayed (benchmarks/spec_sim.py) 1.342 against 1.318x at 4
# (benchmark prompts), 1.155 against 1.139x (calibration prompts); 1: 1.341 / 1.158x
MAX_DEPTH = 2
RANK_PRIOR = (0.6, 0.2, 0.1, 0.05)  # static trees: score of the r-th successor


class Recycle:
    name = "recycle"

    def __init__(self, vocab: int, static: bool = False):
        # token -> its K likeliest successors when last seen, (token, probability) by rank; a
        # dict, not [V, K] tensors: recording a node is then two small .tolist() calls, not
        # indexed writes (each torch call right after a step runs on caches it evicted)
        self.table: dict[int, list[tuple[int, float]]] = {}
        self.static = static

    def successors(self, token: int) -> list[tuple[int, float]]:
        got = self.table.get(token, [])
        if self.static:
            return [(t, RANK_PRIOR[r]) for r, (t, _) in enumerate(got)]
        return got

    def propose(self, history: list[int], depth: int, budget: int) -> dict:
        depth = min(depth, MAX_DEPTH) if MAX_DEPTH else depth
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
        rows = zip(tokens, top_tokens[:, :K].tolist(), top_probs[:, :K].tolist(), strict=True)
        for token, toks, probs in rows:
            self.table[token] = [(t, p) for t, p in zip(toks, probs, strict=True) if t >= 0]

    def observe(self, tree: Tree, topk) -> None:
        tokens, probs = topk
        self.record(tree.tokens, tokens[: len(tree)], probs[: len(tree)])
