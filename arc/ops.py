"""The closed set of IR ops, at block granularity, with their shape rules.

Tensors in the IR keep a flat hidden axis (`[1, T, H*D]`); ops that need heads (ROPE, ATTENTION)
carry `heads`/`head_dim` as attributes and reshape inside their lowering. Shapes are tuples of
ints and symbols (`"T"`: new tokens this call, `"L"`: KV slots read this call).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from enum import Enum

Shape = tuple[int | str, ...]


class Op(str, Enum):
    INPUT = "input"  # a named graph input
    EMBED = "embed"  # token ids -> hidden, w=[vocab, hidden]
    RMSNORM = "rmsnorm"  # Zhang & Sennrich 2019
    LINEAR = "linear"  # x @ w.T (+ b), w=[out, in]
    SLICE = "slice"  # x[..., start:stop] (the outputs of a fused projection)
    ROPE = "rope"  # rotary position embedding (Su et al. 2021), half-split layout
    KV_WRITE = "kv_write"  # write k, v at positions into a layer's cache; yields the cache state
    #   merge=0|1 (kv-fusion merge=slerp): a merged pair's writes; merge=1 takes a 4th input,
    #   the pair's merge=0 write, and stores both layers' rows merged (arc/verify.py)
    ATTENTION = "attention"  # q against the cache slots it reads, under a mask kind:
    #   causal|sliding: inputs (q, kv, pos, slots); tree: (q, kv, pos, visible) where
    #   visible: bool[T, L] says which of the L slots each tree node sees (SpecInfer's tree mask);
    #   sink-window (passes/sparse_attention.py): (q, kv, pos, kpos), q and the cached k
    #   un-rotated, rope `w` applied by cache position (pos of q, kpos: i64[L] of each slot);
    #   block-topk (Quest, arc/block_topk.py): inputs as causal; a one-token step attends to
    #   the `topk` blocks of `block` slots with the highest key-summary bound, prefill is causal
    ADD = "add"
    MUL = "mul"
    SILU = "silu"
    LAST = "last"  # keep the last position only: [1, T, D] -> [1, 1, D]
    LM_HEAD = "lm_head"  # hidden -> logits, w=[vocab, hidden]


MASK_KINDS = ("causal", "sliding", "tree", "sink-window", "block-topk")
DENSE_MASKS = ("causal", "sliding", "tree")  # what a target lowers unless it says more

# op -> number of tensor inputs
ARITY: Mapping[Op, int] = {
    Op.INPUT: 0,
    Op.EMBED: 1,
    Op.RMSNORM: 1,
    Op.LINEAR: 1,
    Op.SLICE: 1,
    Op.ROPE: 2,
    Op.KV_WRITE: 3,
    Op.ATTENTION: 4,
    Op.ADD: 2,
    Op.MUL: 2,
    Op.SILU: 1,
    Op.LAST: 1,
    Op.LM_HEAD: 1,
}

# op -> attributes it must carry
REQUIRED_ATTRS: Mapping[Op, tuple[str, ...]] = {
    Op.INPUT: ("name", "shape", "dtype"),
    Op.EMBED: ("w",),
    Op.RMSNORM: ("w", "eps"),
    Op.LINEAR: ("w",),
    Op.SLICE: ("start", "stop"),
    Op.ROPE: ("w", "heads", "head_dim"),
    Op.KV_WRITE: ("layer",),
    Op.ATTENTION: ("layer", "heads", "kv_heads", "head_dim", "mask"),
}


class ShapeError(ValueError):
    pass


def _same(shapes, attrs, weights):
    return shapes[0]


def _embed(shapes, attrs, weights):
    return (*shapes[0], weights[attrs["w"]][1])


def _linear(shapes, attrs, weights):
    out, inp = weights[attrs["w"]]
    if shapes[0][-1] != inp:
        raise ShapeError(f"linear {attrs['w']}: input width {shapes[0][-1]} != weight in {inp}")
    b = attrs.get("b")
    if b is not None and tuple(weights[b]) != (out,):
        raise ShapeError(f"linear {attrs['w']}: bias {b} shape {weights[b]} != ({out},)")
    return (*shapes[0][:-1], out)


def _slice(shapes, attrs, weights):
    start, stop = attrs["start"], attrs["stop"]
    if not 0 <= start < stop <= shapes[0][-1]:
        raise ShapeError(f"slice [{start}:{stop}] out of range for width {shapes[0][-1]}")
    return (*shapes[0][:-1], stop - start)


def _rope(shapes, attrs, weights):
    if shapes[0][-1] != attrs["heads"] * attrs["head_dim"]:
        raise ShapeError(f"rope: width {shapes[0][-1]} != heads*head_dim")
    if tuple(weights[attrs["w"]]) != (attrs["head_dim"] // 2,):
        raise ShapeError(f"rope: inv_freq {attrs['w']} must be [head_dim/2]")
    return shapes[0]


def _kv_write(shapes, attrs, weights):
    return ()


def _attention(shapes, attrs, weights):
    if shapes[0][-1] != attrs["heads"] * attrs["head_dim"]:
        raise ShapeError("attention: q width != heads*head_dim")
    if attrs["heads"] % attrs["kv_heads"]:
        raise ShapeError("attention: heads must be a multiple of kv_heads")
    if attrs["mask"] not in MASK_KINDS:
        raise ShapeError(f"attention: unknown mask kind {attrs['mask']!r}")
    if attrs["mask"] == "tree" and tuple(shapes[3])[:1] != tuple(shapes[0])[1:2]:
        raise ShapeError(f"attention: tree mask {shapes[3]} must be [T, L] for q {shapes[0]}")
    return shapes[0]


def _binary(shapes, attrs, weights):
    if shapes[0] != shapes[1]:
        raise ShapeError(f"elementwise op on different shapes {shapes[0]} and {shapes[1]}")
    return shapes[0]


def _last(shapes, attrs, weights):
    return (*shapes[0][:-2], 1, shapes[0][-1])


def _lm_head(shapes, attrs, weights):
    vocab, hidden = weights[attrs["w"]]
    if shapes[0][-1] != hidden:
        raise ShapeError(f"lm_head: width {shapes[0][-1]} != {hidden}")
    return (*shapes[0][:-1], vocab)


ShapeRule = Callable[[list[Shape], Mapping, Mapping[str, Shape]], Shape]
SHAPE_RULES: Mapping[Op, ShapeRule] = {
    Op.EMBED: _embed,
    Op.RMSNORM: _same,
    Op.LINEAR: _linear,
    Op.SLICE: _slice,
    Op.ROPE: _rope,
    Op.KV_WRITE: _kv_write,
    Op.ATTENTION: _attention,
    Op.ADD: _binary,
    Op.MUL: _binary,
    Op.SILU: _same,
    Op.LAST: _last,
    Op.LM_HEAD: _lm_head,
}


# the dtype each op yields ("kv" is the cache-state token that orders writes before reads)
def result_dtype(op: Op, in_dtypes: list[str], attrs: Mapping) -> str:
    if op is Op.INPUT:
        return attrs["dtype"]
    if op is Op.KV_WRITE:
        return "kv"
    if op is Op.EMBED:
        return "f32"
    return in_dtypes[0]


def infer_shape(op: Op, shapes: list[Shape], attrs: Mapping, weights: Mapping[str, Shape]) -> Shape:
    """The result shape of `op` on inputs of `shapes`; raises ShapeError when they do not fit."""
    if op is Op.INPUT:
        return tuple(attrs["shape"])
    return tuple(SHAPE_RULES[op](shapes, attrs, weights))
