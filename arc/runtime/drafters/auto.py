"""`auto`: the drafters' proposals merged into one tree by score (each path keeps its best
score over the drafters), so prompt lookup's long copies and Token Recycling's short guesses
share one verify budget."""

from __future__ import annotations

from arc.runtime.tree import Tree


class Merge:
    name = "auto"

    def __init__(self, drafters: list):
        self.drafters = drafters

    def propose(self, history: list[int], depth: int, budget: int) -> dict:
        out: dict[tuple[int, ...], float] = {}
        for d in self.drafters:
            for path, score in d.propose(history, depth, budget).items():
                out[path] = max(out.get(path, 0.0), score)
        return out

    def observe(self, tree: Tree, topk) -> None:
        for d in self.drafters:
            d.observe(tree, topk)
