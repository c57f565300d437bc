"""Weights and KV caches on transparent huge pages (2 MiB), where the kernel allows it.

A decode step streams every weight once (~96 MB for SmolLM2-135M in its GGUF's blocks): on
4 KiB pages that is ~24k pages a step, more than the L2 TLB holds (Zen 4: 3072 entries), so
the stream pays page walks. Linux's `madvise` THP mode (the default of many distributions)
gives huge pages only to mappings that ask for them, and torch's allocator never asks. So
the tvm target's weights and the rows-convention KV cache live in one anonymous mapping each,
advised with MADV_HUGEPAGE (as llama.cpp's `--mlock`/hugepage mappings and TVM's
`TVM_USE_HUGEPAGES`-style allocators do). Measured on the 2-core AMD EPYC (THP "madvise"),
SmolLM2 -O1 tvm decode step: 4.22 -> 4.05, 4.28 -> 4.14, 4.25 -> 4.10 ms (median of 6 requests
each, three process pairs; glibc's `hugetlb=1` tunable, which advises every large malloc).

Nothing changes where THP is off or unavailable (the advice is ignored or skipped), and
`ARC_HUGEPAGES=0` keeps plain allocations.
"""

from __future__ import annotations

import math
import mmap
import os
import threading

import torch
from torch import Tensor

HUGE = 2 << 20  # bytes in a huge page (x86-64)


def enabled() -> bool:
    return os.environ.get("ARC_HUGEPAGES", "1") != "0" and hasattr(mmap, "MADV_HUGEPAGE")


def _mapping(nbytes: int) -> tuple[Tensor, int]:
    """(a uint8 tensor over a fresh anonymous mapping advised for huge pages, the offset of
    its first 2 MiB boundary). The tensor keeps the mapping alive."""
    mm = mmap.mmap(-1, nbytes + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        mm.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # THP compiled out of this kernel: plain pages, same contents
        pass
    buf = torch.frombuffer(mm, dtype=torch.uint8)  # [nbytes + HUGE], zero-filled
    return buf, (-buf.data_ptr()) % HUGE


def zeros(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> Tensor:
    """A zero-filled CPU tensor on huge pages (torch.zeros where they are not enabled)."""
    if not enabled():
        return torch.zeros(shape, dtype=dtype)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    buf, start = _mapping(nbytes)
    return buf[start : start + nbytes].view(dtype).view(shape)


def prefault(t: Tensor) -> threading.Thread | None:
    """Start committing the pages of `t` (a fresh `zeros` tensor) on another thread: a zero
    written into each 4 KiB page, so the contents do not change. The first write to a huge
    page makes the kernel find (compact) and clear 2 MiB, which on the 2-core AMD EPYC took
    31-180 ms for a SmolLM2 cache (94 MB) in the first prefill's KV writes, a request's
    time to first token; here it overlaps the rest of the engine's load (the tokenizer).
    The caller joins the thread before anything else touches `t`. None where huge pages are
    not enabled (torch.zeros already wrote its pages)."""
    if not enabled() or t.numel() == 0:
        return None
    per_page = max(1, 4096 // t.element_size())
    flat = t.view(-1)
    worker = threading.Thread(target=lambda: flat[::per_page].zero_(), daemon=True)
    worker.start()
    return worker


def arena(tensors: list[Tensor], align: int = 64) -> list[Tensor]:
    """Contiguous copies of CPU `tensors`, each `align`-byte aligned, packed into one mapping
    on huge pages; where huge pages are not enabled, each tensor made contiguous, copied only
    when its data is not aligned (a view into a file).

    Consumes `tensors`: each entry is set to None once copied, so a source nobody else holds
    is freed as the copy goes and loading a model does not need twice its weights' memory
    (the mapping's pages are only committed as they are written)."""
    if not enabled() or not tensors:
        out = [t.contiguous() for t in tensors]
        return [t if t.data_ptr() % align == 0 else t.clone() for t in out]
    sizes = [t.numel() * t.element_size() for t in tensors]
    offsets, at = [], 0
    for size in sizes:
        offsets.append(at)
        at += -(-size // align) * align
    buf, start = _mapping(at)
    out = []
    for i, (off, size) in enumerate(zip(offsets, sizes, strict=True)):
        t = tensors[i]
        view = buf[start + off : start + off + size].view(t.dtype).view(t.shape)
        view.copy_(t)
        out.append(view)
        tensors[i] = None
        del t  # the source is freed here if nobody else holds it
    return out
