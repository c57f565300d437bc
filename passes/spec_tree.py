"""spec-tree: speculative decoding over a token tree — draft, verify in one forward, accept.

What it does: adds `verify_B` functions to the Module, copies of `decode` that run a whole
token tree of B nodes (the last committed token as root, plus drafted tokens) in one forward:
B = budget + 1, and with `ladder` also 2, 4, 8, 16 below it, so the runtime can verify a tree
sized to how much the draft is likely to be accepted (a verify's cost grows with B). Each
node's K/V goes to a scratch slot (`write`), its rotary position is prefix length + depth
(`pos`), and its attention reads the committed prefix and its own ancestors only (`visible`,
the ATTENTION mask kind `tree`). It sets the DecodePlan to `speculative` so
the runtime drafts a tree (arc/runtime/drafters), verifies it, accepts the longest path the
model agrees with plus one bonus token, and moves the accepted K/V into place.

Why it helps decoding: a decode step on a CPU is bound by reading every weight once. A verify
forward over a handful of tokens reads the same weights once too, so when the model accepts
k drafted tokens, one weight pass yields k + 1 tokens. Greedy acceptance keeps exactly the
tokens plain decoding would produce; sampling uses multi-branch rejection sampling, which
preserves the model's distribution. So the pass is lossless, unless `accept=relaxed` (LANTERN,
Jang et al. 2025: a drafted token is accepted for its latent neighbourhood's probability
within total variation `delta`), which is lossy and opt-in; `arc eval` measures it.

Papers: SpecInfer (Miao et al. 2024, tree attention and multi-branch verification); Medusa
(Cai et al. 2024, static trees); EAGLE-2 (Li et al. 2024, dynamic trees from draft
confidence); Token Recycling (Luo et al. 2024, the `recycle` drafter); prompt lookup
decoding (Saxena 2023) for `ngram`; Draft & Verify (Zhang et al. 2024) and SWIFT (Xia et al.
2024) for `self`, which drafts with layer-skip's `draft` function (layer-skip{mode=draft}
before this pass; `auto` then merges it with the others); Speculative Jacobi Decoding
(Santilli et al. 2023) and Lookahead decoding (Fu et al. 2024) for `jacobi`: Jacobi guesses
refined by each verify's outputs, their trajectories' n-grams pooled.

Preconditions: a `decode` function; the tree (budget + 1 nodes) fits the cache and every
sliding window (a scratch slot's index stands in for its position in the window test).

Before:  %2 = input slots  # i64[L]   %9 = attention(%5, %8, %1, %2, mask=causal)  # [1,1,576]
After:   @verify_9: %2 = input write  # i64[9]   %3 = input visible  # bool[9,L]
         %10 = attention(%6, %9, %1, %3, mask=tree)  # f32[1,9,576]
"""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

from arc.errors import ArcError
from arc.ir import DecodePlan, GraphBuilder, Module, Node, rebuild
from arc.ops import Op
from arc.pipeline import PassContext, register_pass

DRAFTERS = ("ngram", "recycle", "jacobi", "self", "corpus", "auto")
MAX_CORPUS = 20000  # self-written questions answered for the `corpus` datastore
SHAPES = ("static", "dynamic")
MAX_BUDGET = 31  # verify compiles with static T = budget + 1; the small-T kernels go to 32


ACCEPTS = ("exact", "relaxed")


def _lossless(opts) -> bool:
    """Exact acceptance keeps greedy output identical; relaxed (LANTERN) changes it."""
    return opts.get("accept", "exact") == "exact"


