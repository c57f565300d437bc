"""tvm target: a sampled step's draw in one library call (`sample_rows`), temperature and
top-p (nucleus sampling, Holtzman et al. 2020, "The Curious Case of Neural Text
Degeneration").

The runtime's torch path (arc/runtime/sampling.py `dists`) takes ~0.2-0.3 ms (temperature) and
~0.5 ms (top-p 0.9) of torch calls right after a 4-5 ms decode step, whose caches they find
cold; this kernel reads the logits twice in parallel and draws in one serial pass over the
nucleus' chunks.

    for part in parallel(parts):                     # contiguous shares of the chunks
      cmax[c] = max(x[chunk c]);  bad[c] = sum(x[chunk c])      # nan iff a nan or +inf
    for part in parallel(parts):
      M = max_c cmax[c]
      w[i] = exp((x[i] - M) / T);  csum[c] = sum(w[chunk c])
    for row in parallel(rows):                       # one thread per row
      S = sum_c csum[c]
      top-p < 1: cut = the smallest logit v with G(v) = sum(w[x > v]) < top_p * S, by bisection
                 over the floats' order (their bits as integers): at most 32 halvings, each
                 summing only the chunks whose max is above the probe; below
                 lo0 = M + T log((1 - top_p) / 2V) lies less than 1 - top_p of S (S >= 1:
                 the top token weighs exp(0) = 1), so the search starts there
      else:      cut = -inf
      draw: r = u * sum(w[x >= cut]); the first token, in index order, whose running sum of
            w[x >= cut] exceeds r (the chunks' sums skip whole chunks)

The nucleus is {x >= cut}: the tokens before which (in decreasing order) less than top_p of
the mass lies, as `filter_logits` keeps them, with every token tied with the last one kept
(a sort keeps the first few of them in an order it does not define). Chunk sums are float32,
the running sums float64; a weight is `exp_expr`'s polynomial (relative error ~1e-7 against
libm), so probabilities match the torch path to ~1e-7, not bit for bit.

out[t] = (token, M, cut, nucleus mass, S) as float64; token -1 for a row holding a nan or
+inf or nothing but -inf (the caller's torch path answers for those)."""

from __future__ import annotations

from arc.errors import UnsupportedError
from arc.targets.tvm_kernels import (
    LANES,
    STAT_PARTS,
    chunk_max_sum,
    exp_lane,
    sum16_lanes,
    topk_insert,
)
from arc.targets.tvm_kernels import row_max as row_max_of

# out[t, :] of sample_rows: then the k most likely tokens (-1 outside the nucleus) and their
# probabilities, Token Recycling's successors (arc/runtime/topk.py TOPK)
OUTPUTS = ["token", "max", "cut", "mass", "total", "top_tokens", "top_probs"]
SETTINGS = ["temperature", "top_p", "u", "top_k"]  # cfg[t, :] (top_k 0: off)
HALVINGS = 34  # bisection steps: 2^32 float keys between lo0 and M at most


