"""Quest block top-k attention in torch (Tang et al. 2024, "Quest: Query-Aware Sparsity for
Efficient Long-Context LLM Inference"): the kernels arc/lowering.py calls for ATTENTION mask
kind `block-topk` and for the KV_WRITE that keeps its key summaries (passes/sparse_attention.py).

The cache's slots are cut into blocks of `block` rows. Per layer and KV head, `kmin`/`kmax`
[1, KV, NB, D] hold the per-channel min and max of each block's keys (Quest's page metadata),
kept as state beside the cache and updated where K/V rows are written: a decode step folds
its key into its block's min/max, a prefill chunk re-summarizes every block from the cache
(prefill reads the whole cache for dense attention anyway).
A decode step then reads 2/block of the keys' bytes to score all blocks instead of every key.

Score of block b for query q (Quest's Algorithm 1): sum_c max(q_c * min_c, q_c * max_c), an
upper bound of q . k over the block's keys, written as relu(q) @ kmax + min(q, 0) @ kmin (two
small matmuls). With GQA one KV head serves G query heads, and the blocks are chosen per KV
head (so the gather reads KV heads, not H): a block's score is the max over the group's
bounds, so a block is kept when any head sharing the K/V might attend to it strongly. The
block holding the current token always scores +inf (Quest keeps the newest page), blocks past
it -inf. The `topk` best blocks' rows are gathered and attended with exact softmax (SDPA).

Shapes are static in the number of blocks (NB = ceil(max_seq_len / block), the whole cache's
blocks, masked past the token) and in `topk`, so a decode step exports through AOTInductor with
no data-dependent shapes; the `slots` it is fed are not needed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def blocks_of(max_seq_len: int, block: int) -> int:
    """NB: how many blocks of `block` rows cover `max_seq_len` slots."""
    return -(-max_seq_len // block)


def summarize_block(k_rows: Tensor, rows: Tensor, last: Tensor) -> tuple[Tensor, Tensor]:
    """Min and max per channel of the rows of `k_rows` [1, KV, ..., R, D] whose slot `rows`
    [..., R] is <= `last` (written in this sequence): ([1, KV, ..., D], same). A block with no
    such row gets 0 (its score is masked to -inf anyway; inf would make 0 * inf = nan)."""
    valid = (rows <= last)[..., None]  # [..., R, 1]
    lo = torch.where(valid, k_rows, float("inf")).amin(-2)  # [1, KV, ..., D]
    hi = torch.where(valid, k_rows, float("-inf")).amax(-2)
    any_valid = valid.any(-2)  # [..., 1]
    return torch.where(any_valid, lo, 0.0), torch.where(any_valid, hi, 0.0)


def scores(qh: Tensor, kmin: Tensor, kmax: Tensor, pos: Tensor, block: int) -> Tensor:
    """Per KV head, the upper bound of each block's attention logit for query `qh` [1, H, 1, D]:
    [1, KV, NB], the current block +inf and blocks past it -inf."""
    kvh, nb = kmin.shape[1], kmin.shape[2]
    g = qh.shape[1] // kvh
    qg = qh.reshape(1, kvh, g, qh.shape[-1])  # [1, KV, G, D] the query heads of each KV head
    # sum_c max(q_c min_c, q_c max_c) = relu(q) . max + min(q, 0) . min
    ub = qg.clamp(min=0) @ kmax.transpose(-1, -2) + qg.clamp(max=0) @ kmin.transpose(-1, -2)
    ub = ub.amax(2)  # [1, KV, NB] the group's strongest bound
    b = torch.arange(nb, device=qh.device)  # [NB]
    current = pos.reshape(()) // block
    ub = torch.where(b > current, float("-inf"), ub)
    return torch.where(b == current, float("inf"), ub)


def visible(rows: Tensor, pos: Tensor, heads: int) -> Tensor:
    """Which gathered rows of slots `rows` [1, KV, N] the query at `pos` sees (slot <= pos),
    per query head: [1, H, 1, N], each head taking its KV head's rows."""
    mask = (rows <= pos.reshape(()))[:, :, None, :]  # [1, KV, 1, N]
    return mask.repeat_interleave(heads // rows.shape[1], dim=1)  # [1, H, 1, N]


def select_rows(s: Tensor, topk: int, block: int, max_row: int) -> Tensor:
    """Cache rows of the `topk` best-scoring blocks per KV head: s [1, KV, NB] -> [1, KV, k*B]."""
    idx = s.topk(topk, dim=-1).indices  # [1, KV, topk]
    rows = idx[..., None] * block + torch.arange(block, device=s.device)  # [1, KV, topk, B]
    return rows.flatten(2).clamp(max=max_row)  # [1, KV, topk*B]
