"""A token tree for one speculative verify: nodes, parents, depths, the tree mask.

Node 0 is the root: the last committed token, whose K/V is not in the cache yet. Every other
node is a drafted token whose parent is the token before it. One verify forward runs all nodes;
node i writes its K/V to scratch slot `prefix + i`, sits at position `prefix + depth(i)`, and
attends to the committed prefix and to its own ancestors (SpecInfer's tree attention, Miao et
al. 2024). Paths of the tree are the drafted continuations; siblings are alternatives.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor


class Tree:
    def __init__(self, root: int):
        self.tokens: list[int] = [root]
        self.parents: list[int] = [-1]
        self.depths: list[int] = [0]
        self._children: list[dict[int, int]] = [{}]  # node -> {token: child node}

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int) -> int:
        """The child of `parent` holding `token` (added if new)."""
        known = self._children[parent].get(token)
        if known is not None:
            return known
        self.tokens.append(token)
        self.parents.append(parent)
        self.depths.append(self.depths[parent] + 1)
        self._children.append({})
        node = len(self.tokens) - 1
        self._children[parent][token] = node
        return node

    def add_path(self, tokens: Iterable[int]) -> int:
        node = 0
        for t in tokens:
            node = self.add(node, t)
        return node

    def child(self, node: int, token: int) -> int | None:
        return self._children[node].get(token)

    def children(self, node: int) -> Mapping[int, int]:
        """{token: child node}, in the order the children were added (best first)."""
        return self._children[node]

    def ancestors(self, node: int) -> list[int]:
        """`node` and its ancestors up to the root, deepest first."""
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out

    def feeds(self, prefix: int, size: int) -> tuple[list[int], list[int], list[int], list]:
        """(tokens, pos, write, among) for a verify of `size` >= len(self) nodes at cache
        length `prefix`, as lists: `among` [B][B] holds 1 where a node sees another (its
        ancestors and itself). Rows past the tree are padding that sees only itself."""
        n = len(self)
        tokens = self.tokens + [self.tokens[0]] * (size - n)
        pos = [prefix + d for d in self.depths] + [prefix] * (size - n)
        write = [prefix + i for i in range(size)]
        among = [[0] * size for _ in range(size)]  # [B, B]: a node sees its ancestors
        for i in range(n):
            for a in self.ancestors(i):
                among[i][a] = 1
        for i in range(n, size):
            among[i][i] = 1
        return tokens, pos, write, among

    def inputs(self, prefix: int, size: int) -> tuple[list[int], list[int], list[int], Tensor]:
        """(tokens, pos, write, visible) for a verify of `size` >= len(self) nodes at cache
        length `prefix` (`feeds`), `visible` [B, prefix + B] over the cache and the nodes.
        (The speculative loop fills Steps' own buffers instead: Steps.verify_tree.)"""
        tokens, pos, write, among = self.feeds(prefix, size)
        # built as lists, then two tensors: an indexed assignment per node cost ~10 us each
        seen = torch.ones(size, prefix, dtype=torch.bool)  # [B, prefix]: the cache
        visible = torch.cat([seen, torch.tensor(among, dtype=torch.bool)], dim=1)
        return tokens, pos, write, visible  # visible: [B, prefix + B]


def best_first(scored: Mapping[tuple[int, ...], float], budget: int) -> list[tuple[int, ...]]:
    """The `budget` best drafted paths by score, closed under prefixes.

    Scores must not grow along a path (a path's score is at most its parent's), as draft
    confidences multiplied along a path do; ties go to the shorter path, so a parent always
    comes before its children (EAGLE-2's top-k selection over the whole draft tree).
    """
    order = sorted(scored, key=lambda p: (-scored[p], len(p), p))
    chosen: list[tuple[int, ...]] = []
    have: set[tuple[int, ...]] = {()}
    for path in order:
        if len(chosen) >= budget:
            break
        if path[:-1] in have and path not in have:
            chosen.append(path)
            have.add(path)
    return chosen


def build(root: int, paths: Iterable[tuple[int, ...]]) -> Tree:
    tree = Tree(root)
    for p in paths:
        tree.add_path(p)
    return tree
