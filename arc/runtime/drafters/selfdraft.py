"""`self`: self-speculative drafting with the model's own layer-skipped `draft` function
(Draft & Verify, Zhang et al. 2024; SWIFT, Xia et al. 2024; LayerSkip, Elhoushi et al. 2024).

layer-skip{mode=draft} adds `draft`: `decode` through a subset of the layers, sharing the
weights and the KV cache. From the last committed token (not yet in the cache, at slot `pos`)
the drafter runs `draft` greedily: token i goes to slot pos + i and yields the next token,
for up to `depth` tokens, stopping early once the path's confidence (the product of the
draft's top probabilities) falls below STOP. The second most likely token at each of the
first BRANCH_DEPTHS depths becomes a sibling branch, scored by the same product, so the tree
covers the draft's near-ties at no extra draft step.

The draft writes K/V only for the layers it runs, at slots from `pos` on: slots the verify
that follows rewrites for every layer (each tree node writes its own scratch slot, and the
chain's nodes are the first ones), and that no step reads before they are rewritten (a step
reads slots below its own position), so the full model's cache stays its own.

Cost: each draft token is a forward through the kept layers, a large fraction of a decode
step; the speculative loop counts the draft time in the tree's cost (arc.runtime.speculative)
and falls back to plain steps, drafting only for its periodic probes, when it does not pay.
"""

from __future__ import annotations

import torch

from arc.runtime.tree import Tree

STOP = 0.3  # stop drafting once the path's confidence falls below this
BRANCH_DEPTHS = 2  # depths whose second choice becomes a sibling branch


class SelfDraft:
    name = "self"
    expensive = True  # each proposal runs the model: the loop skips it when plain steps win

    def __init__(self, steps):
        self.steps = steps
        self.pos: int | None = None  # the last committed token's slot; set by the loop
        self.forwards = 0  # draft-function forwards run so far

    def propose(self, history: list[int], depth: int, budget: int) -> dict:
        pos = len(history) - 1 if self.pos is None else self.pos
        room = self.steps.max_seq_len - pos  # draft token i writes slot pos + i
        out: dict[tuple[int, ...], float] = {}
        path, score, token = (), 1.0, history[-1]
        for i in range(min(depth, room - 1)):
            probs = torch.softmax(self.steps.draft(token, pos + i).float(), dim=-1)  # [V]
            self.forwards += 1
            top = torch.topk(probs, 2)
            best, second = (int(t) for t in top.indices)
            p_best, p_second = (float(p) for p in top.values)
            if i < BRANCH_DEPTHS:
                out[(*path, second)] = score * p_second
            score *= p_best
            path = (*path, best)
            out[path] = score
            token = best
            if score < STOP or len(out) >= budget:
                break
        return out

    def observe(self, tree: Tree, topk) -> None:  # drafts from the model itself
        return None
