"""`auto`: the drafters' proposals merged into one tree by score (each path keeps its best
score over the drafters), so prompt lookup's long copies and Token Recycling's short guesses
share one verify budget; a `fallback` drafter (the engine's corpus) is asked only where the
others draft little."""

from __future__ import annotations

from arc.runtime.tree import Tree

# a fallback drafter (the corpus) drafts only when the others' best next-token score is below
# this: where the request holds a copy, prompt lookup's drafts are the ones accepted, and the
# corpus's took tree nodes from them (code prompts lost 2-6%). spec_ab, -O2 tvm engine with a
# 600-question corpus, 10 benchmark prompts x 4 paired with plain, cold (2026-12-06, AMD EPYC):
# geomean 1.203x at 0.5, 1.197x at 0.3, 1.173x always asked, 1.187x without the corpus
FALLBACK_BELOW = 0.5


class Merge:
    name = "auto"

    def __init__(self, drafters: list):
        self.drafters = drafters
        self.sources: dict[tuple[int, ...], str] = {}  # of the last proposal
        self.expensive = any(getattr(d, "expensive", False) for d in drafters)

    @property
    def forwards(self) -> int:
        """Model forwards the drafters ran (the `self` drafter's draft steps)."""
        return sum(getattr(d, "forwards", 0) for d in self.drafters)

    @property
    def pos(self) -> int | None:
        return next((d.pos for d in self.drafters if hasattr(d, "pos")), None)

    @pos.setter
    def pos(self, value: int | None) -> None:
        for d in self.drafters:
            if hasattr(d, "pos"):
                d.pos = value

    def propose(self, history: list[int], depth: int, budget: int) -> dict:
        out: dict[tuple[int, ...], float] = {}
        self.sources = {}  # path -> the drafter of its best score
        best = 0.0  # the best first-token score so far
        for d in self.drafters:
            if getattr(d, "fallback", False) and best >= FALLBACK_BELOW:
                continue  # the others have a good draft: a fallback's would crowd it
            for path, score in d.propose(history, depth, budget).items():
                if len(path) == 1:
                    best = max(best, score)
                if path not in out or score > out[path]:
                    out[path], self.sources[path] = score, d.name
        return out

    def hint(self, history: list[int]) -> float:
        """The best next-token score of the drafters that can tell it cheaply."""
        return max((d.hint(history) for d in self.drafters if hasattr(d, "hint")), default=0.0)

    def observe(self, tree: Tree, topk) -> None:
        for d in self.drafters:
            d.observe(tree, topk)