@register_pass("spec-tree", after=("kv-fusion",), lossless=_lossless)
def spec_tree(
    module: Module,
    ctx: PassContext,
    *,
    draft: str = "auto",
    budget: int = 7,
    depth: int = 0,
    shape: str = "dynamic",
    adaptive: bool = True,
    ladder: str = "pow2",
    tune: bool = False,
    accept: str = "exact",
    delta: float = 0.1,
    sim: float = 0.65,
    corpus: int = 0,
) -> Module:
    """Add `verify_B` functions (trees of B nodes: budget + 1 and the `ladder` below it, so
    the runtime can fit the tree to the draft) and a speculative plan. `depth`: the longest
    drafted path; 0 (default) is the budget, so a tree may be one chain where a copy runs
    on. (It was 5: with trees of at most 8 nodes, the long copies of code edits and
    summaries then took 4-node verifies, where a 7-deep chain yields up to 8 tokens for
    1.6x a 4-node verify's time; -O2 tvm, 10 prompts paired with plain, cold: geomean
    1.281x at depth 7 against 1.233x at 5, code-edit 3.6-4.0 -> 4.4-4.6 tokens per
    forward; 2026-12-05, Intel Xeon.) `ladder`: `pow2`
    (2, 4, 8, 16 below budget + 1; `true` says the same), `dense` (every size from 2: free to
    build on the tvm target, whose verify is one function of symbolic T; the torch and onnx
    targets build a graph per size), `none` (budget + 1 only; `false`). Dense trees need not
    round up to a power of two, but measured no gain: -O2 on tvm, 10 prompts x 4 rounds in
    one process on the AMD EPYC, dense / pow2 1.007x overall (an A/A run of the same setup:
    1.000x, per prompt +-5-8%).
    `tune` (-O3): after the build, arc compile measures verify cost and tokens per second
    per tree size on this device and caps the plan's tree there (arc/tune.py).
    `accept=relaxed` (lossy): LANTERN's relaxed acceptance of a drafted token whose latent
    neighbourhood (output-embedding cosine >= `sim`) carries the model's choice, within
    total variation `delta` (arc/runtime/relaxed.py).
    `corpus` (N > 0): after the build, arc compile has the model write N questions and answer
    them greedily (arc/corpus.py); the answers become a datastore the `corpus` drafter
    retrieves phrases from (REST, He et al. 2023), merged by `auto`."""
    depth = depth or budget
    _check_options(module, draft, budget, depth, shape)
    _check_corpus(draft, corpus)
    _check_accept(accept, delta, sim)
    if module.kv.merged:  # see passes/kv_fusion.py, merge=slerp
        raise ArcError(
            "spec-tree: cannot verify merged KV layers (kv-fusion{merge=slerp}) losslessly: "
            "a tree verify attends its nodes' exact K/V where plain decoding reads them "
            "merged; use merge=reuse"
        )
    ladder = _ladder(ladder)
    sizes = verify_sizes(budget, ladder)
    functions = dict(module.functions)
    for size in sizes:
        functions[f"verify_{size}"] = _verify_graph(module, size)
    plan = DecodePlan(
        "speculative",
        MappingProxyType(
            {
                "draft": draft,
                "budget": budget,
                "depth": depth,
                "shape": shape,
                "adaptive": adaptive,
                "ladder": ladder,
                "verify_tokens": budget + 1,
                "verify_sizes": sizes,
                "tune": tune,
                **({"accept": accept, "delta": delta, "sim": sim} if accept != "exact" else {}),
                **({"corpus": corpus} if corpus else {}),
            }
        ),
    )
    return module.with_functions(functions, plan=plan)


LADDERS = ("pow2", "dense", "none")


def _ladder(ladder) -> str:
    """The ladder kind; `true`/`false` (this option's older values) are pow2/none."""
    kind = {"true": "pow2", "1": "pow2", "false": "none", "0": "none"}.get(
        str(ladder).lower(), str(ladder)
    )
    if kind not in LADDERS:
        raise ArcError(f"spec-tree: unknown ladder={ladder!r}; choose {', '.join(LADDERS)}")
    return kind


def verify_sizes(budget: int, ladder: str) -> list[int]:
    """Tree sizes (nodes, root included) that get a verify function."""
    top = budget + 1
    below = {"pow2": (2, 4, 8, 16), "dense": range(2, top), "none": ()}[ladder]
    return sorted({top, *(b for b in below if b < top)})


def _check_corpus(draft: str, corpus: int) -> None:
    if not 0 <= corpus <= MAX_CORPUS:
        raise ArcError(f"spec-tree: corpus={corpus} must be 0..{MAX_CORPUS} questions")
    if corpus and draft not in ("corpus", "auto"):
        raise ArcError(f"spec-tree: corpus={corpus} needs draft=corpus or auto (not {draft})")
    if draft == "corpus" and not corpus:
        raise ArcError("spec-tree: draft=corpus needs corpus=N (questions to write, N > 0)")


