"""AMX tiles for the tvm target's multi-token projections (a verify tree, a prefill chunk).

A verify of T tree nodes reads each weight once, but on AVX-512 it still does T fp32 FMAs
per weight: at T=8 the 4-bit panel kernel (tvm_kernels.panel_gemv) is arithmetic-bound
(~62 G multiply-adds/s a core, near the FMA ports' limit), and a verify of 8 nodes cost
~1.9x a decode step. Sapphire Rapids' AMX unit multiplies 16x32 by 32x16 bf16 tiles into
fp32 (TDPBF16PS) at ~7 ns a tile whatever the rows used; this module moves the
multiplications there, losslessly:

- The weights: a 4-bit code q (0..15) is exactly a bf16. The block's tile [32 columns x 16
  rows] is made from the panel layout's bytes in registers (vpermi2b interleaves column
  pairs, vpermw looks the bf16 of each nibble up in a 16-entry table): no other layout, no
  more memory than the AVX-512 kernel reads.
- The activations: each fp32 x is split exactly into three bf16 parts x = hi + mid + lo
  (8 significant bits each, 24 in all: the fp32 mantissa), stacked as rows of the A tile
  [3T rows x 32 columns], so one TDPBF16PS serves 5 tokens' three parts. Each product of a
  part and a 4-bit code is exact in fp32 and the unit accumulates in fp32: the result is
  an fp32 dot product, as the AVX-512 kernel's, in another summation order (the "bf16x3"
  emulation of fp32 GEMM that cuBLAS and oneDNN offer for tensor units; Henry et al.,
  "Leveraging the bfloat16 Artificial Intelligence Datatype For Higher-Precision
  Computations", ARITH 2019).
- The block's scale and offset stay outside the tiles, as in the AVX-512 kernel: per
  block, y += d * (C_hi + C_mid + C_lo) + m * sum(x), so each block's C tiles go to memory
  (tilestored) and back through the vector units, as in llama.cpp's AMX kernels for block
  formats (ggml-cpu/amx/mmq.cpp, which quantize the activations to int8 instead).

What it buys, measured on this 2-core Sapphire Rapids VM (smollm2-135m, -O3 engines with and
without AMX, one process, calls interleaved):

- prefill of 121 and 391 tokens: 0.79x and 0.78x the time;
- a verify of 16 nodes: 0.89x (20.6 against 23.1 ms); of 8 nodes: the same (12.6 ms), which
  is why it starts at MIN_TOKENS. Per kernel (weights streamed from memory) AMX took
  0.73-0.95x the AVX-512 time at T=8, but in the forward other kernels slow down after AMX
  code ran (an AVX-512 GEMV right after an AMX call took 1.2x its time: the core's AMX
  power license, or its state), which cancels the gain at T=8.

What limits it: a TDPBF16PS has ~24 ns latency and ~7 ns throughput here, and a block's
step moves ~3 KB through L1 (the bf16 B tile, 3T C rows, the accumulators) to multiply
288 bytes of weights, so a step is ~40 ns at T=8 against ~66 ns for the AVX-512 loop's
FMAs: a verify of 8 nodes cannot come near one decode step (memory-bound) this way.

Linux lets a process use AMX only after it asks (arch_prctl ARCH_REQ_XCOMP_PERM): `request`
does that before an engine with AMX code runs.
"""

from __future__ import annotations

import ctypes
import struct

FLAGS = frozenset({"amx_tile", "amx_bf16"})  # what the kernel needs, by cpuinfo name
MATTR = ["+amx-tile", "+amx-bf16"]  # llvm target features that let it emit them
KINDS = ("affine4",)  # block formats with an AMX kernel
TOKENS = 16  # token rows per pass over the weights (3 parts x 16 = 48 stacked A rows)
# fewest tokens a call runs on AMX (below, the AVX-512 loop; see the module's figures)
MIN_TOKENS = 12
ROW_BYTES = 64  # a tile row: 32 bf16 (one 32-column block) or 16 fp32

_ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA, _SYS_ARCH_PRCTL = 0x1023, 18, 158


def usable(flags) -> bool:
    """Whether a build for CPU extensions `flags` may use the AMX kernel."""
    return FLAGS <= set(flags)


