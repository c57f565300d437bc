"""Projections over formatted weights (arc/formats.py), written for Inductor's CPU code generator.

One token (a decode step): the dequantization sits inside the reduction, so Inductor emits one
threaded loop per row that loads the packed codes, unpacks and scales them in vector registers
and accumulates in fp32 — each packed byte is read once and no fp32 weight is ever written.
The reduction runs over (block, element) so the per-block scale is a broadcast scalar and the
accumulator stays a vector across blocks (a per-block horizontal sum was 1.6x slower).
A few tokens (a speculative verify): one such reduction per token over the same loop, which
Inductor fuses, so each row's codes are read and unpacked once for all the tokens.
Many tokens (prefill): the weight is dequantized once per call and multiplied by the matrix
kernel (compute-bound; the dequant is amortized over the tokens).

Shapes: x [1, T, K]; codes [N, K/g, g/2] (affine4) or [N, K/g, g] (sym8); d, m [N, K/g].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from arc.formats import dequantize, get


def _realized(x: Tensor) -> Tensor:
    """x [1, T, K] as a contiguous [T, K] that Inductor materializes once (as_strided stops it
    from inlining x's producer, e.g. RMSNorm, into the reduction and recomputing it per row)."""
    xc = x[0].contiguous()
    return torch.as_strided(xc, xc.shape, (xc.shape[1], 1))


def _dequant_blocks(fmt: str, c: dict[str, Tensor]) -> tuple[Tensor, ...]:
    """The fp32 weight as blocks: affine4 -> (low halves, high halves) [N, B, g/2] each;
    sym8 -> ([N, B, g],); dense -> ([N, 1, K],)."""
    kind = get(fmt).kind
    codes = c[""]
    if kind == "affine4":
        d, m = c["d"][..., None], c["m"][..., None]
        return (codes & 15).float() * d + m, (codes >> 4).float() * d + m
    if kind == "sym8":
        return (codes.float() * c["d"][..., None],)
    return (codes.float()[:, None, :],)


def small_t(fmt: str, c: dict[str, Tensor], x: Tensor) -> Tensor:
    """[1, T, K] -> [1, T, N] for a static T from 1 to SMALL_T: one reduction per token, over
    the same (row, block, element) loop. Inductor fuses reductions of equal shape into one loop
    and computes their common subexpression, the dequantized weight, once for all T tokens.
    (One reduction with a token axis instead re-unpacks every weight per token: T=8 cost 5.1x
    a step against 2.6x unrolled, measured on 30 SmolLM2-shaped Q4_1 layers.)"""
    parts = _dequant_blocks(fmt, c)  # each [N, B, h]
    blocks, h = parts[0].shape[1], parts[0].shape[2]
    t = x.shape[1]
    xb = _realized(x).view(t, blocks, len(parts), h)  # [T, B, parts, h]
    ys = []
    for j in range(t):
        acc = parts[0] * xb[j, None, :, 0, :]  # [N, B, h] * [1, B, h]
        for i in range(1, len(parts)):
            acc = acc + parts[i] * xb[j, None, :, i, :]
        ys.append(acc.sum((-1, -2)))  # [N]
    return torch.stack(ys, 0)[None]  # [1, T, N]


def dense(fmt: str, c: dict[str, Tensor], x: Tensor, bias: Tensor | None) -> Tensor:
    """Many tokens: dequantize once, then the matrix kernel."""
    return F.linear(x, dequantize(fmt, c), bias)


def q8_rows(x: Tensor, group: int) -> Tensor:
    """x [..., K] with each block of `group` activations quantized to int8 and back: dx =
    max|x| / 127, q = round(x * (127 / max|x|)) (nearest even), x' = q * dx; a block of zeros
    stays zero. The rounding tvm_vnni.quantize_rows does (weight-format{act=q8})."""
    xb = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)  # [..., B, g]
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax.clamp_min(1e-38), torch.zeros_like(amax))
    q = torch.round(xb * inv)
    return (q * (amax / 127.0)).reshape(x.shape)


def q8(fmt: str, c: dict[str, Tensor], x: Tensor) -> Tensor:
    """LINEAR / LM_HEAD with act=q8 (weight-format): [1, T, K] -> [1, T, N] over integer codes
    times int8 activations, in fp32 here (the value, not the VNNI kernel's speed): affine4
    sum_b d_b sum_k q_k x'_k + m_b sum_k x_k (the offset takes the exact block sums, as
    llama.cpp's Q4_1 x Q8_1 product takes the row's), sym8 sum_b d_b sum_k q_k x'_k."""
    kind = get(fmt).kind
    codes = c[""]
    n, blocks = codes.shape[0], codes.shape[1]
    group = codes.shape[2] * (2 if kind == "affine4" else 1)
    xq = q8_rows(x, group)
    if kind == "affine4":
        q = torch.cat([codes & 15, codes >> 4], -1).float()  # [N, B, g]
        w = (q * c["d"].float()[..., None]).reshape(n, blocks * group)
        sums = x.reshape(*x.shape[:-1], blocks, group).sum(-1)  # [1, T, B]
        return F.linear(xq, w) + F.linear(sums, c["m"].float())
    if kind != "sym8":
        raise ValueError(f"act=q8 takes affine4 or sym8 blocks, not {fmt}")
    w = (codes.float() * c["d"].float()[..., None]).reshape(n, blocks * group)
    return F.linear(xq, w)


def gather(fmt: str, c: dict[str, Tensor], tokens: Tensor) -> Tensor:
    """EMBED: the rows of `tokens` [1, T], dequantized -> [1, T, K]."""
    return dequantize(fmt, {k: v[tokens] for k, v in c.items()})
