"""The tvm target's panel kernels against NumPy: every weight kind (fp32, affine4 as Q4_0/Q4_1
and int4 store it, sym8 as Q8_0/int8), every token tiling (T = 1, 2, 3..4, 6..8, a long T with a
short last tile) of every tile plan (AVX-512's and AVX2's register budgets), and the repacking
that feeds them (`to_panels`)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm", reason="target tvm needs the [tvm] extra (apache-tvm)")

pytestmark = pytest.mark.extra

N, K, G = 48, 96, 32  # three panels of 16 rows, three blocks per row
# panel counts: odd (a plan's tiles of 2 panels fall back to one), and even (they apply)
ROWS = [48, 64]
# (kind, scale dtype): fp16 scales as a GGUF's blocks are passed, fp32 as int4/int8's
KINDS = [("f32", "float32"), ("affine4", "float32"), ("affine4", "float16"), ("sym8", "float16")]


def _weight(kind: str, rng, scale: str, n: int = N):
    """(components as stored [n, ...], the fp32 weight [n, K] they encode, as arc/formats.py);
    scales that fp16 holds exactly when `scale` is float16."""

    def scales(shape):
        return rng.standard_normal(shape).astype(scale).astype("float32")

    if kind == "f32":
        w = rng.standard_normal((n, K)).astype("float32")
        return [w], w
    if kind == "sym8":
        codes = rng.integers(-127, 128, (n, K // G, G)).astype("int8")
        d = scales((n, K // G))
        return [codes, d], (codes.astype("float32") * d[..., None]).reshape(n, K)
    codes = rng.integers(0, 256, (n, K // G, G // 2)).astype("uint8")
    d, m = scales((n, K // G)), scales((n, K // G))
    q = np.concatenate([codes & 15, codes >> 4], axis=-1).astype("float32")  # element j, j+g/2
    return [codes, d, m], (q * d[..., None] + m[..., None]).reshape(n, K)


@pytest.fixture(scope="module")
def built():
    import tvm

    from arc.targets import tvm_kernels

    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    out = {}
    for plan in tvm_kernels.PLANS:
        for kind, scale in KINDS:
            for n in ROWS:
                f = tvm_kernels.panel_gemv(kind, n, K, G, scale, plan=plan)
                f = f.with_attr("global_symbol", "main")
                mod = tvm.IRModule({"main": f})
                out[kind, scale, plan, n] = tvm.compile(mod, target=target)["main"]
    return out


@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("plan", ["avx512", "avx2", "avx2-native"])
@pytest.mark.parametrize("kind, scale", KINDS)
@pytest.mark.parametrize("tokens", [1, 2, 3, 4, 6, 8, 17])
def test_panel_gemv_equals_numpy(built, kind, scale, tokens, plan, n):
    import torch
    import tvm

    from arc.targets.tvm_kernels import to_panels

    rng = np.random.default_rng(tokens)
    comps, w = _weight(kind, rng, scale, n)
    x = rng.standard_normal((tokens, K)).astype("float32")
    panels = [to_panels(torch.from_numpy(c)).numpy() for c in comps]
    panels = [p.astype(scale) if p.dtype == np.float32 and kind != "f32" else p for p in panels]
    y = np.full((tokens, n), np.nan, "float32")  # every output must be written
    args = [tvm.runtime.tensor(a) for a in (x, *panels, y)]
    built[kind, scale, plan, n](*args)
    ref = x.astype("float64") @ w.T.astype("float64")
    # fp32 accumulation of K products: error relative to the outputs' scale
    np.testing.assert_allclose(args[-1].numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("n", ROWS)
@pytest.mark.parametrize("plan", ["avx512", "avx2", "avx2-native"])
@pytest.mark.parametrize("kind, scale", KINDS)
def test_panel_gemv_rows_are_the_same_bits_whatever_the_token_count(built, kind, scale, plan, n):
    """A token's row sums in the same order in every tile plan (tvm_kernels.TILES): a verify's
    logits are then the decode step's bit for bit."""
    import torch
    import tvm

    from arc.targets.tvm_kernels import to_panels

    rng = np.random.default_rng(7)
    comps, _ = _weight(kind, rng, scale, n)
    panels = [to_panels(torch.from_numpy(c)).numpy() for c in comps]
    panels = [p.astype(scale) if p.dtype == np.float32 and kind != "f32" else p for p in panels]
    x = rng.standard_normal((17, K)).astype("float32")

    def run(rows):
        y = tvm.runtime.tensor(np.zeros((len(rows), n), "float32"))
        built[kind, scale, plan, n](*[tvm.runtime.tensor(a) for a in (rows, *panels)], y)
        return y.numpy()

    one = np.concatenate([run(x[t : t + 1]) for t in range(len(x))])
    for tokens in (2, 3, 4, 5, 8, 17):
        np.testing.assert_array_equal(run(x[:tokens]), one[:tokens])


