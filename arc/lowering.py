"""IR -> torch: one nn.Module per IR function, running its nodes with torch ops.

Every target starts here: torch runs it (eager, torch.compile, or exported to an AOTInductor
package), and the ONNX/TVM targets export it. Weights and the KV cache are buffers that the
modules of one engine share (the same tensor objects), and the cache is updated in place.

Calling convention of a lowered function: its graph's inputs, in order. prefill and decode
(shapes with T new tokens, L slots read):
    forward(tokens: i64[1, T], pos: i64[T], slots: i64[L]) -> logits f32[1, T or 1, vocab]
`slots` are the KV positions attention may read this call (0..L-1); passing fewer than the
cache holds is how a step reads only the filled part of a static cache. A speculative verify
(passes/spec_tree.py) with B tree nodes:
    forward(tokens: i64[1, B], pos: i64[B], write: i64[B], visible: bool[B, L]) -> f32[1, B, vocab]
`pos` is each node's position (prefix + depth), `write` the cache slot its K/V goes to, and
`visible` which slots each node attends to (the committed prefix and its own ancestors).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arc import block_topk, formats, qlinear
from arc.errors import ArcError
from arc.ir import Graph, KVDecl, Module, Node
from arc.ops import Op


def buffer_name(tensor: str) -> str:
    return "w_" + tensor.replace(".", "_").replace("+", "__").replace(formats.SEP, "___")


def weight_tensors(module: Module, name: str) -> dict[str, tuple[tuple, str]]:
    """Stored tensor name -> (shape, dtype name) for weight `name` in its format."""
    d = module.weights[name]
    return formats.tensor_specs(name, d.format, d.shape, d.group)


def materialize(
    module: Module, stored: Mapping[str, Tensor], blocks: Mapping[str, tuple] | None = None
) -> dict[str, Tensor]:
    """Tensor name -> tensor for every weight the module uses, in the weight's format.

    `stored`: fp32 tensors by weight name, or (an engine) the tensors already materialized.
    `blocks`: weight name -> (format, components) kept from a quantized checkpoint; the kept
    formats come from here only, the lossy ones are made by quantizing the fp32 tensor.
    Fused weights are concatenated here, component by component for block formats.
    """
    blocks = blocks or {}
    out: dict[str, Tensor] = {}
    for name in module.used_weights():
        decl, names = module.weights[name], weight_tensors(module, name)
        if all(_is(stored.get(t), shape, dtype) for t, (shape, dtype) in names.items()):
            out |= {t: stored[t] for t in names}  # already materialized (an engine's tensors)
            continue
        fmt, f = decl.format, formats.get(decl.format)
        if fmt == "f32" or not f.lossless:
            w = _concat([stored[p] for p in decl.parts], decl.axis) if decl.parts else stored[name]
            comps = formats.quantize(fmt, w, decl.group) if fmt != "f32" else {"": w}
        else:  # kept as stored in the checkpoint
            parts = decl.parts or (name,)
            missing = [p for p in parts if p not in blocks or blocks[p][0] != fmt]
            if missing:
                raise ArcError(f"weight {missing[0]} is not stored as {fmt} in the checkpoint")
            comps = {s: _concat([blocks[p][1][s] for p in parts], 0) for s in blocks[parts[0]][1]}
        out |= {formats.tensor_name(name, s): t.contiguous() for s, t in comps.items()}
    return out


def as_f32(module: Module, stored: Mapping[str, Tensor], name: str) -> Tensor:
    """Weight `name` as a contiguous fp32 CPU tensor, from its materialized components (`stored`,
    as `materialize` returns them); a block format is dequantized with formats.dequantize, the
    reference math, so the values are exactly the ones the torch target computes with."""
    fmt = module.weights[name].format
    comps = {s: stored[t] for s in _suffixes(fmt) if (t := formats.tensor_name(name, s)) in stored}
    w = comps[""] if fmt == "f32" else formats.dequantize(fmt, comps)
    return w.float().contiguous().cpu()


def _is(t: Tensor | None, shape: tuple, dtype: str) -> bool:
    """`t` has this shape and dtype: a bf16 weight's one component has the checkpoint tensor's
    own name, so the name alone does not tell a materialized tensor from the fp32 one."""
    return t is not None and tuple(t.shape) == tuple(shape) and str(t.dtype) == f"torch.{dtype}"


def _concat(ts: list[Tensor], axis: int) -> Tensor:
    return ts[0] if len(ts) == 1 else torch.cat(ts, dim=axis)


class KVCache(nn.Module):
    """Per layer k and v of [1, kv_heads, max_seq_len + 1, head_dim], written in place.

    One spare row: slicing `cache[:, :, :L]` with L == rows makes torch.export guard L != rows,
    so the cache is one row longer than the positions it serves and L never reaches it.

    KV dtype int8 (kv-fusion{kv-dtype=int8}): k and v are int8, with fp32 scales `ks{i}`/`vs{i}`
    of [1, kv_heads, rows, 1]: symmetric absmax per token per head, quantized as rows are
    written and dequantized as attention reads them (KIVI, Liu et al. 2024; KVQuant, Hooper
    et al. 2024, quantize per channel for keys; per token keeps a write one-row local).

    A merged layer (kv-fusion{merge=slerp}, KVDecl.merged; MiniCache, Liu et al. 2024) holds
    a pair of model layers: k{i}/v{i} are the pair's merged unit directions (int8 + scales
    when the cache is int8) and `km{i}`/`vm{i}` [1, kv_heads, rows, 2] each layer's norms;
    layer `part` (0 earlier, 1 later) reads back norm * direction (`slerp_merge`).
    """

    def __init__(self, decl: KVDecl, device: str | torch.device = "cpu", *, block: int = 0):
        super().__init__()
        shape = (1, decl.kv_heads, decl.max_seq_len + 1, decl.head_dim)
        self.quantized = decl.dtype == "int8"
        self.block, self.max_row = block, decl.max_seq_len  # the spare row is the last
        dtype = torch.int8 if self.quantized else torch.float32
        for i in range(decl.layers):
            self.register_buffer(f"k{i}", torch.zeros(shape, dtype=dtype, device=device))
            self.register_buffer(f"v{i}", torch.zeros(shape, dtype=dtype, device=device))
            if self.quantized:
                self.register_buffer(f"ks{i}", torch.zeros(shape[:3] + (1,), device=device))
                self.register_buffer(f"vs{i}", torch.zeros(shape[:3] + (1,), device=device))
            if decl.is_merged(i):  # the pair's two norms per token per head, k and v
                self.register_buffer(f"km{i}", torch.zeros(shape[:3] + (2,), device=device))
                self.register_buffer(f"vm{i}", torch.zeros(shape[:3] + (2,), device=device))
            if block:  # block-topk: per-block key min/max per channel (arc/block_topk.py)
                nb = block_topk.blocks_of(decl.max_seq_len, block)
                summary = (1, decl.kv_heads, nb, decl.head_dim)
                self.register_buffer(f"kmin{i}", torch.zeros(summary, device=device))
                self.register_buffer(f"kmax{i}", torch.zeros(summary, device=device))

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        return getattr(self, f"k{i}"), getattr(self, f"v{i}")

    def write(self, i: int, pos: Tensor, k: Tensor, v: Tensor) -> None:
        """cache[:, :, pos] = k, v ([1, KV, T, D]), quantized when the cache is int8."""
        self._store("k", i, pos, k)
        self._store("v", i, pos, v)

    def write_merged(self, i: int, pos: Tensor, first: tuple, k: Tensor, v: Tensor) -> None:
        """Merged layer i at slots `pos`: the directions and norms of the earlier layer's rows
        `first` (k, v [1, KV, T, D]) and the later layer's `k`, `v` (MiniCache's merge)."""
        for name, a, b in (("k", first[0], k), ("v", first[1], v)):
            e, norms = slerp_merge(a, b)  # [1, KV, T, D], [1, KV, T, 2]
            self._store(name, i, pos, e)
            getattr(self, f"{name}m{i}").index_copy_(2, pos, norms)

    def _store(self, name: str, i: int, pos: Tensor, x: Tensor) -> None:
        cache = getattr(self, f"{name}{i}")
        if not self.quantized:
            cache.index_copy_(2, pos, x)
            return
        q, s = quantize_int8(x)
        cache.index_copy_(2, pos, q)
        getattr(self, f"{name}s{i}").index_copy_(2, pos, s)

    def read(self, i: int, length: int, part: int | None = None) -> tuple[Tensor, Tensor]:
        """k, v of slots 0..length-1 as fp32 [1, KV, L, D] (dequantized when int8); of a
        merged layer, layer `part`'s reconstruction norm * direction."""
        kc, vc = self.layer(i)
        k, v = kc[:, :, :length], vc[:, :, :length]
        if self.quantized:
            ks, vs = getattr(self, f"ks{i}")[:, :, :length], getattr(self, f"vs{i}")[:, :, :length]
            k, v = k.float() * ks, v.float() * vs  # [1, KV, L, D] * [1, KV, L, 1]
        if part is None:
            return k, v
        km = getattr(self, f"km{i}")[:, :, :length, part : part + 1]  # [1, KV, L, 1]
        vm = getattr(self, f"vm{i}")[:, :, :length, part : part + 1]
        return k * km, v * vm

    def gather(self, i: int, rows: Tensor) -> tuple[Tensor, Tensor]:
        """k, v of slots `rows` [1, KV, N] (per KV head) as fp32 [1, KV, N, D]."""
        kc, vc = self.layer(i)
        idx = rows[..., None]  # [1, KV, N, 1]
        k = kc.gather(2, idx.expand(-1, -1, -1, kc.shape[3]))  # [1, KV, N, D]
        v = vc.gather(2, idx.expand(-1, -1, -1, vc.shape[3]))
        if not self.quantized:
            return k, v
        ks, vs = getattr(self, f"ks{i}").gather(2, idx), getattr(self, f"vs{i}").gather(2, idx)
        return k.float() * ks, v.float() * vs

    def keys(self, i: int, rows: Tensor) -> Tensor:
        """k of slots `rows` [N] (the same for every head) as fp32 [1, KV, N, D]."""
        k = self.layer(i)[0].index_select(2, rows)
        return k.float() * getattr(self, f"ks{i}").index_select(2, rows) if self.quantized else k

    def summarize(self, i: int, pos: Tensor, one: bool) -> None:
        """Refresh layer i's block key summaries after rows `pos` [T] were written. A decode
        step (`one`) folds its key into its block's min/max (a block's first row starts it
        afresh), as Quest updates its page metadata; a prefill chunk re-summarizes every block
        from the cache, rows past the chunk's last left out."""
        kmin, kmax = getattr(self, f"kmin{i}"), getattr(self, f"kmax{i}")
        if one:
            b = pos // self.block  # [1]
            k = self.keys(i, pos)  # [1, KV, 1, D] as stored (dequantized when int8)
            fresh = pos % self.block == 0  # [1]: the first row of its block
            kmin.index_copy_(2, b, torch.where(fresh, k, torch.minimum(kmin.index_select(2, b), k)))
            kmax.index_copy_(2, b, torch.where(fresh, k, torch.maximum(kmax.index_select(2, b), k)))
            return
        nb = kmin.shape[2]
        rows = torch.arange(nb * self.block, device=pos.device).clamp(max=self.max_row)
        k = self.keys(i, rows)  # [1, KV, NB*B, D]
        k = k.view(k.shape[0], k.shape[1], nb, self.block, k.shape[3])  # [1, KV, NB, B, D]
        lo, hi = block_topk.summarize_block(k, rows.view(nb, self.block), pos[-1])
        kmin.copy_(lo)  # [1, KV, NB, D]
        kmax.copy_(hi)

    def reset(self) -> None:
        for b in self.buffers():
            b.zero_()

    def move(self, src: Tensor, dst: Tensor) -> None:
        """Copy the K/V rows (and their int8 scales) at slots `src` to slots `dst` in every layer
        (accepted tree nodes move from their scratch slots to their place in the sequence)."""
        for b in self.buffers():
            b.index_copy_(2, dst, b.index_select(2, src))  # [1, KV, n, D or 1]


