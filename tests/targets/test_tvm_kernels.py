"""The tvm target's panel kernels against NumPy: every weight kind (fp32, affine4 as Q4_0/Q4_1
and int4 store it, sym8 as Q8_0/int8), every token tiling (T = 1, 2, 3..4, 6..8, a long T with a
short last tile), and the repacking that feeds them (`to_panels`)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm", reason="target tvm needs the [tvm] extra (apache-tvm)")

pytestmark = pytest.mark.extra

N, K, G = 48, 96, 32  # three panels of 16 rows, three blocks per row
# (kind, scale dtype): fp16 scales as a GGUF's blocks are passed, fp32 as int4/int8's
KINDS = [("f32", "float32"), ("affine4", "float32"), ("affine4", "float16"), ("sym8", "float16")]


def _weight(kind: str, rng, scale: str):
    """(components as stored [N, ...], the fp32 weight [N, K] they encode, as arc/formats.py);
    scales that fp16 holds exactly when `scale` is float16."""

    def scales(shape):
        return rng.standard_normal(shape).astype(scale).astype("float32")

    if kind == "f32":
        w = rng.standard_normal((N, K)).astype("float32")
        return [w], w
    if kind == "sym8":
        codes = rng.integers(-127, 128, (N, K // G, G)).astype("int8")
        d = scales((N, K // G))
        return [codes, d], (codes.astype("float32") * d[..., None]).reshape(N, K)
    codes = rng.integers(0, 256, (N, K // G, G // 2)).astype("uint8")
    d, m = scales((N, K // G)), scales((N, K // G))
    q = np.concatenate([codes & 15, codes >> 4], axis=-1).astype("float32")  # element j, j+g/2
    return [codes, d, m], (q * d[..., None] + m[..., None]).reshape(N, K)


@pytest.fixture(scope="module")
def built():
    import tvm

    from arc.targets import tvm_kernels

    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    out = {}
    for kind, scale in KINDS:
        f = tvm_kernels.panel_gemv(kind, N, K, G, scale).with_attr("global_symbol", "main")
        out[kind, scale] = tvm.compile(tvm.IRModule({"main": f}), target=target)["main"]
    return out


@pytest.mark.parametrize("kind, scale", KINDS)
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 6, 8, 17])
def test_panel_gemv_equals_numpy(built, kind, scale, tokens):
    import torch
    import tvm

    from arc.targets.tvm_kernels import to_panels

    rng = np.random.default_rng(tokens)
    comps, w = _weight(kind, rng, scale)
    x = rng.standard_normal((tokens, K)).astype("float32")
    panels = [to_panels(torch.from_numpy(c)).numpy() for c in comps]
    panels = [p.astype(scale) if p.dtype == np.float32 and kind != "f32" else p for p in panels]
    y = np.full((tokens, N), np.nan, "float32")  # every output must be written
    args = [tvm.runtime.tensor(a) for a in (x, *panels, y)]
    built[kind, scale](*args)
    ref = x.astype("float64") @ w.T.astype("float64")
    # fp32 accumulation of K products: error relative to the outputs' scale
    np.testing.assert_allclose(args[-1].numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_to_panels_moves_rows_innermost():
    import torch

    from arc.targets.tvm_kernels import PANEL, to_panels

    codes = torch.arange(N * 3 * 4).reshape(N, 3, 4)
    p = to_panels(codes)
    assert tuple(p.shape) == (N // PANEL, 3, 4, PANEL)
    assert p[2, 1, 3, 5] == codes[2 * PANEL + 5, 1, 3]
