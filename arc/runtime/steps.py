"""The step functions a target hands the runtime, behind one small interface.

A target supplies callables `fn(tokens i64[1,T], pos i64[T], slots i64[L]) -> logits` per IR
function (a speculative `verify_B` takes `(tokens, pos, write, visible)`, see arc/lowering.py),
and `move(src, dst)` that copies K/V rows between cache slots; `Steps` turns positions into
those tensors. It passes only the filled part of the
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
        move: Callable[[Tensor, Tensor], None] | None = None,
        bucket: int = 64,
    ):
        self.functions, self.max_seq_len, self.device = functions, max_seq_len, device
        self.bucket, self._reset, self._move = bucket, reset, move
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

    def verify(self, tokens: list[int], pos: list[int], write: list[int], visible: Tensor):
        """Logits [B, vocab] for the B tree nodes `tokens` (see arc.runtime.tree.Tree.inputs).

        `visible` is [B, end] over the slots up to the last one written; it is padded with
        invisible slots to the step's bucket of slots read."""
        length = self._slots(int(visible.shape[1])).shape[0]
        if length > visible.shape[1]:
            pad = torch.zeros(visible.shape[0], length - visible.shape[1], dtype=torch.bool)
            visible = torch.cat([visible, pad], dim=1)  # [B, L]
        dev = self.device
        logits = self.functions[f"verify_{len(tokens)}"](
            torch.tensor([tokens], dtype=torch.long, device=dev),  # [1, B]
            torch.tensor(pos, dtype=torch.long, device=dev),  # [B]
            torch.tensor(write, dtype=torch.long, device=dev),  # [B]
            visible.to(dev),
        )
        return logits[0]

    def move(self, src: list[int], dst: list[int]) -> None:
        """Copy the K/V of cache slots `src` to slots `dst` (accepted tree nodes into place)."""
        if self._move is None:
            raise RuntimeError("this target's steps cannot move KV rows")
        dev = self.device
        self._move(torch.tensor(src, device=dev), torch.tensor(dst, device=dev))

    def draft(self, token: int, pos: int) -> Tensor:
        """Logits [vocab] of the layer-skipped `draft` function after one token at `pos`
        (a decode through fewer layers; it writes the K/V of those layers only)."""
        ids = torch.tensor([[token]], dtype=torch.long, device=self.device)  # [1, 1]
        logits = self.functions["draft"](ids, self._positions[pos : pos + 1], self._slots(pos + 1))
        return logits[0, -1]

    @property
    def verify_sizes(self) -> list[int]:
        """Tree sizes this engine can verify (its verify_B functions)."""
        return sorted(int(k[7:]) for k in self.functions if k.startswith("verify_"))

    def reset(self) -> None:
        self._reset()
