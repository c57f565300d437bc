"""`jacobi`: Jacobi-iteration guesses refined across steps, with their n-grams pooled
(Speculative Jacobi Decoding, Santilli et al. 2023, "Accelerating Transformer Inference for
Translation via Parallel Decoding"; Lookahead decoding, Fu et al. 2024, "Break the Sequential
Dependency of LLM Inference Using Lookahead Decoding").

Jacobi decoding guesses the next W tokens at once and refines the guess by fixed-point
iteration: fed the guess g_1..g_W after the last token, the model's output y_i after g_i
(given g_<i) becomes the guess for the position after it in the next iteration, and the
positions whose guesses were right are final. Here the guess is one more drafted chain in
the verify tree, so refining it costs no forward of its own: a verify returns the model's
top successor after every node (arc.runtime.topk), and after acceptance the chain's outputs
beyond the accepted tokens, shifted, are the next guess. Guesses past the part of the chain
the tree kept (the budget may cut it) are carried over unrefined.

Lookahead decoding's point is that Jacobi trajectories hold good n-grams even where the
iteration has not converged: the token guessed at position p in iteration t, the model's
output after it (the guess at p+1 in iteration t+1), the output after that (p+2, t+2), ...
each produced right after the previous token, form an n-gram the model tends to generate.
Every guessed token carries that diagonal trail; once a trail holds N tokens it enters a pool
keyed by its first token (newest first, POOL_PER_KEY kept), and the pool's n-grams that
start with the last committed token are proposed as branches: lookahead's verification
branch. Lookahead also runs a W x (N-1) window of Jacobi guesses as an extra branch of every
forward; on this CPU each extra node costs 12-25% of a decode step (benchmarks/verify_cost.py,
arc/tune.py), so the window here is the one chain the tree already verifies.

Measured (smollm2-135m on tvm, the 10 shipped prompts, budget 7, a full verify every step):
1.34 tokens per verify alone (recycle 1.38, ngram 1.63; on chat prompts 1.22-1.30 against
recycle's 1.18-1.21), and `auto` with it 1.84 against 1.74 without, so `auto` merges it.

Scores: a refined guess was produced after a stale prefix, so its score is the model's
probability for it times STALE, multiplied along the chain; pooled n-grams start at POOL_SCORE
and decay per token, as prompt lookup's matches do (arc/runtime/drafters/ngram.py).
"""

from __future__ import annotations

from collections import defaultdict

from arc.runtime.tree import Tree

N = 4  # tokens per pooled n-gram (lookahead's N)
POOL_PER_KEY = 4  # n-grams kept per first token, newest first
STALE = 0.5  # a refined guess's probability counts this much: its prefix was a guess
POOL_SCORE, DECAY = 0.4, 0.9
PAD = 0.02  # score of a padding guess (not yet refined)
SEARCH = 256  # tokens of history searched back for padding


class Jacobi:
    name = "jacobi"

    def __init__(self):
        self.guess: list[tuple[int, float]] = []  # (token, score) after the last committed one
        self.trails: list[tuple[int, ...]] = []  # each guess's diagonal trail, ending in it
        self.pool: dict[int, list[tuple[int, ...]]] = defaultdict(list)  # first -> rests
        self._base, self._request, self._root = 0, 0, -1  # at the last proposal
        self._pending = False  # a proposal the next observe describes
        self._seen: list[tuple[int, float]] = []  # (output, prob) after root and chain nodes

    def propose(self, history: list[int], depth: int, budget: int) -> dict:
        self._refine(history, depth)
        out: dict[tuple[int, ...], float] = {}
        path, score = (), 1.0
        for token, p in self.guess[:depth]:  # the Jacobi chain
            score *= p
            path = (*path, token)
            out[path] = score
        for rest in self.pool.get(history[-1], ()):  # lookahead's pooled n-grams
            score = POOL_SCORE
            for d in range(1, min(len(rest), depth) + 1):
                out[rest[:d]] = max(out.get(rest[:d], 0.0), score)
                score *= DECAY
        self._base, self._request, self._root = len(history), id(history), history[-1]
        self._pending, self._seen = True, []
        return out

    def observe(self, tree: Tree, topk) -> None:
        """After a proposal: the model's top successor (and its probability) after the root
        and after each node of the guessed chain that made it into the tree."""
        if not self._pending:
            return  # a plain step between proposals: the refinement below counts its token
        self._pending = False
        tokens, probs = topk
        first, p_first = tokens[:, 0].tolist(), probs[:, 0].tolist()  # two calls, not 2 per node
        node = 0
        for i in range(len(self.guess) + 1):
            self._seen.append((first[node], p_first[node]))
            child = tree.child(node, self.guess[i][0]) if i < len(self.guess) else None
            if child is None:
                break
            node = child

    def _refine(self, history: list[int], depth: int) -> None:
        """The next guess from the last verify's outputs: the chain's outputs past the tokens
        committed since (guesses for the positions after them), then the old, unrefined
        guesses; every trail moves one step along its diagonal. Padded to `depth`."""
        base = self._base
        fresh = (
            id(history) != self._request
            or not base < len(history)
            or (history[base - 1] != self._root)
        )
        if fresh:  # a new request
            self.guess, self.trails, self._seen = [], [], []
        step = len(history) - base  # tokens committed since: accepted + bonus (+ plain steps)
        trails = [(self._root,), *self.trails]  # of the tokens at base - 1, base, ...
        guess, new_trails = [], []
        for i in range(0 if fresh else step, len(self.guess) + 1):  # predicts base + i
            if i < len(self._seen):
                token, p = self._seen[i]
                guess.append((token, p * STALE))
                new_trails.append(self._extend(trails[i], token))
            elif i < len(self.guess):
                guess.append(self.guess[i])
                new_trails.append(self.trails[i])
        self.guess, self.trails = guess[:depth], new_trails[:depth]
        self._pad(history, depth)

    def _pad(self, history: list[int], depth: int) -> None:
        """Fill the guess to `depth` (Jacobi's window is always full): with what followed the
        newest earlier occurrence of its last token in the history (lookahead starts its
        window from the prompt's tokens), else that token again, at PAD score: guesses to
        refine, seldom right as they stand."""
        while len(self.guess) < depth:
            last = self.guess[-1][0] if self.guess else history[-1]
            at = _last_index(history, last, len(history) - 2)
            follow = history[at + 1 : at + 1 + depth - len(self.guess)] if at >= 0 else []
            for t in follow or [last]:
                self.guess.append((t, PAD))
                self.trails.append((t,))

    def _extend(self, trail: tuple[int, ...], token: int) -> tuple[int, ...]:
        """`trail` + token along its diagonal; a full one enters the pool (keyed by its
        first token, the rest as the drafted continuation); the last N-1 tokens go on."""
        trail = (*trail, token)
        if len(trail) >= N:
            trail = trail[-N:]
            rests = self.pool[trail[0]]
            if trail[1:] in rests:
                rests.remove(trail[1:])
            rests.insert(0, trail[1:])
            del rests[POOL_PER_KEY:]
            trail = trail[1:]
        return trail


def _last_index(seq: list[int], value: int, end: int) -> int:
    """The largest i <= end with seq[i] == value, or -1."""
    for i in range(min(end, len(seq) - 1), max(-1, end - SEARCH), -1):
        if seq[i] == value:
            return i
    return -1
