"""kv-fusion: fuse sibling projections (Q/K/V, gate/up); optionally shrink the KV cache.

Why it helps decoding: a decode step is a chain of matrix-vector products bound by weight
reads and per-kernel overhead. Projections that read the same activation (q, k, v; gate, up)
become one GEMV over a concatenated weight, so the activation is read once and one kernel
launch replaces three (two), as in FasterTransformer/TensorRT-LLM's fused QKV and gpt-fast's
`wqkv`. See Ivanov et al. 2021, "Data Movement Is All You Need" (MLSys), on fusing transformer
operators to cut data movement. Lossless: each output column is the same dot product as before.
Preconditions: the LINEARs of a group read the same input and either all have a bias or none.

Two LOSSY options shrink the KV cache, whose reads grow with the context (off by default,
never in an -O preset; the record gives KV bytes per token before and after):
- `kv-dtype=int8` (`kv_dtype=int8` too; f32, the default, leaves the cache as it is): K and V
  are stored as int8 with one fp32 symmetric absmax scale per token per head, quantized as
  KV_WRITE stores them and dequantized where ATTENTION reads them (arc/lowering.py KVCache).
  KIVI (Liu et al. 2024) and KVQuant (Hooper et al. 2024) show KV quantizes well to few bits;
  they quantize keys per channel, which needs a group of tokens before a key can be stored —
  per token keeps each write local to its own row, at 8 bits where that matters little.
  SmolLM2-135M: 46080 -> 12240 bytes per token (3.76x).
- `share=N`: cross-layer KV sharing over the N deepest adjacent layer pairs (KV layers
  L-2,L-1; L-4,L-3; ...; at most L/2 pairs): the later layer of a pair writes no K/V and
  attends to the earlier layer's, its own k/v projections vanish (their weights leave the
  engine), and the cache holds L-N layers. This is the training-free form of Cross-Layer
  Attention (CLA, Brandon et al. 2024), pairs chosen deepest first as MiniCache (Liu et al.
  2024) finds deep layers' KV most alike. MiniCache's own merge (SLERP of the pair's K/V
  directions with per-layer magnitudes, and unmergeable-token retention) is NOT built: the
  later layer reuses the earlier layer's K/V as they are. Deeper than L/2 pairs (share > L/4)
  reach the shallow half, which MiniCache does not merge.

Measured on smollm2-135m with `arc eval` (10 shipped prompts x 32 greedy tokens; perplexity
over 1024 tokens of pydoc_data.topics, reference 12.742), 2026-11-30, shared loaded 2-core CPU:
- kv-dtype=int8: agreement 0.919 (first divergence 29.4 of 32), perplexity +0.018%;
  46080 -> 12240 KV bytes per token.
- share=1 (layers 28+29): agreement 0.447 (first divergence 11.8), perplexity +5.19%;
  46080 -> 44544 bytes per token.
- share=7 (layers 16..29, the deeper half): agreement 0.022, perplexity +836%; 46080 -> 35328.
  Training-free reuse of another layer's K/V is costly; CLA trains for it, MiniCache merges.

Before:  %5 = linear(%4, w=layers.0.wq)  %6 = linear(%4, w=layers.0.wk)  %7 = linear(%4, w=...)
After:   %5 = linear(%4, w=layers.0.wq+wk+wv)  %6 = slice(%5, start=0, stop=576)  ...
share=1: layer 29's kv_write is gone; %900 = attention(%899, %850, ...)  # %850: layer 28's
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from types import MappingProxyType

from arc.errors import ArcError
from arc.ir import KV_DTYPES, Graph, GraphBuilder, Module, Node, WeightDecl, rebuild
from arc.ops import Op
from arc.pipeline import PassContext, register_pass

_ATTENTION_USERS = (Op.ROPE, Op.KV_WRITE)


def _lossless(opts) -> bool:
    return opts.get("kv_dtype", "f32") == "f32" and not opts.get("share", 0)


@register_pass("kv-fusion", lossless=_lossless)
def kv_fusion(
    module: Module,
    ctx: PassContext,
    *,
    attention: bool = True,
    mlp: bool = True,
    kv_dtype: str = "f32",
    share: int = 0,
) -> Module:
    """Fuse projections feeding attention (q/k/v) if `attention`, the rest (gate/up) if `mlp`;
    store the KV cache as `kv_dtype`; share KV over the `share` deepest adjacent layer pairs."""
    before = module.kv
    pairs = _check_options(module, kv_dtype, share)
    if pairs:
        module = share_kv(module, pairs)
    if kv_dtype != "f32" and module.kv.dtype != kv_dtype:
        module = replace(module, kv=replace(module.kv, dtype=kv_dtype))
    weights = dict(module.weights)
    functions = {}
    for name, g in module.functions.items():
        groups = [grp for grp in _groups(g) if (attention if _feeds_attention(g, grp) else mlp)]
        functions[name] = _fuse(g, groups, weights) if groups else g
    ctx.facts["kv-fusion"] = {
        "kv_dtype": module.kv.dtype,
        "kv_layers_before": before.layers,
        "kv_layers_after": module.kv.layers,
        "shared_kv_layers": "|".join(f"{a}+{b}" for b, a in sorted(pairs.items())),
        "kv_bytes_per_token_before": before.bytes_per_token(),
        "kv_bytes_per_token_after": module.kv.bytes_per_token(),
    }
    if all(functions[k] is module.functions[k] for k in functions):
        return module
    return module.with_functions(functions, weights=MappingProxyType(weights))


# ---------------------------------------------------------------- options


def _check_options(module: Module, kv_dtype: str, share: int) -> dict[int, int]:
    """The shared pairs as {later KV layer: earlier KV layer}, after checking the options."""
    if kv_dtype not in KV_DTYPES:
        raise ArcError(f"kv-fusion: kv-dtype={kv_dtype!r}; choose from {', '.join(KV_DTYPES)}")
    layers = module.kv.layers
    if share < 0 or share > layers // 2:
        raise ArcError(
            f"kv-fusion: share={share} must be between 0 and {layers // 2} "
            f"(pairs of adjacent layers among the cache's {layers})"
        )
    if share and _shares_already(module):
        raise ArcError("kv-fusion: share= was applied already (a layer reads another's KV)")
    return {layers - 1 - 2 * j: layers - 2 - 2 * j for j in range(share)}


def _shares_already(module: Module) -> bool:
    for g in module.functions.values():
        reads = [n.attrs["layer"] for n in g.nodes if n.op is Op.ATTENTION]
        if len(reads) != len(set(reads)):
            return True
    return False


# ---------------------------------------------------------------- cross-layer sharing


def share_kv(module: Module, pairs: dict[int, int]) -> Module:
    """`module` whose KV layers `pairs` keys attend to their pair's earlier layer's K/V and
    write none; the KV layers are renumbered densely and the declaration shrinks."""
    kept = [i for i in range(module.kv.layers) if i not in pairs]
    renumber = {old: new for new, old in enumerate(kept)}
    renumber |= {b: renumber[a] for b, a in pairs.items()}
    shapes = module.weight_shapes()
    functions = {k: _share_graph(g, shapes, pairs, renumber) for k, g in module.functions.items()}
    return module.with_functions(functions, kv=replace(module.kv, layers=len(kept)))


def _share_graph(g: Graph, shapes, pairs: dict[int, int], renumber: dict[int, int]) -> Graph:
    writes = {n.attrs["layer"]: n.id for n in g.nodes if n.op is Op.KV_WRITE}
    ins = {n.id: list(n.inputs) for n in g.nodes}
    for n in g.nodes:
        if n.op is Op.ATTENTION and n.attrs["layer"] in pairs:
            src = writes.get(pairs[n.attrs["layer"]])
            if src is None:  # e.g. a layer-skip draft that skips the earlier layer of a pair
                raise ArcError(
                    f"kv-fusion: @{g.name} has no KV write of layer {pairs[n.attrs['layer']]} "
                    f"for layer {n.attrs['layer']} to share"
                )
            ins[n.id][1] = src  # read the earlier layer's cache
    live, stack = set(), list(g.outputs)
    while stack:  # what the outputs still need: the later layers' k/v projections drop out
        x = stack.pop()
        if x not in live:
            live.add(x)
            stack += ins[x]
    b, remap = GraphBuilder(g.name, shapes), {}
    for n in g.nodes:
        if n.id not in live and n.op is not Op.INPUT:
            continue
        attrs = dict(n.attrs)
        if n.op in (Op.KV_WRITE, Op.ATTENTION):
            attrs["layer"] = renumber[attrs["layer"]]
        remap[n.id] = b.add(n.op, [remap[i] for i in ins[n.id]], **attrs)
    return b.build(remap[o] for o in g.outputs)


# ---------------------------------------------------------------- projection fusion


def _groups(g: Graph) -> list[list[Node]]:
    """LINEARs that share an input, two or more, with matching bias presence."""
    by_input: dict[int, list[Node]] = defaultdict(list)
    for n in g.nodes:
        if n.op is Op.LINEAR:
            by_input[n.inputs[0]].append(n)
    return [
        grp
        for grp in by_input.values()
        if len(grp) > 1 and len({n.attr("b") is None for n in grp}) == 1
    ]


def _feeds_attention(g: Graph, group: list[Node]) -> bool:
    users = g.users()
    return any(g.node(u).op in _ATTENTION_USERS for n in group for u in users[n.id])


def _fused_name(names: list[str]) -> str:
    prefix = names[0][: names[0].rfind(".") + 1]
    if all(n.startswith(prefix) for n in names):
        return prefix + "+".join(n[len(prefix) :] for n in names)
    return "+".join(names)


def _declare(weights: dict[str, WeightDecl], parts: list[str]) -> str:
    name = _fused_name(parts)
    first = weights[parts[0]].shape
    rows = sum(weights[p].shape[0] for p in parts)
    weights[name] = WeightDecl((rows, *first[1:]), weights[parts[0]].dtype, tuple(parts), 0)
    return name


def _fuse(g: Graph, groups: list[list[Node]], weights: dict[str, WeightDecl]) -> Graph:
    plan: dict[int, tuple[int, int, int]] = {}  # node id -> (group index, start, stop)
    fused_w: list[tuple[str, str | None]] = []
    for gi, grp in enumerate(groups):
        w = _declare(weights, [n.attrs["w"] for n in grp])
        b = _declare(weights, [n.attrs["b"] for n in grp]) if grp[0].attr("b") else None
        fused_w.append((w, b))
        start = 0
        for n in grp:
            plan[n.id] = (gi, start, start + n.shape[-1])
            start += n.shape[-1]
    shapes = {k: v.shape for k, v in weights.items()}
    emitted: dict[int, int] = {}  # group index -> fused node id in the new graph

    def rewrite(b, node: Node, ins: list[int]):
        if node.id not in plan:
            return None
        gi, start, stop = plan[node.id]
        if gi not in emitted:
            w, bias = fused_w[gi]
            emitted[gi] = b.add(Op.LINEAR, ins, w=w, b=bias)  # [1, T, sum of outs]
        return b.add(Op.SLICE, [emitted[gi]], start=start, stop=stop)  # [1, T, out]

    return rebuild(g, shapes, rewrite)