def slerp_merge(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """MiniCache's merge of two layers' rows a, b [..., D]: (e [..., D], norms [..., 2]) with
    e = SLERP(a/|a|, b/|b|, t=1/2) and norms (|a|, |b|); layer j reads back norms[j] * e.

    SLERP(x, y, t) = sin((1-t)W)/sin(W) x + sin(tW)/sin(W) y, W the angle between the unit
    vectors; at t = 1/2 both weights are 1/(2 cos(W/2)) = 1/|x + y|, so e = (x+y)/|x+y|: the
    same point, with no arccos to lose precision near W = 0. A zero row has norm 0 and reads
    back as zeros; antipodal rows (x + y = 0) get e = 0.
    """
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)  # [..., 1]
    s = a / na.clamp(min=1e-30) + b / nb.clamp(min=1e-30)  # [..., D]
    e = s / s.norm(dim=-1, keepdim=True).clamp(min=1e-30)
    return e, torch.cat([na, nb], dim=-1)  # [..., D], [..., 2]


class MergedRows(NamedTuple):
    """What a merged layer's KV_WRITE yields: its cache layer, the slots this call writes, and
    the layer's own exact new rows k, v [1, KV, T, D] (its attention reads them as they are)."""

    layer: int
    slots: Tensor
    k: Tensor
    v: Tensor


def quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric absmax int8 per row of the last dim: x [..., D] -> (int8 [..., D], f32 [..., 1]).
    An all-zero row gets scale 0 and dequantizes to zeros."""
    scale = x.abs().amax(-1, keepdim=True) / 127.0  # [..., 1]
    q = torch.round(x / scale.clamp(min=1e-30)).clamp(-127, 127).to(torch.int8)
    return q, scale


class GraphModule(nn.Module):
    """Runs one IR graph. Buffers: `w_*` weights (shared), `kv.k{i}`/`kv.v{i}` cache (shared)."""

    def __init__(
        self,
        graph: Graph,
        weights: Mapping[str, Tensor],
        kv: KVCache,
        *,
        gemv: bool = False,
        sdpa: bool = True,
    ):
        super().__init__()
        self.graph, self.gemv, self.sdpa = graph, gemv, sdpa
        for n in graph.nodes:
            for w in n.weights():
                fmt = n.attr("fmt") if w == n.attr("w") else None
                for s in _suffixes(fmt) if fmt else ("",):
                    t = formats.tensor_name(w, s)
                    if not hasattr(self, buffer_name(t)):
                        self.register_buffer(buffer_name(t), weights[t])
        self.kv = kv

    def w(self, name: str) -> Tensor:
        return getattr(self, buffer_name(name))

    def comps(self, n: Node) -> dict[str, Tensor]:
        """The components of node `n`'s formatted weight `w`, by suffix."""
        w = n.attrs["w"]
        return {s: self.w(formats.tensor_name(w, s)) for s in _suffixes(n.attrs["fmt"])}

    def forward(self, *feeds: Tensor) -> Tensor:
        env: dict[int, object] = {}
        inputs = iter(feeds)  # the graph's inputs, in order
        for n in self.graph.nodes:
            if n.op is Op.INPUT:
                env[n.id] = next(inputs)
            else:
                env[n.id] = KERNELS[n.op](self, n, *[env[i] for i in n.inputs])
        return env[self.graph.outputs[0]]


