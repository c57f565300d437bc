"""KV rows returned, not written: the calling convention of targets whose compiled graphs do
not update a buffer in place (ONNX Runtime), and of TVM, whose library writes them in place.

Such an artifact's function takes its IR inputs followed by the whole cache, read-only,

    cache: f32[2 * layers, kv_heads, S, head_dim]    (S = max_seq_len + 1; K of layer i at
                                                       row 2i, V at 2i + 1)

and returns `(logits, rows)`, where `rows: f32[2 * layers, kv_heads, T, head_dim]` are the K and
V of this call's T new tokens. The runtime then writes the rows into the cache at the slots
the call wrote (`pos` for prefill and decode, `write` for a tree verify), one `index_copy_`.
A target that writes them into the cache itself, after its last attention has read it
(tvm: tvm_kernels.kv_rows), returns `(logits, None)`; the reads below are the same.
Nothing stacked comes back: the cache crosses the call boundary by pointer (zero copy), and
only T rows per layer are returned (STACK-NOTES measured 12 of 92 ms per step lost to
returning whole caches).

Attention inside such a graph reads L slots. The slots the call writes still hold stale rows,
so the graph attends to the cache's first L slots with those masked out, followed by its own
new rows in their place:

    keys = concat(cache[2l, :, :L], k_new)                            # [KV, L + T, D]
    mask = concat(mask_L & ~written[None, :], mask_L[:, write])       # [T, L + T]

where `mask_L` [T, L] is the IR mask kind's (causal: slot <= pos; sliding: and pos - slot <
window; tree: `visible`) and `written[s]` says slot s is in `write`. This is exactly what
writing first and reading after computes (the torch target's order), so greedy output is the
same. Slots read are always 0..L-1 (arc.runtime.steps passes a prefix of the positions), so a
slot's index is its column.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from arc.errors import ArcError
from arc.ir import KVDecl
from arc.runtime import hugepages
from arc.runtime.steps import Steps

# (IR inputs..., cache) -> (logits, rows), or (logits, None) where it wrote them in place
RowFn = Callable[..., tuple[Tensor, Tensor | None]]


LAYOUTS = ("heads", "slots")


class RowCache:
    """The cache of a rows-convention engine, owned by the runtime (see the module docstring).

    layout `heads`: cache [2N, KV, S, D], rows [2N, KV, T, D] (the module docstring's);
    layout `slots`: cache [2N, S, KV*D], rows [2N, T, KV*D]: a layer's first L slots are one
    contiguous block, so a target can hand it to its graph by pointer, with no slicing copy."""

    def __init__(self, decl: KVDecl, device: str = "cpu", layout: str = "heads"):
        if decl.dtype != "f32":  # the onnx and tvm graphs exchange fp32 rows only
            raise ArcError(f"a rows-convention cache holds f32 KV, not {decl.dtype}")
        s, kv, d = decl.max_seq_len + 1, decl.kv_heads, decl.head_dim
        shape = (2 * decl.layers, kv, s, d) if layout == "heads" else (2 * decl.layers, s, kv * d)
        # on CPU, huge pages: a step reads every layer's K/V prefix (arc/runtime/hugepages.py)
        cpu = device == "cpu"
        self._tensor = hugepages.zeros(shape) if cpu else torch.zeros(shape, device=device)
        self._faulting = hugepages.prefault(self._tensor) if cpu else None  # joined on use
        self.dim = 2 if layout == "heads" else 1  # the slot dim

    @property
    def tensor(self) -> Tensor:
        """The cache, once its pages are committed (hugepages.prefault, started at load)."""
        if self._faulting is not None:
            self._faulting.join()
            self._faulting = None
        return self._tensor

    def write(self, slots: Tensor, rows: Tensor) -> None:
        self.tensor.index_copy_(self.dim, slots, rows)  # cache[..., slots, ...] = rows

    def move(self, src: Tensor, dst: Tensor) -> None:
        """Copy the rows at slots `src` to slots `dst` (accepted tree nodes into place)."""
        self.tensor.index_copy_(self.dim, dst, self.tensor.index_select(self.dim, src))

    def reset(self) -> None:
        self.tensor.zero_()


def row_steps(
    calls: dict[str, RowFn],
    decl: KVDecl,
    device: str = "cpu",
    layout: str = "heads",
    move: Callable[[Tensor, Tensor, Tensor], None] | None = None,
) -> Steps:
    """Steps over rows-convention functions: each call reads the cache and writes back its rows.

    prefill/decode: `fn(tokens, pos, slots, cache)`, rows go to `pos`;
    verify_B: `fn(tokens, pos, write, visible, cache)`, rows go to `write`.
    `move(cache, src, dst)`: the target's own copy of accepted rows into place (tvm), else
    torch's (RowCache.move)."""
    cache = RowCache(decl, device, layout)

    def bind(name: str, fn: RowFn):
        if name.startswith("verify_"):

            def verify(tokens: Tensor, pos: Tensor, write: Tensor, visible: Tensor) -> Tensor:
                logits, rows = fn(tokens, pos, write, visible, cache.tensor)
                if rows is not None:
                    cache.write(write, rows)
                return logits

            return verify

        def step(tokens: Tensor, pos: Tensor, slots: Tensor) -> Tensor:
            logits, rows = fn(tokens, pos, slots, cache.tensor)
            if rows is not None:
                cache.write(pos, rows)
            return logits

        return step

    return Steps(
        {name: bind(name, fn) for name, fn in calls.items()},
        max_seq_len=decl.max_seq_len,
        device=device,
        reset=cache.reset,
        move=cache.move if move is None else lambda src, dst: move(cache.tensor, src, dst),
    )