def _check_accept(accept: str, delta: float, sim: float) -> None:
    if accept not in ACCEPTS:
        raise ArcError(f"spec-tree: unknown accept={accept!r}; choose exact or relaxed")
    if not 0 < delta < 1:
        raise ArcError(f"spec-tree: delta={delta} must be in (0, 1): a total-variation bound")
    if not -1 <= sim <= 1:
        raise ArcError(f"spec-tree: sim={sim} must be a cosine similarity in [-1, 1]")


def _check_options(module: Module, draft: str, budget: int, depth: int, shape: str) -> None:
    if "decode" not in module.functions:
        raise ArcError("spec-tree: the module has no decode function")
    if any(name.startswith("decode_skip") for name in module.functions):
        raise ArcError("spec-tree cannot follow layer-skip{mode=adaptive}: verify is full depth")
    if draft not in DRAFTERS:
        raise ArcError(f"spec-tree: unknown drafter {draft!r}; choose from {', '.join(DRAFTERS)}")
    if draft == "self" and "draft" not in module.functions:
        raise ArcError(
            "spec-tree: draft=self needs a `draft` function (layer-skip{mode=draft} before it)"
        )
    masks = {n.attrs["mask"] for n in module.functions["decode"].nodes if n.op is Op.ATTENTION}
    if "sink-window" in masks:
        raise ArcError(
            "spec-tree: cannot run after sparse-attention{kind=sink-window} (a tree verify "
            "writes scratch slots past the sequence; a ring cache has none)"
        )
    if "block-topk" in masks:
        raise ArcError(
            "spec-tree: cannot run after sparse-attention{kind=block-topk} (a tree verify "
            "would attend densely where decode attends to chosen blocks)"
        )
    if shape not in SHAPES:
        raise ArcError(f"spec-tree: unknown tree shape {shape!r}; choose static or dynamic")
    if not 1 <= budget <= MAX_BUDGET:
        raise ArcError(f"spec-tree: budget={budget} must be 1..{MAX_BUDGET} drafted nodes")
    if not 1 <= depth <= budget:
        raise ArcError(f"spec-tree: depth={depth} must be 1..budget ({budget}), or 0 (budget)")
    if 2 * (budget + 1) > module.kv.max_seq_len:
        raise ArcError(
            f"spec-tree: a tree of {budget + 1} nodes cannot fit a cache of "
            f"{module.kv.max_seq_len} slots with room for the sequence; lower budget"
        )
    windows = [
        n.attrs["window"]
        for n in module.functions["decode"].nodes
        if n.op is Op.ATTENTION and n.attr("window")
    ]
    if windows and budget + 1 >= min(windows):
        raise ArcError(
            f"spec-tree: a tree of {budget + 1} nodes must be smaller than the sliding "
            f"window ({min(windows)}); lower budget"
        )


def _verify_graph(module: Module, nodes: int):
    """`decode` rewritten for `nodes` tree nodes: static T, scratch writes, tree mask."""
    decode = module.functions["decode"]
    new: dict[str, int] = {}

    def rewrite(b: GraphBuilder, n: Node, ins: list[int]):
        if n.op is Op.INPUT:
            return _input(b, n.attrs["name"], nodes, new)
        if n.op is Op.KV_WRITE:
            # a merged layer's second write keeps its 4th input, the first write (kv-fusion)
            return b.add(Op.KV_WRITE, [ins[0], ins[1], new["write"], *ins[3:]], **dict(n.attrs))
        if n.op is Op.ATTENTION:
            attrs = dict(n.attrs, mask="tree")
            return b.add(Op.ATTENTION, [ins[0], ins[1], ins[2], new["visible"]], **attrs)
        return None

    g = rebuild(decode, module.weight_shapes(), rewrite)
    return replace(g, name=f"verify_{nodes}")


def _input(b: GraphBuilder, name: str, nodes: int, new: dict[str, int]) -> int:
    if name == "tokens":
        return b.input("tokens", (1, nodes), "i64")  # [1, B] tree tokens, root first
    if name == "pos":
        return b.input("pos", (nodes,), "i64")  # [B] prefix length + depth
    if name == "slots":  # replaced: where each node writes, and what each node sees
        new["write"] = b.input("write", (nodes,), "i64")  # [B] scratch cache slots
        new["visible"] = b.input("visible", (nodes, "L"), "bool")  # [B, L] tree mask
        return new["visible"]
    raise ArcError(f"spec-tree: decode has an unexpected input {name!r}")
