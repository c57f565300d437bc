"""Next-token choice: greedy, or sampling with temperature, top-k and top-p (Holtzman et al.
2020, "The Curious Case of Neural Text Degeneration").

Numerically safe for any valid setting: logits are shifted so the largest is 0 before they are
divided by the temperature, so a tiny temperature (1e-40) gives a one-hot distribution on the
argmax instead of inf - inf = nan; top-p always keeps the top token.

Fast, as a decode step needs it (a 49k vocabulary, one thread): a row's distribution is a
`Dist`, weights exp((x - max) / T) over its support (the whole vocabulary, or the top-k, or
the top-p nucleus found among the top 256, then 4096, then all tokens), and a token is drawn
by inverting its cumulative sum with one uniform number. torch.multinomial took ~1.0 ms a
draw and sorting the vocabulary for top-p ~3.9 ms, against a 4-5 ms decode step; this takes
~0.15 ms (temperature), ~0.3 ms (top-p 0.9). Rows with a nan or inf logit, or a temperature
below FAST_T, take the float64 path of `filter_logits`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
from torch import Tensor

from arc.errors import ArcError

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0

    def validate(self) -> SamplingParams:
        """Self, or ArcError naming the first bad setting: out-of-range values were silently
        ignored (or crashed deep in torch) before."""
        t, k, p, seed = self.temperature, self.top_k, self.top_p, self.seed
        if not (isinstance(t, int | float) and math.isfinite(t) and t >= 0):
            raise ArcError(f"--temperature must be a finite number >= 0 (0 = greedy), not {t}")
        if not (isinstance(k, int) and k >= 0):
            raise ArcError(f"--top-k must be an integer >= 0 (0 = off), not {k}")
        if not (isinstance(p, int | float) and 0 < p <= 1):  # nan fails both comparisons
            raise ArcError(f"--top-p must be in (0, 1] (1 = off), not {p}")
        if seed is not None and not (isinstance(seed, int) and 0 <= seed <= SEED_MAX):
            raise ArcError(f"--seed must be an integer from 0 to {SEED_MAX}, not {seed}")
        return self


class Sampler:
    def __init__(self, params: SamplingParams, argmax=None, kernel=None):
        """`argmax`: rows [n, V] -> their first maximal indices, by the target's kernel
        (arc/runtime/topk.py `argmax_rows`); else torch's max. `kernel` (Steps.sample_rows):
        a target's draw of rows, `(logits [n, V], temperature, top_p, top_k, us) -> [(token,
        max, cut, mass, total, top tokens, their probabilities)] * n` (targets/tvm_sample.py),
        taken where a row is one it answers for (token >= 0)."""
        self.params = params.validate()
        self.argmax = argmax
        p = self.params
        usable = not p.greedy and p.temperature >= FAST_T
        self.kernel = kernel if usable else None
        self.gen = torch.Generator()
        if params.seed is not None:
            self.gen.manual_seed(params.seed)
        else:
            self.gen.seed()
        # the uniforms: per sequence position from the seed (position_uniform), else (no
        # position given) from this stream; a torch.rand right after a decode step took ~50 us
        self.key = self.gen.initial_seed()
        self.rng = random.Random(self.key)

    def __call__(self, logits: Tensor, at: int | None = None) -> int:
        """Pick the next token from logits [vocab]; `at`: its sequence position (sampling
        then uses that position's uniform, so any loop draws the same token there)."""
        if self.params.greedy:
            if self.argmax is not None:
                return self.argmax(logits[None])[0]
            # max's index, which torch documents as the first maximal one as argmax's: the
            # same token, in 24 instead of 82 us over a 49k vocabulary on one thread
            return int(logits.max(dim=-1).indices)
        return self.pick(logits, at)[0]

    def uniform(self, at: int | None) -> float:
        """Position `at`'s uniform (position_uniform of this sampler's seed), or the next
        of this sampler's stream when no position is given."""
        return self.rng.random() if at is None else position_uniform(self.key, at)

    def pick(self, logits: Tensor, at: int | None = None) -> tuple[int, Dist | CutDist]:
        """A token drawn from logits [V] (not greedy) with position `at`'s uniform, and the
        distribution it was drawn from: the target kernel's where it has one, else
        `dists`'."""
        d = self.dists(logits.reshape(1, -1), [at])[0]
        return self.draw(d, at), d

    def dists(self, logits: Tensor, ats: list | None = None) -> list[Dist | CutDist]:
        """Each row's distribution of logits [n, V] (not greedy): a CutDist where the
        target's kernel answers for the row, with a token drawn from it by row i's uniform
        (position ats[i]'s; this sampler's stream where None or no `ats`); else `dists`'."""
        if self.kernel is None:
            return dists(logits, self.params)
        p, n = self.params, logits.shape[0]
        us = [self.uniform(at) for at in (ats or [None] * n)]
        got = self.kernel(logits, p.temperature, p.top_p, p.top_k, us)
        out = [
            CutDist.of(logits[i], r, p.temperature) if r[0] >= 0 else None
            for i, r in enumerate(got)
        ]
        left = [i for i, d in enumerate(out) if d is None]  # nan, inf, all -inf: torch's
        if left:
            for i, d in zip(left, dists(logits[left], p), strict=True):
                out[i] = d
        return out

    def draw(self, d: Dist | CutDist, at: int | None = None) -> int:
        """A token from `d` by position `at`'s uniform (a kernel row: the token the kernel drew
        with it); the argmax of d's logits where d has no mass (no finite logit at all:
        nothing to sample from)."""
        token = d.draw(self.uniform(at))
        return int(torch.argmax(d.row)) if token is None else token


FAST_T = 1e-30  # below: the float64 path (x / T leaves float32's range)
_M64 = 2**64 - 1


def position_uniform(key: int, at: int) -> float:
    """A uniform number in [0, 1) for the token at sequence position `at` of a run keyed `key`
    (the sampler's seed): SplitMix64's output function (Steele et al. 2014, "Fast splittable
    pseudorandom number generators") of key + (at + 1) x its golden-ratio increment, top 53
    bits. The token at each position is drawn with its own number whatever the decoding loop
    did before it, so a speculative loop, whichever trees it verifies, draws the tokens plain
    decoding draws with the same seed (sample-then-match, arc/runtime/accept.py)."""
    z = (key + (at + 1) * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return ((z ^ (z >> 31)) >> 11) * 2.0**-53


NUCLEUS_K = (256, 4096)  # top-p: the nucleus is looked for among these many top tokens first


@dataclass
class Dist:
    """One row's sampling distribution, unnormalized: weights `w` >= 0 [m] over `tokens` [m]
    (vocabulary ids; None: w covers the whole vocabulary), from logits `row` [V]."""

    w: Tensor
    tokens: Tensor | None
    row: Tensor
    total: float | None = None  # sum(w) when known (drawn from, nothing removed since)
    pool: float | None = None  # top-p: the summed weights the nucleus was cut from
    cdf: Tensor | None = field(default=None, repr=False)  # cumsum(w) [m], float64, once drawn

    def copy(self) -> Dist:
        """A copy whose weights `remove` may change (the caller's stay the model's)."""
        return Dist(self.w.clone(), self.tokens, self.row)

    def _at(self, token: int) -> int | None:
        if self.tokens is None:
            return token
        hit = (self.tokens == token).nonzero()
        return int(hit[0, 0]) if len(hit) else None

    def weight(self, token: int) -> float:
        at = self._at(token)
        return 0.0 if at is None else float(self.w[at])

    def remove(self, token: int) -> None:
        """Set `token`'s weight to 0 (a rejected draft: the residual distribution)."""
        at = self._at(token)
        if at is not None:
            self.w[at] = 0.0
            self.total = self.cdf = None

    def mass(self) -> float:
        if self.total is None:
            self.total = float(self.w.sum(dtype=torch.float64))
        return self.total

    def draw(self, u: float) -> int | None:
        """A token with probability w / sum(w), by the uniform u in [0, 1): the first entry
        whose cumulative sum exceeds u * sum(w) (never one of weight 0); None if sum(w) is
        not > 0."""
        cdf = self.cdf = torch.cumsum(self.w, 0, dtype=torch.float64)
        total = self.total = float(cdf[-1])
        if not (total > 0 and math.isfinite(total)):
            return None
        at = int(torch.searchsorted(cdf, u * total, right=True))
        if at >= len(cdf):  # u * total rounded up to total: the last entry with weight
            at = int((self.w > 0).nonzero()[-1, 0])
        return at if self.tokens is None else int(self.tokens[at])

    def probs(self) -> Tensor:
        """The distribution over the whole vocabulary, normalized, float64 [V]."""
        dense = torch.zeros(self.row.shape[-1], dtype=torch.float64)
        w = self.w.double()
        if self.tokens is None:
            dense.copy_(w)
        else:
            dense[self.tokens] = w
        return dense / dense.sum()

    def head(self, k: int) -> tuple[list[int], list[float]] | None:
        """(tokens, probabilities) of the k most likely tokens when the support is kept in
        decreasing order (top-k, top-p), padded with -1; None for a whole vocabulary."""
        if self.tokens is None:
            return None
        mass = self.mass()
        probs = (self.w[:k].double() / mass).tolist() if mass > 0 else [0.0] * min(k, len(self.w))
        tokens = self.tokens[:k].tolist()
        pad = k - len(tokens)
        return tokens + [-1] * pad, probs + [0.0] * pad

    def top(self, candidates: list[int]) -> tuple[list[int], list[float]]:
        """(tokens, probabilities) of `candidates` (the row's top tokens by logit) under this
        distribution; a candidate outside its support becomes -1."""
        mass = self.mass()
        got = [(t, self.weight(t) / mass) if mass > 0 else (t, 0.0) for t in candidates]
        return [t if p > 0 else -1 for t, p in got], [p for _, p in got]


@dataclass
class CutDist:
    """One row's sampling distribution as a target kernel found it (Sampler.dists): weights
    exp((x - peak) / temperature) over the tokens whose logit x >= cut (the top-p nucleus;
    every token when cut is -inf), summing to `total`, and `drawn`, a token the kernel drew
    from it with a uniform of its own (the first draw takes it), and `succ`, its top tokens
    (Token Recycling's successors). Nothing is materialized until a draw after `remove` (a
    rejected draft's residual: one torch pass)."""

    row: Tensor
    peak: float
    cut: float
    temperature: float
    total: float
    drawn: int | None = None
    succ: tuple[list[int], list[float]] | None = None  # the kernel's top tokens (`head`)
    removed: dict[int, float] = field(default_factory=dict)

    @classmethod
    def of(cls, row: Tensor, got: list[float], temperature: float) -> CutDist:
        """From a kernel row `got` = (token, max, cut, mass, total, k top tokens, their
        probabilities) drawn from logits `row`."""
        k = (len(got) - 5) // 2
        succ = [int(t) for t in got[5 : 5 + k]], got[5 + k :]
        return cls(row, got[1], got[2], temperature, got[3], int(got[0]), succ)

    def copy(self) -> CutDist:
        t, p, c = self.temperature, self.peak, self.cut
        return CutDist(self.row, p, c, t, self.total, self.drawn, self.succ)

    def _w(self, x: float) -> float:
        return math.exp((x - self.peak) / self.temperature) if x >= self.cut else 0.0

    def weight(self, token: int) -> float:
        return 0.0 if token in self.removed else self._w(float(self.row[token]))

    def remove(self, token: int) -> None:
        w = self.weight(token)
        if w > 0:
            self.removed[token] = w

    def mass(self) -> float:
        return max(self.total - sum(self.removed.values()), 0.0)

    def draw(self, u: float) -> int | None:
        """The kernel's token (drawn with the row's own uniform) while nothing is removed, once;
        else a draw by `u` from the residual."""
        if not self.removed and self.drawn is not None:
            token, self.drawn = self.drawn, None
            return token
        x = self.row.float()
        w = torch.where(x >= self.cut, (x - self.peak).div_(self.temperature).exp_(), 0.0)
        if self.removed:
            w[list(self.removed)] = 0.0
        return Dist(w, None, self.row).draw(u)

    def head(self, k: int) -> tuple[list[int], list[float]] | None:
        """The kernel's k most likely tokens and their probabilities (-1 and 0 past the
        nucleus), or None (the caller finds candidates) where it kept another k."""
        succ = self.succ
        return succ if succ is not None and len(succ[0]) == k else None

    def top(self, candidates: list[int]) -> tuple[list[int], list[float]]:
        """(tokens, probabilities) of `candidates` under this distribution; a candidate
        outside the nucleus becomes -1."""
        mass = self.total
        probs = [self._w(x) / mass if mass > 0 else 0.0 for x in self.row[candidates].tolist()]
        return [c if q > 0 else -1 for c, q in zip(candidates, probs, strict=True)], probs


def successors_under(
    rows: list[Dist | CutDist], candidates: Tensor | None, k: int
) -> tuple[Tensor, Tensor] | None:
    """(tokens [n, k] i64, probabilities [n, k] f32): each row's `candidates` [n, k] (its top
    tokens by logit) with their probabilities under its distribution (Dist.top). Without
    candidates: each row's own k most likely (Dist.head), or None where a row covers the
    whole vocabulary (the caller then finds candidates)."""
    if candidates is None:
        pairs = [d.head(k) for d in rows]
        if any(x is None for x in pairs):
            return None
    else:
        pairs = [d.top(c) for d, c in zip(rows, candidates.tolist(), strict=True)]
    tokens = torch.tensor([t for t, _ in pairs], dtype=torch.long)
    return tokens, torch.tensor([q for _, q in pairs], dtype=torch.float32)


def dists(logits: Tensor, p: SamplingParams) -> list[Dist]:
    """The sampling distribution of each row of `logits` [..., V] under `p` (not greedy):
    the softmax of the temperature-scaled logits restricted to the top-k and then the top-p
    nucleus, as `filter_logits` defines them, unnormalized."""
    x = logits.detach().reshape(-1, logits.shape[-1]).float().cpu()
    n, vocab = x.shape
    top = x.amax(dim=1, keepdim=True)  # [n, 1]
    out: list[Dist | None] = [None] * n
    fast = [math.isfinite(t) and p.temperature >= FAST_T for t in top[:, 0].tolist()]
    for i, ok in enumerate(fast):
        if not ok:  # nan or inf logits, or a tiny temperature: exactly filter_logits' way
            out[i] = Dist(_filtered(x[i], p).exp_(), None, x[i])
    rows = [i for i, ok in enumerate(fast) if ok]
    if not rows:
        return out
    xs, tops = (x, top) if len(rows) == n else (x[rows], top[rows])
    if 0 < p.top_k < vocab:
        vals, tokens = torch.topk(xs, p.top_k, dim=1)  # [r, k], largest first
        w = ((vals.double() - tops.double()) / p.temperature).exp_()
        kth = vals[:, -1:]
        tied = ((xs == kth).sum(dim=1) != (vals == kth).sum(dim=1)).tolist()
    else:
        w, tokens, tied = (xs - tops).div_(p.temperature).exp_(), None, [False] * len(rows)
    keep = pools = None
    if p.top_p < 1.0:
        w, tokens, keep, pools = _nucleus(w, tokens, p.top_p)
    for j, i in enumerate(rows):
        if tied[j]:  # the k-th logit's ties past k: the mask keeps them all
            out[i] = Dist(_filtered(x[i], p).exp_(), None, x[i])
            continue
        m = keep[j] if keep is not None else w.shape[1]
        out[i] = Dist(w[j, :m], None if tokens is None else tokens[j, :m], x[i])
        out[i].pool = None if keep is None else pools[j]
    return out


def _nucleus(
    w: Tensor, tokens: Tensor | None, top_p: float
) -> tuple[Tensor, Tensor, list[int], list[float]]:
    """(weights, tokens, kept, pools) with each row's weights in decreasing order and its
    first `kept` entries the top-p nucleus: the tokens before which less than top_p of the
    mass (`pools`: each row's summed weights) lies (at least one). The nucleus is found among
    the top NUCLEUS_K tokens when they hold top_p of the mass, which sorts a few hundred
    weights instead of the vocabulary (tried: the tokens above the j-th largest of 128-token
    chunks' maxima, 0.1 ms slower in situ)."""
    total = w.sum(dim=1, keepdim=True, dtype=torch.float64)  # [r, 1]
    if tokens is None:
        width = w.shape[1]
        for k in (*NUCLEUS_K, width):
            vals, at = torch.topk(w, min(k, width), dim=1)
            held = vals.sum(dim=1, keepdim=True, dtype=torch.float64)
            if k >= width or bool((held >= top_p * total).all()):
                break
        w, tokens = vals, at
    probs = w.double() / total
    before = torch.cumsum(probs, dim=1) - probs  # the mass of the tokens ahead of each
    kept = (before < top_p).sum(dim=1).clamp(min=1).tolist()
    return w, tokens, kept, total[:, 0].tolist()


def filter_logits(logits: Tensor, p: SamplingParams) -> Tensor:
    """Temperature-scaled logits [..., vocab] with tokens outside top-k / the top-p nucleus set
    to -inf, in the input's float dtype. They are shifted so the largest is 0 (softmax is
    unchanged by the shift), which keeps a tiny temperature finite."""
    dtype = logits.dtype if logits.is_floating_point() else torch.float32
    return _filtered(logits, p).to(dtype)


def _filtered(logits: Tensor, p: SamplingParams) -> Tensor:
    """filter_logits in float64: logits / 1e-40 overflows float32, differences do not."""
    x = torch.nan_to_num(logits.double(), nan=-math.inf, posinf=torch.finfo(torch.float64).max)
    top = x.amax(dim=-1, keepdim=True)
    x = (x - top) / p.temperature  # the top token is exactly 0, the rest <= 0 (or -inf)
    if 0 < p.top_k < x.shape[-1]:
        kth = torch.topk(x, p.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, -math.inf)
    if p.top_p < 1.0:
        x = x.masked_fill(_outside_nucleus(x, p.top_p), -math.inf)
    return x


def _outside_nucleus(x: Tensor, top_p: float) -> Tensor:
    """True for tokens outside the smallest set whose probability reaches top_p; the most
    likely token is always inside, however small top_p is."""
    sorted_x, order = torch.sort(x, dim=-1, descending=True)
    probs = torch.softmax(sorted_x, dim=-1)
    drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p  # the tokens before already reach it
    drop[..., 0] = False
    return torch.zeros_like(drop).scatter(-1, order, drop)
