"""`ngram`: prompt and history lookup (prompt lookup decoding, Saxena 2023; llama.cpp's n-gram
cache). The last n tokens are looked up in everything before them; what followed each earlier
occurrence is a drafted path. Several occurrences with different continuations become several
branches. Longer matches are trusted more: a match is followed back past the index's 4 tokens
while the text repeats, and a copy 32 tokens long goes on as the model does 0.97 of the time where
a 1-token match does 0.11 (BY_LENGTH); nothing but the token history is read.
"""

from __future__ import annotations

from collections import defaultdict

from arc.runtime.tree import Tree

# the chance that the model's next token is the copy's, by how long the copy already runs: the
# match (followed back past the 4-gram index while the text repeats) plus the drafted tokens
# before this one, which are right if this one is reached at all. A path's score is the
# product over its tokens. Fitted offline on the greedy output of the 32 calibration prompts
# (benchmarks/calibration_prompts.json, not the benchmark's), 256 tokens each, every step's
# proposals checked against the model's own continuation (`benchmarks/draft_calibration.py
# --offline`, 2026-12-05): a path's first token and its later ones are right equally often at
# equal length (length 2: 0.27 / 0.31, 4: 0.61 / 0.62, 8-11: 0.75 / 0.75, 32+: 0.99 / 0.97),
# so one table serves both; rounded to be monotone.
BY_LENGTH = (
    (32, 0.97),
    (16, 0.87),
    (8, 0.82),
    (5, 0.68),
    (4, 0.61),
    (3, 0.40),
    (2, 0.29),
    (1, 0.11),
)
MAX_LENGTH = BY_LENGTH[0][0]  # how far back a match is followed
# SHAPE = 1 scores the newest occurrence's tokens by more than the copy's length: its first
# token also by whether the matched n-gram is ambiguous (its earlier occurrences go on with
# different tokens), its later ones by their own table (older occurrences keep BY_LENGTH).
# Fitted as BY_LENGTH was, per path node whose parent is right, on the calibration prompts'
# greedy output (256 tokens, depth 7, 2026-12-06): after a 2-token match the newest
# occurrence's next token is right 0.54 of the time where every occurrence went on alike and
# 0.20 where they differ (BY_LENGTH: 0.29 for all). Replayed (benchmarks/spec_sim.py, -O2):
# with WAKE, geomean 1.305 -> 1.318x (benchmark prompts), 1.117 -> 1.138x (calibration
# prompts); scoring older occurrences' first tokens by their own (lower) fit lost code-edit 1
# 2.19 -> 1.86x, its older copies being where edited lines resume. 0: BY_LENGTH alone (A/B)
SHAPE = 1
FIRST = ((32, 0.97), (16, 0.91), (8, 0.86), (5, 0.85), (4, 0.74), (3, 0.63), (2, 0.54), (1, 0.29))
FIRST_AMBIGUOUS = ((16, 0.6), (4, 0.45), (2, 0.2), (1, 0.1))
LATER = ((32, 0.94), (16, 0.86), (5, 0.8), (4, 0.67), (3, 0.47), (2, 0.4))
AMBIGUITY_SCAN = 32  # newest occurrences read to tell whether an n-gram is ambiguous
# COPY_LENGTH = 0 scores as before BY_LENGTH (benchmarks/spec_ab.py can A/B the two): by the
# n-gram's length only, x DECAY per later token, which overrated short matches ~2x. BY_LENGTH
# against those, -O2 tvm, 10 benchmark prompts x 5 paired with plain in one process, cold
# (2026-12-05, Intel Xeon), three runs: geomean 1.193 vs 1.187x, 1.189 vs 1.179x, and (prior
# 0.8) 1.189 vs 1.157x; code-edit 1 1.46-1.52 -> 1.71-1.75x, summarize 2 1.36-1.54 -> 1.26-1.31x
COPY_LENGTH = 1
MATCH_SCORE = {1: 0.25, 2: 0.45, 3: 0.6, 4: 0.7}
DECAY = 0.92
MAX_MATCHES = 6  # most recent occurrences per n-gram that become branches


