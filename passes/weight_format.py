"""weight-format: store projection weights in a compact format, dequantized inside the GEMV.

Why it helps decoding: a decode step reads every weight once, so on a CPU its time is weight
bytes over memory bandwidth. llama.cpp (Gerganov et al., GGML block formats Q8_0/Q4_0/Q4_1)
decodes from 4.5-5 bit blocks; gpt-fast and TensorRT-LLM use weight-only int8/int4 (as in
GPTQ, Frantar et al. 2022, and AWQ, Lin et al. 2023, here without calibration: round to
nearest per group). The target lowers each format to a kernel that streams the packed codes and
dequantizes in registers, with fp32 activations and fp32 accumulation.

Modes (the formats are in arc/formats.py):
- `keep` (lossless, in -O1..-O3): a weight the checkpoint stores quantized (a GGUF's Q4_1,
  Q4_0, Q8_0 blocks) keeps its blocks exactly as stored. Its values are then exactly the fp32
  values Hugging Face dequantizes the same file to (the loader checks this bit for bit), so
  greedy output equals HF's fp32 reference. Weights stored in fp32 stay fp32.
- `f32` (lossless): every weight in fp32 (what a pipeline without this pass does).
- `int8` (LOSSY): int8 codes, one fp32 scale per `group` weights of a row (0: per row).
- `int4` (LOSSY): 4-bit codes with a scale and minimum per `group` weights (default 32); the
  embedding / LM head get `head` (default int8), as llama.cpp's Q4 files keep them at 8 bits.
- `bf16` (LOSSY): bfloat16 values.
The lossy modes' cost is measured by `arc eval` (greedy agreement, perplexity delta).

`act=q8` (LOSSY, any mode that leaves block weights): the projections over 4-bit and 8-bit
blocks (affine4, sym8) multiply activations quantized to int8 per block of the weight's group
(one fp32 scale each, max|x| / 127, round to nearest even) by the integer codes, as llama.cpp's
CPU kernels multiply a Q4_1 / Q8_0 weight by a Q8_1 row (ggml's vec_dot_q4_1_q8_1): on a CPU
with AVX-512 VNNI one vpdpbusd does 64 multiply-adds, so a speculative verify of several
tree nodes is no longer bound by fp32 arithmetic (targets/tvm_vnni.py). The node gets
`act=q8`; an affine4 block's offset still multiplies the exact sum of the block's activations.
-O1 and -O2 with the same `act` give the same greedy ids (the tvm target's verify is the
decode step's, bit for bit); against fp32 activations it is lossy, measured by `arc eval`.

Fused weights (kv-fusion's QKV and gate/up, concatenated on rows) take their parts' common
format; parts in different formats fall back to fp32 for the fused weight.
Norm and rope weights stay fp32 (they are tiny and read once per step).

Before:  %5 = linear(%4, w=layers.0.wq+wk+wv)             weight f32[960,576]
After:   %5 = linear(%4, fmt=q4_1, w=layers.0.wq+wk+wv)   weight q4_1[960,576] group 32
"""

from __future__ import annotations

from dataclasses import replace
from types import MappingProxyType

from arc import formats
from arc.errors import ArcError
from arc.ir import Module, WeightDecl, rebuild
from arc.ops import Op
from arc.pipeline import PassContext, register_pass

MODES = ("keep", "f32", "int8", "int4", "bf16")
ACTS = ("f32", "q8")
FORMATTED_OPS = (Op.LINEAR, Op.LM_HEAD, Op.EMBED)
Q8_OPS = (Op.LINEAR, Op.LM_HEAD)  # the projections act=q8 applies to
Q8_KINDS = ("affine4", "sym8")  # integer codes a VNNI dot product takes


def _lossless(opts) -> bool:
    return opts.get("mode", "keep") in ("keep", "f32") and opts.get("act", "f32") == "f32"


