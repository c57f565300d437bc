"""sparse-attention: attend to a few kept KV slots instead of all of them.

What it does, by `kind`:
- `sink-window` (StreamingLLM: Xiao et al. 2023, "Efficient Streaming Language Models with
  Attention Sinks"): the KV cache becomes a fixed ring of `sink + window` slots. The first
  `sink` tokens of the sequence stay forever (the "attention sinks" that softmax dumps its
  mass on); the other `window` slots hold the most recent tokens, the newest overwriting the
  oldest. Every ATTENTION becomes mask kind `sink-window`, each function's `slots` input is
  replaced by `write` (the ring slot each new token's K/V goes to) and `kpos` (the position of
  each slot read in cache order), and the KV declaration shrinks to `sink + window` slots. The
  runtime (arc/runtime/steps.py) computes `write` and `kpos` from the engine's
  `meta["sink_window"]` and no longer stops with `cache_full`: generation runs past the cache
  at constant memory and constant cost per token.
- `block-topk` (Quest, Tang et al. 2024) is named but not built: refused with a clear message.

Positions: keys are cached un-rotated and RoPE is applied at attention time by position in
the cache, as the paper does (its Section 3.2): a query at cache position C-1 sees the sinks
at 0..sink-1 and the window at sink..C-1, so the relative distances stay within what the
model saw in training however long generation runs. Chosen over re-rotating cached keys
(rotate every window key back by one position per evicted token) because that costs a pass
over the whole cache per step plus drift from repeated fp32 rotations, while rotating the L
keys read, inside the attention kernel the compiler fuses, costs a few flops per key and is
exact. While the sequence fits the ring, cache position equals absolute position and the
output is identical to dense attention.

Why it helps decoding: a dense cache grows with the sequence and stops generation when full
(or needs a cache as long as the longest generation); a ring keeps memory and the per-token
attention cost flat. It changes output once the window slides (tokens between the sinks and
the window are forgotten), so it is never in an -O preset.

Measured on smollm2-135m (benchmarks/sink_window.py, 2026-11-30, eager, shared machine): with
`--max-seq-len 256` (4 sinks + 252) perplexity of the first 1024 tokens of Python's
pydoc_data.topics streamed one token per decode step is 13.35 against 12.74 for a dense
cache holding all of it (+4.7%); on text that fits the ring (`arc eval --ppl-tokens 256`) it
is identical to dense (17.2350 both) and greedy agreement is 1.000 (10 prompts x 32 tokens).

Options: `sink` kept first tokens (>= 0, < window); `window` recent tokens kept (0: the
cache less the sinks, `--max-seq-len - sink`); `sink + window` must fit `--max-seq-len`.
Preconditions: causal attention with RoPE on q and k (sliding-window models are refused); only
prefill and decode functions: no speculative verify (a tree verify writes scratch slots past
the prefix, which a ring has not got; spec-tree refuses to run after this pass, too) and no
layer-skip draft or adaptive variants (the runtime drives those with dense inputs).

Before:  %9 = rope(%7, %1)  %11 = kv_write(%10, %8, %1, layer=0)  %12 = attention(%9, %11,
         %1, %2, mask=causal)  # %1 = pos, %2 = slots i64[L]
After:   %11 = kv_write(%9, %8, %2, layer=0)  %12 = attention(%7, %11, %1, %3,
         mask=sink-window, sink=4, window=252, w=rope.inv_freq)  # %2 = write, %3 = kpos
"""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

from arc.errors import ArcError
from arc.ir import Graph, GraphBuilder, Module, Node, rebuild
from arc.ops import Op
from arc.pipeline import PassContext, register_pass

KINDS = ("sink-window",)
NOT_BUILT = {"block-topk": "Quest block top-k attention is not built yet; use sink-window"}


@register_pass("sparse-attention", lossless=False)
def sparse_attention(
    module: Module, ctx: PassContext, *, kind: str = "sink-window", sink: int = 4, window: int = 0
) -> Module:
    """Make attention read `sink` first + `window` recent tokens from a ring KV cache."""
    window = _check_options(module, kind, sink, window)
    functions = {name: _rewrite(g, module, sink, window) for name, g in module.functions.items()}
    kv = replace(module.kv, max_seq_len=sink + window)
    meta = {**module.meta, "sink_window": {"sink": sink, "window": window}}
    return module.with_functions(functions, kv=kv, meta=MappingProxyType(meta))