def test_panel_gemv_sums_a_block_that_is_not_a_power_of_two():
    """int4 with group=48: the block's activation sum (which m multiplies) takes all 48 lanes
    (until 2026-12-08 the halving steps 24, 12, 6, 3, 1 left one out)."""
    import torch
    import tvm

    from arc.targets.tvm_kernels import panel_gemv, to_panels

    rng = np.random.default_rng(48)
    codes = rng.integers(0, 256, (N, K // 48, 24)).astype("uint8")
    d, m = (rng.standard_normal((N, K // 48)).astype("float32") for _ in range(2))
    q = np.concatenate([codes & 15, codes >> 4], axis=-1).astype("float64")
    w = (q * d[..., None] + m[..., None]).reshape(N, K)
    x = rng.standard_normal((3, K)).astype("float32")
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    f = panel_gemv("affine4", N, K, 48).with_attr("global_symbol", "main")
    fn = tvm.compile(tvm.IRModule({"main": f}), target=target)["main"]
    panels = [to_panels(torch.from_numpy(c)).numpy() for c in (codes, d, m)]
    args = [tvm.runtime.tensor(a) for a in (x, *panels, np.zeros((3, N), "float32"))]
    fn(*args)
    ref = x.astype("float64") @ w.T
    np.testing.assert_allclose(args[-1].numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_to_panels_moves_rows_innermost():
    import torch

    from arc.targets.tvm_kernels import PANEL, to_panels

    codes = torch.arange(N * 3 * 4).reshape(N, 3, 4)
    p = to_panels(codes)
    assert tuple(p.shape) == (N // PANEL, 3, 4, PANEL)
    assert p[2, 1, 3, 5] == codes[2 * PANEL + 5, 1, 3]


@pytest.mark.parametrize("pv_floats", [16, 96])
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("tokens, length", [(1, 37), (3, 16), (5, 0)])
@pytest.mark.parametrize("in_place", [False, True])
def test_attention_equals_numpy(tokens, length, grouped, pv_floats, in_place):
    """The attention kernel (cache slots then the call's new rows, a u8 mask, GQA, the
    vectorized exp) against a float64 softmax: masked slots and masked new rows get no
    weight, and a stale value (NaN) in a masked cache slot never reaches the output; a task
    per head, or per KV head's group of query heads; P.V in one pass or in slices of 16
    output dims (pv_floats 16); the new K and V rows in buffers of their own, or read in
    place at their columns of a wider one (a fused QKV output, NaN in the other columns)."""
    import tvm

    from arc.targets import tvm_kernels

    heads, kv_heads, d, layers, seq = 4, 2, 32, 2, 48
    width = kv_heads * d
    at = {"k_at": (3 * width + 16, 16), "v_at": (3 * width + 16, 2 * width + 16)}
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    f = tvm_kernels.attention(
        heads, kv_heads, d, layers, seq, grouped, pv_floats, **(at if in_place else {})
    )
    f = f.with_attr("global_symbol", "main")
    fn = tvm.compile(tvm.IRModule({"main": f}), target=target)["main"]
    rng = np.random.default_rng(tokens)
    q = rng.standard_normal((tokens, heads * d)).astype("float32") * 3
    k = rng.standard_normal((tokens, kv_heads * d)).astype("float32")
    v = rng.standard_normal((tokens, kv_heads * d)).astype("float32")
    kv_args = (k, v)
    if in_place:
        qkv = np.full((tokens, at["k_at"][0]), np.nan, "float32")
        qkv[:, 16 : 16 + width], qkv[:, 16 + 2 * width :] = k, v
        kv_args = (qkv, qkv)
    cache = rng.standard_normal((2 * layers, kv_heads, seq, d)).astype("float32")
    mask = np.ones((tokens, length + tokens), "uint8")
    for t in range(tokens):
        mask[t, length + t + 1 :] = 0  # causal among the new rows
    if length > 2:
        mask[:, 1] = 0  # a masked cache slot holding garbage
        cache[2 * 1 + 1, :, 1] = np.nan
    out = np.zeros((tokens, heads * d), "float32")
    p = np.zeros((heads, tokens, length + tokens), "float32")
    args = [tvm.runtime.tensor(a) for a in (q, *kv_args, cache)]
    args += [tvm.runtime.tensor(mask), tvm.runtime.tensor(np.arange(tokens) + length)]
    outs = [tvm.runtime.tensor(out), tvm.runtime.tensor(p)]
    fn(*args, 1, *outs)
    kk = np.concatenate(
        [cache[2, :, :length], k.reshape(tokens, kv_heads, d).transpose(1, 0, 2)], 1
    )
    vv = np.concatenate(
        [cache[3, :, :length], v.reshape(tokens, kv_heads, d).transpose(1, 0, 2)], 1
    )
    ref = np.zeros((tokens, heads, d))
    for h in range(heads):
        g = h // (heads // kv_heads)
        s = q.reshape(tokens, heads, d)[:, h].astype("float64") @ kk[g].T / np.sqrt(d)
        s = np.where(mask == 1, s, -np.inf)
        w = np.exp(s - s.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        ref[:, h] = w @ np.nan_to_num(vv[g].astype("float64"))
    got = outs[0].numpy().reshape(tokens, heads, d)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def _stats(x, chunk, k=4):
    """(best, tokens, probs) of logits_stats over x [rows, vocab], compiled for this CPU."""
    import torch
    import tvm

    from arc.targets import tvm_kernels

    rows, vocab = x.shape
    fn = _compile(tvm_kernels.logits_stats(vocab, chunk, k))
    args = [tvm.runtime.from_dlpack(x.clone())]
    args += [tvm.runtime.tensor(np.zeros((rows,), "int64"))]
    args += [tvm.runtime.tensor(np.zeros((rows, k), "int64"))]
    args += [tvm.runtime.tensor(np.zeros((rows, k), "float32"))]
    fn(*args)
    return [torch.from_numpy(a.numpy()) for a in args[1:]]


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_logits_stats_equal_torch(rows):
    """logits_stats: each row's argmax exactly (torch.argmax's first maximal index), its top 4
    tokens as torch.topk's, and their softmax probabilities to fp32 rounding; with the max in
    a later chunk, a masked chunk, ties, and a runner-up in a chunk of its own."""
    import torch

    vocab, chunk = 71 * 128, 128  # 71 chunks: 4 vectors of 16 and a tail of 7
    x = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows)) * 5
    x[:, 40 * chunk + 3] += 30  # a later chunk holds the max
    x[:, 40 * chunk + 90] += 28  # the runner-up in the same chunk
    x[:, 69 * chunk + 1] += 29  # and one in a chunk near the end (the tail)
    x[0, :chunk] = float("-inf")  # a whole chunk masked out
    best, tokens, probs = _stats(x, chunk)
    assert best.tolist() == x.argmax(-1).tolist()
    top = torch.topk(x.double(), 4, dim=-1)
    assert torch.equal(tokens, top.indices)
    want = torch.exp(top.values - torch.logsumexp(x.double(), -1, keepdim=True)).float()
    torch.testing.assert_close(probs, want, rtol=1e-5, atol=1e-7)
    y = x[-1:].clone()
    y[0, 66 * chunk + 9] = y[0, 40 * chunk + 3]  # a tie in a later chunk: the first wins
    y[0, 40 * chunk + 70] = y[0, 40 * chunk + 3]  # a tie later in the same chunk
    best, tokens, _ = _stats(y, chunk)
    assert best.tolist() == [40 * chunk + 3] == y.argmax(-1).tolist()
    assert tokens[0, :3].tolist() == [40 * chunk + 3, 40 * chunk + 70, 66 * chunk + 9]


def test_logits_stats_leave_nan_inf_and_empty_rows_to_torch():
    """A row with a nan (even in an otherwise -inf chunk), a +inf, or only -inf gets best -1
    (the runtime asks torch.argmax, which takes a nan as the maximum); -inf logits in an
    otherwise finite row do not, and a row with fewer finite chunks than k still gets its
    finite tokens first and probability 0 for the rest."""
    import torch

    vocab, chunk = 32 * 64, 64
    x = torch.randn(6, vocab, generator=torch.Generator().manual_seed(0))
    x[0, 300] = float("nan")
    x[1, :chunk] = float("-inf")
    x[1, 5] = float("nan")  # a nan in a chunk whose max is -inf
    x[2, 1000] = float("inf")
    x[3] = float("-inf")
    x[4, 7 * chunk : 9 * chunk] = float("-inf")  # finite row with masked chunks
    x[5] = float("-inf")
    x[5, 3 * chunk + 4], x[5, 3 * chunk + 9] = 2.0, 1.0  # one finite chunk, two tokens
    best, tokens, probs = _stats(x, chunk)
    assert best.tolist()[:4] == [-1, -1, -1, -1]
    assert best[4] == x[4].argmax() and tokens[4].tolist() == x[4].topk(4).indices.tolist()
    assert tokens[5, :2].tolist() == [3 * chunk + 4, 3 * chunk + 9]
    want = torch.tensor([0.7311, 0.2689, 0.0, 0.0])  # softmax of (2, 1)
    torch.testing.assert_close(probs[5], want, atol=1e-4, rtol=0)


def _compile(func):
    import tvm

    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    return tvm.compile(
        tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target
    )["main"]


@pytest.mark.parametrize("rows", [1, 8])
def test_silu_mul_equals_torch(rows):
    """silu_mul: silu(gate) * up read in place from a [T, 2I] gate/up output, to fp32 rounding
    (float64 reference), over the whole range: large |gate| where exp(-gate) under- or
    overflows (silu -> gate, silu -> -0), and 0."""
    import torch
    import tvm

    from arc.targets import tvm_kernels

    inner = 48
    fn = _compile(tvm_kernels.silu_mul(2 * inner + 16, 16, 16 + inner, inner))
    x = torch.randn(rows, 2 * inner + 16, generator=torch.Generator().manual_seed(rows)) * 4
    x[0, 16:22] = torch.tensor([0.0, 95.0, -95.0, 88.5, -88.5, 1e-30])
    out = tvm.runtime.tensor(np.zeros((rows, inner), "float32"))
    fn(tvm.runtime.from_dlpack(x.clone()), out)
    gate, up = x[:, 16 : 16 + inner].double(), x[:, 16 + inner : 16 + 2 * inner].double()
    want = (torch.nn.functional.silu(gate) * up).float()
    torch.testing.assert_close(torch.from_numpy(out.numpy()), want, rtol=2e-6, atol=1e-30)


def test_rope_from_table_equals_lowering():
    """rope_table + rope (q read in place at a column offset of a QKV output) against
    arc.lowering's RoPE math in torch, to fp32 rounding."""
    import torch
    import tvm

    from arc.targets import tvm_kernels

    heads, d, width, start, scale, rows = 3, 64, 3 * 64 + 64 + 32, 32, 1.0, 5
    table = _compile(tvm_kernels.rope_table(d // 2, scale))
    rope = _compile(tvm_kernels.rope(heads, d, width, start))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, generator=gen)
    pos = torch.tensor([0, 7, 100, 1023, 5000])
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    cs = tvm.runtime.tensor(np.zeros((rows, 2, d // 2), "float32"))
    table(tvm.runtime.from_dlpack(pos), tvm.runtime.from_dlpack(inv_freq), cs)
    out = tvm.runtime.tensor(np.zeros((rows, heads * d), "float32"))
    rope(tvm.runtime.from_dlpack(x.clone()), cs, out)
    angle = pos[:, None].float() * inv_freq[None, :]  # [T, D/2]
    cos, sin = angle.cos(), angle.sin()
    q = x[:, start : start + heads * d].view(rows, heads, d)
    lo, hi = q[..., : d // 2], q[..., d // 2 :]
    want = torch.cat(
        [lo * cos[:, None] - hi * sin[:, None], hi * cos[:, None] + lo * sin[:, None]], -1
    )
    torch.testing.assert_close(
        torch.from_numpy(out.numpy()).view(rows, heads, d), want, rtol=1e-6, atol=1e-5
    )


def test_kv_rows_write_k_and_v_in_place_and_nothing_outside_the_cache():
    """kv_rows: layer l's K rows to cache[2l, h, write[t]] and V to 2l + 1, head by head from
    [T, KV*D]; a slot outside the cache (negative or past S-1) writes nothing; other layers and
    slots keep their values."""
    import torch
    import tvm

    from arc.errors import UnsupportedError
    from arc.targets import tvm_kernels

    layers, kv_heads, seq, d, t = 3, 2, 10, 16, 4
    fn = _compile(tvm_kernels.kv_rows(kv_heads, d, layers, seq))
    cache = torch.randn(2 * layers, kv_heads, seq, d)
    before = cache.clone()
    k = torch.randn(t, kv_heads * d)
    v = torch.randn(t, kv_heads * d)
    write = torch.tensor([7, -1, 2, seq])  # two slots outside the cache
    fn(*[tvm.runtime.from_dlpack(x) for x in (cache, k, v, write)], 1)
    want = before.clone()
    for row, slot in ((0, 7), (2, 2)):
        want[2, :, slot] = k[row].view(kv_heads, d)
        want[3, :, slot] = v[row].view(kv_heads, d)
    assert torch.equal(cache, want)

    # K and V read in place at their columns of one wider buffer (a fused QKV output)
    width = kv_heads * d
    qkv = torch.full((t, 5 * width), float("nan"))
    qkv[:, width : 2 * width], qkv[:, 3 * width : 4 * width] = k, v
    at = dict(k_at=(5 * width, width), v_at=(5 * width, 3 * width))
    fn = _compile(tvm_kernels.kv_rows(kv_heads, d, layers, seq, **at))
    cache = before.clone()
    fn(*[tvm.runtime.from_dlpack(x) for x in (cache, qkv, qkv, write)], 1)
    assert torch.equal(cache, want)
    with pytest.raises(UnsupportedError, match="outside"):
        tvm_kernels.kv_rows(kv_heads, d, layers, seq, v_at=(5 * width, 4 * width + 1))


def test_kv_move_copies_accepted_rows_in_every_layer_and_skips_outside_slots():
    """kv_move: slots src[p] -> dst[p] for every cache row (each layer's K and V) and head, as
    torch's index_select + index_copy_ (RowCache.move) does for an accepted path; a pair with
    a slot outside the cache is skipped."""
    import torch
    import tvm

    from arc.targets import tvm_kernels

    layers, kv_heads, seq, d = 2, 3, 12, 16
    fn = _compile(tvm_kernels.kv_move(kv_heads, d, layers, seq))
    cache = torch.randn(2 * layers, kv_heads, seq, d)
    want = cache.clone()
    src, dst = torch.tensor([5, 8, 9, 40]), torch.tensor([4, 5, 6, 7])  # a path 5, 8, 9
    want.index_copy_(2, dst[:3], want.index_select(2, src[:3]))
    fn(*[tvm.runtime.from_dlpack(x) for x in (cache, src, dst)])
    assert torch.equal(cache, want)


@pytest.mark.parametrize("scale", ["float32", "float16"])
@pytest.mark.parametrize("tokens", [1, 2, 3, 8, 17])
def test_table_lookup_of_4_bit_codes_is_bit_identical(scale, tokens):
    """panel_gemv with `lut` (4-bit codes to floats by vpermb + vpermps) computes exactly what
    the masking-and-converting loop computes, bit for bit, for every token tiling: the same
    products in the same order, only the codes reach the registers another way."""
    import torch
    import tvm

    from arc import cpu
    from arc.targets import tvm_kernels
    from arc.targets.tvm_kernels import to_panels

    if not tvm_kernels.LUT_FLAGS <= cpu.host_flags():
        pytest.skip(f"this CPU lacks {sorted(tvm_kernels.LUT_FLAGS)} (the lookup's vpermb)")
    target = tvm.target.Target({"kind": "llvm", "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    fns = {}
    for lut in (False, True):
        f = tvm_kernels.panel_gemv("affine4", N, K, G, scale, lut=lut)
        f = f.with_attr("global_symbol", "main")
        fns[lut] = tvm.compile(tvm.IRModule({"main": f}), target=target)["main"]
    rng = np.random.default_rng(100 + tokens)
    comps, w = _weight("affine4", rng, scale)
    x = rng.standard_normal((tokens, K)).astype("float32")
    panels = [to_panels(torch.from_numpy(c)).numpy() for c in comps]
    panels = [p.astype(scale) if p.dtype == np.float32 else p for p in panels]
    out = {}
    for lut, fn in fns.items():
        args = [
            tvm.runtime.tensor(a) for a in (x, *panels, np.full((tokens, N), np.nan, "float32"))
        ]
        fn(*args)
        out[lut] = args[-1].numpy()
    assert np.array_equal(out[True], out[False])
    ref = x.astype("float64") @ w.T.astype("float64")
    np.testing.assert_allclose(out[True], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
