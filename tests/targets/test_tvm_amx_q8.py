"""act=q8's AMX int8 path (targets/tvm_amx_q8.py): its outputs are the VNNI kernel's bit for
bit for every token count, kind and group it takes, the code it builds multiplies on tiles,
and native builds on a CPU with AMX int8 use it for act=q8 (the manifest says so).
The kernel tests need a CPU with AMX int8 and AVX-512 VNNI/VBMI (Intel Sapphire Rapids)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm", reason="target tvm needs the [tvm] extra (apache-tvm)")

from arc import cpu as arc_cpu  # noqa: E402
from arc.targets import tvm_amx, tvm_amx_q8, tvm_vnni  # noqa: E402

pytestmark = pytest.mark.extra
amx = pytest.mark.skipif(
    bool(arc_cpu.missing_flags(tvm_amx_q8.FLAGS | tvm_vnni.FLAGS)),
    reason="the AMX int8 kernel needs AMX-INT8 and AVX-512 VNNI/VBMI, which this CPU lacks",
)

N = 48
# (kind, scale dtype, K, group): Q4_1 / Q8_0 as a GGUF holds them (32 columns, one 32-byte
# tile row), and arc's int4 with groups of 128 (two 64-byte chunks)
CASES = [
    ("affine4", "float16", 96, 32),
    ("sym8", "float16", 96, 32),
    ("affine4", "float32", 256, 128),
]


@pytest.fixture(scope="module")
def kernels():
    """case -> compiled panel_gemv_q8 with its AMX path (one build a case: compiling these
    kernels is slow; the VNNI loop it holds for short calls is the reference)."""
    import tvm

    assert tvm_amx.request() is None
    mattr = tvm_vnni.MATTR + tvm_amx_q8.MATTR
    target = tvm.target.Target(
        {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "mattr": mattr}
    )
    out = {}
    for case in CASES:
        kind, scale, k, g = case
        f = tvm_vnni.panel_gemv_q8(kind, N, k, g, scale, amx=True)
        mod = tvm.IRModule({"main": f.with_attr("global_symbol", "main")})
        out[case] = tvm.compile(mod, target=target)
    return out


def _components(kind: str, scale: str, k: int, g: int, rng):
    import torch

    from arc.targets.tvm_kernels import to_panels

    d = rng.standard_normal((N, k // g)).astype(scale)
    if kind == "sym8":
        comps = [rng.integers(-127, 128, (N, k // g, g)).astype("int8"), d]
    else:
        codes = rng.integers(0, 256, (N, k // g, g // 2)).astype("uint8")
        comps = [codes, d, rng.standard_normal((N, k // g)).astype(scale)]
    return [to_panels(torch.from_numpy(c)).numpy() for c in comps]


def _run(fn, panels, x):
    import tvm

    y = np.full((x.shape[0], N), np.nan, "float32")  # every output must be written
    args = [tvm.runtime.tensor(a) for a in (x, *panels, y)]
    fn["main"](*args)
    return args[-1].numpy()


@amx
@pytest.mark.parametrize("case", CASES)
def test_amx_outputs_are_the_vnni_kernels_bit_for_bit(kernels, case):
    """Exact integer sums (TDPBSUD's, vpdpbusd's) and one float epilogue: each row of a call
    of MIN_TOKENS or more tokens (AMX: a full tile, a tile and a token, three tiles) equals
    that token's row alone (one token: the VNNI loop; tests/targets/test_tvm_vnni.py shows
    the VNNI loop's rows are the same bits whatever the token count)."""
    kind, scale, k, g = case
    rng = np.random.default_rng(k + g)
    panels = _components(kind, scale, k, g, rng)
    x = rng.standard_normal((40, k)).astype("float32")
    x[0, :g] = 0.0  # a block of zeros: scale 0
    x[-1, -g:] *= 1e4  # a block of large values beside small ones
    one = np.concatenate([_run(kernels[case], panels, x[t : t + 1]) for t in range(40)])
    for tokens in (tvm_amx_q8.MIN_TOKENS, 16, 17, 40):
        got = _run(kernels[case], panels, x[:tokens])
        assert not np.isnan(got).any()
        np.testing.assert_array_equal(got, one[:tokens])


@amx
def test_amx_code_multiplies_on_tiles(kernels):
    """The build really has the tile path (TDPBSUD and the tile configuration) beside the
    VNNI loop (vpdpbusd)."""
    asm = kernels[CASES[0]].mod.inspect_source("asm")
    assert "tdpbsud" in asm and "ldtilecfg" in asm and "vpdpbusd" in asm


def test_applies_to_groups_a_tile_row_splits():
    assert tvm_amx_q8.applies("affine4", 32) and tvm_amx_q8.applies("sym8", 32)
    assert tvm_amx_q8.applies("affine4", 128) and tvm_amx_q8.applies("sym8", 64)
    assert not tvm_amx_q8.applies("affine4", 48)  # int4's group=48: the VNNI loop
    assert not tvm_amx_q8.applies("f32", 32)


def test_b_rows_are_in_column_order():
    """Row r of a block's B tile holds columns 4r..4r+3: affine4's low nibbles (columns
    0..g/2-1) first, then the high ones."""
    assert tvm_amx_q8.b_rows("affine4", 32) == [(0, 0), (4, 0), (8, 0), (12, 0)] + [
        (0, 1),
        (4, 1),
        (8, 1),
        (12, 1),
    ]
    assert tvm_amx_q8.b_rows("sym8", 16) == [(0, None), (4, None), (8, None), (12, None)]


def test_native_q8_builds_on_amx_int8_cpus_use_it_unless_turned_off(monkeypatch):
    from arc.targets import tvm as target

    flags = frozenset(tvm_vnni.FLAGS | tvm_amx_q8.FLAGS | {"amx_bf16"})
    monkeypatch.setattr(arc_cpu, "build_target", lambda cpu: ("native", flags))
    monkeypatch.delenv("ARC_TVM_AMX", raising=False)
    tgt, record = target._target("native", q8=True)
    assert record["amx"] and record["amx_q8"] and record["amx_f32"]
    assert "+amx-int8" in str(tgt)
    tgt, record = target._target("native")  # no act=q8: the int8 kernel is not built
    assert record["amx"] and not record["amx_q8"] and "+amx-int8" not in str(tgt)
    monkeypatch.setenv("ARC_TVM_AMX", "0")
    tgt, record = target._target("native", q8=True)
    assert not record["amx"] and not record["amx_q8"] and "amx" not in str(tgt)
    monkeypatch.delenv("ARC_TVM_AMX")
    monkeypatch.setattr(arc_cpu, "build_target", lambda cpu: ("native", tvm_vnni.FLAGS))
    record = target._target("native", q8=True)[1]  # an AMD EPYC Zen 4: VNNI, no AMX
    assert not record["amx"] and not record["amx_q8"]
