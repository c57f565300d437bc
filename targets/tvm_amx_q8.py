"""AMX int8 tiles for act=q8's multi-token projections (a large verify tree, a prefill chunk).

The VNNI kernel (targets/tvm_vnni.py) multiplies int8 activations by 4-bit / 8-bit codes
with vpdpbusd: 64 multiply-adds an instruction, so a call of T tokens still costs T times a
step's integer work. Sapphire Rapids' AMX unit does a whole [T x 64] int8 by [64 x 16] u8
product (TDPBSUD: signed activations, unsigned codes) in one instruction, whatever T up to
16 (the tile's rows). This is the layout llama.cpp's AMX kernels use for block formats
(ggml-cpu/amx/mmq.cpp: Q8 activations in A, the codes unpacked to bytes in B, the block
scales applied after each block's tile); Intel's "Intel AMX Instruction Set Reference",
chapter 3, gives TDPBSUD's semantics.

    for each group of G panels (16 output rows each, the B tile's width), in parallel:
      for each tile of up to 16 tokens:
        for each block b of g columns:
          C_j = 0                              # [tokens x 16] int32, in tile registers
          for each 64-column chunk of the block:
            B_j <- the chunk's codes as u8     # row r: 16 rows' codes of columns 4r..4r+3,
                                               # the vectors the VNNI kernel multiplies
            C_j += xq[tokens, chunk] . B_j      # TDPBSUD: exact int32 sums
          isum <- C_j (tilestored)
          acc[t] += the VNNI kernel's epilogue (tvm_vnni.block_value), token by token

The integer sums are exact in any order and the float epilogue is the VNNI kernel's own
expression, so each output is the VNNI kernel's bit for bit (tested): a call of fewer than
MIN_TOKENS tokens runs the VNNI loop, a longer one (a prefill chunk, a large verify) runs
here, and a verify's rows are still the decode step's whichever runs.

What it buys is small, because the per-block float epilogue, not the multiplication, is
what grows with T: each (token, block, 16 rows) takes a C row's convert, the scale's
multiply, the offset and the add, ~T x weights / 512 vector operations, which the VNNI loop
pays too. A step's 30 layers of SmolLM2-135M's Q4_1 projections (benchmarks/panel_kernel.py
--plans q8,q8+amx, 2-core Sapphire Rapids VM, 2026-12-08), ms at T = 1 / 2 / 4 / 8 / 16:
VNNI 2.47 / 2.39 / 2.53 / 3.66 / 6.66, AMX 2.45 / 3.10 / 3.26 / 4.06 / 5.92 (blocks
software-pipelined, below; 6.09 ms at T = 2 without); at T = 12 / 16 / 32 / 128 another
run: VNNI 6.30 / 6.51 / 12.44 / 52.19, AMX 5.22 / 6.36 / 11.81 / 46.08. So AMX runs from 12
tokens, 2-17% less time there; an 8-node verify stays on VNNI. A 459-token prefill of an
act=q8 engine (`arc run --json`, three processes each, alternating): 417-426 ms against
427-436 without AMX, the same ids.

Linux lets a process use AMX only after it asks: tvm_amx.request (the engine's manifest
records "amx", so the runtime asks before the first call).
"""

from __future__ import annotations

from arc.targets.tvm_amx import _r, _stride, _tile
from arc.targets.tvm_kernels import PANEL, prefetch_block

FLAGS = frozenset({"amx_tile", "amx_int8"})  # what the kernel needs, by cpuinfo name
MATTR = ["+amx-tile", "+amx-int8"]  # llvm features that let it emit them
TOKENS = 16  # token rows per tile (the tile register's rows)
CHUNK = 64  # columns (int8 bytes) per TDPBSUD: a tile row's 64 bytes
# fewest tokens a call runs on AMX: below, the VNNI loop is as fast or faster (the figures
# above)
MIN_TOKENS = 12
A = 0  # the A tile's register; B tiles take 1..G and C tiles G+1..2G (G = group_size)


def usable(flags) -> bool:
    """Whether a build for CPU extensions `flags` may use this kernel."""
    return FLAGS <= set(flags)


def applies(kind: str, group: int) -> bool:
    """Whether a block of `group` columns splits into equal chunks a tile takes (32, or a
    multiple of 64; others run on the VNNI loop)."""
    return kind in ("affine4", "sym8") and (group == 32 or group % CHUNK == 0)