@register_pass("weight-format", after=("kv-fusion",), lossless=_lossless)
def weight_format(
    module: Module,
    ctx: PassContext,
    *,
    mode: str = "keep",
    group: int = 32,
    head: str = "auto",
    act: str = "f32",
) -> Module:
    """Give every LINEAR / LM_HEAD / EMBED weight a storage format; see the module docstring."""
    if mode not in MODES:
        raise ArcError(f"weight-format: mode={mode!r}; use one of {', '.join(MODES)}")
    if group < 0 or group % 2:
        raise ArcError(
            f"weight-format: group={group} must be 0 (per row) or a positive even number"
        )
    if head != "auto" and head not in ("f32", "int8", "int4", "bf16"):
        raise ArcError(f"weight-format: head={head!r}; use auto, f32, int8, int4 or bf16")
    if act not in ACTS:
        raise ArcError(f"weight-format: act={act!r}; use {' or '.join(ACTS)}")
    usage = _usage(module)
    kept = dict(module.meta.get("checkpoint_formats", {}))
    weights = dict(module.weights)
    for name, ops in usage.items():
        decl = weights[name]
        is_head = bool(ops & {Op.EMBED, Op.LM_HEAD})
        fmt, grp = _choose(name, decl, kept, weights, mode, group, head, is_head)
        if fmt != "f32":
            formats.components(fmt, decl.shape, grp)  # group divides the columns, or one line
        weights[name] = replace(decl, format=fmt, group=grp)
    q8 = {w for w in usage if act == "q8" and q8_applies(weights[w].format, weights[w].group)}
    if act == "q8" and not q8:
        raise ArcError(
            "weight-format: act=q8 needs projections in 4-bit or 8-bit blocks (mode=keep of a "
            "quantized checkpoint, mode=int4 or mode=int8); this pipeline leaves none"
        )

    def rewrite(b, node, ins):
        w = node.attr("w")
        if node.op not in FORMATTED_OPS or w is None:
            return None
        attrs = dict(node.attrs)
        attrs.pop("fmt", None)
        attrs.pop("act", None)
        fmt = weights[w].format
        extra = {"fmt": fmt} if fmt != "f32" else {}
        if node.op in Q8_OPS and w in q8:
            extra["act"] = "q8"
        return b.add(node.op, ins, **attrs, **extra)

    shapes = {k: v.shape for k, v in weights.items()}
    functions = {k: rebuild(g, shapes, rewrite) for k, g in module.functions.items()}
    return module.with_functions(functions, weights=MappingProxyType(weights))


def q8_applies(fmt: str, group: int) -> bool:
    """Whether act=q8 takes a weight in this format: integer codes in blocks of a multiple of
    8 columns (a VNNI lane sums 4 codes; a 4-bit byte holds columns e and e + g/2)."""
    return fmt != "f32" and formats.get(fmt).kind in Q8_KINDS and group > 0 and group % 8 == 0


def _usage(module: Module) -> dict[str, set]:
    """Weight name -> the formatted ops reading it as `w`."""
    out: dict[str, set] = {}
    for g in module.functions.values():
        for n in g.nodes:
            if n.op in FORMATTED_OPS and n.attr("w") is not None:
                out.setdefault(n.attrs["w"], set()).add(n.op)
    return out


def _choose(name, decl: WeightDecl, kept, weights, mode, group, head, is_head):
    """(format, group) for one weight."""
    if mode == "f32":
        return "f32", 0
    if mode == "keep":
        if decl.parts:
            fmts = {kept.get(p, "f32") for p in decl.parts}
            fmt = fmts.pop() if len(fmts) == 1 and decl.axis == 0 else "f32"
        else:
            fmt = kept.get(name, "f32")
        if fmt not in formats.FORMATS:  # "gguf:Q6_K": stored in a block type arc cannot keep
            raise ArcError(
                f"weight-format: {name} is stored as GGUF {fmt[5:]}, which arc cannot keep "
                f"(it keeps {', '.join(formats.GGUF_KEPT)}); use weight-format{{mode=f32}} "
                "or {mode=int8}"
            )
        return fmt, formats.FORMATS[fmt].group
    fmt = mode if not is_head or head == "auto" else head
    if is_head and head == "auto" and mode == "int4":
        fmt = "int8"
    if fmt in ("f32", "bf16"):
        return fmt, 0
    k = decl.shape[-1]
    return fmt, (k if group == 0 else group)