# ---------------------------------------------------------------- kernels


def _rmsnorm(m: GraphModule, n: Node, x: Tensor) -> Tensor:
    var = x.pow(2).mean(-1, keepdim=True)
    return m.w(n.attrs["w"]) * (x * torch.rsqrt(var + n.attrs["eps"]))


def _suffixes(fmt: str) -> tuple[str, ...]:
    kind = formats.get(fmt).kind
    return ("", "d", "m") if kind == "affine4" else ("", "d") if kind == "sym8" else ("",)


def _linear(m: GraphModule, n: Node, x: Tensor) -> Tensor:
    if n.attr("fmt"):
        return _formatted_linear(m, n, x)
    w, b = m.w(n.attrs["w"]), n.attr("b")
    t = n.shape[-2]
    if m.gemv and isinstance(t, int) and 1 < t <= SMALL_T:
        # A few tokens (a speculative verify): one fused reduction per (row, token), the row
        # loop outermost, so each weight row streams from memory once and is re-read from L1
        # for the other tokens. sgemm re-packs the weights per call and is slow at small M on
        # this CPU; the reduction with tokens in vector lanes lets Inductor parallelize the
        # reduction itself (a thread fork per row).
        xc = x[0].contiguous()
        # as_strided makes Inductor realize x: otherwise it inlines x's producer (SiLU,
        # RMSNorm, the embedding gather) into the reduction and recomputes it for every row.
        xc = torch.as_strided(xc, xc.shape, (xc.shape[1], 1))  # [T, K]
        y = (w[:, None, :] * xc[None, :, :]).sum(-1)  # [N,1,K]*[1,T,K] -> [N, T]
        y = y.t()[None]  # [1, T, N]
        return y + m.w(b) if b else y
    if m.gemv and t == 1:
        # One token: written as a reduction so a compiler (Inductor) emits one fused, threaded
        # GEMV. On a 2-core CPU MKL's M=1 sgemm runs single-threaded at ~10 GB/s of weights;
        # the fused reduction streams them at ~24 GB/s. Eager, this form would be slow.
        y = (x.unsqueeze(-2) * w).sum(-1)  # [1, 1, 1, K] * [N, K] -> [1, 1, N]
        return y + m.w(b) if b else y
    return F.linear(x, w, m.w(b) if b else None)


