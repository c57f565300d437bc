"""`corpus`: drafts retrieved from a datastore of text the model wrote before (REST: Retrieval-
Based Speculative Decoding, He et al. 2023; the trie of earlier prompts and answers in
Lookahead, Zhao et al. 2023, "Lookahead: An Inference Acceleration Framework for Large
Language Model with Lossless Generation Accuracy").

Prompt lookup (`ngram`) copies from the request itself; a chat answer rarely repeats itself,
but a small model answers many questions with the same phrases ("Here are some tips", "is a
great way to", a list's "\\n\\n2. **"). The datastore is the model's own greedy answers to
questions it wrote itself (arc/corpus.py builds it at compile time: no shipped text, and what
is drafted is what this model says). The last n tokens (n from N_MAX down to N_MIN, the longest
that occurs) are looked up; the continuations after their newest MAX_HITS occurrences become a
tree of paths. A path's token is scored by its share of its parent's continuations, sharpened
(SHARPEN), times how reliable that many agreeing occurrences are for a match of that length
(SINGLE: what one occurrence is worth), so a phrase the model always finishes one way is
drafted with confidence and one it finishes many ways is not; a path's score is the product
along it (paths below MIN_SCORE are not expanded).

Lookups are pure Python (a drafting step right after a decode step runs on cold caches): one
dict per n from a 64-bit hash of the n-gram, folded newest token first so the hashes of every
n come from one pass over the history's end. A hash collision could only draft a wrong
continuation, which verification rejects.
"""

from __future__ import annotations

import numpy as np

from arc.runtime.tree import Tree

N_MAX = 6  # longest n-gram looked up
N_MIN = 2  # shortest: a 1-token context is Token Recycling's
MAX_HITS = 16  # newest occurrences read per lookup
# the chance a continuation seen once after a match of n tokens (index n, 6 and more: the last)
# is the model's; k occurrences that agree: 1 - (1 - SINGLE[n]) ** k. Fitted on the greedy
# answers of the 32 calibration prompts (benchmarks/calibration_prompts.json) against a
# datastore of 600 self-written questions' answers (69k tokens)
SINGLE = (0.1, 0.1, 0.21, 0.27, 0.34, 0.40, 0.55)
SHARPEN = 1.5  # a continuation's share of its parent's, to this power
CAP = 0.95  # no token is more than this sure
MIN_SCORE = 0.02  # paths scored below this are not drafted
SEP = -1  # between documents in the token array
_MUL = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


def _suffix_hashes(history: list[int], n_max: int) -> list[int]:
    """[h_1, ..., h_n]: h_n hashes the last n tokens, newest first (as CorpusIndex's)."""
    out, h = [], 0
    for t in reversed(history[-n_max:]):
        h = (h * _MUL + t + 1) & _MASK
        out.append(h)
    return out


class CorpusIndex:
    """Where each n-gram (N_MIN <= n <= N_MAX) of a token array ends, oldest first.

    Per n: one flat list of end positions grouped by hash (ascending position within a group)
    and a dict hash -> start << 32 | stop into it. A dict of ints is not tracked by Python's
    garbage collector, where a dict of lists (~350k lists for a 600-question corpus) would be
    walked by every full collection; it also builds in 0.1 s instead of 0.34."""

    def __init__(self, tokens: np.ndarray):
        arr = np.ascontiguousarray(tokens, dtype=np.int64)  # [T], SEP between documents
        self.tokens: list[int] = arr.tolist()
        self._groups: list[dict[int, int]] = [{} for _ in range(N_MAX + 1)]
        self._ends: list[list[int]] = [[] for _ in range(N_MAX + 1)]
        t = (arr + 1).astype(np.uint64)  # SEP folds in as 0
        sep = arr == SEP
        h = np.zeros(len(arr), dtype=np.uint64)  # h[i]: the n tokens ending at i, newest first
        bad = np.zeros(len(arr), dtype=bool)  # the n-gram crosses a document boundary
        mul = np.uint64(_MUL)
        with np.errstate(over="ignore"):
            for n in range(1, N_MAX + 1):
                # the n-gram ending at i = the (n-1)-gram ending at i, then token i - n + 1
                shifted = np.zeros_like(t)
                shifted[n - 1 :] = t[: len(t) - n + 1]
                h = h * mul + shifted
                bad |= np.concatenate([np.ones(n - 1, bool), sep[: len(sep) - n + 1]])
                if n < N_MIN:
                    continue
                ends = np.nonzero(~bad)[0]
                keys = h[~bad]
                order = np.argsort(keys, kind="stable")  # a group keeps position order
                keys, ends = keys[order], ends[order]
                uniq, first, count = np.unique(keys, return_index=True, return_counts=True)
                span = (first.astype(np.int64) << 32) | (first + count).astype(np.int64)
                self._groups[n] = dict(zip(uniq.tolist(), span.tolist(), strict=True))
                self._ends[n] = ends.tolist()

    def longest(self, history: list[int]) -> tuple[int, list[int]]:
        """(n, newest MAX_HITS ends) of the longest n-gram ending `history` that occurs."""
        hashes = _suffix_hashes(history, N_MAX)
        for n in range(len(hashes), N_MIN - 1, -1):
            span = self._groups[n].get(hashes[n - 1])
            if span is not None:
                start, stop = span >> 32, span & 0xFFFFFFFF
                return n, self._ends[n][max(start, stop - MAX_HITS) : stop]
        return 0, []


class Corpus:
    name = "corpus"
    fallback = True  # `auto` asks it only where the other drafters have little (auto.py)

    def __init__(self, index: CorpusIndex):
        self.index = index  # built once per engine (loading it), shared by every request

    def propose(self, history: list[int], depth: int, budget: int) -> dict:
        n, ends = self.index.longest(history)
        out: dict[tuple[int, ...], float] = {}
        if ends:
            self._expand(n, [e + 1 for e in ends], (), 1.0, depth, out)
        return out

    def _expand(self, n: int, at: list[int], path: tuple, score: float, depth: int, out: dict):
        """Score the continuations at positions `at` (all after `path`) into `out`."""
        tokens, groups = self.index.tokens, {}
        for i in at:
            if i < len(tokens) and tokens[i] != SEP:
                groups.setdefault(tokens[i], []).append(i + 1)
        single = SINGLE[min(n + len(path), len(SINGLE) - 1)]
        for tok, nxt in groups.items():
            k = len(nxt)
            p = min(CAP, (k / len(at)) ** SHARPEN * (1.0 - (1.0 - single) ** k))
            s = score * p
            if s < MIN_SCORE:
                continue
            out[(*path, tok)] = s
            if len(path) + 1 < depth:
                self._expand(n, nxt, (*path, tok), s, depth, out)

    def hint(self, history: list[int]) -> float:
        """The best next-token score this drafter would draft now (0.0 if none)."""
        return max(self.propose(history, 1, 1).values(), default=0.0)

    def observe(self, tree: Tree, topk) -> None:
        pass  # the datastore is fixed for the engine
