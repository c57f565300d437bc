"""layer-skip: decode through fewer layers — drop the least important ones, or add a draft.

What it does, by `mode`:
- `static` (LOSSY): removes whole decoder layers from every function. The layers are named
  (`layers=10+11+12`, the model's own layer numbers) or chosen by measurement (`ratio=`, the
  fraction of layers to drop). A dropped layer's nodes vanish, its weights are no longer used
  (they leave the engine), and the remaining layers' KV_WRITE / ATTENTION `layer` attributes
  are renumbered densely, so the KV declaration has fewer layers: nothing is written or read
  for a dropped layer.
- `draft` (lossless on its own): removes nothing; adds a `draft` function, `decode` through a
  subset of the layers (same inputs and outputs), sharing the weights and the KV cache with
  the full model: self-speculative decoding drafts with it and verifies with the full model.
- `adaptive` (LOSSY; FiRST's idea, Jain et al. 2024, made training-free the way VARiant
  switches depth): the prompt decides. The pass adds `variants` decode functions
  `decode_skip<k>`, each skipping the k lowest-Block-Influence layers (k up to `ratio` of the
  layers), sharing weights and KV with `decode`. Per request the runtime
  (arc/runtime/adaptive.py) runs the last `probe` prompt tokens through the full model and
  every variant, and decodes the whole request with the deepest skip whose greedy tokens
  agree with the full model's on at least `agree` of them (else with all layers): one skip
  set per request, so a layer skipped for one token is skipped for all and the cache stays
  consistent. Chosen over per-token exits (CALM, FiRST's router) because those need trained
  routers or leave later tokens reading K/V a skipped layer never wrote.

Why it helps decoding: a decode step reads every layer's weights once per token, so its cost
is proportional to the layers it runs. Many middle layers change the residual stream little.

Measured on SmolLM2-135M (README "Layer skipping, measured"; tvm target, 2026-11-30): ratio
0.25 static decodes 1.25x faster than -O1 at greedy agreement 0.009 and perplexity +250%;
adaptive 1.22x at agreement 0.147; draft + spec-tree{draft=self} is lossless but 0.71x
(its draft costs ~3/4 of a step and ~45% of drafted tokens are accepted): a 135M model has
no layers to spare.

Importance (static): ShortGPT's Block Influence (Men et al. 2024), BI_i = 1 - mean over
calibration tokens of cos(x_i, x_{i+1}), the cosine similarity of a layer's input and output
hidden states; the `ratio` lowest-BI layers go. Chosen over the loss increase of dropping each
layer because one prefill over the calibration text gives every layer's score at once (the
loss criterion needs one forward per layer, per layer dropped), and ShortGPT finds BI ranks
layers as well as perplexity-based removal does on Llama models.

Draft search (draft): Draft & Verify (Zhang et al. 2023) and SWIFT (Xia et al. 2024) search
the skip set for acceptance; LayerSkip (Elhoushi et al. 2024) drafts with early layers of the
same model. Here `search=greedy` drops one layer at a time (up to `ratio` of them), each time
the one that keeps the draft's greedy acceptance highest: the fraction of calibration positions
where the draft's argmax equals the full model's, the draft reading the full model's KV of the
prefix (each position is one tree node that sees the prefix and itself; exactly a draft step
right after a verify). Each step tries the SEARCH_WIDTH layers left with
the lowest Block Influence (one forward over the calibration text each: 1-2 s for SmolLM2-135M
on 2 cores at calib=128). `search=score` takes the lowest-BI layers without a search.

KV consistency of the draft: a draft step writes K/V only for the layers it runs; the skipped
layers' slots at the drafted positions keep stale values (or zeros). The full model's verify
that follows runs every layer on the drafted tokens and rewrites every layer's K/V at those
positions (accepted tokens keep the verify's rows; rejected positions are overwritten later),
so the cache the full model reads is always its own; the draft's kept layers read the full
model's K/V for the verified prefix, which is what makes its drafts close to the full model's.

Calibration needs the model at compile time: the PassContext's fp32 `weights` and `tokenizer`
(given by arc compile, arc eval and arc profile). The text is the end of Python's
`pydoc_data.topics` (arc eval scores perplexity on its start, so the two do not overlap).
With `mode=static` and explicit `layers=` no calibration runs. The first and last layers are
never dropped. The chosen layers and their scores go to `module.meta["layer_skip"]` (in the
engine manifest) and `ctx.facts["layer-skip"]`.

Before:  %40 = add(%30, %39)  # layer 1 out   %41 = rmsnorm(%40, w=layers.2.attn_norm) ...
After:   %30 = add(%20, %29)  # layer 0 out   %31 = rmsnorm(%30, w=layers.2.attn_norm)
         %36 = kv_write(%34, %35, %1, layer=1)  (layer 2 of the model is KV layer 1)
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from arc.errors import ArcError
from arc.ir import Graph, GraphBuilder, Module
from arc.ops import Op
from arc.pipeline import PassContext, register_pass

MODES = ("static", "draft", "adaptive")
NOT_BUILT: dict[str, str] = {}
VARIANT = "decode_skip"  # adaptive: decode functions named decode_skip<k> (k layers skipped)
SEARCHES = ("greedy", "score")
SEARCH_WIDTH = 8  # greedy search: candidates tried per step, the lowest-BI layers left
CALIB_CHARS_PER_TOKEN = 8  # characters of text taken per calibration token wanted (ample)
_LAYER_WEIGHT = re.compile(r"^layers\.(\d+)\.")
_PRE, _POST = -1, 1 << 30  # labels of nodes before the first layer and after the last


def _lossless(opts) -> bool:
    return opts.get("mode", "static") == "draft"


@register_pass("layer-skip", lossless=_lossless)
def layer_skip(
    module: Module,
    ctx: PassContext,
    *,
    mode: str = "static",
    ratio: float = 0.25,
    layers: str = "",
    search: str = "greedy",
    calib: int = 128,
    variants: int = 3,
    agree: float = 0.75,
    probe: int = 8,
) -> Module:
    """Drop layers (`static`), add a `draft` function over fewer layers (`draft`), or add
    depth variants the runtime picks from per request (`adaptive`)."""
    if "decode" not in module.functions:
        raise ArcError("layer-skip: the module has no decode function")
    present = [b.index for b in blocks(module.functions["decode"])]
    named = _check_options(present, mode, ratio, layers, search, calib)
    count = len(named) if named else _count(ratio, present)
    if mode == "static":
        chosen, facts = _choose_static(module, ctx, present, named, count, calib)
        out = drop_layers(module, chosen)
    elif mode == "adaptive":
        _check_adaptive(module, named, variants, agree, probe)
        facts = _choose_variants(module, ctx, present, count, variants, calib)
        facts |= {"agree": agree, "probe": probe}
        decode = module.functions["decode"]
        extra = {
            v["function"]: replace(skip_layers(decode, module, v["skipped"]), name=v["function"])
            for v in facts["variants"]
        }
        out = module.with_functions({**module.functions, **extra})
    else:
        chosen, facts = _choose_draft(module, ctx, present, named, count, search, calib)
        draft = replace(skip_layers(module.functions["decode"], module, chosen), name="draft")
        out = module.with_functions({**module.functions, "draft": draft})
    facts = {"mode": mode, **facts}
    ctx.facts["layer-skip"] = facts
    return replace(out, meta=MappingProxyType({**module.meta, "layer_skip": facts}))


# ---------------------------------------------------------------- options


def _check_options(present, mode, ratio, layers, search, calib) -> list[int]:
    """The layers named by `layers=` (model layer numbers), checked; [] when none are."""
    if mode in NOT_BUILT:
        raise ArcError(f"layer-skip: mode={mode}: {NOT_BUILT[mode]}")
    if mode not in MODES:
        raise ArcError(f"layer-skip: unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if not 0.0 < ratio < 1.0:
        raise ArcError(f"layer-skip: ratio={ratio} must be between 0 and 1 (exclusive)")
    if search not in SEARCHES:
        raise ArcError(f"layer-skip: unknown search {search!r}; choose from greedy or score")
    if calib < 8:
        raise ArcError(f"layer-skip: calib={calib} must be at least 8 tokens")
    if len(present) < 3:
        raise ArcError(
            f"layer-skip: the model has {len(present)} layers; the first and last "
            "are never dropped, so it needs at least 3"
        )
    if not layers:
        return []
    try:
        named = sorted({int(x) for x in layers.split("+")})
    except ValueError:
        raise ArcError(
            f"layer-skip: layers={layers!r}: want layer numbers joined by +, e.g. layers=10+11+12"
        ) from None
    for i in named:
        if i not in present:
            raise ArcError(
                f"layer-skip: layer {i} is out of range (layers {present[0]}..{present[-1]})"
            )
        if i in (present[0], present[-1]):
            raise ArcError(f"layer-skip: layer {i} is the first or last layer; those are kept")
    return named


def _check_adaptive(module: Module, named, variants: int, agree: float, probe: int) -> None:
    if named:
        raise ArcError("layer-skip: mode=adaptive chooses its layers; give ratio=, not layers=")
    if not 1 <= variants <= 8:
        raise ArcError(f"layer-skip: variants={variants} must be 1..8")
    if not 0.0 < agree <= 1.0:
        raise ArcError(f"layer-skip: agree={agree} must be in (0, 1]")
    if not 1 <= probe <= 64:
        raise ArcError(f"layer-skip: probe={probe} must be 1..64 prompt tokens")
    if any(name.startswith("verify_") for name in module.functions):
        raise ArcError("layer-skip: mode=adaptive cannot follow spec-tree (verify is full depth)")


def _count(ratio: float, present: list[int]) -> int:
    """Layers to drop for `ratio`: at least one, at most all but the first and last."""
    n = max(1, round(ratio * len(present)))
    if n > len(present) - 2:
        raise ArcError(
            f"layer-skip: ratio={ratio} drops {n} of {len(present)} layers; at "
            f"most {len(present) - 2} can go (the first and last are kept)"
        )
    return n


# ---------------------------------------------------------------- layer blocks


@dataclass(frozen=True)
class Block:
    """One decoder layer in a graph: its node ids, the residual stream entering it (`entry`,
    a node before it) and leaving it (`exit`, its last add)."""

    index: int  # the model's layer number (from its weights' names: layers.<i>.*)
    nodes: frozenset[int]
    entry: int
    exit: int


def _labels(g: Graph) -> dict[int, int | None]:
    """Node id -> the layer it belongs to (_PRE / _POST outside the layers; None: an input).

    A node reading a `layers.<i>.` weight is in layer i; another node reading a weight (other
    than the rotary table every layer shares) is before or after the layers (embedding, final
    norm, head); a node without weights is in the latest layer among its inputs."""
    label: dict[int, int | None] = {}
    for n in g.nodes:
        if n.op is Op.INPUT:
            label[n.id] = None
            continue
        own = {int(m.group(1)) for w in n.weights() if (m := _LAYER_WEIGHT.match(w))}
        ins = [label[i] for i in n.inputs if label[i] is not None]
        if own:
            label[n.id] = max(own)
        elif n.weights() and n.op is not Op.ROPE:
            label[n.id] = _POST if any(x != _PRE for x in ins) else _PRE
        else:
            label[n.id] = max(ins, default=_PRE)
    return label


def blocks(g: Graph) -> list[Block]:
    """The decoder layers of `g`, in order; each must be one residual block (one hidden state
    in, one out, of the same shape), else an ArcError: dropping it would not be a layer skip."""
    label, users = _labels(g), g.users()
    out = []
    for index in sorted({x for x in label.values() if x not in (None, _PRE, _POST)}):
        nodes = frozenset(k for k, x in label.items() if x == index)
        entry = {i for k in nodes for i in g.node(k).inputs if label[i] is not None} - nodes
        exits = {k for k in nodes if set(users[k]) - nodes or k in g.outputs}
        if len(entry) != 1 or len(exits) != 1:
            raise ArcError(
                f"layer-skip: @{g.name} layer {index} is not one residual block "
                f"({len(entry)} hidden states in, {len(exits)} out)"
            )
        (e,), (x,) = entry, exits
        if g.node(e).shape != g.node(x).shape:
            raise ArcError(f"layer-skip: @{g.name} layer {index} changes the hidden shape")
        out.append(Block(index, nodes, e, x))
    return out


def skip_layers(g: Graph, module: Module, skip, renumber=None) -> Graph:
    """`g` without the layers numbered in `skip`: each one's users read its entry instead.
    `renumber` maps the KV layer of each kept KV_WRITE / ATTENTION to its new one."""
    bypass = {k: b.entry for b in blocks(g) if b.index in set(skip) for k in b.nodes}
    b = GraphBuilder(g.name, module.weight_shapes())
    remap: dict[int, int] = {}
    for n in g.nodes:  # topological: a block's entry is mapped before its nodes
        if n.id in bypass:
            remap[n.id] = remap[bypass[n.id]]
            continue
        attrs = dict(n.attrs)
        if renumber is not None and n.op in (Op.KV_WRITE, Op.ATTENTION):
            attrs["layer"] = renumber[attrs["layer"]]
        remap[n.id] = b.add(n.op, [remap[i] for i in n.inputs], **attrs)
    return b.build(remap[o] for o in g.outputs)


def drop_layers(module: Module, drop) -> Module:
    """`module` with layers `drop` removed from every function and the KV cache renumbered."""
    decode = module.functions["decode"]
    kept = [b for b in blocks(decode) if b.index not in set(drop)]
    kv_of = [_kv_layer(decode, b) for b in kept]  # the KV layer each kept block uses
    renumber = {old: new for new, old in enumerate(kv_of)}
    functions = {k: skip_layers(g, module, drop, renumber) for k, g in module.functions.items()}
    return module.with_functions(functions, kv=replace(module.kv, layers=len(kept)))


def _kv_layer(g: Graph, b: Block) -> int:
    layers = {g.node(k).attrs["layer"] for k in b.nodes if g.node(k).op is Op.KV_WRITE}
    if len(layers) != 1:
        raise ArcError(f"layer-skip: layer {b.index} writes {len(layers)} KV layers, not one")
    return layers.pop()


# ---------------------------------------------------------------- choosing layers


def _least(scores: dict[int, float], layers: list[int]) -> list[int]:
    """`layers` by Block Influence, least first (ties: the lower layer first)."""
    return sorted(layers, key=lambda i: (scores[i], i))


def _choose_static(module, ctx, present, named, count, calib):
    if named:
        return named, {"dropped": named, "criterion": "named"}
    cal = Calibration(module, ctx, min(calib, module.kv.max_seq_len))
    scores = cal.block_influence()  # layer -> BI
    dropped = sorted(_least(scores, present[1:-1])[:count])
    return dropped, {
        "dropped": dropped,
        "criterion": "block-influence",
        "layers": present,
        "scores": [round(scores[i], 6) for i in present],
        "calib_tokens": cal.n,
    }


def _choose_variants(module, ctx, present, count, variants, calib):
    """`variants` skip sets, k = count * (i + 1) / variants layers each (distinct k), each the
    k lowest-Block-Influence layers on the calibration text (so they nest)."""
    cal = Calibration(module, ctx, min(calib, module.kv.max_seq_len))
    scores = cal.block_influence()
    order = _least(scores, present[1:-1])
    sizes = sorted({max(1, round(count * (i + 1) / variants)) for i in range(variants)})
    return {
        "variants": [{"function": f"{VARIANT}{k}", "skipped": sorted(order[:k])} for k in sizes],
        "criterion": "block-influence",
        "layers": present,
        "scores": [round(scores[i], 6) for i in present],
        "calib_tokens": cal.n,
    }


def _choose_draft(module, ctx, present, named, count, search, calib):
    measured = ctx.weights is not None and ctx.tokenizer is not None
    if named and not measured:  # nothing to measure with: the draft is still well defined
        return named, {"skipped": named, "search": "named", "acceptance": None}
    cal = Calibration(module, ctx, min(calib, module.kv.max_seq_len // 2))
    if named:
        acceptance = round(cal.acceptance(named), 6)
        return named, {"skipped": named, "search": "named", "acceptance": acceptance}
    if search == "score":
        skip = sorted(_least(cal.block_influence(), present[1:-1])[:count])
        acceptance = cal.acceptance(skip)
        return skip, {
            "skipped": skip,
            "search": "score",
            "acceptance": round(acceptance, 6),
            "calib_tokens": cal.n,
        }
    scores = cal.block_influence()
    skip: list[int] = []
    steps = []
    for _ in range(count):  # greedy: add the layer whose skipping keeps acceptance highest
        left = _least(scores, [i for i in present[1:-1] if i not in skip])
        trial = {i: cal.acceptance(skip + [i]) for i in left[:SEARCH_WIDTH]}
        best = max(trial, key=lambda i: (trial[i], -i))
        skip.append(best)
        steps.append({"layer": best, "acceptance": round(trial[best], 6)})
    return sorted(skip), {
        "skipped": sorted(skip),
        "search": "greedy",
        "acceptance": steps[-1]["acceptance"],
        "steps": steps,
        "calib_tokens": cal.n,
    }


# ---------------------------------------------------------------- calibration


class Calibration:
    """The traced model run eagerly (fp32) on calibration text: one prefill of the full model
    fills the KV cache of the first `n` slots and gives its greedy token at every position and
    every layer's input and output hidden states; a draft is then scored as a tree of `n`
    nodes, each seeing the full model's prefix K/V and itself (scratch slots n..2n-1)."""

    def __init__(self, module: Module, ctx: PassContext, n: int):
        import torch

        from arc.evaluate import score_graph
        from arc.lowering import KVCache, materialize

        if ctx.weights is None or ctx.tokenizer is None:
            raise ArcError(
                "layer-skip: choosing layers needs the model's weights and tokenizer at compile "
                "time (arc compile / eval give them); or name the layers with layers=a+b+c"
            )
        full = _fp32(module, score_graph(module))  # logits at every position
        self.probe = _tree_probe(full.functions["score"], full)
        self.module, self.n = full, n
        self.tensors = materialize(full, ctx.weights)
        self.kv = KVCache(full.kv)
        self.ids = calibration_ids(ctx.tokenizer, n)  # may be fewer than asked for
        self.n = len(self.ids)
        self.tokens = torch.tensor([self.ids])  # [1, n]
        self.pos = torch.arange(self.n)  # [n]
        score = full.functions["score"]
        self.blocks = blocks(score)
        capture = {k for b in self.blocks for k in (b.entry, b.exit)}  # [1, n, hidden] each
        logits, self.hidden = self._run(score, (self.tokens, self.pos, self.pos), capture)
        self.greedy = logits[0].argmax(-1)  # [n] the full model's next token at each position

    def _run(self, g: Graph, feeds, capture=frozenset(), seed=None):
        """Run `g` node by node (arc.lowering's kernels), keeping the `capture` node values.
        `seed` (node id, value): that node's value is given, and only the nodes that depend on
        it (and the inputs) run."""
        import torch

        from arc.lowering import KERNELS, GraphModule

        gm = GraphModule(g, self.tensors, self.kv)
        env: dict[int, Any] = dict([seed]) if seed else {}
        it = iter(feeds)
        with torch.inference_mode():
            for n in g.nodes:
                if n.op is Op.INPUT:
                    env[n.id] = next(it)
                elif n.id not in env and all(i in env for i in n.inputs):
                    if seed and all(g.node(i).op is Op.INPUT for i in n.inputs):
                        continue  # reads only inputs (the embedding): before the seed
                    env[n.id] = KERNELS[n.op](gm, n, *[env[i] for i in n.inputs])
        return env[g.outputs[0]], {k: env[k] for k in capture}

    def block_influence(self) -> dict[int, float]:
        """Layer -> 1 - mean cosine similarity of its input and output hidden states."""
        import torch.nn.functional as F

        out = {}
        for b in self.blocks:
            x, y = self.hidden[b.entry][0], self.hidden[b.exit][0]  # [n, hidden]
            out[b.index] = float(1.0 - F.cosine_similarity(x, y, dim=-1).mean())
        return out

    def acceptance(self, skip) -> float:
        """Fraction of positions where the draft without layers `skip` picks the full model's
        greedy token, reading the full model's K/V of the prefix (the prefill's, slots 0..n-1)."""
        import torch

        n = self.n
        g = skip_layers(self.probe, self.module, skip)
        write = n + self.pos  # [n] scratch slots
        visible = torch.zeros(n, 2 * n, dtype=torch.bool)  # [n, 2n]
        visible[:, :n] = self.pos[None, :] < self.pos[:, None]  # the prefix before each node
        visible[self.pos, write] = True  # and the node itself
        logits, _ = self._run(g, (self.tokens, self.pos, write, visible), seed=self._seed(g, skip))
        return float((logits[0].argmax(-1) == self.greedy).float().mean())

    def _seed(self, g: Graph, skip) -> tuple[int, Any] | None:
        """Up to the first skipped layer a draft computes what the full model did (each node
        sees the full model's prefix K/V and its own): start there, from the prefill's hidden
        state entering that layer (the entry, in `g`, of the first layer after it)."""
        if not skip:
            return None
        first = min(skip)
        entry = {b.index: b.entry for b in self.blocks}[first]
        after = next((b for b in blocks(g) if b.index > first), None)
        return (after.entry, self.hidden[entry]) if after else None