SMALL_T = 32  # static token counts up to this use the small-T reduction form in _linear


def _formatted_linear(m: GraphModule, n: Node, x: Tensor) -> Tensor:
    """A LINEAR / LM_HEAD over a formatted weight (arc/qlinear.py has the forms and why)."""
    fmt, comps, b = n.attrs["fmt"], m.comps(n), n.attr("b")
    if n.attr("act") == "q8":  # int8 activations (weight-format{act=q8})
        y = qlinear.q8(fmt, comps, x)
        return y + m.w(b) if b else y
    t = n.shape[-2]
    if m.gemv and isinstance(t, int) and t <= SMALL_T:
        y = qlinear.small_t(fmt, comps, x)
        return y + m.w(b) if b else y
    return qlinear.dense(fmt, comps, x, m.w(b) if b else None)


def _embed(m: GraphModule, n: Node, tokens: Tensor) -> Tensor:
    if n.attr("fmt"):
        return qlinear.gather(n.attrs["fmt"], m.comps(n), tokens)  # [1, T, hidden]
    return F.embedding(tokens, m.w(n.attrs["w"]))


def _heads(x: Tensor, heads: int, head_dim: int) -> Tensor:
    return x.view(x.shape[0], x.shape[1], heads, head_dim).transpose(1, 2)  # [1, H, T, D]


def _merge(x: Tensor) -> Tensor:
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)  # [1, T, H*D]


