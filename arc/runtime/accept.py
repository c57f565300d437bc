"""Acceptance of a verified token tree: which drafted tokens the model keeps.

Greedy: walk from the root, following the child whose token is the model's argmax; the tokens
on that path plus the argmax after its last node (the bonus token) are exactly what plain
greedy decoding would produce.

Sampling, as the speculative loop runs it: sample-then-match (`accept_matched`). At each node
the model's token is drawn from the node's distribution with the uniform number of the
sequence position it would fill (arc/runtime/sampling.py `position_uniform`), and the walk
follows the child equal to it. Every emitted token is then exactly the token plain sampling
draws at that position with the same seed, whatever trees were verified, so a seeded run
repeats and equals -O1's. For drafted tokens (deterministic drafts) it accepts as often as
multi-branch rejection sampling does: children c1..cm with probability p(c1) + ... + p(cm).

`settle`: where a target's verify is not the decode step bit for bit (torch, onnx: a matrix
product against a GEMV, in other summation orders), a greedy decision whose two best logits
are closer than `TIE` (scaled by the logits' size) could go the other way in plain decoding;
the walk stops before it and the loop lets a decode step, plain decoding's own computation,
take it. A seeded draw near a boundary that such a difference can move is cut the same way
(arc/runtime/near_draws.py).

`accept_sampled`: multi-branch rejection sampling over the tree (SpecInfer, Miao et al. 2024;
the deterministic-draft case of Chen et al. 2023 / Leviathan et al. 2023), which LANTERN's
relaxed acceptance (arc/runtime/relaxed.py) builds on. At a node with target distribution p
and drafted children c1..cm: accept c_j with probability p(c_j) (renormalized); on rejection
set p(c_j) = 0 and renormalize; if no child is accepted, sample the bonus token from what is
left of p. Each step draws exactly from p, so the output distribution is the model's own
(tested by a chi-square test in tests/runtime/test_speculative.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from arc.runtime.sampling import CutDist, Dist, SamplingParams, dists
from arc.runtime.tree import Tree


def accept_greedy(
    tree: Tree,
    logits: Tensor,
    best: list[int] | None = None,
    instead: Callable[[int, int], int | None] | None = None,
) -> tuple[list[int], list[int]]:
    """(accepted nodes below the root, new tokens incl. the bonus) for verify `logits` [B, V];
    `best`: their argmax per node when the caller has it. `instead(node, argmax)`: a child to
    accept when the argmax has none (relaxed acceptance, arc/runtime/relaxed.py)."""
    best = logits[: len(tree)].argmax(-1).tolist() if best is None else best
    node, path, tokens = 0, [], []
    while True:
        nxt = tree.child(node, best[node])
        if nxt is None and instead is not None and tree.children(node):
            nxt = instead(node, best[node])
        tokens.append(best[node] if nxt is None else tree.tokens[nxt])
        if nxt is None:
            return path, tokens
        path.append(nxt)
        node = nxt


# the smallest gap between a node's two best logits, over max(1, |best logit|), that a verify
# may decide on where the target's verify is not the decode step bit for bit: 30x the largest
# verify-vs-step logit difference so scaled that benchmarks/verify_drift.py measured on
# SmolLM2-135M -O2 (1.0e-5 onnx, 7.4e-6 torch AOT), while its greedy decisions come as close
# as 1.35e-5 (docs/SPECULATIVE.md, "Near ties on the torch and onnx targets")
TIE = 3e-4


def settle(
    path: list[int],
    tokens: list[int],
    probs: list[list[float]],
    best: list[float],
    tie: float = TIE,
) -> tuple[list[int], list[int]]:
    """A greedy walk (path, tokens) cut before its first token whose deciding node's two best
    logits are within tie x max(1, |best logit|) (log p1 - log p2 from the node's top-k
    probabilities `probs`; `best`: each node's largest logit): tokens[i] is decided by node
    ([0] + path)[i]. Returns (path, tokens) kept; where a token was cut, len(tokens) ==
    len(path) and the next step must be a decode step."""

    def settled(node: int) -> bool:
        p1, p2 = probs[node][:2]
        return not (p2 > 0.0 and math.log(p1) - math.log(p2) < tie * max(1.0, abs(best[node])))

    return cut_unsettled(path, tokens, settled)


def cut_unsettled(
    path: list[int], tokens: list[int], settled: Callable[[int], bool]
) -> tuple[list[int], list[int]]:
    """A walk (path, tokens) cut before its first token whose deciding node ([0] + path)[i]
    is not `settled(node)`; where a token was cut, len(tokens) == len(path)."""
    deciders = [0, *path]
    for i in range(len(tokens)):
        if not settled(deciders[i]):
            return path[:i], tokens[:i]
    return path, tokens


def accept_matched(tree: Tree, draw: Callable[[int], int]) -> tuple[list[int], list[int]]:
    """(accepted nodes below the root, new tokens incl. the last draw) by sample-then-match:
    `draw(node)` is the model's token after `node`, drawn from the node's distribution with
    the uniform of the position it fills; the walk follows the child equal to it and stops
    at the first draw no child holds (that draw is the last new token)."""
    node, path, tokens = 0, [], []
    while True:
        token = draw(node)
        tokens.append(token)
        nxt = tree.child(node, token)
        if nxt is None:
            return path, tokens
        path.append(nxt)
        node = nxt


def accept_sampled(
    tree: Tree,
    logits: Tensor,
    params: SamplingParams,
    gen: torch.Generator,
    group: Callable[[Tensor, int], list[int]] | None = None,
    rows: list[Dist | CutDist] | None = None,
) -> tuple[list[int], list[int]]:
    """Like accept_greedy, for sampling: distribution-preserving multi-branch acceptance.
    `group(p, token)`: the tokens whose mass the first child is accepted with (relaxed
    acceptance, arc/runtime/relaxed.py); by default the child alone, exact. `rows`: each
    node's distribution (`dists(logits, params)`) when the caller has them."""
    node, path, tokens = 0, [], []
    while True:
        d = rows[node] if rows is not None else dists(logits[node], params)[0]
        # a copy to take rejected drafts out of (the caller's rows stay the model's); relaxed:
        # dense, since a neighbourhood is a set of vocabulary ids
        if group is None:
            d = d.copy()
        else:
            d = Dist(d.probs(), None, d.row)
        nxt = None
        for i, (token, child) in enumerate(tree.children(node).items()):
            mass = d.mass()
            kept = group(d.w, token) if group is not None and i == 0 else [token]
            u = float(torch.rand((), generator=gen, dtype=torch.float64))
            if mass > 0 and u * mass < sum(d.weight(t) for t in kept):
                nxt = child
                break
            for t in kept:  # rejected: the rest of the weights, renormalized, is the residual
                d.remove(t)
        if nxt is None:
            bonus = d.draw(float(torch.rand((), generator=gen, dtype=torch.float64)))
            tokens.append(int(torch.argmax(d.row)) if bonus is None else bonus)
            return path, tokens
        tokens.append(tree.tokens[nxt])
        path.append(nxt)
        node = nxt