def calibration_ids(tokenizer, n: int) -> list[int]:
    """Up to `n` token ids from the end of the text arc eval scores perplexity on the start of."""
    from arc.evaluate import corpus_text

    text = corpus_text()[-CALIB_CHARS_PER_TOKEN * n :]
    ids = list(tokenizer.encode(text, add_special_tokens=False))[-n:]
    if len(ids) < 8:
        raise ArcError("layer-skip: too little calibration text")
    return ids


def _fp32(module: Module, graph: Graph) -> Module:
    """A Module of `graph` alone with every weight in fp32 (calibration measures the model,
    not its storage format; the fp32 tensors are the ones the context gives)."""
    weights = {k: replace(w, format="f32", group=0) for k, w in module.weights.items()}
    m = module.with_functions({graph.name: graph}, weights=MappingProxyType(weights))
    b = GraphBuilder(graph.name, m.weight_shapes())
    remap: dict[int, int] = {}
    for n in graph.nodes:
        attrs = {k: v for k, v in n.attrs.items() if k != "fmt"}
        remap[n.id] = b.add(n.op, [remap[i] for i in n.inputs], **attrs)
    return m.with_functions({graph.name: b.build(remap[o] for o in graph.outputs)})


def _tree_probe(g: Graph, module: Module) -> Graph:
    """Score graph `g` with every position a tree node: K/V written to `write` slots, attention
    under a `tree` mask `visible` [T, L] (inputs: tokens, pos, write, visible)."""
    b = GraphBuilder("probe", module.weight_shapes())
    remap: dict[int, int] = {}
    write = visible = -1
    for n in g.nodes:
        ins = [remap[i] for i in n.inputs]
        if n.op is Op.INPUT and n.attrs["name"] == "slots":
            write = b.input("write", ("T",), "i64")  # [T] scratch slots
            remap[n.id] = visible = b.input("visible", ("T", "L"), "bool")  # [T, L]
        elif n.op is Op.KV_WRITE:
            remap[n.id] = b.add(n.op, [ins[0], ins[1], write, *ins[3:]], **dict(n.attrs))
        elif n.op is Op.ATTENTION:
            remap[n.id] = b.add(n.op, [*ins[:3], visible], **dict(n.attrs, mask="tree"))
        else:
            remap[n.id] = b.copy(n, ins)
    return b.build(remap[o] for o in g.outputs)
