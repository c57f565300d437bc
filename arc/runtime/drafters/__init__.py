"""Training-free drafters for speculative decoding: each proposes scored drafted paths.

A drafter's `propose(history, depth, budget)` returns {path: score}: paths are token tuples
that would follow the last committed token, closed under prefixes, with scores in (0, 1] that
do not grow along a path (a draft-side estimate that the model accepts the path). The tree
builder (arc.runtime.tree.best_first) keeps the `budget` best. `observe(tree, topk)` lets a
drafter learn from each verify: `topk` is (tokens, probs) [n, K], the model's top-K after
each tree node.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

from arc.errors import ArcError
from arc.runtime.tree import Tree

Scored = dict[tuple[int, ...], float]
# whether `auto` merges the Jacobi drafter (A/B): it had no token accepted on the 10 benchmark
# prompts (-O2 traces, 2026-12-06), and its proposing and refining cost every drafting step
# ~20-40 us (cold caches after a decode step). Without it: replayed 1.349 vs 1.342x (Intel
# costs, benchmark prompts), 1.240 vs 1.220x (AMD costs), 1.125 / 1.091x vs 1.122 / 1.090x
# (calibration prompts); spec_ab -O2 tvm, 10 prompts x 6 paired, cold: 1.326 vs 1.329x (Intel),
# 1.190 vs 1.173x and 1.166 vs 1.161x (AMD EPYC, two runs). So `auto` leaves it out;
# `draft=jacobi` still runs it alone
AUTO_JACOBI = 0
AUTO_CORPUS = 1  # whether `auto` merges the engine's corpus drafter, where it has one (A/B)


class Drafter(Protocol):
    name: str

    def propose(self, history: list[int], depth: int, budget: int) -> Scored: ...

    def observe(self, tree: Tree, topk: Any) -> None: ...


def load() -> None:
    """Import every drafter's module now (an engine's load), not in a request's first step."""
    from arc.runtime.drafters import auto, corpus, jacobi, ngram, recycle, selfdraft  # noqa: F401


def make(name: str, options: Mapping[str, Any], vocab: int, steps=None) -> Drafter:
    """Drafter `name`; `self` (and `auto`, when the engine has a `draft` function) drafts
    with `steps.draft`; `corpus` (and `auto`, when the engine has one) retrieves from
    `steps.corpus`."""
    from arc.runtime.drafters import auto, corpus, jacobi, ngram, recycle, selfdraft

    static = options.get("shape") == "static"
    has_draft = steps is not None and "draft" in steps.functions
    store = getattr(steps, "corpus", None)  # the engine's datastore (spec-tree{corpus=N})
    if name == "corpus" and store is not None:
        return corpus.Corpus(store)
    if name == "ngram":
        return ngram.NGram()
    if name == "jacobi":
        return jacobi.Jacobi()
    if name == "recycle":
        return recycle.Recycle(vocab, static=static)
    if name == "self" and has_draft:
        return selfdraft.SelfDraft(steps)
    if name == "auto":
        merged = [ngram.NGram(), recycle.Recycle(vocab, static=static)]
        merged += [jacobi.Jacobi()] if AUTO_JACOBI else []
        merged += [corpus.Corpus(store)] if store is not None and AUTO_CORPUS else []
        return auto.Merge(merged + ([selfdraft.SelfDraft(steps)] if has_draft else []))
    raise ArcError(f"drafter {name!r} is not available in this runtime or engine")
