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
  2024) finds deep layers' KV most alike. Deeper than L/2 pairs (share > L/4) reach the
  shallow half, which MiniCache does not merge. How a pair shares, `merge=`:
  - `reuse` (the default): the later layer reuses the earlier layer's K/V as they are.
  - `slerp`: MiniCache's merge (Liu et al. 2024, "MiniCache: KV Cache Compression in Depth
    Dimension for Large Language Models", Section 4). Per token and KV head the pair's entry
    holds ONE unit direction e = SLERP(k_a/|k_a|, k_b/|k_b|, t=1/2) and both layers' norms
    |k_a|, |k_b| (fp32); layer i reads k_i ~ |k_i| e; the same for V. Both layers keep their
    k/v projections. In the IR the earlier layer's KV_WRITE gets `merge=0` and stores
    nothing; the later one's gets `merge=1` and a 4th input, the first write, and stores the
    merged rows; each ATTENTION (`merge=` its write's) reads the merged past with its own
    norms and this call's new rows exact (arc/lowering.py KVCache, MergedRows). So a prompt
    prefilled in one call attends exactly, as in MiniCache, which merges the cache after
    prefill; the merge acts from the next call on. Cache per pair: one layer's K/V (in
    kv-dtype) + 16 bytes per KV head per token (KVDecl.merged, bytes_per_token).
    NOT built: MiniCache's retention of unmergeable tokens (those whose two directions are far
    apart are kept unmerged). With a fixed-size cache that needs a per-token flag, a budget of
    spare full rows, and slot allocation that survives chunked prefill; every token is merged
    here. Also refused (one ArcError line): spec-tree (a tree verify attends its nodes' exact
    rows where plain decoding reads them merged, so it would not be lossless against it),
    sparse-attention (its ring and block summaries read the cache another way), and the onnx
    and tvm targets (targets.check_ops), whose graphs exchange plain f32 rows.

Measured on smollm2-135m with `arc eval` (10 shipped prompts x 32 greedy tokens; perplexity
over 1024 tokens of pydoc_data.topics, reference 12.742), 2026-11-30, shared loaded 2-core CPU:
- kv-dtype=int8: agreement 0.919 (first divergence 29.4 of 32), perplexity +0.018%;
  46080 -> 12240 KV bytes per token.
- share=1 (layers 28+29): agreement 0.447 (first divergence 11.8), perplexity +5.19%;
  46080 -> 44544 bytes per token.
- share=7 (layers 16..29, the deeper half): agreement 0.022, perplexity +836%; 46080 -> 35328.
  Training-free reuse of another layer's K/V is costly; CLA trains for it, MiniCache merges.
merge=slerp, measured the same way plus `--long-context 1024` (2026-11-30): the windowed
perplexity prefills each window in ONE call, where a merged pair attends exactly, so it reads
+0.000% by construction; the streamed one (128 tokens prefilled, then one decode step per
token, each reading the merged past) is the cost. Streamed, reuse gives its windowed figure.
- share=1,merge=slerp: agreement 0.766 (first divergence 23.5), streamed perplexity +4.15%
  (reuse: +5.19%); 46080 -> 44592 bytes per token.
- share=3,merge=slerp (layers 24..29): agreement 0.300 (first divergence 9.0), streamed
  +36.8% (reuse: agreement 0.038, +64.8%, 41472); 46080 -> 41616.
- share=7,merge=slerp: agreement 0.081 (first divergence 2.2), streamed +465% (reuse +836%);
  46080 -> 35664.
The merge cuts what reuse costs (share=1: disagreement 0.553 -> 0.234, perplexity cost a fifth
lower; share=7: nearly half lower), but without retention it does not make the deep half
mergeable on this 135M model (MiniCache reports its merge of the deeper half near-lossless
on far larger models, with retention). `reuse` stays the default: it composes with spec-tree,
sparse-attention and the onnx/tvm targets, which refuse `slerp`, and saves 16 bytes per KV
head per token more.

Before:  %5 = linear(%4, w=layers.0.wq)  %6 = linear(%4, w=layers.0.wk)  %7 = linear(%4, w=...)
After:   %5 = linear(%4, w=layers.0.wq+wk+wv)  %6 = slice(%5, start=0, stop=576)  ...
share=1: layer 29's kv_write is gone; %900 = attention(%899, %850, ...)  # %850: layer 28's
merge=slerp: %850 = kv_write(%848, %849, %1, layer=28, merge=0)
             %898 = kv_write(%896, %897, %1, %850, layer=28, merge=1)  # stores the pair merged
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from types import MappingProxyType

