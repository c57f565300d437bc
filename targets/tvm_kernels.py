"""Hand-scheduled TIR kernels for the tvm target: GEMV/small-T GEMM, attention, mask, RoPE, SwiGLU.

Decode on a CPU is memory-bound: each token reads every weight once, so the projection
kernel must stream weights at DRAM bandwidth. TVM's default CPU pipeline leaves the
legalized matmuls as scalar single-threaded loops (1.5 tok/s, STACK-NOTES), and dlight's CPU
GEMV rule (tvm/s_tir/dlight/cpu/gemv.py) vectorizes the spatial axis, which for a row-major
[N, K] weight turns the reduction into strided loads. The kernel here follows the shape of
a hand-written GEMV instead (and MLC-LLM's "one schedule per op kind" approach): a TE
reduction scheduled with s_tir

    for n_o in parallel(N / 16):          # output rows split between the threads
      for n_i in 0..16:
        for t in 0..T:                    # the weight row stays in L1 across the T tokens
          acc[0:16] = 0                   # rfactor: 16 partial sums in one vector register
          for k_o in 0..K/16:
            acc[0:16] += x[t, k_o*16 : +16] * w[n, k_o*16 : +16]     # vectorized
          y[t, n] = sum(acc)

so each weight streams from memory once per call whatever T is (a tree verify reads them
once for all B nodes). Measured alone on this 2-core CPU: a 49152x576 GEMV at ~23 GB/s,
torch.mv's rate.

A block-format weight (q4_0/q4_1/q8_0 from a GGUF, int4/int8; arc/formats.py) goes through
`qgemv`: the same schedule with each row dequantized once into a local [K] buffer (w = d*q+m,
the nibble choice unrolled, 16 lanes at a time) before the dot products, so the step reads the
packed bytes only (as llama.cpp's and arc's torch kernels do; STACK-NOTES: 4-bit ~300 tok/s
bound vs ~50 for fp32).

Attention is written in TVMScript (TIR without blocks), RoPE and the mask in TE: attention over
the L cache slots plus the call's T new rows, in the rows convention of arc/runtime/rows.py,
parallel over (head, token), with 16-lane vectorized dot products and a two-pass softmax.
"""

from __future__ import annotations

from arc.errors import UnsupportedError

LANES = 16  # f32 lanes of one AVX-512 register (two AVX2 registers on x86-64-v3)
# what panel_gemv's table lookup of 4-bit codes needs (vpermb: VBMI; vpermps on 16 lanes)
LUT_FLAGS = frozenset({"avx512f", "avx512vbmi"})
ROWS = 16  # output rows per parallel task
STAT_PARTS = 16  # logits_stats: parallel shares of the vocabulary (even for 1, 2, 4, 8, 16 threads)


def gemv(n: int, k: int, tokens: int | None = None):
    """PrimFunc y[T, N] = x[T, K] @ w[N, K].T, T symbolic or `tokens` (see the docstring)."""
    from tvm import s_tir, te, tirx

    t_len = tirx.Var("T", "int64") if tokens is None else tokens
    x = te.placeholder((t_len, k), "float32", name="x")
    w = te.placeholder((n, k), "float32", name="w")
    r = te.reduce_axis((0, k), name="k")
    y = te.compute((t_len, n), lambda t, j: te.sum(x[t, r] * w[j, r], axis=r), name="y")
    sch = s_tir.Schedule(te.create_prim_func([x, w, y]))
    _schedule_gemv(sch, n, k)
    return sch.mod["main"]


def _schedule_gemv(sch, n: int, k: int):
    """Schedule block "y" of a [T, N] x [N, K] reduction as in the module docstring; returns
    the row loop (n_i), under which a per-row producer can be computed."""
    block = sch.get_sblock("y")
    t, j, r = sch.get_loops(block)
    rows = ROWS if n % ROWS == 0 else 1
    jo, ji = sch.split(j, [None, rows])
    sch.reorder(jo, ji, t, r)
    lanes = LANES if k % LANES == 0 else 1
    _, ri = sch.split(r, [None, lanes])
    rf = sch.rfactor(ri, 0)  # partial sums [lanes, T, N]
    jo, ji, t, _ = sch.get_loops(block)
    sch.parallel(jo)
    sch.compute_at(rf, t)
    sch.set_scope(rf, 0, "local")  # one vector of partial sums per (row, token)
    inner = sch.get_loops(rf)[3:]  # under (n_o, n_i, t): [lanes, k_o], or [lanes] if K == lanes
    if len(inner) == 2:
        sch.reorder(inner[1], inner[0])  # [k_o, lanes]
        inner = inner[::-1]
    if lanes > 1:
        sch.vectorize(inner[-1])
    sch.decompose_reduction(rf, inner[0])
    return ji


def rope(heads: int, d: int, width: int | None = None, start: int = 0):
    """PrimFunc out[T, H*D] = x * cos + rotate_half(x) * sin (half-split layout, as
    arc.lowering._rope), with cos and sin from `rope_table` [T, 2, D/2], of the H*D columns of
    x [T, width] from `start` on: q or k read in place from the fused QKV projection's output,
    so no slice of it is copied out first (one kernel call instead of two, 60 fewer calls a
    step)."""
    from tvm import te, tirx

    t_len, half, n = tirx.Var("T", "int64"), d // 2, heads * d
    x = te.placeholder((t_len, width or n), "float32", name="x")
    cs = te.placeholder((t_len, 2, half), "float32", name="cs")

    def f(t, j):
        i = j % d
        lo = x[t, start + tirx.max(j - half, 0)]  # x[.., i - D/2] for the upper half
        hi = x[t, start + tirx.min(j + half, n - 1)]  # x[.., i + D/2] for the lower half
        rot = tirx.if_then_else(i < half, -hi, lo)
        return x[t, start + j] * cs[t, 0, i % half] + rot * cs[t, 1, i % half]

    out = te.compute((t_len, n), f, name="rope")
    return te.create_prim_func([x, cs, out])


def kv_rows(kv_heads: int, d: int, layers: int, seq: int, k_at=None, v_at=None):
    """PrimFunc writing one layer's new K and V rows [T, KV*D] into the cache [2N, KV, S, D]
    in place (Relax call_tir_inplace): cache[2 layer, h, write[t]] = k[t, h], and V at
    2 layer + 1. A slot outside 0..S-1 is not written (the runtime never passes one; a
    crafted call must not write outside the cache). `k_at` / `v_at` = (width, start): the
    rows are the KV*D columns from `start` of a [T, width] buffer (V read in place from the
    fused QKV projection's output, as `rope` reads q and k; None: a [T, KV*D] buffer).

    It replaces returning every layer's rows (60 reshapes, transposes and expand_dims, one
    concatenate of [2N, KV, T, D]) for torch's index_copy_ to scatter them after the call:
    one copy of each row instead of three, and no Python between."""
    from tvm.script import tirx as T

    if d % LANES:
        raise UnsupportedError(f"target tvm: head_dim {d} is not a multiple of {LANES}")
    width = kv_heads * d
    (kw, k0), (vw, v0) = _cols(k_at, width), _cols(v_at, width)

    @T.prim_func(private=True)
    def kv_rows_kernel(
        var_cache: T.handle, var_k: T.handle, var_v: T.handle, var_w: T.handle, layer: T.int64
    ):
        T.func_attr({"tirx.noalias": True})
        t_len = T.int64()
        cache = T.match_buffer(var_cache, (2 * layers, kv_heads, seq, d), "float32")
        k = T.match_buffer(var_k, (t_len, kw), "float32")
        v = T.match_buffer(var_v, (t_len, vw), "float32")
        w = T.match_buffer(var_w, (t_len,), "int64")
        for t, h in T.grid(t_len, kv_heads):
            if w[t] >= 0 and w[t] < seq:
                for i in T.vectorized(d):
                    cache[2 * layer, h, w[t], i] = k[t, k0 + h * d + i]
                for i in T.vectorized(d):
                    cache[2 * layer + 1, h, w[t], i] = v[t, v0 + h * d + i]

    return kv_rows_kernel


def _cols(at, width: int) -> tuple[int, int]:
    """(buffer width, first column) of `width` columns read in place at `at` = (buffer width,
    start), or a buffer of its own (None)."""
    if at is None:
        return width, 0
    cols, start = (int(a) for a in at)
    if start < 0 or start + width > cols:
        raise UnsupportedError(f"target tvm: columns {start}..{start + width} outside {cols}")
    return cols, start