class NGram:
    name = "ngram"

    def __init__(self, max_n: int = 4):
        self.max_n = max_n
        self._index: dict[tuple[int, ...], list[int]] = defaultdict(list)  # n-gram -> ends
        self._seen: list[int] = []  # the history the index covers
        self._of: list[int] | None = None  # the list object it was read from

    def _sync(self, history: list[int]) -> None:
        """Index every n-gram (n <= max_n) of `history` by where it ends, incrementally. The
        speculative loop only appends to its history list, so the same list, no shorter and
        with the last indexed token in place, is taken as a continuation without comparing
        the whole prefix (that comparison cost ~28 us a call right after a decode step, two
        calls a step; a stale index could only draft worse, never change the output)."""
        seen = self._seen
        same = history is self._of and len(history) >= len(seen)
        if not (same and (not seen or history[len(seen) - 1] == seen[-1])):
            if history[: len(seen)] != seen:  # a new request: start over
                self._index.clear()
                self._seen = seen = []
            self._of = history
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
            found = self._index.get(tuple(history[-n:]), ())  # ascending: the tail is enough
            ends = [e for e in found[-MAX_MATCHES - 1 :] if e < last][-MAX_MATCHES:]
            ambiguous = SHAPE and _ambiguous(history, found[-AMBIGUITY_SCAN - 1 :], last)
            for rank, end in enumerate(reversed(ends)):  # most recent first
                length = _copy_length(history, end, n)
                copy = 1.0  # the chance the path so far is right
                cont = history[end + 1 : end + 1 + depth]
                for d in range(1, len(cont) + 1):
                    if SHAPE and not rank:
                        copy *= _shaped(length + d - 1, d == 1, ambiguous)
                    else:
                        copy *= _right(length + d - 1)
                    score = copy if COPY_LENGTH else MATCH_SCORE[n] * DECAY ** (d - 1)
                    path = tuple(cont[:d])
                    out[path] = max(out.get(path, 0.0), score)
            if len(out) >= budget:
                break
        return out

    def hint(self, history: list[int]) -> float:
        """The score of the next token this drafter would draft now from its longest match
        of 2+ tokens (0.0 if none): cheap, for a loop that has stopped drafting to ask
        whether a copy starts. 1-token matches are left out: they match almost every step
        and score at most FIRST[1] (0.29), below any useful wake threshold."""
        self._sync(history)
        last = len(history) - 1
        # most steps' last 2 tokens have not occurred before, and then no longer n-gram has:
        # one lookup instead of three (this runs right after a step, on evicted caches)
        pair = self._index.get(tuple(history[-2:]), ())
        if len(pair) < 2 or pair[-2] >= last:
            return 0.0
        for n in range(min(self.max_n, len(history)), 1, -1):
            found = pair if n == 2 else self._index.get(tuple(history[-n:]), ())
            end = next((e for e in reversed(found[-2:]) if e < last), None)
            if end is None:
                continue
            length = _copy_length(history, end, n)
            if not SHAPE:
                return _right(length)
            return _shaped(length, True, _ambiguous(history, found[-AMBIGUITY_SCAN - 1 :], last))
        return 0.0

    def observe(self, tree: Tree, topk) -> None:
        pass  # the history is all it reads


def _copy_length(history: list[int], end: int, n: int) -> int:
    """How far back the text before `end` (inclusive) repeats the history's end, given that
    the last `n` tokens do (at most MAX_LENGTH)."""
    last = len(history) - 1
    while n < MAX_LENGTH and n <= end and history[end - n] == history[last - n]:
        n += 1
    return n


def _ambiguous(history: list[int], ends: list[int], last: int) -> bool:
    """Whether the occurrences of an n-gram (ending at `ends`, before `last`) go on with
    different tokens."""
    return len({history[e + 1] for e in ends if e < last}) > 1


def _shaped(length: int, first: bool, ambiguous: bool) -> float:
    """The chance a token copied from the newest occurrence is right (SHAPE): after a copy of
    `length` tokens, as the path's first token (of an n-gram whose occurrences go on alike or
    not) or a later one."""
    table = (FIRST_AMBIGUOUS if ambiguous else FIRST) if first else LATER
    return next((p for least, p in table if length >= least), table[-1][1])


def _right(length: int) -> float:
    """The chance the next token is the copy's, after a copy of `length` tokens (BY_LENGTH)."""
    return next(p for least, p in BY_LENGTH if length >= least)
