"""Next-token choice: greedy, or sampling with temperature, top-k and top-p (Holtzman et al.
2020, "The Curious Case of Neural Text Degeneration").

Numerically safe for any valid setting: logits are shifted so the largest is 0 before they are
divided by the temperature, in float64, so a tiny temperature (1e-40) gives a one-hot
distribution on the argmax instead of inf - inf = nan; top-p always keeps the top token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    def __init__(self, params: SamplingParams, argmax=None):
        """`argmax`: rows [n, V] -> their first maximal indices, by the target's kernel
        (arc/runtime/topk.py `argmax_rows`); else torch's max."""
        self.params = params.validate()
        self.argmax = argmax
        self.gen = torch.Generator()
        if params.seed is not None:
            self.gen.manual_seed(params.seed)
        else:
            self.gen.seed()

    def __call__(self, logits: Tensor) -> int:
        """Pick the next token from logits [vocab]."""
        if self.params.greedy:
            if self.argmax is not None:
                return self.argmax(logits[None])[0]
            # max's index, which torch documents as the first maximal one as argmax's: the
            # same token, in 24 instead of 82 us over a 49k vocabulary on one thread
            return int(logits.max(dim=-1).indices)
        probs = torch.softmax(_filtered(logits.detach().cpu(), self.params), dim=-1)
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
            return int(torch.argmax(logits))  # no finite logit at all: nothing to sample from
        return int(torch.multinomial(probs, 1, generator=self.gen))


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
