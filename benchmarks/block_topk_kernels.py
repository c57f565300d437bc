"""Microbenchmark of one decode step's attention for sparse-attention{kind=block-topk} (Quest)
on smollm2-135m's shapes (9 query heads, 3 KV heads, head_dim 64) at a 4k context: which torch
form of the sparse kernel to lower to (passes/sparse_attention.py records the figures).

    python benchmarks/block_topk_kernels.py [--context 4096] [--block 16] [--topk 32]

Forms, each eager and torch.compile'd (Inductor, CPU; the aot/jit modes compile):
- dense:        SDPA over every cached row (what no pass does)
- gather:       scores from kept key min/max, topk, gather the chosen rows, SDPA (arc's lowering)
- gather+sum:   the same, with the min/max computed from the cache in the step (reads all keys)
- flex:         FlexAttention with a BlockMask built from the chosen blocks (kv_indices)
Times are medians per layer call, in microseconds; each sparse form is checked against gather.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from arc import block_topk

H, KV, D = 9, 3, 64


def _time(fn, *args, reps: int = 200) -> float:
    for _ in range(10):
        fn(*args)
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn(*args)
        out.append(time.perf_counter() - t)
    return 1e6 * statistics.median(out)


def dense(q, kc, vc, kmin, kmax, pos, ctx: int, block: int, topk: int):
    k, v = kc[:, :, :ctx], vc[:, :, :ctx]
    return F.scaled_dot_product_attention(q, k, v, scale=D**-0.5, enable_gqa=True)


def gather(q, kc, vc, kmin, kmax, pos, ctx: int, block: int, topk: int):
    s = block_topk.scores(q, kmin, kmax, pos, block)
    rows = block_topk.select_rows(s, topk, block, kc.shape[2] - 1)  # [1, KV, N]
    idx = rows[..., None].expand(-1, -1, -1, D)
    k, v = kc.gather(2, idx), vc.gather(2, idx)
    mask = block_topk.visible(rows, pos, H)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=D**-0.5, enable_gqa=True)


def gather_sum(q, kc, vc, kmin, kmax, pos, ctx: int, block: int, topk: int):
    nb = kmin.shape[2]
    k = kc[:, :, : nb * block].view(1, KV, nb, block, D)  # [1, KV, NB, B, D]
    return gather(q, kc, vc, k.amin(3), k.amax(3), pos, ctx, block, topk)


def flex_fn():
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    def flex(q, kc, vc, kmin, kmax, pos, ctx: int, block: int, topk: int):
        s = block_topk.scores(q, kmin, kmax, pos, block)  # [1, KV, NB]
        idx = s.topk(topk, dim=-1).indices.repeat_interleave(H // KV, dim=1)  # [1, H, topk]
        n = kc.shape[2] // block
        cnt = torch.full((1, H, 1), topk, dtype=torch.int32)  # [1, H, q blocks]
        sel = torch.zeros(1, H, 1, n, dtype=torch.int32)  # [1, H, q blocks, kv blocks]
        sel[..., :topk] = idx.to(torch.int32)[:, :, None]
        # no fully visible blocks; Inductor's CPU flex kernel does not compile without them
        full_cnt, full_sel = torch.zeros_like(cnt), torch.zeros_like(sel)

        def causal(b, h, qi, ki):
            return ki <= pos[0]

        bm = BlockMask.from_kv_blocks(
            cnt, sel, full_cnt, full_sel, BLOCK_SIZE=(1, block), mask_mod=causal,
            seq_lengths=(1, kc.shape[2]),
        )  # fmt: skip
        return flex_attention(q, kc, vc, block_mask=bm, scale=D**-0.5, enable_gqa=True)

    return flex


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = a.context + a.block  # a cache a little longer than the context
    rows -= rows % a.block
    kc, vc = torch.randn(1, KV, rows, D), torch.randn(1, KV, rows, D)
    nb = rows // a.block
    k = kc.view(1, KV, nb, a.block, D)
    kmin, kmax = k.amin(3), k.amax(3)
    q = torch.randn(1, H, 1, D)
    pos = torch.tensor([a.context - 1])
    args = (q, kc, vc, kmin, kmax, pos, a.context, a.block, a.topk)
    forms = {"dense": dense, "gather": gather, "gather+sum": gather_sum, "flex": flex_fn()}
    print(f"context {a.context}, block {a.block}, topk {a.topk}, {a.threads} threads; us/call")
    with torch.inference_mode():
        ref = gather(*args)
        for name, fn in forms.items():
            row = []
            for compiled in (False, True):
                f = torch.compile(fn, dynamic=False) if compiled else fn
                try:
                    diff = float((f(*args) - ref).abs().max())
                    row.append(f"{_time(f, *args):9.1f} (vs gather {diff:.0e})")
                except Exception as e:  # noqa: BLE001 - report and go on
                    row.append(f"  failed: {type(e).__name__}: {str(e)[:80]}")
            print(f"  {name:<11} eager {row[0]}   compiled {row[1]}")
    print("(eager flex attends densely: outside torch.compile it ignores the BlockMask's blocks)")


if __name__ == "__main__":
    main()
