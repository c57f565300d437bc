"""Weight formats: how a weight's values are stored, and the exact math that turns them into fp32.

A decode step reads every weight once, so on a CPU its time is weight bytes over memory
bandwidth; fewer bytes per weight is the other road to speed beside speculation. The formats
follow llama.cpp's GGML block types (Gerganov et al., ggml `ggml-quants.c`; the GGUF spec) and
weight-only quantization as in GPTQ/AWQ-style deployments (Frantar et al. 2022; Lin et al. 2023)
without their calibration: round-to-nearest per group.

    f32    values as they are                         4 bytes per weight
    bf16   bfloat16 values (lossy from fp32)          2
    q8_0   GGUF Q8_0: blocks of 32 int8 q, w = d*q     (kept from a GGUF)
    q4_0   GGUF Q4_0: blocks of 32 4-bit q, w = d*(q-8)  (kept from a GGUF)
    q4_1   GGUF Q4_1: blocks of 32 4-bit q, w = d*q + m  (kept from a GGUF)
    int8   arc's own: w = d*q, q int8 in [-127, 127], one d per `group` weights of a row
    int4   arc's own: w = d*q + m, q in [0, 15], one (d, m) per `group` weights of a row

Each formatted weight of logical shape [N, K] is stored as components (tensors), named
`<weight>` (the codes) and `<weight>#d`, `<weight>#m` (per-group scale and minimum):

    affine4 (q4_0, q4_1, int4)  codes u8[N, K/g, g/2]: byte j holds element j (low nibble) and
                                element j + g/2 (high nibble) of its group, as GGUF stores Q4;
                                d, m f32[N, K/g]  (q4_0 stores m = -8*d)
    sym8    (q8_0, int8)        codes i8[N, K/g, g]; d f32[N, K/g]

GGUF stores d and m as fp16; arc widens them to fp32 (exact) because the compiled kernels read
fp32 scalars much faster than fp16 ones on CPU (measured: 4.8 vs 11.9 ms per 30 layers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from arc.errors import ArcError

SEP = "#"  # weight name + SEP + component: "layers.0.wq#d"


@dataclass(frozen=True)
class Format:
    name: str
    kind: str  # "dense" | "affine4" | "sym8"
    lossless: bool  # True: the values are the checkpoint's own (kept, not re-quantized)
    group: int = 0  # fixed block size (GGUF types); 0: the `group` option decides

    def bits(self, group: int) -> float:
        """Stored bits per weight, scales included (fp32 scales, as arc stores them)."""
        if self.kind == "dense":
            return 32.0 if self.name == "f32" else 16.0
        codes = 4 if self.kind == "affine4" else 8
        scales = 64 if self.kind == "affine4" else 32
        return codes + scales / group


FORMATS = {
    f.name: f
    for f in (
        Format("f32", "dense", True),
        Format("bf16", "dense", False),
        Format("q8_0", "sym8", True, 32),
        Format("q4_0", "affine4", True, 32),
        Format("q4_1", "affine4", True, 32),
        Format("int8", "sym8", False),
        Format("int4", "affine4", False),
    )
}

# GGUF tensor types arc keeps as they are, by gguf's GGMLQuantizationType name.
GGUF_KEPT = {"F32": "f32", "Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}
_GGUF_BLOCK_BYTES = {"q8_0": 34, "q4_0": 18, "q4_1": 20}


def get(name: str) -> Format:
    if name not in FORMATS:
        raise ArcError(f"unknown weight format {name!r}; known: {', '.join(FORMATS)}")
    return FORMATS[name]


def components(fmt: str, shape: tuple[int, ...], group: int) -> dict[str, tuple[tuple, str]]:
    """Component suffix ("" for the codes) -> (shape, dtype name) for a weight [N, K]."""
    f = get(fmt)
    if f.kind == "dense":
        return {"": (tuple(shape), "float32" if fmt == "f32" else "bfloat16")}
    n, k = shape
    if group <= 0 or k % group:
        raise ArcError(f"{fmt}: group {group} does not divide the {k} columns")
    if f.kind == "affine4":
        blocks = (n, k // group)
        return {
            "": ((*blocks, group // 2), "uint8"),
            "d": (blocks, "float32"),
            "m": (blocks, "float32"),
        }
    return {"": ((n, k // group, group), "int8"), "d": ((n, k // group), "float32")}


def tensor_name(weight: str, suffix: str) -> str:
    return weight + (SEP + suffix if suffix else "")


def tensor_specs(weight: str, fmt: str, shape, group: int) -> dict[str, tuple[tuple, str]]:
    """Stored tensor name -> (shape, dtype name) for one weight."""
    return {tensor_name(weight, s): v for s, v in components(fmt, tuple(shape), group).items()}


def nbytes(fmt: str, shape, group: int) -> int:
    total = 0
    for shp, dtype in components(fmt, tuple(shape), group).values():
        numel = 1
        for d in shp:
            numel *= d
        total += numel * getattr(torch, dtype).itemsize
    return total


# ---------------------------------------------------------------- GGUF blocks


def from_gguf(fmt: str, rows: Tensor, shape: tuple[int, int]) -> dict[str, Tensor]:
    """Components of a GGUF tensor kept as stored. `rows` u8[N, bytes per row] is the tensor's
    raw data, one row per output row (llama.cpp's ne1), blocks along the row."""
    n, k = shape
    if fmt == "f32":
        return {"": rows.contiguous().view(torch.float32).reshape(n, k).clone()}
    size = _GGUF_BLOCK_BYTES[fmt]
    blocks = rows.reshape(n, k // 32, size)
    d = blocks[..., 0:2].contiguous().view(torch.float16)[..., 0].float()  # [N, K/32]
    if fmt == "q8_0":
        return {"": blocks[..., 2:].contiguous().view(torch.int8), "d": d.contiguous()}
    if fmt == "q4_0":
        return {"": blocks[..., 2:].contiguous(), "d": d.contiguous(), "m": (-8.0 * d).contiguous()}
    m = blocks[..., 2:4].contiguous().view(torch.float16)[..., 0].float()
    return {"": blocks[..., 4:].contiguous(), "d": d.contiguous(), "m": m.contiguous()}


# ---------------------------------------------------------------- quantize / dequantize


def quantize(fmt: str, w: Tensor, group: int) -> dict[str, Tensor]:
    """Round-to-nearest weight-only quantization of fp32 `w` [N, K] (lossy formats)."""
    w = w.float()
    if fmt == "f32":
        return {"": w.contiguous()}
    if fmt == "bf16":
        return {"": w.to(torch.bfloat16).contiguous()}
    n, k = w.shape
    b = w.reshape(n, k // group, group)
    if fmt == "int8":
        d = (b.abs().amax(-1) / 127).half().float()  # fp16-representable, as GGUF's Q8_0
        q = torch.where(d[..., None] > 0, b / d[..., None], 0).round().clamp(-127, 127)
        return {"": q.to(torch.int8).contiguous(), "d": d.contiguous()}
    if fmt == "int4":
        lo, hi = b.amin(-1), b.amax(-1)
        d, m = ((hi - lo) / 15).half().float(), lo.half().float()
        q = torch.where(d[..., None] > 0, (b - m[..., None]) / d[..., None], 0)
        q = q.round().clamp(0, 15).to(torch.uint8)
        half = group // 2
        codes = q[..., :half] | (q[..., half:] << 4)
        return {"": codes.contiguous(), "d": d.contiguous(), "m": m.contiguous()}
    raise ArcError(f"weight format {fmt!r} is kept from a checkpoint, not made by quantizing")


def unpack4(codes: Tensor) -> Tensor:
    """u8[..., g/2] -> the 4-bit values in element order, [..., g] (low nibbles first)."""
    return torch.cat([codes & 15, codes >> 4], dim=-1)


def dequantize(fmt: str, comps: dict[str, Tensor]) -> Tensor:
    """fp32 [N, K] (or [..., K] for gathered rows) from a weight's components: the reference
    math (GGUF's own: d * q + m in fp32)."""
    kind = get(fmt).kind
    codes = comps[""]
    if kind == "dense":
        return codes.float()
    if kind == "affine4":
        w = unpack4(codes).float() * comps["d"][..., None] + comps["m"][..., None]
    else:
        w = codes.float() * comps["d"][..., None]
    return w.reshape(*w.shape[:-2], -1)
