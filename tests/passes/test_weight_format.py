"""weight-format: the formats' math against gguf-py's own (independent) dequantizer, the pass's
structure, and the formatted kernels against a plain fp32 matmul of the same values."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arc import formats, qlinear
from arc.errors import ArcError
from arc.ir import WeightDecl
from arc.lowering import lower, materialize, weight_tensors
from arc.ops import Op
from arc.pipeline import PassManager
from arc.verify import VerifyError, verify


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_dequantize_as_gguf_py(kind):
    """Rows quantized by gguf-py, kept by arc: arc's fp32 values are gguf-py's, bit for bit."""
    from gguf import GGMLQuantizationType, quants

    qtype = GGMLQuantizationType[kind]
    w = np.random.default_rng(0).standard_normal((24, 96)).astype(np.float32)
    rows = quants.quantize(w, qtype)  # u8[24, bytes per row]
    want = quants.dequantize(rows, qtype)
    comps = formats.from_gguf(formats.GGUF_KEPT[kind], torch.from_numpy(rows.copy()), (24, 96))
    got = formats.dequantize(formats.GGUF_KEPT[kind], comps)
    assert torch.equal(got, torch.from_numpy(want))
    spec = formats.components(formats.GGUF_KEPT[kind], (24, 96), 32)
    assert {s: (tuple(c.shape), str(c.dtype)[6:]) for s, c in comps.items()} == spec


@pytest.mark.parametrize(
    ("fmt", "group", "tol"),
    [("int8", 32, 0.01), ("int8", 0, 0.02), ("int4", 32, 0.1), ("bf16", 0, 0.005)],
)
def test_quantize_round_trip(fmt, group, tol):
    w = torch.randn(64, 128)
    g = group or 128
    comps = formats.quantize(fmt, w, g)
    back = formats.dequantize(fmt, comps)
    assert back.shape == w.shape
    err = ((back - w).norm() / w.norm()).item()
    assert 0 < err < tol  # lossy, and close
    assert formats.nbytes(fmt, (64, 128), g) == sum(
        c.numel() * c.element_size() for c in comps.values()
    )


def test_quantize_zero_and_constant_groups_exact():
    """A zero group (scale 0) gives zeros, not NaN; int4's minimum holds a constant group."""
    w = torch.zeros(4, 64)
    w[1] = 0.5
    assert torch.equal(formats.dequantize("int4", formats.quantize("int4", w, 32)), w)
    w[1] = 0.0
    assert torch.equal(formats.dequantize("int8", formats.quantize("int8", w, 32)), w)


def test_bits_per_weight():
    assert formats.get("q4_1").bits(32) == 6.0  # 4-bit codes + fp32 d and m per 32
    assert formats.get("q8_0").bits(32) == 9.0
    assert formats.get("f32").bits(0) == 32.0


