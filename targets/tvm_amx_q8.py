"""AMX int8 tiles for act=q8's multi-token projections (a verify tree, a prefill chunk).

The VNNI kernel (targets/tvm_vnni.py) multiplies int8 activations by 4-bit / 8-bit codes
with vpdpbusd: 64 multiply-adds an instruction, so a verify of T nodes still costs T times a
step's integer work, and on a 2-core CPU 8 nodes took ~1.65x a step's projections. Sapphire
Rapids' AMX unit does a whole [T x 64] int8 by [64 x 16] u8 product (TDPBSUD: signed
activations, unsigned codes) in one instruction, whatever T up to 16. This is the layout
llama.cpp's AMX kernels use for block formats (ggml-cpu/amx/mmq.cpp: Q8 activations in A,
the codes unpacked to bytes in B, the block scales applied after each block's tile);
Intel's "Intel AMX Instruction Set Reference", chapter 3, gives TDPBSUD's semantics.

    for p in parallel(N / 16):                 # a panel: 16 output rows (the B tile's width)
      for each tile of up to 16 tokens:
        for each block b of g columns:
          C = 0                                # [tokens x 16] int32, in the tile register
          for each 64-column chunk of the block:
            B <- the chunk's codes as u8       # row r: 16 rows' codes of columns 4r..4r+3,
                                               # the vectors the VNNI kernel multiplies
            C += xq[tokens, chunk] . B         # TDPBSUD: exact int32 sums
          isum <- C (tilestored)
          acc[t] += the VNNI kernel's epilogue (tvm_vnni.block_value), token by token

The integer sums are exact in any order and the float epilogue is the VNNI kernel's own
expression, so each output is the VNNI kernel's bit for bit (tested): a decode step runs
VNNI (one token: a tile would waste 15 of its 16 rows), a verify of T >= MIN_TOKENS nodes
runs here, and the verify's rows are still the step's.

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
MIN_TOKENS = 2  # fewest tokens a call runs on AMX (one token: the VNNI loop)
A, B, C = 0, 1, 2  # tile registers


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


def panel_tiles(kind: str, k: int, g: int, npan: int, t_len, comps, xq, dx, sx, y, codes, value):
    """IRBuilder, inside panel_gemv_q8's prim_func: y[T, N] by AMX tiles (see the module).
    `codes(p, b, e0, half)`: the VNNI kernel's u8 code vector (lane i: row i's 4 codes);
    `value(p, b, isum, dx, sx)`: its float epilogue for one token's block."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as I

    nb, chunk = k // g, min(g, CHUNK)
    rows = b_rows(kind, g)
    per = chunk // 4  # B rows a chunk
    with I.parallel(0, npan) as p:
        cfg = I.alloc_buffer((64,), "uint8")  # the tile configuration (palette 1)
        wb = I.alloc_buffer((len(rows) * PANEL,), "int32")  # a block's B rows
        cb = I.alloc_buffer((TOKENS * PANEL,), "int32")  # C, stored
        acc = I.alloc_buffer((TOKENS * PANEL,), "float32")
        with I.serial(0, tirx.floordiv(t_len + TOKENS - 1, TOKENS)) as t0:
            tt = tirx.min(tirx.const(TOKENS, "int64"), t_len - t0 * TOKENS)
            for i in range(64):
                I.buffer_store(cfg, tirx.const(1 if i == 0 else 0, "uint8"), [i])
            for reg, nrows, colsb in ((A, tt, chunk), (B, per, 64), (C, tt, 64)):
                I.buffer_store(cfg, tirx.const(colsb, "uint8"), [16 + 2 * reg])
                I.buffer_store(cfg, tirx.Cast("uint8", nrows), [48 + reg])
            _tile("ldtilecfg", tirx.address_of(cfg[0]))
            with I.serial(0, TOKENS * PANEL) as i:
                I.buffer_store(acc, tirx.const(0.0, "float32"), [i])
            with I.serial(0, nb) as b:
                prefetch_block(comps, kind, g, nb, npan, p, b)
                for r, (e0, half) in enumerate(rows):
                    I.buffer_store(wb, codes(p, b, e0, half), [tirx.Ramp(r * PANEL, 1, PANEL)])
                _tile("tilezero", _r(C))
                for c in range(g // chunk):
                    at = tirx.address_of(wb[c * per * PANEL])
                    _tile("tileloadd64", _r(B), at, _stride(64))
                    at = tirx.address_of(xq[t0 * TOKENS * k + b * g + c * chunk])
                    _tile("tileloadd64", _r(A), at, _stride(k))
                    _tile("tdpbsud", _r(C), _r(A), _r(B))
                _tile("tilestored64", _r(C), tirx.address_of(cb[0]), _stride(64))
                with I.serial(0, tt) as t:
                    row = t0 * TOKENS + t
                    isum = cb[tirx.Ramp(t * PANEL, 1, PANEL)]
                    slot = tirx.Ramp(t * PANEL, 1, PANEL)
                    v = value(p, b, isum, dx[row * nb + b], sx[row * nb + b])
                    I.buffer_store(acc, acc[slot] + v, [slot])
            with I.serial(0, tt) as t:
                out = acc[tirx.Ramp(t * PANEL, 1, PANEL)]
                I.buffer_store(y, out, [t0 * TOKENS + t, tirx.Ramp(p * PANEL, 1, PANEL)])
        _tile("tilerelease")