from arc.errors import ArcError
from arc.ir import KV_DTYPES, Graph, GraphBuilder, Module, Node, WeightDecl, rebuild
from arc.ops import DENSE_MASKS, Op
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
    merge: str = "reuse",
) -> Module:
    """Fuse projections feeding attention (q/k/v) if `attention`, the rest (gate/up) if `mlp`;
    store the KV cache as `kv_dtype`; share KV over the `share` deepest adjacent layer pairs,
    the later layer reusing the earlier's K/V (`merge=reuse`) or both merged (`slerp`)."""
    before = module.kv
    pairs = _check_options(module, kv_dtype, share, merge)
    if pairs:
        module = share_kv(module, pairs, merge)
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
        "kv_merge": merge if pairs else "none",
        "kv_bytes_per_token_before": before.bytes_per_token(),
        "kv_bytes_per_token_after": module.kv.bytes_per_token(),
    }
    if all(functions[k] is module.functions[k] for k in functions):
        return module
    return module.with_functions(functions, weights=MappingProxyType(weights))


# ---------------------------------------------------------------- options


MERGES = ("reuse", "slerp")


def _check_options(module: Module, kv_dtype: str, share: int, merge: str) -> dict[int, int]:
    """The shared pairs as {later KV layer: earlier KV layer}, after checking the options."""
    if kv_dtype not in KV_DTYPES:
        raise ArcError(f"kv-fusion: kv-dtype={kv_dtype!r}; choose from {', '.join(KV_DTYPES)}")
    if merge not in MERGES:
        raise ArcError(f"kv-fusion: merge={merge!r}; choose from {', '.join(MERGES)}")
    if merge == "slerp" and share:
        _check_dense(module)
    layers = module.kv.layers
    if share < 0 or share > layers // 2:
        raise ArcError(
            f"kv-fusion: share={share} must be between 0 and {layers // 2} "
            f"(pairs of adjacent layers among the cache's {layers})"
        )
    if share and _shares_already(module):
        raise ArcError("kv-fusion: share= was applied already (a layer reads another's KV)")
    return {layers - 1 - 2 * j: layers - 2 - 2 * j for j in range(share)}


def _check_dense(module: Module) -> None:
    """A merged layer substitutes its own exact rows at the slots a call writes; the sparse
    masks (a ring cache, block summaries of the stored keys) read the cache another way."""
    for g in module.functions.values():
        for n in g.nodes:
            if n.op is Op.ATTENTION and n.attrs["mask"] not in DENSE_MASKS:
                raise ArcError(
                    f"kv-fusion: merge=slerp cannot merge layers read with mask "
                    f"{n.attrs['mask']} (sparse-attention); use merge=reuse"
                )


def _shares_already(module: Module) -> bool:
    for g in module.functions.values():
        reads = [n.attrs["layer"] for n in g.nodes if n.op is Op.ATTENTION]
        if len(reads) != len(set(reads)):
            return True
    return False


# ---------------------------------------------------------------- cross-layer sharing


def share_kv(module: Module, pairs: dict[int, int], merge: str = "reuse") -> Module:
    """`module` whose KV layers `pairs` keys share their pair's earlier layer's cache entry:
    `reuse`: attend to the earlier layer's K/V and write none; `slerp`: both layers write the
    entry merged (MiniCache) and read it back with their own norms. The KV layers are
    renumbered densely (a pair's entry is its earlier layer's) and the declaration shrinks."""
    kept = [i for i in range(module.kv.layers) if i not in pairs]
    renumber = {old: new for new, old in enumerate(kept)}
    renumber |= {b: renumber[a] for b, a in pairs.items()}
    shapes = module.weight_shapes()
    functions = {
        k: _share_graph(g, shapes, pairs, renumber, merge) for k, g in module.functions.items()
    }
    merged = len(pairs) if merge == "slerp" else 0  # deepest pairs: the last cache entries
    return module.with_functions(functions, kv=replace(module.kv, layers=len(kept), merged=merged))


def _share_graph(g: Graph, shapes, pairs, renumber, merge: str) -> Graph:
    writes = {n.attrs["layer"]: n.id for n in g.nodes if n.op is Op.KV_WRITE}
    ins = {n.id: list(n.inputs) for n in g.nodes}
    roles: dict[int, int] = {}  # node id -> merge role (0 earlier layer, 1 later) for slerp
    for n in g.nodes:
        if n.op is Op.KV_WRITE and n.attrs["layer"] in pairs.values() and merge == "slerp":
            roles[n.id] = 0  # stores nothing (a draft without the later layer writes none)
        if n.op is not Op.KV_WRITE or n.attrs["layer"] not in pairs:
            continue
        src = writes.get(pairs[n.attrs["layer"]])
        if src is None:  # e.g. a layer-skip draft that skips the earlier layer of a pair
            raise ArcError(
                f"kv-fusion: @{g.name} has no KV write of layer {pairs[n.attrs['layer']]} "
                f"for layer {n.attrs['layer']} to share"
            )
        if merge == "slerp":
            ins[n.id].append(src)  # the later write merges the earlier one's rows
            roles[n.id] = 1
    for n in g.nodes:
        if n.op is Op.ATTENTION and n.attrs["layer"] in pairs and merge == "reuse":
            ins[n.id][1] = writes[pairs[n.attrs["layer"]]]  # read the earlier layer's cache
        elif n.op is Op.ATTENTION and n.inputs[1] in roles:
            roles[n.id] = roles[n.inputs[1]]
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
        if n.id in roles:
            attrs["merge"] = roles[n.id]
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