def kv_move(kv_heads: int, d: int, layers: int, seq: int):
    """PrimFunc copying the K/V rows of cache slots src[p] to slots dst[p], every layer, in
    place (Relax call_tir_inplace): a verify's accepted tree nodes into their places in the
    sequence (arc/runtime/speculative.py). Pairs are copied in order, which is safe for
    accepted paths: dst[p] = pos + 1 + p <= src[p], and src[q] > dst[p] for q > p. A pair with
    a slot outside 0..S-1 is skipped.

    It replaces torch's index_select + index_copy_ over the cache after a verify (~0.33 ms in
    situ for a few rows: two passes, on caches the verify had evicted)."""
    from tvm.script import tirx as T

    if d % LANES:
        raise UnsupportedError(f"target tvm: head_dim {d} is not a multiple of {LANES}")

    @T.prim_func(private=True)
    def kv_move_kernel(var_cache: T.handle, var_src: T.handle, var_dst: T.handle):
        T.func_attr({"tirx.noalias": True})
        n = T.int64()
        cache = T.match_buffer(var_cache, (2 * layers, kv_heads, seq, d), "float32")
        src = T.match_buffer(var_src, (n,), "int64")
        dst = T.match_buffer(var_dst, (n,), "int64")
        for row in T.parallel(2 * layers):
            for p, h in T.grid(n, kv_heads):
                if src[p] >= 0 and src[p] < seq and dst[p] >= 0 and dst[p] < seq:
                    for i in T.vectorized(d):
                        cache[row, h, dst[p], i] = cache[row, h, src[p], i]

    return kv_move_kernel


def add_rms_norm(dim: int, eps: float):
    """PrimFunc (s, y)[T, D] = (a + b, rms_norm(a + b) * w): a residual add and the RMSNorm
    that reads it in one kernel with two outputs (TensorRT-LLM's and vLLM's fused
    add-RMSNorm); Relax's FuseOps cannot fuse them, the sum having another reader (the next
    residual add). As arc.lowering: w * (s * rsqrt(mean(s^2) + eps)), in fp32."""
    from tvm import s_tir, te, tirx

    t_len = tirx.Var("T", "int64")
    a = te.placeholder((t_len, dim), "float32", name="a")
    b = te.placeholder((t_len, dim), "float32", name="b")
    w = te.placeholder((dim,), "float32", name="w")
    s = te.compute((t_len, dim), lambda t, j: a[t, j] + b[t, j], name="sum")
    r = te.reduce_axis((0, dim), name="k")
    sq = te.compute((t_len,), lambda t: te.sum(s[t, r] * s[t, r], axis=r), name="sq")
    inv = te.compute(
        (t_len,), lambda t: tirx.rsqrt(sq[t] / tirx.const(dim, "float32") + eps), name="inv"
    )
    y = te.compute((t_len, dim), lambda t, j: w[j] * (s[t, j] * inv[t]), name="norm")
    sch = s_tir.Schedule(te.create_prim_func([a, b, w, s, y]))
    if dim % LANES == 0:  # 16 lanes at a time (unscheduled TE is a scalar loop: 7 us a row)
        for name in ("sum", "norm"):
            _, j = sch.get_loops(sch.get_sblock(name))
            sch.vectorize(sch.split(j, [None, LANES])[1])
        sq = sch.get_sblock("sq")
        _, k = sch.get_loops(sq)
        _, ki = sch.split(k, [None, LANES])
        rf = sch.rfactor(ki, 0)  # 16 partial sums of squares in one vector, then their sum
        t, ko, ki = sch.get_loops(rf)
        sch.reorder(t, ko, ki)
        sch.vectorize(ki)
    return sch.mod["main"]


def silu_mul(width: int, a0: int, b0: int, n: int):
    """PrimFunc out[T, n] = silu(x[:, a0:a0+n]) * x[:, b0:b0+n] of x [T, width]: SwiGLU's
    gate and product read in place from the fused gate/up projection's output (one call where
    Relax's default pipeline, which runs no FuseOps, made four: two slices, SiLU, multiply;
    its SiLU was a scalar expf per element, 1.2 ms of a T=8 verify). silu(a) = a / (1 + exp(-a))
    with `exp_expr`'s polynomial (-a clamped at EXP_HIGH: silu is -0 there in fp32 too), 16
    lanes at a time; rows in sequence (8 rows of 1536 are ~10 us, less than waking the pool).
    TE, not TVMScript: Relax asks any one-input kernel whether it is a reshape, which needs
    the block structure TE gives."""
    from tvm import s_tir, te, tirx

    if n % LANES:
        raise UnsupportedError(f"target tvm: silu_mul width {n} is not a multiple of {LANES}")
    t_len = tirx.Var("T", "int64")
    x = te.placeholder((t_len, width), "float32", name="x")

    def f(t, j):
        a = x[t, a0 + j]
        e = exp_expr(tirx.min(-a, tirx.const(EXP_HIGH, "float32")))
        return a / (tirx.const(1, "float32") + e) * x[t, b0 + j]

    out = te.compute((t_len, n), f, name="silu_mul")
    sch = s_tir.Schedule(te.create_prim_func([x, out]))
    _, j = sch.get_loops(sch.get_sblock("silu_mul"))
    _, ji = sch.split(j, [None, LANES])
    sch.vectorize(ji)
    return sch.mod["main"]


def exp_expr(x):
    """exp(x) as a PrimExpr, the polynomial of `exp_lane` (x <= EXP_HIGH; 0 below EXP_LOW)."""
    from tvm import tirx

    def c(v):
        return tirx.const(v, "float32")

    fx = tirx.floor(x * c(LOG2E) + c(0.5))
    r = x - fx * c(LN2_HI) - fx * c(LN2_LO)
    p = c(EXP_POLY[0])
    for coef in EXP_POLY[1:]:
        p = p * r + c(coef)
    p = p * r * r + r + c(1)
    n = tirx.Cast("int32", tirx.max(fx, c(-126))) + tirx.const(127, "int32")
    scale = tirx.reinterpret("float32", tirx.shift_left(n, tirx.const(23, "int32")))
    return tirx.Select(x < c(EXP_LOW), c(0), p * scale)


def rope_table(half: int, scale: float):
    """PrimFunc cs[T, 2, half] = (cos, sin)(pos[t] * inv_freq[i]) * scale: the angles of a
    call's tokens, computed once per function and read by all its `rope` calls (two per
    layer), not once per element of each (a scalar cos and sin: 1 ms of a T=8 verify)."""
    from tvm import te, tirx

    t_len = tirx.Var("T", "int64")
    pos = te.placeholder((t_len,), "int64", name="pos")
    inv_freq = te.placeholder((half,), "float32", name="inv_freq")

    def f(t, c, i):
        angle = pos[t].astype("float32") * inv_freq[i]
        return tirx.if_then_else(c == 0, tirx.cos(angle) * scale, tirx.sin(angle) * scale)

    cs = te.compute((t_len, 2, half), f, name="rope_table")
    return te.create_prim_func([pos, inv_freq, cs])


def mask(kind: str, window: int):
    """PrimFunc mask u8[T, L + T] (arc/runtime/rows.py): the IR mask over the L slots read with
    the slots this call writes masked out, then the new rows' columns. Inputs: pos [T],
    `last` (slots i64[L] for causal/sliding, visible u8[T, L] for tree), write [T]."""
    from tvm import te, tirx

    t_len, l_len = tirx.Var("T", "int64"), tirx.Var("L", "int64")
    pos = te.placeholder((t_len,), "int64", name="pos")
    write = te.placeholder((t_len,), "int64", name="write")
    tree = kind == "tree"
    shape = (t_len, l_len) if tree else (l_len,)
    last = te.placeholder(shape, "uint8" if tree else "int64", name="last")
    r = te.reduce_axis((0, t_len), name="j")
    stale = te.compute(
        (l_len,), lambda s: te.max((write[r] == s).astype("int32"), axis=r), name="stale"
    )

    def base(t, slot, value):
        """The IR mask at (token t, slot): visible, or causal over the slot's position."""
        if tree:
            ok = tirx.all(slot < l_len, last[t, tirx.min(slot, l_len - 1)] != 0)
        else:
            ok = value <= pos[t]
        if window:
            ok = tirx.all(ok, pos[t] - value < window)
        return ok

    def f(t, s):
        old = tirx.min(s, l_len - 1)
        new = write[tirx.max(s - l_len, 0)]  # column L + j is the slot write[j]
        value = last[old] if not tree else old
        keep_old = tirx.all(base(t, old, value), stale[old] == 0)
        return tirx.if_then_else(s < l_len, keep_old, base(t, new, new)).astype("uint8")

    m = te.compute((t_len, l_len + t_len), f, name="mask")
    return te.create_prim_func([pos, last, write, m])


