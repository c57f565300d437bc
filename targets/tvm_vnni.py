"""Integer panel kernel for the tvm target: block-quantized activations x 4-bit / 8-bit codes by
AVX-512 VNNI (vpdpbusd), the way llama.cpp's CPU kernels multiply a Q4_1 weight by a Q8_1 row.

A verify of T tree nodes on a CPU is bound by arithmetic, not by memory: the fp32 panel kernel
(tvm_kernels.panel_gemv) turns each 4-bit code into a float and spends one FMA per weight and
token, so 8 nodes of SmolLM2-135M are 8 x 134.5 M multiply-adds, 2.7-3.4x a decode step on the
2-core AMD EPYC (docs/SPECULATIVE.md). One vpdpbusd multiplies 16 rows x 4 columns of u8 codes
by 4 broadcast int8 activations and sums each row's 4 products into an int32 lane: 64
multiply-adds in one instruction, 4x the FMA's 16, and the unpacking of the codes is shared by
every token of a tile. The activations are quantized first, per token and per block of the
weight's group (g columns), to int8 with one fp32 scale (Q8 as llama.cpp's quantize_row_q8_1
makes it: dx = max|x| / 127; here q = x * (127 / max|x|) rounded to nearest even, as
arc/qlinear.q8_rows does):

    for each token t, block b:  xq[t, b], dx[t, b] = q8(x[t, b*g : b*g+g]);  sx[t, b] = sum(x)
    for p in parallel(N / P):                    # a panel: P = 16 output rows, one vector
      for each tile of TB tokens:
        acc[TB] = 0.0
        for each block b:
          isum[TB] = 0                           # int32 lanes: exact, in any order
          for each 4 slots of the block's codes:
            u = vpermb(codes[p, b, slots])       # lane i: row i's 4 bytes (8 nibbles)
            for t in TB: isum[t] = vpdpbusd(isum[t], u & 0x0F, bcast(xq[t, 4 cols]))
                         isum[t] = vpdpbusd(isum[t], u >> 4 & 0x0F, bcast(xq[t, +g/2]))
          for t in TB: acc[t] += float(isum[t]) * (d[p, b] * dx[t, b]) + m[p, b] * sx[t, b]
        y[t, p*P : p*P+P] = acc[t]

(8-bit codes, the Q8_0 LM head: the bytes xor 0x80 are u8 = q + 128, and 128 * sum(xq) is taken
back.) The integer sums are exact, so how many chains a tile runs cannot change them; each
token's float sum runs over the blocks in order with the same expression whatever the tile:
a verify node's outputs are the decode step's bit for bit, as the fp32 kernels' are.

It is lossy against the fp32 kernel (the activations lose their low bits, as in llama.cpp):
opt-in, `weight-format{act=q8}` (passes/weight_format.py), its cost shown by `arc eval`.
"""

from __future__ import annotations

from arc.targets.tvm_kernels import PANEL, fold, panel_args, panel_specs, prefetch_block

FLAGS = frozenset({"avx512f", "avx512bw", "avx512vbmi", "avx512_vnni"})  # vpermb, vpdpbusd
MATTR = ["+avx512vnni", "+avx512vbmi", "+avx512bw"]  # llvm features that let it emit them
KINDS = frozenset({"affine4", "sym8"})
# token tiles: (largest T served, tokens per tile, int32 chains per token); integer chains
# only hide vpdpbusd's latency, they do not change any sum
TILES = ((1, 1, 4), (2, 2, 2), (4, 4, 2), (None, 8, 1))


def applies(kind: str, group: int, k: int) -> bool:
    """Whether a weight of this kind and group runs on this kernel (else the fp32 one)."""
    slots = group // 2 if kind == "affine4" else group
    return kind in KINDS and group % 4 == 0 and slots % 4 == 0 and k % group == 0


def _dpbusd(acc, u, s):
    """acc + per lane sum of 4 products u8 x s8 (vpdpbusd); LLVM 22 takes the bytes as
    <64 x i8>, older LLVMs as <16 x i32>."""
    import tvm
    from tvm import tirx

    wide = "int8x64" if tvm.target.codegen.llvm_version_major() >= 22 else f"int32x{PANEL}"
    return tirx.call_llvm_pure_intrin(
        f"int32x{PANEL}",
        "llvm.x86.avx512.vpdpbusd.512",
        acc,
        tirx.reinterpret(wide, u),
        tirx.reinterpret(wide, s),
    )


