"""Seeded draws a verify may not decide: the sampled counterpart of `accept.settle`.

Where a target's verify is not the decode step bit for bit (torch, onnx), each of a node's
logits may differ from the decode step's by up to ERR = DRAW_ERR x max(1, |best logit|): 5x
the largest such difference, so scaled, that benchmarks/verify_drift.py measured on
SmolLM2-135M (1.0e-5 onnx, 7.4e-6 torch AOT, over every logit of ~4,000 verified nodes).
Greedy's `accept.TIE` allows 15x (a gap of two errors): it cuts ~0.2% of greedy decisions,
while a draw's window grows with the error: on the onnx engine at temperature 0.7 and top-p
0.9 (benchmarks/guard_cost.py), 15x cut 4.3% of the seeded draws the verifies decided, 5x
1.9%. A token drawn with position `at`'s uniform u (arc/runtime/sampling.py) is the decode
step's draw for every row within ERR of the verify's unless u lies near a boundary that such
a change can move:

- the cumulative sums around the drawn entry: a weight w = exp((x - top) / T) changes by at
  most a factor exp(2 ERR / T) = 1 + r, which moves the fraction f of the mass ahead of a
  boundary by at most ~2 r f (1 - f) (every weight ahead up by r, every one after down);
- the order of a sorted support (top-k, top-p): two neighbours within 2 ERR may swap, and then
  a draw landing on either of them changes token;
- membership: the support's last token and the first one outside within 2 ERR may trade
  places (a draw of the last changes token); and in a top-p nucleus whose first excluded or
  last kept token has a mass ahead of it within the slack of top_p, a token may join or
  leave the support, which moves every boundary after it.

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
    for b in (j - 1, j):  # the boundaries before and after the drawn entry
        if 0 <= b < len(cdf) - 1 and not _clear(u, float(cdf[b]) / total, r):
            return False
    if d.tokens is None:
        return True
    xs = x[d.tokens].double()  # [m], decreasing
    for a, b in ((j - 1, j), (j, j + 1)):  # neighbours that could swap places
        if 0 <= a and b < len(xs) and float(xs[a] - xs[b]) < 2 * err:
            return False
    return _membership_settled(x, xs, d, params, err, r, j)


def _clear(u: float, f: float, r: float) -> bool:
    """u is farther from a boundary at mass fraction f than any row within r can move it."""
    return abs(u - f) > 2 * r * f * (1 - f) + SLACK


def _membership_settled(x, xs, d: Dist, params: SamplingParams, err, r, j) -> bool:
    """The support of a sorted distribution (top-k, then the top-p nucleus) is the same for
    every row within `err` of x [V]: its m tokens are xs, the drawn entry is j."""
    m, temp = len(xs), params.temperature
    if m == len(x):  # the whole vocabulary is in the support
        return True
    outside = x.clone()
    outside[d.tokens] = -math.inf
    first_out = float(outside.max())  # the largest logit outside the support
    if float(xs[-1]) - first_out < 2 * err and j == m - 1:
        return False  # the last token in and the first out may trade places: the draw's
    if params.top_p >= 1.0:
        return True
    top = float(x.max())
    mass = d.pool  # the nucleus' denominator: the weights it was cut from
    if mass is None:
        k = params.top_k if 0 < params.top_k < len(x) else len(x)
        pool = torch.topk(x, k).values if k < len(x) else x
        mass = float(((pool - top) / temp).exp().sum(dtype=torch.float64))
    kept = float(((xs - top) / temp).exp().sum())
    last = float(math.exp((float(xs[-1]) - top) / temp))
    # the nucleus keeps a token while the mass ahead of it is below top_p: the first one out
    # has `kept` ahead, the last one in `kept - last`
    return _clear(params.top_p, kept / mass, r) and _clear(params.top_p, (kept - last) / mass, r)