# expf as Cephes computes it (exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 in two
# parts, exp(r) by a degree-7 polynomial; about 1 ulp on [-87, 0]), 16 slots at a time:
# libm's scalar expf per slot was 1.4% of a decode step at context 200 (perf)
LOG2E, LN2_HI, LN2_LO = 1.44269504088896341, 0.693359375, -2.12194440e-4
EXP_POLY = (
    1.9875691500e-4,
    1.3981999507e-3,
    8.3334519073e-3,
    4.1665795894e-2,
    1.6666665459e-1,
    5.0000001201e-1,
)
EXP_LOW = -87.0  # exp below this (masked slots' -inf among them) is 0 here
EXP_HIGH = 88.0  # exp(88) = 1.65e38 still fits a float32


def sum16_lanes(op=None):
    """T.macro `sum16(acc)`: halving steps over a 16-lane buffer, after which
    op(acc[0], acc[1]) folds all its lanes (a tree, not 16 steps in a chain); `op` is + by
    default, T.max for a maximum."""
    from tvm.script import tirx as T

    op = op or (lambda a, b: a + b)

    @T.macro
    def f(acc):
        for i in T.vectorized(8):
            acc[i] = op(acc[i], acc[i + 8])
        for i in T.vectorized(4):
            acc[i] = op(acc[i], acc[i + 4])
        for i in T.vectorized(2):
            acc[i] = op(acc[i], acc[i + 2])

    return f


def exp_lane():
    """T.macro `exp_lane(xs, ev, i)`: ev[i] = exp(xs[i]) by `exp_expr` (0 where xs[i] <
    EXP_LOW, -inf among them; xs[i] must be <= EXP_HIGH). Called inside a `T.vectorized` loop
    over i, it is 16 lanes of branch-free arithmetic (T.Select: T.if_then_else there is
    scalarized lane by lane)."""
    from tvm.script import tirx as T

    @T.macro
    def f(xs, ev, i):
        ev[i] = exp_expr(xs[i])

    return f


# attention's P.V accumulators per task, in floats: 12 of AVX2's 16 registers (8 floats each),
# leaving room for the broadcast probabilities and V's loads; 12 of AVX-512's 32 (16 floats)
PV_FLOATS = {"avx2": 96, "avx512": 192}