def sample_rows(vocab: int, chunk: int, k: int):
    """PrimFunc out f64[T, 5 + 2k] of logits x [T, V] and cfg f64[T, 3] = (temperature,
    top_p, u) for each row, u uniform in [0, 1): see the module docstring; then the row's k
    largest logits' tokens (from the k chunks of largest max, as tvm_kernels.logits_stats
    finds them) and their probabilities under the distribution, a token outside the nucleus
    -1 with probability 0. temperature >= 1e-30 (arc/runtime/sampling.py FAST_T), 0 < top_p
    <= 1."""
    from tvm.script import tirx as T

    lanes = LANES
    if chunk % lanes or vocab % chunk:
        raise UnsupportedError(
            f"target tvm: sample_rows needs {chunk} | {vocab}, {lanes} | {chunk}"
        )
    chunks, vecs = vocab // chunk, chunk // lanes
    per = -(-chunks // STAT_PARTS)  # chunks per part
    parts = -(-chunks // per)
    neg, inf = T.float32(float("-inf")), T.float32(float("inf"))
    exp, sum16 = exp_lane(), sum16_lanes()
    sign = T.int64(-(2**31))
    insert = topk_insert(k)

    gt, ge = _masked_sum(chunk, lambda a, b: a > b), _masked_sum(chunk, lambda a, b: a >= b)
    count_ge = _masked_sum(chunk, lambda a, b: a >= b, ones=True)
    scan, row_max = chunk_max_sum(chunk), row_max_of(chunks)

    @T.macro
    def to_key(key, i, value):
        """key[i] = the float32 `value`'s place in the floats' order, as an integer."""
        key[i] = T.Cast("int64", T.reinterpret("int32", value))
        if key[i] < T.int64(0):
            key[i] = T.int64(0) - (key[i] - sign)

    @T.macro
    def from_key(f, i, kv):
        """f[i] = the float32 whose place in the floats' order is the integer kv."""
        if kv >= T.int64(0):
            f[i] = T.reinterpret("float32", T.Cast("int32", kv))
        else:
            f[i] = T.reinterpret("float32", T.Cast("int32", T.int64(0) - kv + sign))

    @T.prim_func(private=True)
    def sample_rows_kernel(var_x: T.handle, var_cfg: T.handle, var_out: T.handle):
        T.func_attr({"tirx.noalias": True})
        t_len = T.int64()
        x = T.match_buffer(var_x, (t_len, vocab), "float32")
        cfg = T.match_buffer(var_cfg, (t_len, 4), "float64")
        out = T.match_buffer(var_out, (t_len, 5 + 2 * k), "float64")
        w = T.alloc_buffer((t_len, vocab), "float32")
        cmax = T.alloc_buffer((t_len, chunks), "float32")
        csum = T.alloc_buffer((t_len, chunks), "float32")
        bad = T.alloc_buffer((t_len, chunks), "float32")
        for part in T.parallel(parts):
            acc = T.alloc_buffer((lanes,), "float32")
            tot = T.alloc_buffer((lanes,), "float32")
            for t, cc in T.grid(t_len, per):
                c = part * per + cc
                if c < chunks:
                    scan(x, t, c, acc, tot)
                    cmax[t, c] = acc[0]
                    bad[t, c] = tot[0]
        for part in T.parallel(parts):
            m = T.alloc_buffer((1,), "float32")
            mv = T.alloc_buffer((lanes,), "float32")
            xs = T.alloc_buffer((lanes,), "float32")
            ev = T.alloc_buffer((lanes,), "float32")
            acc = T.alloc_buffer((lanes,), "float32")
            for t in range(t_len):
                row_max(m, mv, cmax, t)
                for cc in range(per):
                    c = part * per + cc
                    if c < chunks:
                        for i in T.vectorized(lanes):
                            acc[i] = T.float32(0)
                        if m[0] > neg and m[0] < inf:
                            for j in range(vecs):
                                for i in T.vectorized(lanes):
                                    xs[i] = (x[t, c * chunk + j * lanes + i] - m[0]) / T.Cast(
                                        "float32", cfg[t, 0]
                                    )
                                    exp(xs, ev, i)
                                    w[t, c * chunk + j * lanes + i] = ev[i]
                                    acc[i] = acc[i] + ev[i]
                        sum16(acc)
                        csum[t, c] = acc[0] + acc[1]
        for t in T.parallel(t_len):
            m = T.alloc_buffer((1,), "float32")
            mv = T.alloc_buffer((lanes,), "float32")
            acc = T.alloc_buffer((lanes,), "float32")
            f = T.alloc_buffer((2,), "float32")  # the probe, cut
            red = T.alloc_buffer((4,), "float64")  # S (then a probe's mass), target, running
            key = T.alloc_buffer((3,), "int64")  # lo, hi, mid: floats' order as integers
            cand = T.alloc_buffer((chunks,), "int32")  # chunks that may hold nucleus tokens
            cs = T.alloc_buffer((chunks,), "float64")  # their nucleus mass
            n = T.alloc_buffer((4,), "int32")  # candidates, kept, token, last chunk with mass
            cv = T.alloc_buffer((k,), "float32")  # the k largest chunk maxima
            ci = T.alloc_buffer((k,), "int64")  # their chunks
            tv = T.alloc_buffer((k,), "float32")  # the k largest logits
            ti = T.alloc_buffer((k,), "int64")  # their tokens
            row_max(m, mv, cmax, t)
            red[0] = T.float64(0)
            red[1] = T.float64(0)
            for c in range(chunks):
                red[0] = red[0] + T.Cast("float64", csum[t, c])
                red[1] = red[1] + T.Cast("float64", bad[t, c])
            out[t, 0] = T.float64(-1)
            out[t, 1] = T.Cast("float64", m[0])
            out[t, 4] = red[0]
            if m[0] > neg and m[0] < inf and red[1] < T.float64(float("inf")):
                n[0] = 0
                f[1] = neg  # the cut: the nucleus is x >= f[1]
                key[0] = T.int64(0)  # top-p's lowest key (0: none from top-k)
                if cfg[t, 3] >= T.float64(1) and cfg[t, 3] < T.float64(vocab):
                    # top-k: the k-th largest logit, the largest v with count(x >= v) >= k
                    to_key(key, 0, neg)
                    to_key(key, 1, m[0])
                    key[1] = key[1] + T.int64(1)  # count(x >= the float above M) = 0
                    for _ in range(HALVINGS):
                        if key[1] - key[0] > T.int64(1):
                            key[2] = key[0] + (key[1] - key[0]) // T.int64(2)
                            from_key(f, 0, key[2])
                            red[2] = T.float64(0)
                            for c in range(chunks):
                                if cmax[t, c] >= f[0]:
                                    count_ge(red, 2, x, w, t, c, f[0], acc)
                            if red[2] >= cfg[t, 3]:
                                key[0] = key[2]
                            else:
                                key[1] = key[2]
                    from_key(f, 1, key[0])
                    red[0] = T.float64(0)  # the mass top-p takes its share of: the top k's
                    for c in range(chunks):
                        if cmax[t, c] >= f[1]:
                            ge(red, 0, x, w, t, c, f[1], acc)
                    key[0] = key[0] - T.int64(1)  # just below the k-th: G there is all of it
                if cfg[t, 1] < T.float64(1):
                    red[1] = cfg[t, 1] * red[0]  # the mass the tokens before the cut stay under
                    f[0] = T.Cast(
                        "float32",
                        T.Cast("float64", m[0])
                        + cfg[t, 0] * T.log((T.float64(1) - cfg[t, 1]) / T.float64(2 * vocab)),
                    )
                    f[0] = T.max(f[0], f[1])  # top-k's cut, where it is the higher
                    for c in range(chunks):  # >=: a tiny T puts lo0 at M
                        if cmax[t, c] >= f[0]:
                            cand[n[0]] = T.int32(c)
                            n[0] = n[0] + 1
                    key[2] = key[0]
                    to_key(key, 0, f[0])
                    if f[1] > neg:
                        key[0] = T.max(key[0] - T.int64(1), key[2])
                    to_key(key, 1, m[0])
                    for _ in range(HALVINGS):
                        if key[1] - key[0] > T.int64(1):
                            key[2] = key[0] + (key[1] - key[0]) // T.int64(2)
                            from_key(f, 0, key[2])
                            red[0] = T.float64(0)
                            for q in range(n[0]):
                                if cmax[t, cand[q]] > f[0]:
                                    gt(red, 0, x, w, t, cand[q], f[0], acc)
                            if red[0] < red[1]:
                                key[1] = key[2]
                            else:
                                key[0] = key[2]
                                n[1] = 0
                                for q in range(n[0]):
                                    if cmax[t, cand[q]] > f[0]:
                                        cand[n[1]] = cand[q]
                                        n[1] = n[1] + 1
                                n[0] = n[1]
                    from_key(f, 1, key[1])
                else:
                    for c in range(chunks):
                        if cmax[t, c] >= f[1]:
                            cand[n[0]] = T.int32(c)
                            n[0] = n[0] + 1
                red[2] = T.float64(0)  # the nucleus' mass
                for q in range(n[0]):
                    red[0] = T.float64(0)
                    if cmax[t, cand[q]] >= f[1]:
                        ge(red, 0, x, w, t, cand[q], f[1], acc)
                    cs[q] = red[0]
                    red[2] = red[2] + red[0]
                out[t, 2] = T.Cast("float64", f[1])
                out[t, 3] = red[2]
                red[1] = cfg[t, 2] * red[2]  # the draw: the first running sum above u * mass
                red[0] = T.float64(0)
                n[2] = -1
                n[3] = -1
                for q in range(n[0]):
                    if n[2] < 0 and cs[q] > T.float64(0):
                        n[3] = cand[q]
                        if red[0] + cs[q] > red[1]:
                            for i in range(chunk):
                                if n[2] < 0 and x[t, cand[q] * chunk + i] >= f[1]:
                                    red[0] = red[0] + T.Cast("float64", w[t, cand[q] * chunk + i])
                                    if red[0] > red[1]:
                                        n[2] = cand[q] * chunk + i
                        else:
                            red[0] = red[0] + cs[q]
                if n[2] < 0 and n[3] >= 0:  # rounding: the last token with weight
                    for i in range(chunk):
                        if x[t, n[3] * chunk + i] >= f[1] and w[t, n[3] * chunk + i] > T.float32(0):
                            n[2] = n[3] * chunk + i
                out[t, 0] = T.Cast("float64", n[2])
                for j in range(k):  # Token Recycling's successors: the k largest logits
                    cv[j] = neg
                    ci[j] = T.int64(-1)
                    tv[j] = neg
                    ti[j] = T.int64(-1)
                for c in range(chunks):
                    insert(cv, ci, cmax[t, c], T.int64(c))
                for j in range(k):
                    if ci[j] >= T.int64(0):  # a chunk with a finite max (each chunk once)
                        for i in range(chunk):
                            insert(tv, ti, x[t, ci[j] * chunk + i], ci[j] * chunk + i)
                for j in range(k):
                    out[t, 5 + j] = T.float64(-1)
                    out[t, 5 + k + j] = T.float64(0)
                    if ti[j] >= T.int64(0) and tv[j] >= f[1] and red[2] > T.float64(0):
                        red[0] = T.Cast(
                            "float64", T.exp((tv[j] - m[0]) / T.Cast("float32", cfg[t, 0]))
                        )
                        if red[0] > T.float64(0):
                            out[t, 5 + j] = T.Cast("float64", ti[j])
                            out[t, 5 + k + j] = red[0] / red[2]

    return sample_rows_kernel


def _masked_sum(chunk: int, cmp, ones: bool = False):
    """T.macro `f(red, r, x, w, t, c, value, acc)`: red[r] += the sum of w[t, i] (of 1 with
    `ones`: a count, exact to 2^24) over chunk c's tokens i with cmp(x[t, i], value), 16 lanes
    at a time (float32 within the chunk)."""
    from tvm.script import tirx as T

    lanes, sum16 = LANES, sum16_lanes()
    term = (lambda w, t, i: T.float32(1)) if ones else (lambda w, t, i: w[t, i])

    @T.macro
    def f(red, r, x, w, t, c, value, acc):
        for i in T.vectorized(lanes):
            acc[i] = T.float32(0)
        for j in range(chunk // lanes):
            for i in T.vectorized(lanes):
                acc[i] = acc[i] + T.Select(
                    cmp(x[t, c * chunk + j * lanes + i], value),
                    term(w, t, c * chunk + j * lanes + i),
                    T.float32(0),
                )
        sum16(acc)
        red[r] = red[r] + T.Cast("float64", acc[0] + acc[1])

    return f
