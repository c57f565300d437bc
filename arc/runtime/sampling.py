"""Next-token choice: greedy, or sampling with temperature, top-k and top-p (Holtzman et al.
2020, "The Curious Case of Neural Text Degeneration")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self.gen = torch.Generator()
        if params.seed is not None:
            self.gen.manual_seed(params.seed)
        else:
            self.gen.seed()

    def __call__(self, logits: Tensor) -> int:
        """Pick the next token from logits [vocab]."""
        if self.params.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(filter_logits(logits.float().cpu(), self.params), dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.gen))


def filter_logits(logits: Tensor, p: SamplingParams) -> Tensor:
    """Temperature-scaled logits with tokens outside top-k / the top-p nucleus set to -inf."""
    logits = logits / p.temperature
    if p.top_k > 0 and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens before it already reach top_p (keeps at least one)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
        unsorted = torch.zeros_like(drop).scatter(0, order, drop)
        logits = logits.masked_fill(unsorted, float("-inf"))
    return logits
