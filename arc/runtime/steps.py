"""The step functions a target hands the runtime, behind one small interface.

A target supplies callables `fn(tokens i64[1,T], pos i64[T], slots i64[L]) -> logits` per IR
function (a speculative `verify_B` takes `(tokens, pos, write, visible)`, see arc/lowering.py),
and `move(src, dst)` that copies K/V rows between cache slots; `Steps` turns positions into
those tensors. It passes only the filled part of the
static cache (rounded up to `bucket` slots), so a step's attention reads what the sequence has,
not the whole cache, while compiled code still sees few distinct shapes.

With a ring cache (`ring=(sink, window)`, passes/sparse_attention.py) prefill and decode take
`(tokens, pos, write, kpos)`: `pos` is each new token's position in cache order, `write` its
ring slot, `kpos` [L] each slot's position in cache order. Until the ring is full these are the
absolute positions and slots; after, a token at absolute position p goes to slot
sink + (p - sink) % window, the query sits at cache position C-1 (C = sink + window) and the
window's slots count back from it by age, so decoding never runs out of cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

StepFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def ring_of(meta) -> tuple[int, int] | None:
    """(sink, window) of a module whose cache is a ring (its `meta["sink_window"]`), or None."""
    sw = meta.get("sink_window")
    return (int(sw["sink"]), int(sw["window"])) if sw else None


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
        ring: tuple[int, int] | None = None,
    ):
        self.functions, self.max_seq_len, self.device = functions, max_seq_len, device
        self.ring = ring  # (sink, window) of a ring cache, or None
        self.decode_fn = "decode"  # adaptive layer-skip: the request's decode_skip<k>
        self.latents = None  # output embeddings for relaxed acceptance (arc/runtime/relaxed.py)
        # logits [n, V] -> (chunk maxima, logsumexp) by the target's kernel (tvm), or None
        self.logit_stats = None
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
        at = self._positions[start:end]  # [T]; a prompt fits the cache, so no ring wraps yet
        feeds = (at, at, self._slots(end)) if self.ring else (at, self._slots(end))
        logits = self.functions["prefill"](ids, *feeds)
        return logits[0, -1]

    def decode(self, token: int, pos: int) -> Tensor:
        """Logits [vocab] after one token at position `pos` (through `decode_fn`)."""
        return self.step(self.decode_fn, token, pos)

    def _ring_feeds(self, pos: int) -> tuple[Tensor, Tensor, Tensor]:
        """(pos, write, kpos) of a ring-cache decode step for absolute position `pos`."""
        if pos < self.max_seq_len:  # not wrapped yet: cache order is sequence order
            at = self._positions[pos : pos + 1]
            return at, at, self._slots(pos + 1)
        sink, window = self.ring
        write = sink + (pos - sink) % window
        slots = self._positions  # [C], every slot is filled
        age = (write - slots) % window  # steps since a window slot was written
        kpos = torch.where(slots < sink, slots, self.max_seq_len - 1 - age)  # [C]
        return self._positions[-1:], self._positions[write : write + 1], kpos

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
        return self.step("draft", token, pos)

    def step(self, name: str, token: int, pos: int) -> Tensor:
        """Logits [vocab] of the decode-like function `name` (decode, draft, decode_skip<k>)
        after one token at `pos`."""
        ids = torch.tensor([[token]], dtype=torch.long, device=self.device)  # [1, 1]
        if self.ring:
            feeds = self._ring_feeds(pos)
        else:
            feeds = (self._positions[pos : pos + 1], self._slots(pos + 1))
        return self.functions[name](ids, *feeds)[0, -1]

    @property
    def verify_sizes(self) -> list[int]:
        """Tree sizes this engine can verify (its verify_B functions)."""
        return sorted(int(k[7:]) for k in self.functions if k.startswith("verify_"))

    def reset(self) -> None:
        self._reset()
