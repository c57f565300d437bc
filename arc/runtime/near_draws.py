"""Seeded draws a verify may not decide: the sampled counterpart of `accept.settle`.

Where a target's verify is not the decode step bit for bit (torch, onnx), each of a node's
logits may differ from the decode step's by up to ERR = DRAW_ERR x max(1, |best logit|): 5x
the largest such difference, so scaled, that benchmarks/verify_drift.py measured on
SmolLM2-135M (1.0e-5 onnx, 7.4e-6 torch AOT, over every logit of ~4,000 verified nodes).
Greedy's `accept.TIE` allows 15x (a gap of two errors): it cuts ~0.2% of greedy decisions,
while a draw's window grows with the error: on the onnx engine at temperature 0.7 and top-p
0.9 (benchmarks/guard_cost.py), 15x cut 4.3% of the seeded draws the verifies decided, 5x
1.9%, and 0.5-0.7% once a nucleus edge within reach widened the boundaries instead of
cutting (below). A token drawn with position `at`'s uniform u (arc/runtime/sampling.py) is
the decode step's draw for every row within ERR of the verify's unless u lies near a
boundary that such a change can move:

- the cumulative sums around the drawn entry: a weight w = exp((x - top) / T) changes by at
  most a factor exp(2 ERR / T) = 1 + r, which moves the fraction f of the mass ahead of a
  boundary by at most ~2 r f (1 - f) (every weight ahead up by r, every one after down);
- the order of a sorted support (top-k, top-p): two neighbours within 2 ERR may swap, and then
  a draw landing on either of them changes token;
- membership: the support's last token and the first one outside within 2 ERR may trade
  places (a draw of the last changes token); and in a top-p nucleus whose first excluded or
  last kept token has a mass ahead of it within the slack of top_p, tokens may join or leave
  the support, which scales every boundary: the drawn entry's boundaries are checked at
  those scales too (and the draw is cut where the drawn token itself may leave).

`draw_settled` answers whether none of these holds; where one does, the speculative loop stops
its walk before that token and a decode step, plain sampling's own computation, draws it, as
for a greedy near tie. Distributions drawn on the float64 path (a nan or inf logit, a tiny
temperature, ties at the k-th logit) are never settled: they are rare, and a decode step is
always right.
"""

from __future__ import annotations

import math

import torch

from arc.runtime.sampling import Dist, SamplingParams, dists

DRAW_ERR = 5e-5  # a verify logit's error bound over max(1, |best logit|) (see above)
SLACK = 1e-12  # float64 rounding of the cumulative sums, on top of the logits' error


def draw_settled(d, u: float, params: SamplingParams, rel_err: float = DRAW_ERR) -> bool:
    """True when the draw from distribution `d` (a Dist or a target kernel's CutDist) with
    uniform u in [0, 1) gives the same token for every logits row within the verify's error
    of d's row (see the module docstring)."""
    if not isinstance(d, Dist):  # a kernel's row: judged on the distribution it stands for
        d = dists(d.row.reshape(1, -1), params)[0]
    x = d.row.float()  # [V]: float32 values, compared in float64 below (cheap over V)
    top = float(x.max())
    temp = params.temperature
    if not math.isfinite(top) or temp < 1e-30:
        return False
    filtered = 0 < params.top_k < len(x) or params.top_p < 1.0
    if d.tokens is None and filtered:  # the float64 path's masked row
        return False
    err = rel_err * max(1.0, abs(top))  # each logit's possible error
    r = math.expm1(2 * err / temp)  # the largest relative change of a weight ratio
    cdf = d.cdf if d.cdf is not None else torch.cumsum(d.w, 0, dtype=torch.float64)  # [m]
    total = float(cdf[-1])
    if not (total > 0 and math.isfinite(total)):
        return False
    j = min(int(torch.searchsorted(cdf, u * total, right=True)), len(cdf) - 1)
    lo = float(cdf[j - 1]) / total if j > 0 else None  # the boundaries around the drawn entry
    hi = float(cdf[j]) / total if j < len(cdf) - 1 else None
    if d.tokens is None:
        return _between(u, [lo], [hi], r)
    xs = x[d.tokens].double()  # [m], decreasing
    for a, b in ((j - 1, j), (j, j + 1)):  # neighbours that could swap places
        if 0 <= a and b < len(xs) and float(xs[a] - xs[b]) < 2 * err:
            return False
    moved = _membership(x, xs, d, params, err, r, j, total)
    if moved is None:
        return False
    join, leave = moved  # the most weight, over the support's, that may join / leave it
    if leave and (lo is not None and 1 - lo <= leave or leave >= 1):
        return False  # the drawn token may be among those leaving
    lows = [lo] + ([lo / (1 - leave)] if leave and lo is not None else [])
    highs = [hi] + ([(1.0 if hi is None else hi) / (1 + join)] if join else [])
    return _between(u, lows, highs, r)


def _slack(f: float, r: float) -> float:
    """How far a row within r (each weight ratio within a factor 1 + r) can move the mass
    fraction f ahead of a boundary: every weight ahead up, every one after down."""
    return 2 * r * f * (1 - f) + SLACK


def _between(u: float, lows: list, highs: list, r: float) -> bool:
    """u stays above every boundary in `lows` and below every one in `highs` (mass fractions;
    None: no boundary) for every row within r."""
    return all(u - f > _slack(f, r) for f in lows if f is not None) and all(
        f - u > _slack(f, r) for f in highs if f is not None
    )


def _membership(x, xs, d: Dist, params: SamplingParams, err, r, j, total):
    """(join, leave): bounds on the weight, over the support's `total`, that may join or leave
    the support of a sorted distribution (top-k, then the top-p nucleus: its m tokens are xs,
    from row x [V]) for a row within `err`; None where the drawn entry j itself may change
    (the support's last token and the first one out may trade places)."""
    m, temp = len(xs), params.temperature
    if m == len(x):  # the whole vocabulary is in the support
        return 0.0, 0.0
    outside = x.clone()
    outside[d.tokens] = -math.inf
    first_out = float(outside.max())  # the largest logit outside the support
    if float(xs[-1]) - first_out < 2 * err and j == m - 1:
        return None
    if params.top_p >= 1.0:  # top-k: a trade of near-equal weights, within r
        return 0.0, 0.0
    top = float(x.max())
    mass = d.pool  # the nucleus' denominator: the weights it was cut from
    if mass is None:
        k = params.top_k if 0 < params.top_k < len(x) else len(x)
        pool = torch.topk(x, k).values if k < len(x) else x
        mass = float(((pool - top) / temp).exp().sum(dtype=torch.float64))
    w_out = math.exp((first_out - top) / temp)
    w_last = math.exp((float(xs[-1]) - top) / temp)
    # the nucleus keeps a token while the mass ahead of it is below top_p: the first one out
    # has total / mass ahead, the last one in (total - w_last) / mass; where one is within a
    # row's reach of top_p, tokens may join (leave) until the mass ahead passes top_p, whose
    # weight is at most the first's (last's) and the slack's worth of mass
    f_out, f_last = total / mass, (total - w_last) / mass
    join = leave = 0.0
    if f_out - params.top_p <= _slack(f_out, r):
        join = (w_out * (1 + r) + 2 * _slack(f_out, r) * mass) / total
    if m > 1 and params.top_p - f_last <= _slack(f_last, r):
        leave = (w_last * (1 + r) + 2 * _slack(f_last, r) * mass) / total
    return join, leave