def request() -> str | None:
    """Ask Linux to let this process use AMX tile data (once is enough; repeats are
    harmless). None when granted, else why not."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
            return f"arch_prctl(ARCH_REQ_XCOMP_PERM) failed (errno {ctypes.get_errno()})"
    except (OSError, AttributeError) as e:
        return f"cannot ask the kernel for AMX: {e}"
    return None


def _bf16(v: float) -> int:
    return struct.unpack("<I", struct.pack("<f", v))[0] >> 16


def _tile(name: str, *args):
    from tvm import tirx
    from tvm.script.ir_builder import tirx as I

    I.evaluate(tirx.call_llvm_intrin("void", f"llvm.x86.{name}", *args))


def split_activations(x, xs, t_len, k: int) -> None:
    """xs = the stacked A tiles of every token tile t0 and 32-column block b: row
    part*tt + t of xs[t0, b] ([48 rows, 32], 64 bytes a row) holds the bf16 bits of part
    `part` (hi, mid, lo) of x[t0*16 + t, b*32 : b*32 + 32], tt the tokens of tile t0.

        hi = x with its low 16 mantissa bits cleared (exact: truncation), r = x - hi (exact)
        mid = r truncated alike, lo = r - mid (exact, at most 8 significant bits)
    """
    from tvm import tirx
    from tvm.script.ir_builder import tirx as I

    lanes, nb = 16, k // 32
    keep = tirx.Broadcast(tirx.const(0xFFFF0000, "uint32"), lanes)
    shift = tirx.Broadcast(tirx.const(16, "uint32"), lanes)

    def trunc(v):  # vector reinterprets need explicit lanes (a vectorized loop's do not)
        bits = tirx.reinterpret(f"uint32x{lanes}", v)
        return tirx.reinterpret(f"float32x{lanes}", bits & keep)

    def bits16(v):
        return (tirx.reinterpret(f"uint32x{lanes}", v) >> shift).astype(f"uint16x{lanes}")

    with I.serial(0, t_len) as t:
        t0 = tirx.floordiv(t, TOKENS)
        tt = tirx.min(tirx.const(TOKENS, "int64"), t_len - t0 * TOKENS)
        tl = tirx.floormod(t, TOKENS)
        with I.serial(0, k // lanes) as kc:
            v = x[t, tirx.Ramp(kc * lanes, 1, lanes)]
            hi = trunc(v)
            r = v - hi
            mid = trunc(r)
            b, half = tirx.floordiv(kc, 2), tirx.floormod(kc, 2)
            for part, value in enumerate((hi, mid, r - mid)):
                row = (t0 * nb + b) * 3 * TOKENS + part * tt + tl
                I.buffer_store(xs, bits16(value), [tirx.Ramp(row * 32 + half * lanes, 1, lanes)])


def applies(kind: str, group: int, npan: int) -> bool:
    """Whether a [16 * npan, K] weight of block format `kind` with `group`-column blocks has
    an AMX kernel: 4-bit, one block per 32-column tile, panels that group evenly."""
    return kind in KINDS and group == 32 and group_size(npan) > 0


def group_size(npan: int) -> int:
    """Panels a parallel task runs together (they share each block's A tiles); even, so
    that the pipeline's register sets alternate with the panel; 0: none fits."""
    return next((g for g in (6, 4, 2) if npan % g == 0), 0)


def _registers(tiles: int) -> tuple[list[int], list[tuple[int, list[int]]]]:
    """Tile registers: the block's A tiles, and (W tile, C tiles) of the two pipeline sets
    (panels alternate between them); C is shared by both sets where 8 registers run out."""
    a = list(range(tiles))
    if tiles == 3:
        return a, [(3, [5, 6, 7]), (4, [5, 6, 7])]
    sets, reg = [], tiles
    for _ in range(2):
        sets.append((reg, list(range(reg + 1, reg + 1 + tiles))))
        reg += 1 + tiles
    return a, sets


def _prefetch_line(buf, at) -> None:
    from tvm import tirx
    from tvm.script.ir_builder import tirx as I

    I.evaluate(tirx.call_intrin("void", "tirx.prefetch", tirx.address_of(buf[at]), 0, 3, 1))


def _r(reg: int):
    from tvm import tirx

    return tirx.const(reg, "int8")


def _stride(nbytes: int):
    from tvm import tirx

    return tirx.const(nbytes, "int64")


def panel_groups(k: int, group: int, npan: int, t_len, comps, sx, xs, y, prefetch) -> None:
    """The AMX path of panel_gemv (T >= MIN_TOKENS): y[T, N] for an affine4 panel-layout
    weight with 32-column blocks (`applies`).

    for each group of G panels, in parallel:
      for each token tile (16 tokens; 3 x 16 stacked A rows):
        for each block b of 32 columns:
          A tiles <- xs[t0, b]                  # once for the group's G panels
          for each panel j of the group:        # pipelined, two register sets:
            build W tile (j+1, b)               #   vector units, in registers
            C = A . W(j, b)                     #   the AMX unit
            acc[j] += d * (C_hi + C_mid + C_lo) + m * sum(x)   # for panel j-2
    """
    from tvm import tirx
    from tvm.script.ir_builder import tirx as I

    nb, u8, u16 = k // group, "uint8", "uint16"
    gs = group_size(npan)
    with I.parallel(0, npan // gs) as pg:
        cfg = I.alloc_buffer((64,), u8)  # the tile configuration (palette 1)
        table = I.alloc_buffer((32,), u16)  # bf16 of 0..15, twice (a 32-word vpermw table)
        pick = I.alloc_buffer((128,), u8)  # vpermi2b indices of the two column pairs
        wb = I.alloc_buffer((4 * 16 * 32,), u16)  # four B tiles: 16 column pairs x 16 x 2
        cb = I.alloc_buffer((2 * 3 * TOKENS * 16,), "float32")  # two C: (part, token) x 16
        acc = I.alloc_buffer((gs * TOKENS * 16,), "float32")
        for q in range(16):
            I.buffer_store(table, tirx.const(_bf16(float(q)), u16), [q])
            I.buffer_store(table, tirx.const(_bf16(float(q)), u16), [q + 16])
        # out byte 2*(2*row + j) of pair s <- byte (2s + j)*16 + row of the 4 code rows
        # loaded (column 2s + j of the 4); odd bytes <- index 64 (the zero vector's byte)
        for s in range(2):
            for row in range(16):
                for j in range(2):
                    at = 64 * s + 2 * (2 * row + j)
                    I.buffer_store(pick, tirx.const((2 * s + j) * 16 + row, u8), [at])
                    I.buffer_store(pick, tirx.const(64, u8), [at + 1])

        def build_w(p, b, at) -> None:
            """wb[at:] = the bf16 B tile of panel p's block b: row r (columns 2r, 2r+1)
            holds (q[n, 2r], q[n, 2r+1]) for each of the panel's 16 rows n; code byte e of
            the panel layout holds column e (low nibble) and e + 16 (high) of the 16 rows."""
            zero = tirx.Broadcast(tirx.const(0, u8), 64)
            low = tirx.Broadcast(tirx.const(15, u16), 32)
            four = tirx.Broadcast(tirx.const(4, u16), 32)
            tab = table[tirx.Ramp(0, 1, 32)]
            for c in range(4):  # code rows 4c..4c+3: B rows 2c, 2c+1 (low), 8+2c, 9+2c (high)
                # the 64 bytes of code rows 4c..4c+3 (a ramp over the flattened last axes)
                codes = comps[0][p, b, 4 * c, tirx.Ramp(0, 1, 64)]
                for s in range(2):
                    idx = pick[tirx.Ramp(64 * s, 1, 64)]
                    pair = tirx.call_llvm_pure_intrin(
                        f"{u8}x64", "llvm.x86.avx512.vpermi2var.qi.512", codes, idx, zero
                    )
                    words = tirx.reinterpret(f"{u16}x32", pair)
                    for half, nib in ((0, words & low), (8, words >> four)):
                        bf = tirx.call_llvm_pure_intrin(
                            f"{u16}x32", "llvm.x86.avx512.permvar.hi.512", tab, nib
                        )
                        row = tirx.Ramp(at + (half + 2 * c + s) * 32, 1, 32)
                        I.buffer_store(wb, bf, [row])

        def variant(tiles: int, t0, tt) -> None:
            """A token tile of tt tokens whose 3*tt stacked rows fill `tiles` A tiles.

            The group's panels are software-pipelined over two register and buffer sets:
            while the AMX unit multiplies panel j, the vector units build panel j+1's B
            tile and add panel j-1's C tiles into its accumulators. A tile load waits for
            the vector stores before it to reach L1 and a vector load for the tile store
            before it (neither forwards), so steps that read what the step just before
            wrote would wait ~3 latencies a panel."""
            sixteen = tirx.const(16, "int64")
            rows = [tirx.min(sixteen, 3 * tt - 16 * a) for a in range(tiles)]
            a_regs, sets = _registers(tiles)
            for i in range(64):
                I.buffer_store(cfg, tirx.const(1 if i == 0 else 0, u8), [i])
            config = [*zip(a_regs, rows, strict=True)]
            for w_reg, c_regs in sets:
                config += [(w_reg, sixteen), *zip(c_regs, rows, strict=True)]
            for reg, nrows in config:
                I.buffer_store(cfg, tirx.const(ROW_BYTES, u8), [16 + 2 * reg])
                I.buffer_store(cfg, nrows.astype(u8), [48 + reg])
            _tile("ldtilecfg", tirx.address_of(cfg[0]))
            with I.serial(0, gs * TOKENS * 16) as i:
                I.buffer_store(acc, tirx.const(0.0, "float32"), [i])

            shared_c = sets[0][1] == sets[1][1]  # 3 A tiles: C must be stored at once
            wbuf = lambda step: tirx.floormod(step, 4) * 512  # noqa: E731 (4 B tile buffers)

            def multiply(step, par: int) -> None:
                w_reg, c_regs = sets[par]
                _tile("tileloadd64", _r(w_reg), tirx.address_of(wb[wbuf(step)]), _stride(64))
                for a in range(tiles):
                    _tile("tilezero", _r(c_regs[a]))
                    _tile("tdpbf16ps", _r(c_regs[a]), _r(a_regs[a]), _r(w_reg))

            def store(par: int) -> None:
                for a, reg in enumerate(sets[par][1]):
                    at = tirx.address_of(cb[(par * 3 + a) * 256])
                    _tile("tilestored64", _r(reg), at, _stride(ROW_BYTES))

            def add(j: int, b, par: int) -> None:  # acc[j] += d * (hi + mid + lo) + m sum(x)
                p, base = pg * gs + j, par * 3 * 256
                with I.serial(0, tt) as t:
                    with I.vectorized(0, 16) as i:
                        s = cb[base + t * 16 + i] + cb[base + (tt + t) * 16 + i]
                        s = s + cb[base + (2 * tt + t) * 16 + i]
                        s = comps[1][p, b, i].astype("float32") * s
                        m = comps[2][p, b, i].astype("float32")
                        at = (j * TOKENS + t) * 16 + i
                        value = acc[at] + s + m * sx[(t0 * TOKENS + t) * nb + b]
                        I.buffer_store(acc, value, [at])

            def guarded(cond, body) -> None:
                if cond is None:
                    body()
                    return
                with I.If(cond):
                    with I.Then():
                        body()

            # steps s = b * gs + j run the group's panels j of each block b in turn; step s
            # multiplies s, stores s-1's C tiles, builds s+2's B tile and adds s-2's C tiles
            # (with shared C registers: stores s's and adds s-1's)
            build_w(pg * gs, 0, wbuf(0))
            build_w(pg * gs + 1, 0, wbuf(1))
            with I.serial(0, nb) as b:
                for j in range(gs):
                    step = b * gs + j
                    if j == 0:
                        for a in range(tiles):
                            row0 = ((t0 * nb + b) * 3 * TOKENS + 16 * a) * 32
                            at = tirx.address_of(xs[row0])
                            _tile("tileloadd64", _r(a_regs[a]), at, _stride(64))
                    if j == 1:  # the next block's A rows, into L1
                        nxt = tirx.min(b + 1, nb - 1)
                        with I.serial(0, 3 * tt) as line:  # rows of 64 bytes
                            _prefetch_line(xs, ((t0 * nb + nxt) * 3 * TOKENS + line) * 32)
                    prefetch(pg * gs + j, b)
                    multiply(step, j % 2)
                    if shared_c:
                        store(j % 2)
                    else:
                        guarded(None if j else b > 0, lambda j=j: store((j - 1) % 2))
                    b2, j2 = b + (j + 2) // gs, (j + 2) % gs
                    guarded(
                        b2 < nb if (j + 2) >= gs else None,
                        lambda b2=b2, j2=j2, step=step: build_w(pg * gs + j2, b2, wbuf(step + 2)),
                    )
                    lag = 1 if shared_c else 2  # shared C: step s+1 overwrites cb[(s-1) % 2]
                    b1, j1 = b - (1 if j < lag else 0), (j - lag) % gs
                    guarded(b > 0 if j < lag else None, lambda b1=b1, j1=j1: add(j1, b1, j1 % 2))
            if not shared_c:
                store((gs - 1) % 2)
                add(gs - 2, nb - 1, (gs - 2) % 2)
            add(gs - 1, nb - 1, (gs - 1) % 2)
            with I.serial(0, gs) as j:
                with I.serial(0, tt) as t:
                    with I.vectorized(0, 16) as i:
                        value = acc[(j * TOKENS + t) * 16 + i]
                        I.buffer_store(y, value, [t0 * TOKENS + t, (pg * gs + j) * 16 + i])

        with I.serial(0, tirx.floordiv(t_len + TOKENS - 1, TOKENS)) as t0:
            tt = tirx.min(tirx.const(TOKENS, "int64"), t_len - t0 * TOKENS)
            with I.If(3 * tt <= 16):  # 3 parts of tt tokens: 1, 2 or 3 A tiles of 16 rows
                with I.Then():
                    variant(1, t0, tt)
                with I.Else():
                    with I.If(3 * tt <= 32):
                        with I.Then():
                            variant(2, t0, tt)
                        with I.Else():
                            variant(3, t0, tt)
        _tile("tilerelease")
