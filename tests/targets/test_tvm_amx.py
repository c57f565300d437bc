"""The tvm target's AMX path (targets/tvm_amx.py): multi-token projections of 4-bit block
weights on AMX tiles give the fp32 product the AVX-512 loop gives (an exact bf16x3 split of
the activations), for every token-tile shape and panel grouping; which builds use it; and the
manifest's `amx` entry. The kernel tests need a CPU with AMX and are skipped elsewhere."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm", reason="target tvm needs the [tvm] extra (apache-tvm)")

from arc import cpu as arc_cpu  # noqa: E402
from arc.errors import EngineError  # noqa: E402
from arc.targets import tvm_amx  # noqa: E402

pytestmark = pytest.mark.extra

K, G = 96, 32  # three 32-column blocks (an odd count: the pipeline's tail)
HAS_AMX = tvm_amx.usable(arc_cpu.host_flags())
needs_amx = pytest.mark.skipif(not HAS_AMX, reason="needs a CPU with AMX (amx_tile, amx_bf16)")


def _weight(n: int, rng, scale: str):
    """(codes, d, m) of an affine4 weight [n, K] as stored, the fp32 weight they encode, and
    the size of the two terms both kernels sum (d * sum(x q) + m * sum(x)) per unit of |x|:
    |d q| + |m|, which fp32 rounding errors scale with."""
    codes = rng.integers(0, 256, (n, K // G, G // 2)).astype("uint8")
    d = rng.standard_normal((n, K // G)).astype(scale).astype("float32")
    m = rng.standard_normal((n, K // G)).astype(scale).astype("float32")
    q = np.concatenate([codes & 15, codes >> 4], axis=-1).astype("float32")
    w = (q * d[..., None] + m[..., None]).reshape(n, K)
    size = (np.abs(q * d[..., None]) + np.abs(m[..., None])).reshape(n, K)
    return [codes, d, m], w, size


@pytest.fixture(scope="module")
def kernels():
    """(n, scale, amx) -> the compiled panel_gemv."""
    import tvm

    from arc.targets import tvm_kernels

    spec = {"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()}
    target = tvm.target.Target(spec | {"mattr": tvm_amx.MATTR})
    cache = {}

    def get(n: int, scale: str, amx: bool):
        if (n, scale, amx) not in cache:
            f = tvm_kernels.panel_gemv("affine4", n, K, G, scale, amx)
            mod = tvm.IRModule({"main": f.with_attr("global_symbol", "main")})
            cache[n, scale, amx] = tvm.compile(mod, target=target)["main"]
        return cache[n, scale, amx]

    return get


def _run(fn, comps, x, n: int, scale: str):
    import torch
    import tvm

    from arc.targets.tvm_kernels import to_panels

    panels = [to_panels(torch.from_numpy(c)).numpy() for c in comps]
    panels = [p.astype(scale) if p.dtype == np.float32 else p for p in panels]
    y = np.full((x.shape[0], n), np.nan, "float32")  # every output must be written
    args = [tvm.runtime.tensor(a) for a in (x, *panels, y)]
    fn(*args)
    return args[-1].numpy()


@needs_amx
@pytest.mark.parametrize("n", [96, 64, 32, 48])  # 6, 4, 2 panels a task; 3 panels: no AMX
@pytest.mark.parametrize("scale", ["float16", "float32"])
# token tiles of 16: one A tile (<= 5 tokens), two (<= 10), three; a short last tile
@pytest.mark.parametrize("tokens", [12, 16, 17, 21, 27, 40])
def test_amx_panel_gemv_equals_numpy_and_the_avx512_loop(kernels, n, scale, tokens):
    assert tvm_amx.request() is None
    rng = np.random.default_rng(tokens * 100 + n)
    comps, w, size = _weight(n, rng, scale)
    x = rng.standard_normal((tokens, K)).astype("float32")
    x[:, 5] *= 1e4  # an outlier channel and small ones: the bf16 parts must be exact
    x[:, 7] *= 1e-4
    got = _run(kernels(n, scale, True), comps, x, n, scale)
    ref = x.astype("float64") @ w.T.astype("float64")
    tol = 1e-5 * np.abs(x.astype("float64")) @ size.T.astype("float64")  # fp32 sums
    assert np.all(np.abs(got - ref) <= tol + 1e-30), np.abs(got - ref).max()
    avx = _run(kernels(n, scale, False), comps, x, n, scale)
    assert np.all(np.abs(got - avx) <= 2 * tol + 1e-30)


@needs_amx
def test_below_min_tokens_the_avx512_loop_runs(kernels):
    """Fewer than MIN_TOKENS tokens: bit-identical to the kernel built without AMX."""
    rng = np.random.default_rng(0)
    comps, _, _ = _weight(64, rng, "float16")
    for tokens in (1, 2, tvm_amx.MIN_TOKENS - 1):
        x = rng.standard_normal((tokens, K)).astype("float32")
        got = _run(kernels(64, "float16", True), comps, x, 64, "float16")
        want = _run(kernels(64, "float16", False), comps, x, 64, "float16")
        assert np.array_equal(got, want)


def test_applies_to_4bit_blocks_of_32_columns_only():
    assert tvm_amx.applies("affine4", 32, 36)
    assert not tvm_amx.applies("affine4", 64, 36)  # arc's int4 with another group: AVX-512
    assert not tvm_amx.applies("sym8", 32, 36)  # Q8_0 (the LM head): AVX-512
    assert not tvm_amx.applies("affine4", 32, 3)  # panels that do not group evenly


def test_group_size_is_even_or_none():
    assert [tvm_amx.group_size(p) for p in (36, 60, 192, 3072, 4, 2, 3, 1)] == [
        6,
        6,
        6,
        6,
        4,
        2,
        0,
        0,
    ]


def test_native_builds_on_amx_cpus_use_it_unless_turned_off(monkeypatch):
    from arc.targets import tvm as target

    amx_flags = frozenset({"avx512f", "amx_tile", "amx_bf16"})
    monkeypatch.setattr(arc_cpu, "build_target", lambda cpu: ("native", amx_flags))
    monkeypatch.delenv("ARC_TVM_AMX", raising=False)
    tgt, record = target._target("native")
    assert record["amx"] is True and "+amx-bf16" in str(tgt)
    monkeypatch.setenv("ARC_TVM_AMX", "0")
    tgt, record = target._target("native")
    assert record["amx"] is False and "amx" not in str(tgt)
    monkeypatch.delenv("ARC_TVM_AMX")
    monkeypatch.setattr(arc_cpu, "build_target", lambda cpu: ("native", frozenset({"avx512f"})))
    assert target._target("native")[1]["amx"] is False  # an AMD EPYC: no AMX
    monkeypatch.setattr(arc_cpu, "build_target", lambda cpu: ("x86-64-v4", amx_flags))
    assert target._target("x86-64-v4")[1]["amx"] is False  # a portable level: no AMX


def test_check_engine_refuses_a_bad_amx_entry(monkeypatch):
    import tvm

    from arc.targets import tvm as target

    info = {
        "device": "cpu",
        "tvm_version": tvm.__version__,
        "library": target.LIBRARY,
        "functions": {"decode": "decode"},
        "params": [],
        "layout": target.LAYOUT,
        "cpu_flags": [],
        "amx": "yes",
    }
    with pytest.raises(EngineError, match="bad 'amx' entry"):
        target.check_engine(info)
    target.check_engine(info | {"amx": False})


def test_request_reports_why_not_instead_of_raising(monkeypatch):
    import ctypes

    class NoSyscall:
        def __init__(self, *a, **k):
            pass

        def syscall(self, *args):
            ctypes.set_errno(22)
            return -1

    monkeypatch.setattr(ctypes, "CDLL", NoSyscall)
    assert "errno 22" in tvm_amx.request()