def quantize_rows(x, xq, dx, sx, t_len, k: int, g: int, kind: str) -> None:
    """xq[t*K + c] (int8), dx[t*nb + b] (fp32 scale) and sx[t*nb + b] (affine4: the exact fp32
    sum of the block's activations, which m multiplies; sym8: 128 * sum(xq) as fp32, exact)
    for every token and block, serially (a call's rows are few; the threads then split the
    panels). A block of zeros gets dx = 0 and xq = 0."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as I

    nb = k // g
    with I.serial(0, t_len * nb) as tb_:
        t, c0 = tirx.floordiv(tb_, nb), tirx.floormod(tb_, nb) * g
        part = I.alloc_buffer((g,), "float32")
        with I.vectorized(0, g) as i:
            I.buffer_store(part, tirx.abs(x[t, c0 + i]), [i])
        fold(part, g, tirx.max)
        amax = part[0]
        inv = tirx.Select(amax > 0.0, tirx.const(127.0, "float32") / amax, 0.0)
        I.buffer_store(dx, amax / tirx.const(127.0, "float32"), [tb_])
        with I.vectorized(0, g) as i:
            q = tirx.nearbyint(x[t, c0 + i] * inv)
            I.buffer_store(xq, q.astype("int8"), [t * k + c0 + i])
        if kind == "affine4":
            with I.vectorized(0, g) as i:
                I.buffer_store(part, x[t, c0 + i], [i])
        else:
            with I.vectorized(0, g) as i:
                I.buffer_store(part, xq[t * k + c0 + i].astype("float32"), [i])
        fold(part, g)
        total = part[0] if kind == "affine4" else part[0] * tirx.const(128.0, "float32")
        I.buffer_store(sx, total, [tb_])


def code_vector(comps, pick, p, b, e0, half):
    """u8 vector of panel p's block b: lane i holds row i's codes of the 4 block columns of
    slot group e0 (affine4: the low nibbles, half 0, or the high ones, half 1; sym8, half
    None: q + 128)."""
    from tvm import tirx

    raw = comps[0][p, b, e0, tirx.Ramp(0, 1, 4 * PANEL)]
    rows = tirx.call_llvm_pure_intrin(
        "int8x64", "llvm.x86.avx512.permvar.qi.512", tirx.reinterpret("int8x64", raw), pick
    )
    v = tirx.reinterpret(f"int32x{PANEL}", rows)
    if half is None:  # sym8: q + 128 as u8
        return v ^ tirx.Broadcast(tirx.const(-0x7F7F7F80, "int32"), PANEL)
    if half:
        v = v >> tirx.Broadcast(tirx.const(4, "int32"), PANEL)
    return v & tirx.Broadcast(tirx.const(0x0F0F0F0F, "int32"), PANEL)


def block_value(comps, kind: str, p, b, isum, dxv, sxv):
    """One token's float value of panel p's block b from its exact integer sums isum (int32
    x PANEL): isum * (d * dx) (+ m * sum(x)); the one expression both kernels use, so their
    outputs agree bit for bit."""
    from tvm import tirx

    f32 = f"float32x{PANEL}"
    d = comps[1][p, b, tirx.Ramp(0, 1, PANEL)].astype(f32)
    ds = d * tirx.Broadcast(dxv, PANEL)
    v = isum.astype(f32)
    if kind == "sym8":  # take back 128 * sum(xq): integers, exact
        v = v - tirx.Broadcast(sxv, PANEL)
    v = v * ds
    if kind == "affine4":
        m = comps[2][p, b, tirx.Ramp(0, 1, PANEL)].astype(f32)
        v = v + m * tirx.Broadcast(sxv, PANEL)
    return v


def panel_gemv_q8(
    kind: str,
    n: int,
    k: int,
    group: int,
    scale: str = "float32",
    tiles=TILES,
    amx: bool = False,
):
    """PrimFunc y[T, N] = q8(x)[T, K] @ w[N, K].T over a panel-layout weight
    (tvm_kernels.panel_specs: affine4 or sym8), for any T (see the module docstring).
    `amx` (a CPU with AMX int8: tvm_amx_q8.FLAGS): calls of T >= tvm_amx_q8.MIN_TOKENS
    multiply on AMX tiles instead (targets/tvm_amx_q8.py), the same outputs bit for bit."""
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as I

    from arc.targets import tvm_amx_q8 as amx_q8

    if not applies(kind, group, k) or n % PANEL:
        raise ValueError(f"panel_gemv_q8: {kind} g{group} [{n}, {k}] does not apply")
    g, nb, npan = group, k // group, n // PANEL
    specs = panel_specs(kind, n, k, group, scale)
    # the block's slots in groups of 4, each with the block columns its nibbles hold
    if kind == "affine4":
        groups = [(e0, [(0, e0), (1, e0 + g // 2)]) for e0 in range(0, g // 2, 4)]
    else:
        groups = [(e0, [(None, e0)]) for e0 in range(0, g, 4)]
    # byte 4i + j of a gathered vector <- byte 16j + i: row i's byte of slot e0 + j
    r = tirx.Ramp(0, 1, 64)
    pick = tirx.Cast("int8x64", r % 4 * PANEL + r // 4)

    with IRBuilder() as ib:
        with I.prim_func():
            x, comps, y, t_len = panel_args("panel_gemv_q8", specs, k, n)
            xq = I.alloc_buffer((t_len * k,), "int8")
            dx = I.alloc_buffer((t_len * nb,), "float32")
            sx = I.alloc_buffer((t_len * nb,), "float32")
            quantize_rows(x, xq, dx, sx, t_len, k, g, kind)

            def codes(p, b, e0, half):
                return code_vector(comps, pick, p, b, e0, half)

            def run(p, tb: int, c: int, acc, iacc):
                with I.serial(0, tirx.floordiv(t_len + tb - 1, tb)) as t0:
                    rows = [tirx.min(t0 * tb + t, t_len - 1) for t in range(tb)]
                    for a in range(tb):
                        with I.vectorized(0, PANEL) as i:
                            I.buffer_store(acc, tirx.const(0.0, "float32"), [a * PANEL + i])
                    with I.serial(0, nb) as b:
                        prefetch_block(comps, kind, g, nb, npan, p, b)
                        for a in range(tb * c):
                            with I.vectorized(0, PANEL) as i:
                                I.buffer_store(iacc, tirx.const(0, "int32"), [a * PANEL + i])
                        step = 0
                        for e0, cols in groups:
                            for half, col in cols:
                                u = codes(p, b, e0, half)
                                for t, row in enumerate(rows):
                                    at = row * k + b * g + col
                                    xw = tirx.reinterpret("int32", xq[tirx.Ramp(at, 1, 4)])
                                    slot = tirx.Ramp((t * c + step % c) * PANEL, 1, PANEL)
                                    s = _dpbusd(iacc[slot], u, tirx.Broadcast(xw, PANEL))
                                    I.buffer_store(iacc, s, [slot])
                                step += 1
                        for t, row in enumerate(rows):
                            isum = iacc[tirx.Ramp(t * c * PANEL, 1, PANEL)]
                            for cc in range(1, c):
                                isum = isum + iacc[tirx.Ramp((t * c + cc) * PANEL, 1, PANEL)]
                            v = block_value(
                                comps, kind, p, b, isum, dx[row * nb + b], sx[row * nb + b]
                            )
                            slot = tirx.Ramp(t * PANEL, 1, PANEL)
                            I.buffer_store(acc, acc[slot] + v, [slot])
                    for t in range(tb):
                        with I.If(t0 * tb + t < t_len):
                            with I.Then():
                                I.buffer_store(
                                    y,
                                    acc[tirx.Ramp(t * PANEL, 1, PANEL)],
                                    [t0 * tb + t, tirx.Ramp(p * PANEL, 1, PANEL)],
                                )

            def loop():
                with I.parallel(0, npan) as p:
                    most = max(tb for _, tb, _ in tiles)
                    acc = I.alloc_buffer((most * PANEL,), "float32")  # stack: under 1 KB each
                    iacc = I.alloc_buffer((max(tb * c for _, tb, c in tiles) * PANEL,), "int32")

                    def plan(idx: int):
                        bound, tb, c = tiles[idx]
                        if bound is None:
                            run(p, tb, c, acc, iacc)
                            return
                        with I.If(t_len <= bound):
                            with I.Then():
                                run(p, tb, c, acc, iacc)
                            with I.Else():
                                plan(idx + 1)

                    plan(0)

            if amx and amx_q8.applies(kind, g):  # T >= MIN_TOKENS on AMX tiles, the same bits
                with I.If(t_len < amx_q8.MIN_TOKENS):
                    with I.Then():
                        loop()
                    with I.Else():
                        value = lambda p, b, isum, dxv, sxv: block_value(  # noqa: E731
                            comps, kind, p, b, isum, dxv, sxv
                        )
                        amx_q8.panel_tiles(
                            kind, k, g, npan, t_len, comps, xq, dx, sx, y, codes, value
                        )
            else:
                loop()
    return ib.get()