def b_rows(kind: str, g: int) -> list[tuple[int, int | None]]:
    """(slot group e0, nibble half or None) of each B row of a block, in column order: row r
    holds columns 4r..4r+3. affine4's slot e holds column e (low nibble) and e + g/2 (high),
    so the low halves of every slot group come first."""
    if kind == "affine4":
        return [(e0, h) for h in (0, 1) for e0 in range(0, g // 2, 4)]
    return [(e0, None) for e0 in range(0, g, 4)]


def group_size(npan: int) -> int:
    """Panels a parallel task multiplies together (sharing each block's A tile): 3 B and 3 C
    tile registers beside A fill 7 of the 8."""
    return next(g for g in (3, 2, 1) if npan % g == 0)


def panel_tiles(kind: str, k: int, g: int, npan: int, t_len, comps, xq, dx, sx, y, codes, value):
    """IRBuilder, inside panel_gemv_q8's prim_func: y[T, N] by AMX tiles (see the module).
    `codes(p, b, e0, half)`: the VNNI kernel's u8 code vector (lane i: row i's 4 codes);
    `value(p, b, isum, dx, sx)`: its float epilogue for one token's block.

    A task takes G panels; blocks are software-pipelined over two buffer sets, so no step
    reads what the step just before it wrote (a tile load waits for the vector stores
    before it to reach L1, a vector load for the tile store before it):

        block 0:     build B(0); C_j = A(0) . B(0, j); build B(1); store C_j
        block b > 0: C_j = A(b) . B(b, j)           # the AMX unit
                     epilogue(b - 1) from its C     # the vector units, meanwhile
                     build B(b + 1); store C_j      # (the last block builds one unused)
    """
    from tvm import tirx
    from tvm.script.ir_builder import tirx as I

    nb, chunk = k // g, min(g, CHUNK)
    rows = b_rows(kind, g)
    per, gs = chunk // 4, group_size(npan)  # B rows a chunk; panels a task
    b_regs, c_regs = list(range(1, 1 + gs)), list(range(1 + gs, 1 + 2 * gs))
    wsize, csize = len(rows) * PANEL, TOKENS * PANEL  # int32 words of a B block, a C tile
    with I.parallel(0, npan // gs) as pg:
        cfg = I.alloc_buffer((64,), "uint8")  # the tile configuration (palette 1)
        wb = I.alloc_buffer((2 * gs * wsize,), "int32")  # B blocks: 2 sets x G panels
        cb = I.alloc_buffer((2 * gs * csize,), "int32")  # C tiles, stored: 2 sets x G
        acc = I.alloc_buffer((gs * csize,), "float32")

        def build(b, half) -> None:
            for j in range(gs):
                for r, (e0, h) in enumerate(rows):
                    at = (half * gs + j) * wsize + r * PANEL
                    I.buffer_store(wb, codes(pg * gs + j, b, e0, h), [tirx.Ramp(at, 1, PANEL)])

        def multiply(b, half) -> None:
            for c in range(g // chunk):
                at = tirx.address_of(xq[t0 * TOKENS * k + b * g + c * chunk])
                _tile("tileloadd64", _r(A), at, _stride(k))
                for j in range(gs):
                    at = tirx.address_of(wb[(half * gs + j) * wsize + c * per * PANEL])
                    _tile("tileloadd64", _r(b_regs[j]), at, _stride(64))
                    if c == 0:
                        _tile("tilezero", _r(c_regs[j]))
                    _tile("tdpbsud", _r(c_regs[j]), _r(A), _r(b_regs[j]))

        def store(half) -> None:
            for j in range(gs):
                at = tirx.address_of(cb[(half * gs + j) * csize])
                _tile("tilestored64", _r(c_regs[j]), at, _stride(64))

        def epilogue(b, half, tt) -> None:
            for j in range(gs):
                with I.serial(0, tt) as t:
                    row = t0 * TOKENS + t
                    isum = cb[tirx.Ramp((half * gs + j) * csize + t * PANEL, 1, PANEL)]
                    v = value(pg * gs + j, b, isum, dx[row * nb + b], sx[row * nb + b])
                    slot = tirx.Ramp(j * csize + t * PANEL, 1, PANEL)
                    I.buffer_store(acc, acc[slot] + v, [slot])

        with I.serial(0, tirx.floordiv(t_len + TOKENS - 1, TOKENS)) as t0:
            tt = tirx.min(tirx.const(TOKENS, "int64"), t_len - t0 * TOKENS)
            for i in range(64):
                I.buffer_store(cfg, tirx.const(1 if i == 0 else 0, "uint8"), [i])
            config = [(A, tt, chunk)] + [(r, per, 64) for r in b_regs]
            config += [(r, tt, 64) for r in c_regs]
            for reg, nrows, colsb in config:
                I.buffer_store(cfg, tirx.const(colsb, "uint8"), [16 + 2 * reg])
                I.buffer_store(cfg, tirx.Cast("uint8", nrows), [48 + reg])
            _tile("ldtilecfg", tirx.address_of(cfg[0]))
            with I.serial(0, gs * csize) as i:
                I.buffer_store(acc, tirx.const(0.0, "float32"), [i])
            # block 0 alone, then blocks 1.. each with the epilogue of the block before: no
            # branch in the loop (a branch there broke TVM's lowering of the parallel body)
            build(0, 0)
            for j in range(gs):
                prefetch_block(comps, kind, g, nb, npan, pg * gs + j, 0, gs)
            multiply(0, 0)
            build(min(1, nb - 1), 1)
            store(0)
            with I.serial(1, nb) as b:
                half = tirx.floormod(b, 2)
                for j in range(gs):
                    prefetch_block(comps, kind, g, nb, npan, pg * gs + j, b, gs)
                multiply(b, half)
                epilogue(b - 1, 1 - half, tt)
                build(tirx.min(b + 1, nb - 1), 1 - half)
                store(half)
            epilogue(nb - 1, (nb - 1) % 2, tt)
            for j in range(gs):
                with I.serial(0, tt) as t:
                    out = acc[tirx.Ramp(j * csize + t * PANEL, 1, PANEL)]
                    at = [t0 * TOKENS + t, tirx.Ramp((pg * gs + j) * PANEL, 1, PANEL)]
                    I.buffer_store(y, out, at)
        _tile("tilerelease")