def attention(
    heads: int,
    kv_heads: int,
    d: int,
    layers: int,
    seq: int,
    grouped: bool = False,
    pv_floats: int = PV_FLOATS["avx2"],
    k_at=None,
    v_at=None,
):
    """PrimFunc out[T, H*D] = softmax(q k^T / sqrt(D), masked) v over the cache's first L slots
    of layer `layer` then the T new rows; `p` [H, T, L+T] is scratch for the probabilities.

    A parallel task is one token and one head, or with `grouped` one token and the H/KV query
    heads that share a KV head (GQA): each K and V row is then loaded once for all of them,
    and P.V keeps H/KV sets of accumulators busy. Grouped is for T > 1 (a verify, a prefill),
    where tokens give the threads enough tasks; a decode step keeps a task per head. P.V runs
    in passes over slices of the output dims whose accumulators (heads x slice) fit
    `pv_floats` (PV_FLOATS: the vector registers): grouped on AVX2, 2 passes of 32 dims for
    3 heads of 64 (why and what it measured: at the P.V loop below).

    `k_at` / `v_at` = (width, start): the new K / V rows are the KV*D columns from `start` of
    a [T, width] buffer, read in place (V from the fused QKV projection's output: no slice of
    it copied out first); None: a [T, KV*D] buffer of their own.

    `pos` [T]: the new rows' positions. Each token's output is the same bits whatever the
    call (one decode token, a verify's tree node, a prefill chunk's row): its scores, its
    softmax sum (terms in lanes by position, in position order) and P.V (slots, then rows, in
    order) take the same operations in the same order."""
    from tvm.script import tirx as T

    if d % LANES:
        raise UnsupportedError(f"target tvm: head_dim {d} is not a multiple of {LANES}")
    g, scale, lanes = heads // kv_heads, d**-0.5, LANES
    hg = g if grouped else 1  # query heads per task
    chunks = d // lanes
    neg = T.float32(float("-inf"))
    # P.V's slice of output dims per pass: the widest whose hg x dw accumulators fit pv_floats
    dw = max(
        w for w in range(lanes, d + 1, lanes) if d % w == 0 and (hg * w <= pv_floats or w == lanes)
    )
    exp, sum16, max16 = exp_lane(), sum16_lanes(), sum16_lanes(T.max)
    (kw, k0), (vw, v0) = _cols(k_at, kv_heads * d), _cols(v_at, kv_heads * d)

    @T.macro
    def dot(acc, acc2, qh, hh, row):  # acc[0] + acc[1] = qh[hh] . row(c * lanes + i)
        for i in T.vectorized(lanes):
            acc[i] = T.float32(0)
            acc2[i] = T.float32(0)
        for c in range(chunks // 2):  # even chunks into acc, odd into acc2: two FMA chains
            for i in T.vectorized(lanes):
                acc[i] = acc[i] + qh[hh * d + 2 * c * lanes + i] * row(2 * c * lanes + i)
                acc2[i] = acc2[i] + qh[hh * d + (2 * c + 1) * lanes + i] * row(
                    (2 * c + 1) * lanes + i
                )
        for c in range(chunks // 2 * 2, chunks):
            for i in T.vectorized(lanes):
                acc[i] = acc[i] + qh[hh * d + c * lanes + i] * row(c * lanes + i)
        for i in T.vectorized(lanes):
            acc[i] = acc[i] + acc2[i]
        sum16(acc)

    @T.prim_func(private=True)
    def attention_kernel(
        var_q: T.handle,
        var_k: T.handle,
        var_v: T.handle,
        var_c: T.handle,
        var_m: T.handle,
        var_pos: T.handle,
        layer: T.int64,
        var_out: T.handle,
        var_p: T.handle,
    ):
        T.func_attr({"tirx.noalias": True})
        t_len = T.int64()
        c_len = T.int64()  # L + T columns
        q = T.match_buffer(var_q, (t_len, heads * d), "float32")
        k = T.match_buffer(var_k, (t_len, kw), "float32")
        v = T.match_buffer(var_v, (t_len, vw), "float32")
        cache = T.match_buffer(var_c, (2 * layers, kv_heads, seq, d), "float32")
        m = T.match_buffer(var_m, (t_len, c_len), "uint8")
        pos = T.match_buffer(var_pos, (t_len,), "int64")  # the new rows' positions
        out = T.match_buffer(var_out, (t_len, heads * d), "float32")
        p = T.match_buffer(var_p, (heads, t_len, c_len), "float32")
        l_len = c_len - t_len
        for ht in T.parallel(heads // hg * t_len):
            # scratch in scope "global" under 1 KB: stack allocas (see panel_gemv), not a
            # heap workspace per task
            acc = T.alloc_buffer((lanes,), "float32")
            acc2 = T.alloc_buffer((lanes,), "float32")  # odd chunks' products: two chains
            o = T.alloc_buffer((hg * dw,), "float32")  # a slice of P.V per head
            red = T.alloc_buffer((1 + hg,), "float32")  # a running max, then each head's sum
            qh = T.alloc_buffer((hg * d,), "float32")  # the task's queries
            xs = T.alloc_buffer((lanes,), "float32")  # exp's argument, then its value
            ev = T.alloc_buffer((lanes,), "float32")
            xr = T.alloc_buffer((lanes,), "float32")  # the same for the last columns
            er = T.alloc_buffer((lanes,), "float32")
            sums = T.alloc_buffer((lanes,), "float32")  # the lanes' sums, lane picked per term
            h0 = ht // t_len * hg
            t = ht % t_len
            kvh = h0 // g
            for hh in T.unroll(hg):
                for i in T.vectorized(d):
                    qh[hh * d + i] = q[t, (h0 + hh) * d + i]
            for s in range(l_len):  # scores over the cache; the max after
                for hh in T.unroll(hg):
                    p[h0 + hh, t, s] = neg
                if m[t, s] != T.uint8(0):
                    for hh in T.unroll(hg):
                        dot(acc, acc2, qh, hh, lambda e: cache[2 * layer, kvh, s, e])  # noqa: B023
                        p[h0 + hh, t, s] = (acc[0] + acc[1]) * T.float32(scale)
            for j in range(t_len):  # scores over this call's new rows
                for hh in T.unroll(hg):
                    p[h0 + hh, t, l_len + j] = neg
                if m[t, l_len + j] != T.uint8(0):
                    for hh in T.unroll(hg):
                        dot(acc, acc2, qh, hh, lambda e: k[j, k0 + kvh * d + e])  # noqa: B023
                        p[h0 + hh, t, l_len + j] = (acc[0] + acc[1]) * T.float32(scale)
            for hh in T.unroll(hg):
                h = h0 + hh
                for i in T.vectorized(lanes):  # the max, 16 slots at a time
                    acc[i] = neg
                for so in range((l_len + t_len) // lanes):
                    for i in T.vectorized(lanes):
                        acc[i] = T.max(acc[i], p[h, t, so * lanes + i])
                for s in range((l_len + t_len) // lanes * lanes, l_len + t_len):
                    acc[0] = T.max(acc[0], p[h, t, s])
                max16(acc)
                red[0] = T.max(acc[0], acc[1])
                # exp, and the sum with each slot's term in lane (its position % 16), lanes
                # filled in the order of positions: a token's softmax sum is then the same bits
                # whether its earlier tokens are cache slots (a decode step) or this call's rows
                # (a verify), and so are its logits (spec-tree's output is plain decoding's
                # bit for bit). Cache slots, 16 at a time: position = slot
                for i in T.vectorized(lanes):
                    acc[i] = T.float32(0)
                for so in range(l_len // lanes):
                    for i in T.vectorized(lanes):
                        xs[i] = p[h, t, so * lanes + i] - red[0]  # <= 0, or -inf where masked
                        exp(xs, ev, i)
                        p[h, t, so * lanes + i] = ev[i]
                        acc[i] = acc[i] + ev[i]
                # the cache's last slots past a multiple of 16, then the new rows: gathered 16
                # at a time (-inf past the row), the same vector exp, each term into its lane
                # (in buffers of their own: a lane picked at run time keeps a buffer in
                # memory, and `acc` is the scores' accumulator too)
                for i in T.vectorized(lanes):
                    sums[i] = acc[i]
                rest = l_len // lanes * lanes
                for cc in range((c_len - rest + lanes - 1) // lanes):
                    for i in T.unroll(lanes):
                        col = rest + cc * lanes + i
                        xr[i] = T.if_then_else(
                            col < c_len, p[h, t, T.min(col, c_len - 1)] - red[0], neg
                        )
                    for i in T.vectorized(lanes):
                        exp(xr, er, i)
                    for i in T.unroll(lanes):
                        col = rest + cc * lanes + i
                        if col < c_len:
                            p[h, t, col] = er[i]
                            at = T.if_then_else(col < l_len, col, pos[T.max(col - l_len, 0)])
                            sums[at % lanes] = sums[at % lanes] + er[i]
                for i in T.vectorized(lanes):
                    acc[i] = sums[i]
                sum16(acc)
                red[1 + hh] = acc[0] + acc[1]
            # P.V in passes over slices of `dw` output dims, each head's slice summed over the
            # slots in order: the group's accumulators (hg x dw floats) stay in registers. All
            # d dims of 3 heads at once (24 AVX2 registers) were spilled to the stack by LLVM
            # (a load-FMA-store chain per slot, half of the kernel's perf samples at T=4; the
            # kernel 0.92x the time without at T=4 and 8, context 200, 2-core Zen 3).
            # Masked slots are skipped, so a stale row there never reaches the output (0 * NaN)
            for w0 in range(d // dw):
                for hh in T.unroll(hg):
                    for i in T.vectorized(dw):
                        o[hh * dw + i] = T.float32(0)
                for s in range(l_len):
                    if m[t, s] != T.uint8(0):
                        for hh in T.unroll(hg):
                            for i in T.vectorized(dw):
                                o[hh * dw + i] = (
                                    o[hh * dw + i]
                                    + p[h0 + hh, t, s] * cache[2 * layer + 1, kvh, s, w0 * dw + i]
                                )
                for j in range(t_len):
                    if m[t, l_len + j] != T.uint8(0):
                        for hh in T.unroll(hg):
                            for i in T.vectorized(dw):
                                o[hh * dw + i] = (
                                    o[hh * dw + i]
                                    + p[h0 + hh, t, l_len + j] * v[j, v0 + kvh * d + w0 * dw + i]
                                )
                for hh in T.unroll(hg):
                    for i in T.vectorized(dw):
                        out[t, (h0 + hh) * d + w0 * dw + i] = o[hh * dw + i] / red[1 + hh]

    return attention_kernel


def _dequant(kind: str, codes, d, m, j, kk, group: int):
    """The fp32 value of weight element [j, kk] from its block components (arc/formats.py:
    affine4 w = d*q + m with q the low nibble of byte e (e < g/2) or the high nibble of byte
    e - g/2; sym8 w = d*q)."""
    from tvm import tirx

    b, e = kk // group, kk % group
    if kind == "sym8":
        return codes[j, b, e].astype("float32") * d[j, b]
    half = group // 2
    byte = codes[j, b, e % half]
    q = tirx.if_then_else(e < half, byte & tirx.const(15, "uint8"), byte >> tirx.const(4, "uint8"))
    return q.astype("float32") * d[j, b] + m[j, b]


def block_inputs(kind: str, n: int, k: int, group: int) -> list:
    """TE placeholders of a block-format weight [N, K]: codes, d (and m for affine4)."""
    from tvm import te

    blocks = (n, k // group)
    if kind == "sym8":
        codes = te.placeholder((*blocks, group), "int8", name="codes")
        return [codes, te.placeholder(blocks, "float32", name="d")]
    codes = te.placeholder((*blocks, group // 2), "uint8", name="codes")
    d = te.placeholder(blocks, "float32", name="d")
    return [codes, d, te.placeholder(blocks, "float32", name="m")]


def qgemv(kind: str, n: int, k: int, group: int, tokens: int | None = None):
    """PrimFunc y[T, N] = x[T, K] @ dequant(w)[N, K].T for a block-format weight: each row is
    dequantized once into a local [K] buffer (read once from memory as packed codes), then
    the gemv schedule's vectorized dot runs for every token over it."""
    from tvm import s_tir, te, tirx

    t_len = tirx.Var("T", "int64") if tokens is None else tokens
    x = te.placeholder((t_len, k), "float32", name="x")
    comps = block_inputs(kind, n, k, group)
    m = comps[2] if kind == "affine4" else None
    w = te.compute((n, k), lambda j, kk: _dequant(kind, comps[0], comps[1], m, j, kk, group))
    r = te.reduce_axis((0, k), name="k")
    y = te.compute((t_len, n), lambda t, j: te.sum(x[t, r] * w[j, r], axis=r), name="y")
    sch = s_tir.Schedule(te.create_prim_func([x, *comps, y]))
    ji = _schedule_gemv(sch, n, k)
    deq = sch.get_sblock("compute")
    sch.compute_at(deq, ji)
    sch.set_scope(deq, 0, "local")  # one dequantized row, in L1
    if kind == "affine4":  # [blocks, low|high nibbles, g/2]: the nibble choice unrolled
        _, half, e = sch.split(sch.get_loops(deq)[-1], [None, 2, group // 2])
        sch.unroll(half)
    else:
        _, e = sch.split(sch.get_loops(deq)[-1], [None, LANES if k % LANES == 0 else 1])
    sch.vectorize(e)
    return sch.mod["main"]


def qembed(kind: str, vocab: int, hidden: int, group: int):
    """PrimFunc out[T, hidden] = dequant(w)[tokens] for a block-format embedding."""
    from tvm import te, tirx

    t_len = tirx.Var("T", "int64")
    tokens = te.placeholder((t_len,), "int64", name="tokens")
    comps = block_inputs(kind, vocab, hidden, group)
    m = comps[2] if kind == "affine4" else None
    out = te.compute(
        (t_len, hidden),
        lambda t, kk: _dequant(kind, comps[0], comps[1], m, tokens[t], kk, group),
        name="embed",
    )
    return te.create_prim_func([tokens, *comps, out])


# ---------------------------------------------------------------- panel kernels

# Software prefetch, AHEAD blocks ahead of the block being read: each panel's codes are a few
# KB, so the hardware's streamers (which stop at 4 KB pages) keep restarting; asking for them
# 2 KB ahead (Q4 blocks; 4 KB for Q8) took a step's projections from 16.3 to 9.7 ms (T=1) and
# 23.4 to 12.7 ms (T=4) on one thread with the weights out of L2 (30 layers' worth, /tmp
# microbenchmark; AHEAD 2: 11.7, 4: 11.0, 16: 10.1 ms)
AHEAD, LINE = 8, 64
PANEL = LANES  # output rows per panel: one f32 vector holds one column of a panel
# tile plans by token count: (largest T the plan serves, tokens per tile, chains per token,
# and optionally panels per tile, 1 if absent).
# A tile's accumulators (tokens x chains panels) must stay in vector registers; a panel of 16
# floats is one AVX-512 register (32 of them) but two AVX2 ones (16 of them).
# Every plan of a target has the same chains per token: a token's sum then runs in the same
# order whatever the call's T, so a verify's logits are the decode step's bit for bit and
# spec-tree's greedy (and seeded sampled) output is plain decoding's by construction, not
# only where no two logits are within rounding of each other (until 2026-12-06 T=1 took 4
# chains, T=2 and 4 two and T=8 one: verify and decode logits differed by up to 4e-5, and a
# sampled corpus question came out differently after ~7000 sampled tokens).
# AVX-512: 2 chains, tiles up to 4 tokens. Two 8-token plans were measured on the 2-core AMD
# EPYC (Zen 4), -O2 engines' calls interleaved in one process (decode, verify of 8, ms):
# 8 tokens x 2 chains 4.92 / 20.2 and 4 chains with 4-token tiles 5.28 / 19.4, against the
# old plans' 4.77 / 14.9: their accumulators (16 panels, 1 KB) reach TVM's stack limit, so the
# scratch went to the heap and every update through memory, T = 1 included. These plans
# (8 panels at most): 4.43 / 14.8 against 4.54 / 14.9 in the same run; T = 2 and 4 unchanged.
TILES = ((1, 1, 2), (2, 2, 2), (None, 4, 2))
# AVX2: 4 tokens x 2 chains (16 registers of accumulators, plus the column and the broadcast
# activation) spill, so T >= 2 takes tiles of 2 tokens x 2 chains. AVX2 code (znver3) on the
# Zen 4, a step's Q4_1 projections, T = 1 / 4 / 8: the old plans (4 chains at T=1, tiles of
# 4 x 1 chain) 6.53 / 11.29 / 21.36 ms, these 6.41 / 14.11 / 27.41, one chain everywhere
# (tiles of 4) 7.34 / 11.26 / 21.40: a slower decode step costs more than slower verifies.
TILES_AVX2 = ((1, 1, 2), (None, 2, 2))
# AVX2 with one chain per token: tiles of 4 tokens fit the 16 registers. On a CPU whose own
# vector unit is AVX2 (a native build there: Zen 3 measured) the decode step costs the same
# as with 2 chains and verifies much less; benchmarks/panel_kernel.py on the 2-core Zen 3
# (2026-12-07), a step's Q4_1 projections, T = 1 / 2 / 4 / 8, 2 threads: 6.59 / 8.18 / 15.50 /
# 29.64 ms with TILES_AVX2, 6.57 / 8.40 / 11.73 / 22.72 with these; 1 thread 12.17 / 15.36 /
# 29.86 / 58.32 against 12.30 / 15.68 / 22.00 / 42.48. AVX2 code run on the Zen 4 (a portable
# x86-64-v3 build there) lost 12% at T = 1 this way (above), so portable builds keep 2 chains.
# Then (2026-12-07, same machine) with the codes widened in-lane (`widen_inlane`): one chain
# at T = 1 became latency-bound (each FMA waits for the last, 4 cycles): a decode tile of 2
# panels (4 independent chains, each row's sum in the same order) 4.66 ms against 5.44-5.58
# for one panel (2 chains per token: 4.49-4.60, but T = 4 then 11.6-13.1 ms against 9.3-9.5);
# 4 panels 7.26 ms (9 tasks of 4 panels split 5 / 4 between the 2 threads).
TILES_AVX2_NATIVE = ((1, 1, 1, 2), (2, 2, 1, 1), (None, 4, 1, 1))
PLANS = {"avx512": TILES, "avx2": TILES_AVX2, "avx2-native": TILES_AVX2_NATIVE}
# plans of AVX2 code: codes widened to floats by in-lane byte shuffles (panel_gemv's
# `widen_inlane`), not by LLVM's lane-crossing vpmovzxbd
INLANE_PLANS = frozenset({"avx2", "avx2-native"})


def tile_plan(avx512: bool, native: bool = False) -> str:
    """The name (in PLANS) of the panel kernels' tile plan for a target with (or without)
    AVX-512's 32 registers; `native`: built for this CPU's own name, not a portable level."""
    if avx512:
        return "avx512"
    return "avx2-native" if native else "avx2"


def panel_specs(
    kind: str, n: int, k: int, group: int, scale: str = "float32"
) -> dict[str, tuple[tuple, str]]:
    """Component suffix ("" for the codes or the fp32 weight) -> (shape, dtype) of a weight
    [N, K] repacked into panels of PANEL rows (`to_panels`): the row axis goes innermost, so
    one vector load holds the same element of PANEL consecutive rows. `scale`: the dtype of
    d and m, float16 for a GGUF's blocks (stored as fp16 there, so converting is exact)."""
    p = n // PANEL
    if kind == "f32":
        return {"": ((p, k, PANEL), "float32")}
    blocks = (p, k // group)
    if kind == "affine4":
        return {
            "": ((*blocks, group // 2, PANEL), "uint8"),
            "d": ((*blocks, PANEL), scale),
            "m": ((*blocks, PANEL), scale),
        }
    return {"": ((*blocks, group, PANEL), "int8"), "d": ((*blocks, PANEL), scale)}


def to_panels(t):
    """A stored component (codes [N, B, E], scales [N, B], or fp32 [N, K]) in panel layout
    ([N/P, B, E, P], [N/P, B, P], [N/P, K, P]): the same values, rows moved innermost."""
    n = t.shape[0]
    x = t.reshape(n // PANEL, PANEL, *t.shape[1:])
    return x.movedim(1, -1).contiguous()


def panel_gemv(
    kind: str,
    n: int,
    k: int,
    group: int,
    scale: str = "float32",
    amx: bool = False,
    plan: str = "avx512",
    lut: bool = False,
    inlane: bool | None = None,
):
    """PrimFunc y[T, N] = x[T, K] @ w[N, K].T over a panel-layout weight (`panel_specs`), for
    any T (decode, a verify tree, a prefill chunk).

        for p in parallel(N / P):             # a panel: P output rows, one f32 vector
                                              # (or the plan's panels per tile, side by side)
          for each tile of TB tokens:          # TB by T (`tiles`): 1, 2, 4 (, 8)
            acc[TB] = 0
            for each block b of g columns:
              blk[TB x C] = 0                  # C independent chains per token (FMA latency)
              for each column kk of the block:   # in the order the block's bytes hold them
                q[0:P] = float(codes[p, kk, 0:P])                # P rows at once, in registers
                for t in TB: blk[t, kk % C][0:P] += x[t, kk] * q[0:P]   # broadcast x
              for t in TB: acc[t] += d[p, b] * sum_C blk[t] + m[p, b] * sx[t, b]
            y[t, p*P : p*P+P] = acc[t]                          # no horizontal reduction

    The block's scale and offset leave the inner loop, as in llama.cpp's and gpt-fast's
    kernels: sum_k x_k (d q_k + m) = d sum_k x_k q_k + m sum_k x_k, with sx[t, b] (the block's
    sum of activations) computed once per call. The inner loop is then a nibble, a convert and
    TB FMAs per 16 weights instead of also an FMA for `d*q + m`: a step's projections went
    from 10.9 to 9.6 ms (T=1) and 19.5 to 18.1 ms (T=8) on one thread (/tmp microbenchmark,
    weights out of L2). The weights are still exactly arc/formats.py's (the integer codes,
    fp16 scales widened exactly) with fp32 accumulation; only the rounding order differs from
    multiplying by each dequantized weight — as any other summation order (MKL's, a reduction
    split over threads) does, and greedy output stays HF's (tests/e2e). f32 weights take
    the same loop with blocks of P columns and no scale. Against the row-at-a-time `qgemv`
    (dequantize a row into a buffer, then one 16-lane dot product with a horizontal sum per
    row and token) this keeps weights in registers, reuses each for TB tokens, and writes P
    outputs with one store: the packed layout llama.cpp's repacked CPU kernels (Q4_0_8x8) and
    MLC's weight layouts use.

    `lut` (affine4 on a CPU with AVX-512 VBMI, LUT_FLAGS): the codes become floats by table
    lookup instead of masking, widening and converting each column (`nibble_lut`: one vpermb
    per 8 columns, then a shift and a vpermps per column; LLVM had made the old path a GFNI
    byte shift, a vpmovzxbd and a vcvtdq2ps per column, two of them on port 5). The products
    and their order are unchanged, so the outputs are bit for bit the same (tested). Measured
    on the 2-core Intel Xeon (2026-12-06): a step's QKV, gate/up and down projections x 30,
    interleaved, T = 1 / 2 / 4 / 8: 0.82x / 0.89x / 0.93x / 0.97x the time; `arc bench`, 10
    prompts x 128 tokens, own processes: -O1 287.6 against 267.0 tok/s (1.077x), -O2 329.8
    against 309.2 (1.067x).

    `plan`: the token tiles (a name in PLANS, `tile_plan`'s pick: AVX-512's or AVX2's register
    budget). A tile of several panels (PLANS' optional fourth field) runs their rows side by
    side, each row's sum still one chain in column order, so a task then takes that many
    panels. `inlane` (default: the plan is one of INLANE_PLANS): AVX2 code widens the codes
    by in-lane byte shuffles (`widen_inlane`); the products and their order are the same.
    `amx` (a kind in tvm_amx.KINDS, a CPU with AMX): T >= tvm_amx.MIN_TOKENS runs on AMX tiles
    instead (targets/tvm_amx.py), the same layout and an fp32-exact product.
    """
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as I

    from arc.targets import tvm_amx

    tiles = PLANS[plan]
    plans = [(*tile, 1)[:4] for tile in tiles]  # (bound, tokens, chains, panels)
    inlane = plan in INLANE_PLANS if inlane is None else inlane
    if len({c for _, _, c, _ in plans}) != 1:  # a token's sum order must not depend on T
        raise ValueError(f"tile plans {tiles} differ in chains per token")
    g = group if kind != "f32" else PANEL
    nb, npan = k // g, n // PANEL
    specs = panel_specs(kind, n, k, group, scale)
    # the block's columns in storage order: (slot e, nibble h, column within the block)
    if kind == "affine4":
        order = [(e, h, h * (g // 2) + e) for e in range(g // 2) for h in range(2)]
    else:
        order = [(e, 0, e) for e in range(g)]

    with IRBuilder() as ib:
        with I.prim_func():
            x, comps, y, t_len = panel_args("panel_gemv", specs, k, n)

            def prefetch(p, b, stride: int = 1):
                prefetch_block(comps, kind, g, nb, npan, p, b, stride)

            def code(p, b, e, h, i):
                """The stored integer q of element (column b*g + col) of the panel's P rows, as
                fp32 (exact: |q| < 2^8); for f32, the weight itself."""
                if kind == "f32":
                    return comps[0][p, b * g + e, i]
                if kind == "sym8":
                    return comps[0][p, b, e, i].astype("float32")
                byte = comps[0][p, b, e, i]
                nib = byte & tirx.const(15, "uint8") if h == 0 else byte >> tirx.const(4, "uint8")
                return nib.astype("float32")

            def nibble_lut(p, b, e, h):
                """The 4-bit codes of slot e's nibble h of the panel's P rows as fp32 vectors
                by table lookup, with no per-column widening or converting: the 64 bytes of
                slots e0..e0+3 (e0 = e rounded down to 4) are gathered by one vpermb so that
                lane i holds row i's 4 bytes (8 nibbles); vpermps then takes the low 4 bits
                of each lane as an index into 0.0 .. 15.0 after shifting nibble 2(e - e0) + h
                down (LLVM merges the repeated loads and vpermb of a group)."""
                e0 = e - e % 4
                raw = comps[0][p, b, e0, tirx.Ramp(0, 1, 4 * PANEL)]  # slots e0..e0+3 x P rows
                # byte 4i + j of the result <- byte 16j + i: row i's byte of slot e0 + j
                pick = tirx.Cast(
                    "int8x64",
                    tirx.Ramp(0, 1, 64) % 4 * 16 + tirx.Ramp(0, 1, 64) // 4,
                )
                rows = tirx.call_llvm_pure_intrin(
                    "int8x64",
                    "llvm.x86.avx512.permvar.qi.512",
                    tirx.reinterpret("int8x64", raw),
                    pick,
                )
                idx = tirx.reinterpret(f"int32x{PANEL}", rows)
                shift = 4 * (2 * (e - e0) + h)
                if shift:
                    idx = idx >> tirx.Broadcast(tirx.const(shift, "int32"), PANEL)
                table = tirx.Cast(f"float32x{PANEL}", tirx.Ramp(0, 1, PANEL))  # 0.0 .. 15.0
                return tirx.call_llvm_pure_intrin(
                    f"float32x{PANEL}", "llvm.x86.avx512.permvar.sf.512", table, idx
                )

            lut = lut and kind == "affine4" and PANEL == 16
            # 8-bit codes keep LLVM's widening: vpmovsxbd straight from memory measured faster
            # (the Q8_0 LM head, 49152 x 576, T = 1 / 4 / 8: 0.76 / 2.25 / 4.52 ms against
            # 1.02 / 2.55 / 5.44 in-lane; Zen 3, 2 threads)
            inlane = inlane and not lut and kind == "affine4" and PANEL == 16

            def widen_inlane(p, b, e, h):
                """The 4-bit codes of slot e's nibble h of the panel's P rows as fp32 vectors,
                widened by in-lane byte shuffles (AVX2): the slot's 16 bytes are loaded into
                both 128-bit halves, and one vpshufb per 8 rows puts row r's byte into the low
                byte of dword r, zeros above; a mask or a shift takes the nibble, a convert
                makes floats. LLVM's widening of the masked bytes, vpmovzxbd to 256 bits,
                crosses the halves: 3 cycles on a shuffle pipe of a Zen 3 (llvm-mca
                -mcpu=znver3), two of them per 16 codes, the loop's bottleneck at T = 1 (a
                step's projections 6.48 -> 5.44 ms, T = 8 21.8 -> 17.7 ms on the 2-core Zen 3,
                benchmarks/panel_kernel.py)."""
                raw = comps[0][p, b, e, tirx.Ramp(0, 1, PANEL)]  # 16 rows' bytes
                both = tirx.reinterpret("int8x32", tirx.Shuffle([raw, raw], list(range(2 * PANEL))))
                r = tirx.Ramp(0, 1, 32)
                halves = []
                for base in (0, 8):  # rows 0-7, then 8-15
                    # dword d of 128-bit half L (r // 16) takes row base + 4L + d
                    src = (r // 16) * 4 + (r % 16) // 4 + base
                    pick = tirx.Select(r % 4 == 0, src, tirx.Broadcast(-128, 32))  # -128: 0
                    dwords = tirx.reinterpret(
                        "int32x8",
                        tirx.call_llvm_pure_intrin(
                            "int8x32", "llvm.x86.avx2.pshuf.b", both, tirx.Cast("int8x32", pick)
                        ),
                    )
                    if h == 0:
                        q = dwords & tirx.Broadcast(tirx.const(15, "int32"), 8)
                    else:
                        q = dwords >> tirx.Broadcast(tirx.const(4, "int32"), 8)
                    halves.append(tirx.Cast("float32x8", q))
                return tirx.Shuffle(halves, list(range(2 * 8)))

            def token_tiles(ps: list, acc, blk, wv, sx, tb: int, c: int):
                """Tiles of tb tokens x len(ps) panels: tb * c * len(ps) independent FMA
                chains, each output element's sum in the same order whatever the tile."""
                pb = len(ps)
                with I.serial(0, tirx.floordiv(t_len + tb - 1, tb)) as t0:
                    for a in range(tb * pb):
                        with I.vectorized(0, PANEL) as i:
                            I.buffer_store(acc, tirx.const(0.0, "float32"), [a * PANEL + i])
                    with I.serial(0, nb) as b:
                        for p in ps:
                            prefetch(p, b, group)
                        for a in range(tb * c * pb):
                            with I.vectorized(0, PANEL) as i:
                                I.buffer_store(blk, tirx.const(0.0, "float32"), [a * PANEL + i])
                        for j, (e, h, col) in enumerate(order):
                            for q, p in enumerate(ps):
                                if lut or inlane:
                                    at = [tirx.Ramp(q * PANEL, 1, PANEL)]
                                    v = (nibble_lut if lut else widen_inlane)(p, b, e, h)
                                    I.buffer_store(wv, v, at)
                                else:
                                    with I.vectorized(0, PANEL) as i:
                                        I.buffer_store(wv, code(p, b, e, h, i), [q * PANEL + i])
                            for t in range(tb):
                                row = tirx.min(t0 * tb + t, t_len - 1)  # a short last tile
                                for q in range(pb):
                                    a = ((t * c + j % c) * pb + q) * PANEL
                                    with I.vectorized(0, PANEL) as i:
                                        value = blk[a + i] + x[row, b * g + col] * wv[q * PANEL + i]
                                        I.buffer_store(blk, value, [a + i])
                        for t in range(tb):  # acc += d * sum(x q) + m * sum(x), per row
                            row = tirx.min(t0 * tb + t, t_len - 1)
                            for q, p in enumerate(ps):
                                at = (t * pb + q) * PANEL
                                with I.vectorized(0, PANEL) as i:
                                    s = blk[(t * c * pb + q) * PANEL + i]
                                    for cc in range(1, c):
                                        s = s + blk[((t * c + cc) * pb + q) * PANEL + i]
                                    if kind != "f32":
                                        s = comps[1][p, b, i].astype("float32") * s  # fp16: exact
                                    value = acc[at + i] + s
                                    if kind == "affine4":
                                        m = comps[2][p, b, i].astype("float32")
                                        value = value + m * sx[row * nb + b]
                                    I.buffer_store(acc, value, [at + i])
                    for t in range(tb):
                        with I.If(t0 * tb + t < t_len):
                            with I.Then():
                                for q, p in enumerate(ps):
                                    with I.vectorized(0, PANEL) as i:
                                        I.buffer_store(
                                            y,
                                            acc[(t * pb + q) * PANEL + i],
                                            [t0 * tb + t, p * PANEL + i],
                                        )

            # sx[t, b]: the sum of token t's activations over block b, which m multiplies
            # (once per call, before the threads split the panels)
            sx = I.alloc_buffer((t_len * nb,), "float32")
            if kind == "affine4":
                with I.serial(0, t_len * nb) as tb_:
                    part = I.alloc_buffer((g,), "float32")
                    at = [tirx.floordiv(tb_, nb), tirx.floormod(tb_, nb) * g]
                    with I.vectorized(0, g) as i:
                        I.buffer_store(part, x[at[0], at[1] + i], [i])
                    fold(part, g)
                    I.buffer_store(sx, part[0], [tb_])
            amx = amx and tvm_amx.applies(kind, group, npan)

            # panels a parallel task takes together: the plans' largest tile of panels,
            # where the panels split evenly into such groups (else one at a time)
            group = max(pb for *_, pb in plans)
            if npan % group:
                group = 1
                plans = [(bound, tb, c, 1) for bound, tb, c, _ in plans]

            def vectors():  # AVX-512 or AVX2 registers
                with I.parallel(0, npan // group) as pg:
                    # scratch under 1 KB in scope "global" is a stack alloca, which LLVM keeps
                    # in registers; TVM heap-allocates "local" (TVMBackendAllocWorkspace) per
                    # parallel task, and every accumulator update then goes through memory
                    tokens = max(tb * pb for _, tb, _, pb in plans)
                    chains = max(tb * c * pb for _, tb, c, pb in plans)
                    acc = I.alloc_buffer((tokens * PANEL,), "float32")  # 8 x 16 floats: 512 B
                    blk = I.alloc_buffer((chains * PANEL,), "float32")  # a block's partial sums
                    wv = I.alloc_buffer((group * PANEL,), "float32")

                    def run(tb: int, c: int, pb: int):
                        for sub in range(group // pb):
                            ps = [pg * group + sub * pb + q for q in range(pb)]
                            token_tiles(ps, acc, blk, wv, sx, tb, c)

                    def plan(idx: int):
                        bound, tb, c, pb = plans[idx]
                        if bound is None:
                            run(tb, c, pb)
                            return
                        with I.If(t_len <= bound):
                            with I.Then():
                                run(tb, c, pb)
                            with I.Else():
                                plan(idx + 1)

                    plan(0)

            if amx:
                with I.If(t_len < tvm_amx.MIN_TOKENS):
                    with I.Then():
                        vectors()
                    with I.Else():  # the activations' bf16 parts, allocated here only
                        tiles_t = tirx.floordiv(t_len + tvm_amx.TOKENS - 1, tvm_amx.TOKENS)
                        xs = I.alloc_buffer((tiles_t * 3 * tvm_amx.TOKENS * k,), "uint16")
                        tvm_amx.split_activations(x, xs, t_len, k)
                        tvm_amx.panel_groups(k, g, npan, t_len, comps, sx, xs, y, prefetch)
            else:
                vectors()
    return ib.get()


def panel_args(name: str, specs: dict, k: int, n: int):
    """IRBuilder, inside I.prim_func(): the panel kernels' signature, x [T, K], the weight's
    components (`panel_specs`), y [T, N], all no-alias; returns (x, comps, y, T)."""
    from tvm.script.ir_builder import tirx as I

    I.func_name(name)
    I.func_attr({"tirx.noalias": True})
    x_h = I.arg("x", I.handle())
    comp_h = [I.arg(f"c{i}", I.handle()) for i in range(len(specs))]
    y_h = I.arg("y", I.handle())
    t_len = I.int64()
    x = I.match_buffer(x_h, (t_len, k), "float32")
    comps = [I.match_buffer(h, *shape) for h, shape in zip(comp_h, specs.values(), strict=True)]
    y = I.match_buffer(y_h, (t_len, n), "float32")
    return x, comps, y, t_len


def prefetch_block(comps, kind: str, g: int, nb: int, npan: int, p, b, stride: int = 1):
    """IRBuilder: ask the cache for the block AHEAD blocks on (past the last block, into the
    panel `stride` on: the one read next when a task reads `stride` panels side by side):
    every cache line of its codes, and its scales."""
    from tvm import tirx

    ahead = b + AHEAD
    p2 = tirx.min(p + stride * tirx.floordiv(ahead, nb), npan - 1)
    b2 = tirx.floormod(ahead, nb)
    row = PANEL * (4 if kind == "f32" else 1)  # bytes of one column of a panel
    byte_rows = g // 2 if kind == "affine4" else g  # affine4: 2 columns a byte
    for e2 in range(0, byte_rows, max(1, LINE // row)):  # f32: a column a line
        at = [p2, b2 * g + e2, 0] if kind == "f32" else [p2, b2, e2, 0]
        _prefetch(comps[0], at)
    for comp in comps[1:]:
        _prefetch(comp, [p2, b2, 0])


def fold(part, n: int, op=None) -> None:
    """IRBuilder: part[0] = op-fold of part[0:n] (+ by default), in halving steps: the upper
    half's lanes into the lower's, an odd middle lane left for the next step, so any n works
    (for a power of two the steps are i + n/2, i + n/4, ...; until 2026-12-08 an n such as 48,
    int4's group=48, dropped lanes: 24 + 12 + 6 + 3 left part[2] out of the block's sum)."""
    from tvm.script.ir_builder import tirx as I

    op = op or (lambda a, b: a + b)
    while n > 1:
        half = n // 2
        with I.vectorized(0, half) as i:
            I.buffer_store(part, op(part[i], part[i + n - half]), [i])
        n -= half


def _prefetch(buf, index) -> None:
    """llvm.prefetch of buf[index] (read, keep in all cache levels, data)."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as I

    addr = tirx.address_of(buf[tuple(index)])
    I.evaluate(tirx.call_intrin("void", "tirx.prefetch", addr, 0, 3, 1))


def panel_embed(kind: str, vocab: int, hidden: int, group: int, scale: str = "float32"):
    """PrimFunc out[T, hidden] = dequant(w)[tokens] for a block-format embedding stored in
    panel layout (tied to a panel LM head)."""
    from tvm import te, tirx

    t_len = tirx.Var("T", "int64")
    tokens = te.placeholder((t_len,), "int64", name="tokens")
    specs = panel_specs(kind, vocab, hidden, group, scale)
    comps = [te.placeholder(s, dt, name=f"c{i}") for i, (s, dt) in enumerate(specs.values())]

    def f(t, kk):
        p, r = tokens[t] // PANEL, tokens[t] % PANEL
        b, e = kk // group, kk % group
        d = comps[1][p, b, r].astype("float32")
        if kind == "sym8":
            return comps[0][p, b, e, r].astype("float32") * d
        half = group // 2
        byte = comps[0][p, b, e % half, r]
        q = tirx.if_then_else(
            e < half, byte & tirx.const(15, "uint8"), byte >> tirx.const(4, "uint8")
        )
        return q.astype("float32") * d + comps[2][p, b, r].astype("float32")

    out = te.compute((t_len, hidden), f, name="embed")
    return te.create_prim_func([tokens, *comps, out])


def chunk_max_sum(chunk: int):
    """T.macro `scan(x, t, c, acc, tot)`: chunk c of row t, 16 lanes at a time: acc[0] = its
    max, tot[0] = its plain sum (nan iff it holds a nan or +inf, or +inf and -inf)."""
    from tvm.script import tirx as T

    lanes = LANES
    sum16, max16 = sum16_lanes(), sum16_lanes(T.max)

    @T.macro
    def scan(x, t, c, acc, tot):
        for i in T.vectorized(lanes):
            acc[i] = x[t, c * chunk + i]
            tot[i] = x[t, c * chunk + i]
        for j in range(1, chunk // lanes):
            for i in T.vectorized(lanes):
                acc[i] = T.max(acc[i], x[t, c * chunk + j * lanes + i])
                tot[i] = tot[i] + x[t, c * chunk + j * lanes + i]
        max16(acc)
        sum16(tot)
        acc[0] = T.max(acc[0], acc[1])
        tot[0] = tot[0] + tot[1]

    return scan


def row_max(chunks: int):
    """T.macro `fold(m, mv, cmax, t)`: m[0] = max_c cmax[t, c] over `chunks` chunk maxima, 16
    at a time, then the tail of a count not a multiple of 16."""
    from tvm.script import tirx as T

    lanes, cvecs = LANES, chunks // LANES
    max16 = sum16_lanes(T.max)

    @T.macro
    def fold(m, mv, cmax, t):
        for i in T.vectorized(lanes):
            mv[i] = T.float32(float("-inf"))
        for j in range(cvecs):
            for i in T.vectorized(lanes):
                mv[i] = T.max(mv[i], cmax[t, j * lanes + i])
        max16(mv)
        m[0] = T.max(mv[0], mv[1])
        for c in range(cvecs * lanes, chunks):
            m[0] = T.max(m[0], cmax[t, c])

    return fold


def topk_insert(k: int):
    """T.macro `insert(topv, topi, value, index)`: into topv/topi (k entries, decreasing)
    `value` if it beats the last, bubbled up past smaller entries (a tie stays below: the
    earlier index wins)."""
    from tvm.script import tirx as T

    @T.macro
    def insert(topv, topi, value, index):
        if value > topv[k - 1]:
            topv[k - 1] = value
            topi[k - 1] = index
            for jj in range(k - 1):
                if topv[k - 1 - jj] > topv[k - 2 - jj]:
                    sv = topv[k - 2 - jj]
                    si = topi[k - 2 - jj]
                    topv[k - 2 - jj] = topv[k - 1 - jj]
                    topi[k - 2 - jj] = topi[k - 1 - jj]
                    topv[k - 1 - jj] = sv
                    topi[k - 1 - jj] = si

    return insert


def logits_stats(vocab: int, chunk: int, k: int):
    """PrimFunc (best i64[T], tokens i64[T, k], probs [T, k]) of logits [T, V]: each row's
    argmax (the first maximal index, torch.argmax's), its k most probable tokens in
    decreasing order and their softmax probabilities: what greedy sampling and Token
    Recycling take from a step's logits (arc/runtime/topk.py), in one call.

        for part in parallel(parts):              # contiguous shares of the chunks
          for t in range(T), c in part:
            cmax[t, c] = max(x[t, chunk c])       # 16 lanes at a time
            csum[t, c] = sum(exp(x[t, chunk c] - cmax[t, c]))   # 0 for an all -inf chunk,
                                                  # nan if it holds a nan or +inf
        for t in parallel(T):
          M = max_c cmax[t, c]                    # merge (Milakov & Gimelshein 2018)
          lse = M + log(sum_c csum[t, c] * exp(cmax[t, c] - M))
          best[t] = first index of M in the first chunk c with cmax[t, c] = M
          the k chunks of largest max, then the k largest logits among their k * chunk
          (every top-k logit lies in one of them: arc/runtime/topk.py), probs = exp(v - lse)

    best[t] is -1 unless lse is finite (a nan, +inf, or all -inf row), and the caller then
    asks torch, whose argmax takes a nan as the maximum; ties among the top k go to the lower
    chunk, then the lower index.

    Parallel over shares of the vocabulary, not rows: a decode step's logits were written by
    the LM head's threads, each its contiguous share, then evicted from L2 as it streamed 30
    MB of weights; two threads read them back in half the time. After a step, in situ, the
    torch passes this replaces took ~330 us (argmax and top-4 with probabilities; ~12 torch
    calls, each slowed several fold by caches the step evicted), torch's argmax alone 110."""
    from tvm.script import tirx as T

    lanes = LANES
    if chunk % lanes or vocab % chunk or vocab // chunk < k:
        raise UnsupportedError(
            f"target tvm: logits_stats needs {chunk} | {vocab}, {lanes} | {chunk}, "
            f"{k} <= {vocab} / {chunk}"
        )
    chunks, vecs, cvecs = vocab // chunk, chunk // lanes, vocab // chunk // lanes
    per = -(-chunks // STAT_PARTS)  # chunks per part
    parts = -(-chunks // per)
    neg, inf = T.float32(float("-inf")), T.float32(float("inf"))
    nan = T.float32(float("nan"))
    exp, sum16 = exp_lane(), sum16_lanes()

    insert = topk_insert(k)
    scan, fold = chunk_max_sum(chunk), row_max(chunks)

    @T.prim_func(private=True)
    def logits_stats_kernel(
        var_x: T.handle, var_best: T.handle, var_tokens: T.handle, var_probs: T.handle
    ):
        T.func_attr({"tirx.noalias": True})
        t_len = T.int64()
        x = T.match_buffer(var_x, (t_len, vocab), "float32")
        best = T.match_buffer(var_best, (t_len,), "int64")
        tokens = T.match_buffer(var_tokens, (t_len, k), "int64")
        probs = T.match_buffer(var_probs, (t_len, k), "float32")
        cmax = T.alloc_buffer((t_len, chunks), "float32")
        csum = T.alloc_buffer((t_len, chunks), "float32")
        for part in T.parallel(parts):
            acc = T.alloc_buffer((lanes,), "float32")
            tot = T.alloc_buffer((lanes,), "float32")  # plain sum: nan iff a nan or +inf
            xs = T.alloc_buffer((lanes,), "float32")
            ev = T.alloc_buffer((lanes,), "float32")
            for t, cc in T.grid(t_len, per):
                c = part * per + cc
                if c < chunks:
                    scan(x, t, c, acc, tot)
                    cmax[t, c] = acc[0]
                    for i in T.vectorized(lanes):
                        acc[i] = T.float32(0)
                    if cmax[t, c] > neg:  # else every logit of the chunk is -inf: it adds 0
                        for j in range(vecs):
                            for i in T.vectorized(lanes):
                                xs[i] = x[t, c * chunk + j * lanes + i] - cmax[t, c]
                                exp(xs, ev, i)
                                acc[i] = acc[i] + ev[i]
                    sum16(acc)
                    if tot[0] < inf:  # false for nan (+inf and -inf make nan)
                        csum[t, c] = acc[0] + acc[1]
                    else:
                        csum[t, c] = nan
        for t in T.parallel(t_len):
            mv = T.alloc_buffer((lanes,), "float32")
            xs = T.alloc_buffer((lanes,), "float32")
            ev = T.alloc_buffer((lanes,), "float32")
            red = T.alloc_buffer((3,), "float32")  # the row's max M, its sum of exp, lse
            at = T.alloc_buffer((2,), "int64")  # the first chunk holding M, M's index in it
            cv = T.alloc_buffer((k,), "float32")  # the k largest chunk maxima
            ci = T.alloc_buffer((k,), "int64")  # their chunks
            tv = T.alloc_buffer((k,), "float32")  # the k largest logits
            ti = T.alloc_buffer((k,), "int64")  # their tokens
            fold(red, mv, cmax, t)  # red[0] = M
            red[1] = T.float32(0)
            if red[0] > neg:
                for i in T.vectorized(lanes):
                    mv[i] = T.float32(0)
                for j in range(cvecs):
                    for i in T.vectorized(lanes):
                        xs[i] = cmax[t, j * lanes + i] - red[0]
                        exp(xs, ev, i)
                        mv[i] = mv[i] + csum[t, j * lanes + i] * ev[i]
                sum16(mv)
                red[1] = mv[0] + mv[1]
                for c in range(cvecs * lanes, chunks):
                    red[1] = red[1] + csum[t, c] * T.exp(cmax[t, c] - red[0])
            red[2] = red[0] + T.log(red[1])  # log(0) = -inf for an all -inf row
            best[t] = T.int64(-1)
            for j in range(k):
                tokens[t, j] = T.int64(0)
                probs[t, j] = T.float32(0)
            if red[2] > neg and red[2] < inf:  # false for nan
                at[0] = T.int64(chunks)
                for c in range(chunks):
                    if at[0] == chunks and cmax[t, c] == red[0]:
                        at[0] = T.int64(c)
                at[1] = T.int64(chunk)
                for i in range(chunk):
                    if at[1] == chunk and x[t, at[0] * chunk + i] == red[0]:
                        at[1] = T.int64(i)
                best[t] = at[0] * chunk + at[1]
                for j in range(k):
                    cv[j] = neg
                    ci[j] = T.int64(j)  # distinct chunks even where fewer than k are finite
                    tv[j] = neg
                    ti[j] = T.int64(0)
                for c in range(chunks):
                    insert(cv, ci, cmax[t, c], T.int64(c))
                for j in range(k):  # the chosen chunks by index: ties go to the lower index
                    at[0] = T.int64(chunks)
                    for jj in range(k):
                        if ci[jj] < at[0] and (j == 0 or ci[jj] > at[1]):
                            at[0] = ci[jj]
                    at[1] = at[0]
                    if at[0] < chunks:  # fewer than k distinct chunks: none left
                        for i in range(chunk):
                            insert(tv, ti, x[t, at[0] * chunk + i], at[0] * chunk + i)
                for j in range(k):
                    tokens[t, j] = ti[j]
                    probs[t, j] = T.exp(tv[j] - red[2])

    return logits_stats_kernel
