"""`ngram`: prompt and history lookup (prompt lookup decoding, Saxena 2023; llama.cpp's n-gram
cache). The last n tokens are looked up in everything before them; what followed each earlier
occurrence is a drafted path. Several occurrences with different continuations become several
branches. Longer matches are trusted more; nothing but the token history is read.
"""

from __future__ import annotations

from collections import defaultdict

from arc.runtime.tree import Tree

# draft-side confidence by match length (1..4 tokens) and its decay per drafted token
MATCH_SCORE = {1: 0.25, 2: 0.45, 3: 0.6, 4: 0.7}
DECAY = 0.92
MAX_MATCHES = 6  # most recent occurrences per n-gram that become branches


class NGram:
    name = "ngram"

    def __init__(self, max_n: int = 4):
        self.max_n = max_n
        self._index: dict[tuple[int, ...], list[int]] = defaultdict(list)  # n-gram -> ends
        self._seen: list[int] = []  # the history the index covers

    def _sync(self, history: list[int]) -> None:
        """Index every n-gram (n <= max_n) of `history` by where it ends, incrementally."""
        if history[: len(self._seen)] != self._seen:  # a new request: start over
            self._index.clear()
            self._seen = []
        for end in range(len(self._seen), len(history)):
            for n in range(1, self.max_n + 1):
                if end - n + 1 >= 0:
                    self._index[tuple(history[end - n + 1 : end + 1])].append(end)
        self._seen.extend(history[len(self._seen) :])

    def propose(self, history: list[int], depth: int, budget: int) -> dict:
        self._sync(history)
        out: dict[tuple[int, ...], float] = {}
        last = len(history) - 1
        for n in range(min(self.max_n, len(history)), 0, -1):
            ends = [e for e in self._index.get(tuple(history[-n:]), ()) if e < last]
            for end in reversed(ends[-MAX_MATCHES:]):  # most recent first
                score = MATCH_SCORE[n]
                cont = history[end + 1 : end + 1 + depth]
                for d in range(1, len(cont) + 1):
                    path = tuple(cont[:d])
                    out[path] = max(out.get(path, 0.0), score)
                    score *= DECAY
            if len(out) >= budget:
                break
        return out

    def observe(self, tree: Tree, topk) -> None:
        pass  # the history is all it reads