def _check_options(module: Module, kind: str, sink: int, window: int) -> int:
    """The window to use (0 means the cache less the sinks), or ArcError."""
    if kind in NOT_BUILT:
        raise ArcError(f"sparse-attention: kind={kind}: {NOT_BUILT[kind]}")
    if kind not in KINDS:
        raise ArcError(f"sparse-attention: unknown kind {kind!r}; choose from {', '.join(KINDS)}")
    cache = module.kv.max_seq_len
    if sink < 0:
        raise ArcError(f"sparse-attention: sink={sink} must be >= 0")
    if window < 0:
        raise ArcError(f"sparse-attention: window={window} must be >= 0 (0: the cache less sink)")
    window = window or cache - sink
    if sink + window > cache:
        raise ArcError(
            f"sparse-attention: sink + window = {sink + window} is larger than the cache "
            f"({cache} slots, --max-seq-len); lower window or raise --max-seq-len"
        )
    if sink >= window:
        raise ArcError(f"sparse-attention: sink={sink} must be smaller than window={window}")
    if any(name.startswith("verify_") for name in module.functions):
        raise ArcError(
            "sparse-attention: kind=sink-window cannot be combined with spec-tree (a tree "
            "verify writes scratch slots past the sequence; a ring cache has none)"
        )
    extra = sorted(set(module.functions) - {"prefill", "decode"})
    if extra:  # the runtime feeds a ring to prefill and decode only
        raise ArcError(
            f"sparse-attention: kind=sink-window rewrites prefill and decode only; this module "
            f"also has {', '.join(extra)} (layer-skip draft/adaptive are not supported with it)"
        )
    for g in module.functions.values():
        for n in g.nodes:
            if n.op is Op.ATTENTION and n.attrs["mask"] != "causal":
                raise ArcError(
                    f"sparse-attention: @{g.name} has attention with mask {n.attrs['mask']}; "
                    "sink-window replaces causal attention only"
                )
    return window


def _rewrite(g: Graph, module: Module, sink: int, window: int) -> Graph:
    """`g` with un-rotated K cached at `write` and attention under the sink-window mask."""
    ropes = _rope_uses(g)
    new: dict[str, int] = {}

    def rewrite(b: GraphBuilder, n: Node, ins: list[int]):
        if n.op is Op.INPUT and n.attrs["name"] == "slots":
            t = g.node(_input(g, "pos")).shape[0]
            new["write"] = b.input("write", (t,), "i64")  # [T] ring slot of each new token
            new["kpos"] = b.input("kpos", ("L",), "i64")  # [L] cache position of each slot
            return new["kpos"]
        if n.op is Op.ROPE:
            return ins[0]  # rotation moves into attention, by cache position
        if n.op is Op.KV_WRITE:
            return b.add(Op.KV_WRITE, [ins[0], ins[1], new["write"]], **dict(n.attrs))
        if n.op is Op.ATTENTION:
            rope = ropes[n.id]
            attrs = dict(n.attrs, mask="sink-window", sink=sink, window=window)
            attrs |= {"w": rope.attrs["w"], "rope_scale": rope.attr("scale")}
            return b.add(Op.ATTENTION, [ins[0], ins[1], ins[2], new["kpos"]], **attrs)
        return None

    return rebuild(g, module.weight_shapes(), rewrite)


def _input(g: Graph, name: str) -> int:
    for n in g.inputs():
        if n.attrs["name"] == name:
            return n.id
    raise ArcError(f"sparse-attention: @{g.name} has no {name!r} input")


def _rope_uses(g: Graph) -> dict[int, Node]:
    """Attention node id -> the ROPE of its q; checks that q and the cached k are ROPE'd by
    `pos` and that every ROPE feeds one of them (else the rewrite would drop a rotation)."""
    _input(g, "slots"), _input(g, "pos")
    out, covered = {}, set()
    for n in g.nodes:
        if n.op is not Op.ATTENTION:
            continue
        q, write = g.node(n.inputs[0]), g.node(n.inputs[1])
        k = g.node(write.inputs[0])
        if q.op is not Op.ROPE or k.op is not Op.ROPE:
            raise ArcError(
                f"sparse-attention: @{g.name} attention %{n.id} reads q or k without rope"
            )
        out[n.id] = q
        covered |= {q.id, k.id}
    if any(n.op is Op.ROPE and n.id not in covered for n in g.nodes):
        raise ArcError(f"sparse-attention: @{g.name} has a rope that feeds no attention")
    return out
