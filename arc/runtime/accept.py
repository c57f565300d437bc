"""Acceptance of a verified token tree: which drafted tokens the model keeps.

Greedy: walk from the root, following the child whose token is the model's argmax; the tokens
on that path plus the argmax after its last node (the bonus token) are exactly what plain
greedy decoding would produce.

Sampling: multi-branch rejection sampling over the tree (SpecInfer, Miao et al. 2024; the
deterministic-draft case of Chen et al. 2023 / Leviathan et al. 2023). At a node with target
distribution p and drafted children c1..cm: accept c_j with probability p(c_j) (renormalized);
on rejection set p(c_j) = 0 and renormalize; if no child is accepted, sample the bonus token
from what is left of p. Each step draws exactly from p, so the output distribution is the
model's own (tested by a chi-square test in tests/runtime/test_speculative.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from arc.runtime.sampling import SamplingParams, filter_logits
from arc.runtime.tree import Tree


def accept_greedy(
    tree: Tree, logits: Tensor, best: list[int] | None = None
) -> tuple[list[int], list[int]]:
    """(accepted nodes below the root, new tokens incl. the bonus) for verify `logits` [B, V];
    `best`: their argmax per node when the caller has it."""
    best = logits[: len(tree)].argmax(-1).tolist() if best is None else best
    node, path, tokens = 0, [], []
    while True:
        tokens.append(best[node])
        nxt = tree.child(node, best[node])
        if nxt is None:
            return path, tokens
        path.append(nxt)
        node = nxt


def accept_sampled(
    tree: Tree, logits: Tensor, params: SamplingParams, gen: torch.Generator
) -> tuple[list[int], list[int]]:
    """Like accept_greedy, for sampling: distribution-preserving multi-branch acceptance."""
    node, path, tokens = 0, [], []
    while True:
        p = torch.softmax(filter_logits(logits[node].double().cpu(), params), dim=-1)
        nxt = None
        for token, child in tree.children(node).items():
            mass = float(p.sum())
            u = float(torch.rand((), generator=gen, dtype=torch.float64))
            if mass > 0 and u * mass < float(p[token]):
                nxt = child
                break
            p[token] = 0.0  # rejected: the rest of p, renormalized, is the residual
        if nxt is None:
            tokens.append(int(torch.multinomial(p / p.sum(), 1, generator=gen)))
            return path, tokens
        tokens.append(tree.tokens[nxt])
        path.append(nxt)
        node = nxt
