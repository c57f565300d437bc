"""The step functions a target hands the runtime, behind one small interface.

A target supplies callables `fn(tokens i64[1,T], pos i64[T], slots i64[L]) -> logits` per IR
function; `Steps` turns positions into those tensors. It passes only the filled part of the
static cache (rounded up to `bucket` slots), so a step's attention reads what the sequence has,
not the whole cache, while compiled code still sees few distinct shapes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

StepFn = Callable[[Tensor, Tensor, Tensor], Tensor]


class Steps:
    def __init__(
        self,
        functions: dict[str, StepFn],
        *,
        max_seq_len: int,
        device: str = "cpu",
        reset: Callable[[], None] = lambda: None,
        bucket: int = 64,
    ):
        self.functions, self.max_seq_len, self.device = functions, max_seq_len, device
        self.bucket, self._reset = bucket, reset
        self._positions = torch.arange(max_seq_len, dtype=torch.long, device=device)

    def _slots(self, end: int) -> Tensor:
        length = min(-(-end // self.bucket) * self.bucket, self.max_seq_len)
        return self._positions[:length]  # [L]

    def prefill(self, tokens: list[int], start: int) -> Tensor:
        """Logits [vocab] after `tokens` written at positions start.. (one chunk)."""
        if len(tokens) == 1:  # the same computation; compiled prefill takes T >= 2
            return self.decode(tokens[0], start)
        end = start + len(tokens)
        ids = torch.tensor([tokens], dtype=torch.long, device=self.device)  # [1, T]
        logits = self.functions["prefill"](ids, self._positions[start:end], self._slots(end))
        return logits[0, -1]

    def decode(self, token: int, pos: int) -> Tensor:
        """Logits [vocab] after one token at position `pos`."""
        ids = torch.tensor([[token]], dtype=torch.long, device=self.device)  # [1, 1]
        logits = self.functions["decode"](ids, self._positions[pos : pos + 1], self._slots(pos + 1))
        return logits[0, -1]

    def reset(self) -> None:
        self._reset()
