"""IR -> torch: one nn.Module per IR function, running its nodes with torch ops.

Every target starts here: torch runs it (eager, torch.compile, or exported to an AOTInductor
package), and the ONNX/TVM targets export it. Weights and the KV cache are buffers that the
modules of one engine share (the same tensor objects), and the cache is updated in place.

Calling convention of every lowered function (shapes with T new tokens, L slots read):
    forward(tokens: i64[1, T], pos: i64[T], slots: i64[L]) -> logits f32[1, T or 1, vocab]
`slots` are the KV positions attention may read this call (0..L-1); passing fewer than the
cache holds is how a step reads only the filled part of a static cache.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arc.ir import Graph, KVDecl, Module, Node
from arc.ops import Op


def buffer_name(weight: str) -> str:
    return "w_" + weight.replace(".", "_").replace("+", "__")


def materialize(module: Module, stored: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The tensors of every weight the module uses; fused weights are concatenated here."""
    out = {}
    for name in module.used_weights():
        decl = module.weights[name]
        if name in stored:  # stored as is (an engine stores weights already materialized)
            out[name] = stored[name]
        elif decl.parts:
            out[name] = torch.cat([stored[p] for p in decl.parts], dim=decl.axis).contiguous()
        else:
            out[name] = stored[name]
    return out


class KVCache(nn.Module):
    """Per layer k and v of [1, kv_heads, max_seq_len + 1, head_dim], written in place.

    One spare row: slicing `cache[:, :, :L]` with L == rows makes torch.export guard L != rows,
    so the cache is one row longer than the positions it serves and L never reaches it.
    """

    def __init__(self, decl: KVDecl, device: str | torch.device = "cpu"):
        super().__init__()
        shape = (1, decl.kv_heads, decl.max_seq_len + 1, decl.head_dim)
        for i in range(decl.layers):
            self.register_buffer(f"k{i}", torch.zeros(shape, device=device))
            self.register_buffer(f"v{i}", torch.zeros(shape, device=device))

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        return getattr(self, f"k{i}"), getattr(self, f"v{i}")

    def reset(self) -> None:
        for b in self.buffers():
            b.zero_()


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
                if not hasattr(self, buffer_name(w)):
                    self.register_buffer(buffer_name(w), weights[w])
        self.kv = kv

    def w(self, name: str) -> Tensor:
        return getattr(self, buffer_name(name))

    def forward(self, tokens: Tensor, pos: Tensor, slots: Tensor) -> Tensor:
        env: dict[int, object] = {}
        feeds = {"tokens": tokens, "pos": pos, "slots": slots}
        for n in self.graph.nodes:
            if n.op is Op.INPUT:
                env[n.id] = feeds[n.attrs["name"]]
            else:
                env[n.id] = KERNELS[n.op](self, n, *[env[i] for i in n.inputs])
        return env[self.graph.outputs[0]]


# ---------------------------------------------------------------- kernels


def _rmsnorm(m: GraphModule, n: Node, x: Tensor) -> Tensor:
    var = x.pow(2).mean(-1, keepdim=True)
    return m.w(n.attrs["w"]) * (x * torch.rsqrt(var + n.attrs["eps"]))


def _linear(m: GraphModule, n: Node, x: Tensor) -> Tensor:
    w, b = m.w(n.attrs["w"]), n.attr("b")
    if m.gemv and n.shape[-2] == 1:
        # One token: written as a reduction so a compiler (Inductor) emits one fused, threaded
        # GEMV. On a 2-core CPU MKL's M=1 sgemm runs single-threaded at ~10 GB/s of weights;
        # the fused reduction streams them at ~24 GB/s. Eager, this form would be slow.
        y = (x.unsqueeze(-2) * w).sum(-1)  # [1, 1, 1, K] * [N, K] -> [1, 1, N]
        return y + m.w(b) if b else y
    return F.linear(x, w, m.w(b) if b else None)


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


def _kv_write(m: GraphModule, n: Node, k: Tensor, v: Tensor, pos: Tensor) -> int:
    kc, vc = m.kv.layer(n.attrs["layer"])
    heads, d = kc.shape[1], kc.shape[3]
    kc.index_copy_(2, pos, _heads(k, heads, d))  # cache[:, :, pos] = k  [1, KV, T, D]
    vc.index_copy_(2, pos, _heads(v, heads, d))
    return n.attrs["layer"]


def _attention(m: GraphModule, n: Node, q: Tensor, layer: int, pos: Tensor, slots: Tensor):
    kc, vc = m.kv.layer(layer)
    length = slots.shape[0]
    k, v = kc[:, :, :length], vc[:, :, :length]  # [1, KV, L, D]
    mask = slots[None, :] <= pos[:, None]  # [T, L] causal over absolute positions
    if n.attrs["mask"] == "sliding":  # Mistral: key visible iff q_pos - k_pos < window
        mask = mask & (pos[:, None] - slots[None, :] < n.attrs["window"])
    qh = _heads(q, n.attrs["heads"], n.attrs["head_dim"])  # [1, H, T, D]
    scale = n.attrs["head_dim"] ** -0.5
    if m.sdpa:
        out = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    else:
        out = _gqa_attention(qh, k, v, mask, scale)
    return _merge(out)  # [1, T, H*D]


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
    Op.EMBED: lambda m, n, t: F.embedding(t, m.w(n.attrs["w"])),
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
    kv = KVCache(module.kv, device)
    fns = {
        name: GraphModule(g, tensors, kv, gemv=gemv, sdpa=sdpa)
        for name, g in module.functions.items()
    }
    return fns, kv