@pytest.mark.parametrize("fmt", ["int4", "int8", "bf16"])
@pytest.mark.parametrize("t", [1, 3])
def test_small_t_kernel_equals_dense(fmt, t):
    """The reduction form the compiled code uses == F.linear over the dequantized weight."""
    w, x = torch.randn(40, 64), torch.randn(1, t, 64)
    comps = formats.quantize(fmt, w, 32 if fmt != "bf16" else 0)
    want = x @ formats.dequantize(fmt, comps).t()
    torch.testing.assert_close(qlinear.small_t(fmt, comps, x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qlinear.dense(fmt, comps, x, None), want, rtol=1e-5, atol=1e-5)
    toks = torch.tensor([[3, 0, 39]])
    assert torch.equal(qlinear.gather(fmt, comps, toks), formats.dequantize(fmt, comps)[toks])


def _fmt_of(module, fn="decode"):
    return {
        n.attrs["w"]: n.attr("fmt", "f32")
        for n in module.functions[fn].nodes
        if n.op in (Op.LINEAR, Op.LM_HEAD, Op.EMBED)
    }


def test_structure_int4(traced):
    _, m = traced("tiny-llama")
    out, rec = PassManager("kv-fusion,weight-format{mode=int4,group=16}").run(m)
    fmts = _fmt_of(out)
    assert fmts["layers.0.wq+wk+wv"] == "int4" and fmts["layers.1.w_down"] == "int4"
    assert fmts["embed"] == "int8" and fmts["lm_head"] == "int8"  # head=auto: 8 bits
    assert out.weights["layers.0.wq+wk+wv"].group == 16
    assert all(out.weights[w].format == "f32" for w in ("norm", "layers.0.attn_norm"))
    assert rec[1].changed and _fmt_of(m)["embed"] == "f32"  # the input is untouched
    verify(out)


def test_f32_and_keep_without_blocks_change_nothing(traced):
    _, m = traced("tiny-llama")  # an fp32 checkpoint: nothing to keep
    for spec in ("weight-format{mode=f32}", "weight-format"):
        _, rec = PassManager(spec).run(m)
        assert not rec[0].changed


def test_keep_takes_checkpoint_formats_and_common_fused_format(traced):
    from dataclasses import replace
    from types import MappingProxyType

    _, m = traced("tiny-llama")
    kept = {w: "q4_1" for w in m.weights if w.startswith("layers.0.w")}
    kept["layers.0.wv"] = "q8_0"  # q/k/v disagree: the fused QKV stays f32
    m = replace(m, meta=MappingProxyType({**m.meta, "checkpoint_formats": kept}))
    out, _ = PassManager("kv-fusion,weight-format").run(m)
    fmts = _fmt_of(out)
    assert fmts["layers.0.w_gate+w_up"] == "q4_1" and fmts["layers.0.wo"] == "q4_1"
    assert fmts["layers.0.wq+wk+wv"] == "f32" and fmts["layers.1.wo"] == "f32"


@pytest.mark.parametrize("opts", ["mode=int3", "group=7", "head=q4_1"])
def test_bad_options_are_one_line_errors(traced, opts):
    _, m = traced("tiny-llama")
    with pytest.raises(ArcError, match="weight-format"):
        PassManager(f"weight-format{{{opts}}}").run(m)


def test_group_must_divide_columns(traced):
    _, m = traced("tiny-llama")
    with pytest.raises(ArcError, match="group 48 does not divide"):
        PassManager("weight-format{mode=int4,group=48}").run(m)


def test_verify_rejects_fmt_mismatch(traced):
    from dataclasses import replace
    from types import MappingProxyType

    _, m = traced("tiny-llama")
    out, _ = PassManager("weight-format{mode=int8}").run(m)
    weights = dict(out.weights)
    weights["layers.0.wo"] = replace(weights["layers.0.wo"], format="f32")
    with pytest.raises(VerifyError, match="fmt int8 != its weight's format"):
        verify(replace(out, weights=MappingProxyType(weights)))
    weights["layers.0.wo"] = WeightDecl((64, 64), format="int4", group=5)
    with pytest.raises(VerifyError, match="does not divide"):
        verify(replace(out, weights=MappingProxyType(weights)))


@pytest.mark.parametrize("mode", ["int8", "int4", "bf16"])
def test_lowered_module_equals_dequantized_reference(traced, mode):
    """The formatted Module (eager, and with the compiled code's reduction forms) computes what
    an fp32 Module holding the dequantized values computes."""
    loaded, m = traced("tiny-llama")
    out, _ = PassManager(f"kv-fusion,weight-format{{mode={mode}}}").run(m)
    tensors = materialize(out, loaded.weights)
    fused, _ = PassManager("kv-fusion").run(m)
    ref_w = {}
    for name in fused.used_weights():
        d = out.weights[name]
        comps = {
            s: tensors[formats.tensor_name(name, s)]
            for s in formats.components(d.format, d.shape, d.group)
        }
        ref_w[name] = formats.dequantize(d.format, comps) if d.format != "f32" else comps[""]
    toks = torch.tensor([[5, 17, 3, 99, 42]])
    pos = torch.arange(5)
    results = []
    for module, weights, gemv in (
        (fused, ref_w, False),
        (out, tensors, False),
        (out, tensors, True),
    ):
        fns, kv = lower(module, weights, gemv=gemv)
        with torch.inference_mode():
            a = fns["prefill"](toks, pos, pos)
            b = fns["decode"](torch.tensor([[7]]), torch.tensor([5]), torch.arange(6))
        results.append((a, b))
    for got in results[1:]:
        for x, y in zip(results[0], got, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_keep_refuses_a_block_type_it_cannot_keep(traced):
    from dataclasses import replace
    from types import MappingProxyType

    _, m = traced("tiny-llama")
    kept = {"layers.1.wo": "gguf:Q6_K"}
    m = replace(m, meta=MappingProxyType({**m.meta, "checkpoint_formats": kept}))
    with pytest.raises(ArcError, match=r"layers\.1\.wo is stored as GGUF Q6_K.*mode=f32"):
        PassManager("weight-format").run(m)
    out, _ = PassManager("weight-format{mode=f32}").run(m)  # an fp32 build still works
    assert out.weights["layers.1.wo"].format == "f32"


@pytest.mark.parametrize("mode", ["int8", "int4", "bf16"])
def test_materialize_gives_every_weight_its_format(traced, mode):
    """Every tensor has the dtype and shape its format declares, unfused ones too: a bf16
    weight's tensor has the checkpoint tensor's own name, and once the fp32 one was taken."""
    loaded, m = traced("tiny-llama")
    out, _ = PassManager(f"kv-fusion,weight-format{{mode={mode}}}").run(m)
    tensors = materialize(out, loaded.weights)
    formatted = 0
    for name in out.used_weights():
        for t, (shape, dtype) in weight_tensors(out, name).items():
            assert tuple(tensors[t].shape) == tuple(shape) and str(tensors[t].dtype) == (
                f"torch.{dtype}"
            ), (name, t)
        formatted += out.weights[name].format != "f32"
    assert formatted >= 2 * 4 + 1  # per layer wo, w_down (unfused) and more; the embedding
    assert out.weights["embed"].format != "f32"


def _acts(module, fn="decode"):
    return {n.attrs["w"]: n.attr("act") for n in module.functions[fn].nodes if n.attr("w")}


def test_act_q8_marks_block_projections_only(traced):
    """act=q8: LINEAR / LM_HEAD over integer blocks get act=q8, the embedding (a gather) and
    fp32 / bf16 weights do not; the pass is then lossy; a pipeline with no block weights is
    one line."""
    from arc.pipeline import registry

    _, m = traced("tiny-llama")
    out, rec = PassManager("kv-fusion,weight-format{mode=int4,act=q8}").run(m)
    acts = _acts(out)
    assert acts["layers.0.wq+wk+wv"] == "q8" and acts["layers.1.w_down"] == "q8"
    assert acts["lm_head"] == "q8" and acts["embed"] is None
    assert not registry()["weight-format"].is_lossless({"act": "q8"})
    assert registry()["weight-format"].is_lossless({})
    verify(out)
    plain, _ = PassManager("kv-fusion,weight-format{mode=int4}").run(m)
    assert set(_acts(plain).values()) == {None}
    with pytest.raises(ArcError, match="act=q8 needs projections in 4-bit or 8-bit blocks"):
        PassManager("weight-format{mode=bf16,act=q8}").run(m)
    with pytest.raises(ArcError, match="act='q4'"):
        PassManager("weight-format{mode=int4,act=q4}").run(m)


def test_q8_rows_quantize_per_block_and_keep_zero_blocks():
    x = torch.tensor([[[0.0] * 8 + [1.0, -0.5, 0.25, 2.0, 0.0, 0.0, 0.0, 0.003]]])
    got = qlinear.q8_rows(x, 8)
    assert torch.equal(got[..., :8], torch.zeros(1, 1, 8))  # no 0/0
    d = 2.0 / 127
    want = torch.round(x[..., 8:] * (127 / 2.0)) * d
    torch.testing.assert_close(got[..., 8:], want, rtol=0, atol=1e-7)
    assert got[0, 0, 15] == 0.0  # 0.003 is below half a step of 2/127


@pytest.mark.parametrize("fmt", ["int4", "int8", "q4_1"])
def test_q8_linear_is_the_blocks_times_int8_activations(fmt):
    """qlinear.q8 (the eager form of act=q8) against float64 sums written out per block: the
    integer products, d per block, and for affine4 m times the exact block sum of x."""
    g = formats.FORMATS[fmt].group or 32
    rng = torch.Generator().manual_seed(0)
    w = torch.randn(24, 96, generator=rng)
    c = formats.quantize("int4" if fmt == "q4_1" else fmt, w, g)
    if fmt == "q4_1":  # a GGUF's blocks: the same layout, fp16 scales
        c = {k: v.half() if v.is_floating_point() else v for k, v in c.items()}
    x = torch.randn(1, 3, 96, generator=rng)
    got = qlinear.q8(fmt, c, x)
    xb = x.double().reshape(3, 96 // g, g)
    amax = xb.abs().amax(-1, keepdim=True)
    q = torch.round(x.reshape(3, 96 // g, g) * (127.0 / amax.float())).double()
    kind = formats.get(fmt).kind
    codes = c[""].long()
    if kind == "affine4":
        codes = torch.cat([codes & 15, codes >> 4], -1)
    d = c["d"].double()
    want = torch.einsum("tbg,nbg,nb,tb->tn", q, codes.double(), d, amax[..., 0] / 127)
    if kind == "affine4":
        want = want + torch.einsum("tb,nb->tn", xb.sum(-1), c["m"].double())
    torch.testing.assert_close(got[0].double(), want, rtol=1e-5, atol=1e-5)
    full = x[0].double() @ formats.dequantize(fmt, c).double().T
    assert (got[0].double() - full).abs().max() > 1e-4  # the activations really were rounded
