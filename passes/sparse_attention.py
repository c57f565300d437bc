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
- `block-topk` (Quest: Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient
  Long-Context LLM Inference"): the cache is cut into blocks of `block` slots; each decode step
  bounds every block's attention logit from the per-channel min and max of its keys and
  attends, with exact softmax, to the `topk` blocks with the highest bound (the block holding
  the current token always among them). Every ATTENTION becomes mask kind `block-topk` and
  every KV_WRITE gets `block=`, so the torch lowering keeps the key summaries as state beside
  the cache (arc/block_topk.py). Inputs, cache size and runtime are unchanged. Prefill stays
  dense, as in Quest; so does a decode whose `topk` blocks cover the whole cache (identical
  output to no pass).

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
Through 4096 tokens (`arc eval smollm2-135m --passes 'sparse-attention{kind=sink-window,
sink=4}' --max-seq-len 256 --long-context 4096 --prompts SHORT.json`, the 6 shipped prompts
under 100 characters; 15 min on one thread): 13.233 against 10.834 for a dense cache of 4096
(+22.1%): the ring attends to 256 of up to 4096 tokens, which the long text's later tokens
miss (StreamingLLM's claim is stability past the cache, not dense quality).

block-topk, how it is lowered (arc/block_topk.py, arc/lowering.py) and why:
- Key summaries are state kept at KV_WRITE (what Quest does), not recomputed from the cache
  in the step: a decode step then reads 2/block of the keys' bytes to score the blocks
  instead of all of them. benchmarks/block_topk_kernels.py (smollm2's 9/3 heads x 64, 4096
  context, block 16, topk 32, per layer call, 2026-11-30, shared 2-core machine at load ~2,
  two runs): kept summaries 360-459 us eager, 181-418 us compiled; recomputed 481-685 us
  eager, 319-461 compiled; dense SDPA 491-510 us eager (one run 8 ms), 549-659 compiled.
- Gather + SDPA, not FlexAttention: compiled flex with a BlockMask of the chosen blocks was
  245-290 us, on par with the gather within this machine's noise, but flex outside
  torch.compile ignores the BlockMask's blocks and attends densely (12 ms per call), so
  eager mode needs the gather anyway, and Inductor's CPU flex kernel does not compile
  without (empty) full-block tensors. One form for every --torch-mode; it exports (static
  shapes: all ceil(cache/block) blocks scored, masked past the token; topk static).
- GQA: one KV head serves G query heads; blocks are chosen per KV head (the gather reads KV
  heads, not H), a block's score the max of its G heads' bounds.
Measured on smollm2-135m, decode at 4000..4031 tokens of context (`python
benchmarks/block_topk.py --context 4000 --steps 32 --spec block=16,topk=32 --spec
block=16,topk=64`, eager, steps interleaved, 2026-11-30, on the shared 2-core machine at load
4-7, so absolute figures are several times slower than alone): dense 245.4 ms/step, topk=32
245.2 (1.00x), topk=64 291.9 (0.84x). In eager mode the ~30 extra small ops per layer (scoring,
top-k, gather, summary update) cost about what the dense attention over 4k keys they avoid
costs; the kernel microbenchmark above (compiled: 181-418 vs 549-659 us per layer) is where it
pays. Compiled (`--torch-mode jit`: torch.compile of the lowered Module, Inductor's CPU code,
the code generator AOT engines come from), 2026-11-30, no other job of ours running: dense
56.1 ms/step, topk=32 40.6 (1.38x dense), topk=64 43.3 (1.29x). Perplexity at 4k
context (`arc eval smollm2-135m --passes 'sparse-attention{kind=block-topk,block=16,topk=32}'
--max-seq-len 4096 --long-context 4096`, 2026-11-30, 19 min on one thread): 4096 tokens of
pydoc_data.topics streamed through decode one per step, each step attending 32 blocks (512 of
up to 4096 tokens): 11.430 against dense 10.834 (+5.50%); greedy agreement on the 10 shipped
prompts (x 32 tokens, all shorter than 512 tokens, so every block is chosen) 1.000.

Options: `sink` kept first tokens (>= 0, < window); `window` recent tokens kept (0: the
cache less the sinks, `--max-seq-len - sink`); `sink + window` must fit `--max-seq-len`.
block-topk: `block` slots per block (> 0, at most the cache), `topk` blocks attended per
decode step (> 0; topk * block >= --max-seq-len is dense attention).
Preconditions: causal attention with RoPE on q and k (sliding-window models are refused); only
prefill and decode functions: no speculative verify (a tree verify writes scratch slots past
the prefix, which a ring has not got; with block-topk it would attend densely where decode
does not; spec-tree refuses to run after this pass, too) and no layer-skip draft or adaptive
variants (the runtime drives those with dense inputs).

Before:  %9 = rope(%7, %1)  %11 = kv_write(%10, %8, %1, layer=0)  %12 = attention(%9, %11,
         %1, %2, mask=causal)  # %1 = pos, %2 = slots i64[L]
After:   %11 = kv_write(%9, %8, %2, layer=0)  %12 = attention(%7, %11, %1, %3,
         mask=sink-window, sink=4, window=252, w=rope.inv_freq)  # %2 = write, %3 = kpos
block-topk, after: %11 = kv_write(%10, %8, %1, layer=0, block=16)  %12 = attention(%9, %11,
         %1, %2, mask=block-topk, block=16, topk=32)  # inputs as before
"""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

from arc.errors import ArcError
from arc.ir import Graph, GraphBuilder, Module, Node, rebuild
from arc.ops import Op
from arc.pipeline import PassContext, register_pass

KINDS = ("sink-window", "block-topk")
NOT_BUILT: dict[str, str] = {}


@register_pass("sparse-attention", lossless=False)
def sparse_attention(
    module: Module,
    ctx: PassContext,
    *,
    kind: str = "sink-window",
    sink: int = 4,
    window: int = 0,
    block: int = 16,
    topk: int = 32,
) -> Module:
    """Attend to a few KV slots: a sink+window ring cache, or Quest's top-k key blocks."""
    if kind == "block-topk":
        return _block_topk(module, block, topk)
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
    _check_module(module, kind)
    return window


def _check_module(module: Module, kind: str) -> None:
    """ArcError unless `module` has only prefill and decode, with causal attention."""
    if any(name.startswith("verify_") for name in module.functions):
        why = {
            "sink-window": "a tree verify writes scratch slots past the sequence; a ring cache "
            "has none",
            "block-topk": "a tree verify would attend densely while decode attends to chosen "
            "blocks, and accepted rows moved into place would leave the block summaries stale",
        }[kind]
        raise ArcError(f"sparse-attention: kind={kind} cannot be combined with spec-tree ({why})")
    if module.kv.merged:  # a merged layer's reads substitute rows at the written slots
        raise ArcError(
            f"sparse-attention: kind={kind} cannot read merged KV layers "
            "(kv-fusion{merge=slerp}); use merge=reuse"
        )
    extra = sorted(set(module.functions) - {"prefill", "decode"})
    if extra:  # the runtime feeds the sparse inputs to prefill and decode only
        raise ArcError(
            f"sparse-attention: kind={kind} rewrites prefill and decode only; this module "
            f"also has {', '.join(extra)} (layer-skip draft/adaptive are not supported with it)"
        )
    for g in module.functions.values():
        for n in g.nodes:
            if n.op is Op.ATTENTION and n.attrs["mask"] != "causal":
                raise ArcError(
                    f"sparse-attention: @{g.name} has attention with mask {n.attrs['mask']}; "
                    f"{kind} replaces causal attention only"
                )


def _block_topk(module: Module, block: int, topk: int) -> Module:
    """Quest: every ATTENTION becomes mask kind block-topk and every KV_WRITE keeps the key
    summaries of `block`-slot blocks (arc/block_topk.py); the cache itself is unchanged."""
    cache = module.kv.max_seq_len
    if block <= 0:
        raise ArcError(f"sparse-attention: block={block} must be > 0 (slots per block)")
    if topk <= 0:
        raise ArcError(f"sparse-attention: topk={topk} must be > 0 (blocks kept per step)")
    if block > cache:
        raise ArcError(
            f"sparse-attention: block={block} is larger than the cache ({cache} slots, "
            "--max-seq-len); lower block or raise --max-seq-len"
        )
    _check_module(module, "block-topk")

    def rewrite(b: GraphBuilder, n: Node, ins: list[int]):
        if n.op is Op.KV_WRITE:
            return b.add(Op.KV_WRITE, ins, **dict(n.attrs, block=block))
        if n.op is Op.ATTENTION:
            return b.add(
                Op.ATTENTION, ins, **dict(n.attrs, mask="block-topk", block=block, topk=topk)
            )
        return None

    shapes = module.weight_shapes()
    functions = {name: rebuild(g, shapes, rewrite) for name, g in module.functions.items()}
    meta = {**module.meta, "block_topk": {"block": block, "topk": topk}}
    return module.with_functions(functions, meta=MappingProxyType(meta))


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
