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
        self.corpus = None  # the `corpus` drafter's datastore, indexed (drafters/corpus.py)
        # logits [n, V] -> (chunk maxima, logsumexp) by the target's kernel (tvm), or None
        self.logit_stats = None
        # a sampled step's draw by the target's kernel (tvm: targets/tvm_sample.py), or None
        self.sample_rows = None
        # a verify node's logits are the decode step's at its position, bit for bit (tvm);
        # else the speculative loop leaves near ties to decode steps (accept.settle)
        self.verify_exact = False
        self.bucket, self._reset, self._move = bucket, reset, move
        self._positions = torch.arange(max_seq_len, dtype=torch.long, device=device)
        self._verify_feeds: dict[tuple[int, int], tuple] = {}  # (B, width) -> _tree_buffers
        feed = torch.zeros(2, 8, dtype=torch.long)  # a decode step's token, position: rows
        self._step_feed = (feed[0:1, :1], feed[1, :1], feed.numpy())  # 64 bytes apart
        self._slot_views: dict[int, Tensor] = {}  # slots read -> the positions' view

    def _slots(self, end: int) -> Tensor:
        """The slots a step whose last token writes slot `end - 1` reads: [L], a view of the
        positions kept per L (a fresh slice is a torch call a step)."""
        length = self.mask_width(end)
        slots = self._slot_views.get(length)
        if slots is None:
            slots = self._slot_views[length] = self._positions[:length]
        return slots

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

    def mask_width(self, end: int) -> int:
        """Slots a verify whose last node writes slot `end - 1` reads: its mask's width."""
        return min(-(-end // self.bucket) * self.bucket, self.max_seq_len)

    def verify(self, tokens: list[int], pos: list[int], write: list[int], visible: Tensor):
        """Logits [B, vocab] for the B tree nodes `tokens` (see arc.runtime.tree.Tree.inputs).

        `visible` is [B, end] over the slots up to the last one written, or already as wide
        as the slots the step reads (`mask_width`); a narrower one is padded with invisible
        slots to that width."""
        length = self.mask_width(int(visible.shape[1]))
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

    def verify_tree(self, tree, prefix: int, size: int) -> Tensor:
        """`verify` of a Tree (arc.runtime.tree) of at most `size` nodes at cache length
        `prefix`, its inputs written into buffers kept for each size (on the CPU): right after
        a step the torch calls that build them afresh (tensors, the mask's cat and padding,
        the copies a target makes of unaligned ones) find cold caches and cost ~0.2 ms, 5% of
        a decode step; written through NumPy views they cost ~0.04 ms. Each input row starts
        64-byte aligned, as TVM's kernels want, so no target copies them. The callee gets the
        same tensors each call: it must not keep them past the call (CUDA graphs would: a
        device other than the CPU takes `verify`)."""
        if self.device != "cpu":
            return self.verify(*tree.inputs(prefix, size))
        tokens, pos, write, among = tree.feeds(prefix, size)
        width = self.mask_width(prefix + size)
        got = self._verify_feeds.get((size, width))
        if got is None:
            got = self._verify_feeds[size, width] = _tree_buffers(size, width)
        ids, at, slots, visible, rows, grid = got
        rows[0, :size], rows[1, :size], rows[2, :size] = tokens, pos, write
        grid[:, :prefix] = 1  # every node sees the cache
        grid[:, prefix : prefix + size] = among
        grid[:, prefix + size :] = 0  # slots past the tree: read, never seen
        return self.functions[f"verify_{size}"](ids, at, slots, visible)[0]

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
        if self.ring or self.device != "cpu":
            ids = torch.tensor([[token]], dtype=torch.long, device=self.device)  # [1, 1]
            if self.ring:
                feeds = self._ring_feeds(pos)
            else:
                feeds = (self._positions[pos : pos + 1], self._slots(pos + 1))
            return self.functions[name](ids, *feeds)[0, -1]
        # the token and its position in a buffer kept for this (as verify_tree's): a fresh
        # tensor, a one-slot view and its aligned copy cost ~40 us of a step's time
        ids, at, rows = self._step_feed
        rows[0, 0], rows[1, 0] = token, pos
        return self.functions[name](ids, at, self._slots(pos + 1))[0, -1]

    @property
    def verify_sizes(self) -> list[int]:
        """Tree sizes this engine can verify (its verify_B functions)."""
        return sorted(int(k[7:]) for k in self.functions if k.startswith("verify_"))

    def reset(self) -> None:
        self._reset()


def _tree_buffers(size: int, width: int) -> tuple:
    """Buffers for verifies of `size` nodes reading `width` slots: (ids [1, B], pos [B],
    write [B], visible bool [B, width]) tensors and the NumPy views that fill them (rows
    [3, stride] i64, grid [B, width] u8). Each row of `rows` is a multiple of 8 int64 (64
    bytes) long, so every input starts where torch's allocator aligns (64 bytes)."""
    import numpy as np

    stride = -(-size // 8) * 8
    feed = torch.zeros(3, stride, dtype=torch.long)
    visible = torch.zeros(size, width, dtype=torch.bool)
    ids, at, slots = feed[0:1, :size], feed[1, :size], feed[2, :size]
    return ids, at, slots, visible, feed.numpy(), visible.numpy().view(np.uint8)