def _rope(m: GraphModule, n: Node, x: Tensor, pos: Tensor) -> Tensor:
    heads, d = n.attrs["heads"], n.attrs["head_dim"]
    freqs = pos[:, None].float() * m.w(n.attrs["w"])[None, :]  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    scale = n.attr("scale", 1.0)
    cos, sin = emb.cos() * scale, emb.sin() * scale
    xh = _heads(x, heads, d)  # [1, H, T, D]
    rot = torch.cat((-xh[..., d // 2 :], xh[..., : d // 2]), dim=-1)
    return _merge(xh * cos + rot * sin)


def _kv_write(m: GraphModule, n: Node, k: Tensor, v: Tensor, pos: Tensor, first=None):
    kc, _ = m.kv.layer(n.attrs["layer"])
    heads, d = kc.shape[1], kc.shape[3]
    if n.attr("merge") is not None:  # merge=0 stores nothing; merge=1 stores the pair merged
        rows = MergedRows(n.attrs["layer"], pos, _heads(k, heads, d), _heads(v, heads, d))
        if n.attrs["merge"] == 1:
            m.kv.write_merged(rows.layer, pos, (first.k, first.v), rows.k, rows.v)
        return rows
    # cache[:, :, pos] = k, v  [1, KV, T, D]; quantized there when the cache is int8
    m.kv.write(n.attrs["layer"], pos, _heads(k, heads, d), _heads(v, heads, d))
    if n.attr("block"):  # block-topk: refresh the key summaries (arc/block_topk.py)
        m.kv.summarize(n.attrs["layer"], pos, one=m.graph.node(n.inputs[0]).shape[1] == 1)
    return n.attrs["layer"]


def _attention(m: GraphModule, n: Node, q: Tensor, layer, pos: Tensor, last: Tensor):
    """`last` is `slots` [L] (causal, sliding) or the tree's `visible` mask [T, L] (tree).
    `layer` is the KV_WRITE's cache layer, or its MergedRows for a merged layer."""
    if n.attrs["mask"] == "sink-window":
        return _sink_window_attention(m, n, q, layer, pos, last)
    if n.attrs["mask"] == "block-topk" and _sparse_step(m, n):
        return _block_topk_attention(m, n, q, layer, pos)
    kind, window = n.attrs["mask"], n.attr("window")
    if kind == "tree":
        mask, length = last, last.shape[1]
        slots = torch.arange(length, device=last.device)  # [L]
    else:
        slots, length = last, last.shape[0]
        mask = slots[None, :] <= pos[:, None]  # [T, L] causal over absolute positions
    rows = layer if n.attr("merge") is not None else None
    if rows is None:
        k, v = m.kv.read(layer, length)  # [1, KV, L, D] fp32 (dequantized if the cache is int8)
    else:  # the merged past reconstructed with this layer's norms, this call's rows exact
        k, v = m.kv.read(rows.layer, length, n.attrs["merge"])  # [1, KV, L, D]
        k, v = k.index_copy(2, rows.slots, rows.k), v.index_copy(2, rows.slots, rows.v)
    if window:  # Mistral: key visible iff q_pos - k_pos < window. In a tree, a scratch slot's
        # index is >= its node's position, so the test is exact while window > tree size.
        mask = mask & (pos[:, None] - slots[None, :] < window)
    qh = _heads(q, n.attrs["heads"], n.attrs["head_dim"])  # [1, H, T, D]
    scale = n.attrs["head_dim"] ** -0.5
    return _attend(m, qh, k, v, mask, scale)  # [1, T, H*D]


def _sink_window_attention(m: GraphModule, n: Node, q: Tensor, layer: int, pos, kpos: Tensor):
    """StreamingLLM over a ring cache (passes/sparse_attention.py): q and the cached keys are
    un-rotated; both are rotated here by cache position (`pos` [T] of the queries, `kpos` [L]
    of the slots read), and a slot is visible iff its cache position is <= the query's."""
    k, v = m.kv.read(layer, kpos.shape[0])  # [1, KV, L, D] un-rotated keys
    inv, scale = m.w(n.attrs["w"]), n.attr("rope_scale", 1.0)
    qh = _rotate(_heads(q, n.attrs["heads"], n.attrs["head_dim"]), pos, inv, scale)  # [1,H,T,D]
    k = _rotate(k, kpos, inv, scale)  # [1, KV, L, D]
    mask = kpos[None, :] <= pos[:, None]  # [T, L]
    sm = n.attrs["head_dim"] ** -0.5
    return _attend(m, qh, k, v, mask, sm)  # [1, T, H*D]


def _sparse_step(m: GraphModule, n: Node) -> bool:
    """A block-topk attention is sparse in a one-token step whose topk blocks do not cover the
    cache; prefill stays dense (as in Quest), and so does a decode that would keep every block
    (then it is exactly causal attention)."""
    blocks = block_topk.blocks_of(m.kv.max_row, n.attrs["block"])
    return n.shape[1] == 1 and n.attrs["topk"] < blocks


def _block_topk_attention(m: GraphModule, n: Node, q: Tensor, layer: int, pos: Tensor):
    """Quest (arc/block_topk.py): score every block from its key min/max, gather the rows of
    the topk best per KV head, exact attention over them."""
    block, topk = n.attrs["block"], n.attrs["topk"]
    qh = _heads(q, n.attrs["heads"], n.attrs["head_dim"])  # [1, H, 1, D]
    kmin, kmax = getattr(m.kv, f"kmin{layer}"), getattr(m.kv, f"kmax{layer}")  # [1, KV, NB, D]
    s = block_topk.scores(qh, kmin, kmax, pos, block)  # [1, KV, NB]
    rows = block_topk.select_rows(s, topk, block, m.kv.max_row)  # [1, KV, topk*block]
    k, v = m.kv.gather(layer, rows)  # [1, KV, N, D]
    mask = block_topk.visible(rows, pos, qh.shape[1])  # [1, H, 1, N]
    sm = n.attrs["head_dim"] ** -0.5
    return _attend(m, qh, k, v, mask, sm)  # [1, 1, H*D]


def _rotate(xh: Tensor, pos: Tensor, inv_freq: Tensor, scale: float) -> Tensor:
    """RoPE of xh [1, H, N, D] at positions pos [N]: the same math as _rope, per head."""
    freqs = pos[:, None].float() * inv_freq[None, :]  # [N, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [N, D]
    cos, sin = emb.cos() * scale, emb.sin() * scale
    d = xh.shape[-1]
    rot = torch.cat((-xh[..., d // 2 :], xh[..., : d // 2]), dim=-1)
    return xh * cos + rot * sin


def _attend(m: GraphModule, qh: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float):
    """Masked attention of qh [1, H, T, D] over k, v [1, KV, N, D] -> [1, T, H*D]: SDPA, or
    written out (_gqa_attention) when the module does not use SDPA."""
    if m.sdpa:
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    else:
        out = _gqa_attention(qh, k, v, mask, scale)
    return _merge(out)


def _gqa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Attention written out, K/V heads repeated for their query groups. Used where SDPA's
    kernel choice puts stride guards on the dynamic sizes (torch.export on CUDA); grouping q
    instead of repeating K/V would merge T into another dim, which guards the same way."""
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, dim=1)  # [1, H, L, D]
    v = v.repeat_interleave(g, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale  # [1, H, T, L]
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v  # [1, H, T, D]


KERNELS = {
    Op.EMBED: _embed,
    Op.RMSNORM: _rmsnorm,
    Op.LINEAR: _linear,
    Op.SLICE: lambda m, n, x: x[..., n.attrs["start"] : n.attrs["stop"]],
    Op.ROPE: _rope,
    Op.KV_WRITE: _kv_write,
    Op.ATTENTION: _attention,
    Op.ADD: lambda m, n, a, b: a + b,
    Op.MUL: lambda m, n, a, b: a * b,
    Op.SILU: lambda m, n, x: F.silu(x),
    Op.LAST: lambda m, n, x: x[:, -1:, :],
    Op.LM_HEAD: _linear,
}


def lower(
    module: Module,
    weights: Mapping[str, Tensor],
    device: str = "cpu",
    *,
    gemv: bool = False,
    sdpa: bool = True,
):
    """(modules by function name, shared KV cache) with weights moved to `device`.

    `gemv`: write one-token projections as reductions, for compiled CPU code (see _linear).
    `sdpa`: attention through F.scaled_dot_product_attention, else written out (_gqa_attention).
    """
    tensors = {k: v.to(device).contiguous() for k, v in materialize(module, weights).items()}
    kv = KVCache(module.kv, device, block=summary_block(module))
    fns = {
        name: GraphModule(g, tensors, kv, gemv=gemv, sdpa=sdpa)
        for name, g in module.functions.items()
    }
    return fns, kv


def summary_block(module: Module) -> int:
    """The block size of block-topk's key summaries (a KV_WRITE's `block`), 0 when none."""
    sizes = {
        n.attrs["block"]
        for g in module.functions.values()
        for n in g.nodes
        if n.op is Op.KV_WRITE and n.attr("block")
    }
    if len(sizes) > 1:
        raise ArcError(f"KV writes keep block summaries of different sizes {sorted(sizes)}")
    return sizes.pop() if sizes else 0
