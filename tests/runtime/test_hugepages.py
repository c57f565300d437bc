"""Weights and KV caches on huge pages (arc/runtime/hugepages.py): same values, aligned, and
the mapping really advised for THP where the kernel has it."""

from __future__ import annotations

import mmap
from pathlib import Path

import pytest
import torch

from arc.runtime import hugepages

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _tensors():
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(3, 5, generator=g),  # 60 bytes: the next one must still be aligned
        torch.randint(0, 255, (7, 9), dtype=torch.uint8, generator=g),
        torch.randn(4, dtype=torch.float64, generator=g),
        torch.randn(16, 16, generator=g).to(torch.float16).t(),  # not contiguous
        torch.zeros(0),
    ]


@pytest.mark.parametrize("on", ["1", "0"])
def test_arena_copies_aligned(monkeypatch, on):
    monkeypatch.setenv("ARC_HUGEPAGES", on)
    src = _tensors()
    given = list(src)
    out = hugepages.arena(given, align=64)
    if on == "1":  # the list is consumed: sources are released as they are copied
        assert given == [None] * len(src)
    for a, b in zip(src, out, strict=True):
        assert b.dtype == a.dtype and b.shape == a.shape and b.is_contiguous()
        assert torch.equal(a, b)
        assert b.numel() == 0 or b.data_ptr() % 64 == 0
    if on == "1":  # copies, not views of the sources
        out[0].add_(1)
        assert not torch.equal(src[0], out[0])


def test_zeros(monkeypatch):
    z = hugepages.zeros((2, 3, 4))
    assert z.shape == (2, 3, 4) and z.dtype == torch.float32 and not z.any()
    z.fill_(1.5)  # writable
    assert float(z.sum()) == 1.5 * 24
    monkeypatch.setenv("ARC_HUGEPAGES", "0")
    assert not hugepages.zeros((5,)).any()


def _vma_of(addr: int) -> list[str]:
    lines = Path("/proc/self/smaps").read_text().splitlines()
    for i, line in enumerate(lines):
        head = line.split()[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            lo, hi = (int(x, 16) for x in head.split("-"))
            if lo <= addr < hi:
                j = i + 1
                out = []
                while j < len(lines) and ":" in lines[j].split()[0]:
                    out.append(lines[j])
                    j += 1
                return out
    raise AssertionError("no mapping holds the tensor")


class _Spy(mmap.mmap):
    """An anonymous mapping that records the advice it is given."""

    advised: list[int] = []

    def madvise(self, option, *args):
        _Spy.advised.append(option)
        return super().madvise(option, *args)


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no MADV_HUGEPAGE here")
@pytest.mark.parametrize("on", ["1", "0"])
def test_arena_asks_for_huge_pages(monkeypatch, on):
    """The arena's mapping is advised MADV_HUGEPAGE, and only when huge pages are enabled."""
    monkeypatch.setenv("ARC_HUGEPAGES", on)
    monkeypatch.setattr(hugepages.mmap, "mmap", _Spy)
    _Spy.advised = []
    out = hugepages.arena([torch.ones(1 << 20, dtype=torch.uint8)])
    hugepages.zeros((1 << 18,))
    assert torch.equal(out[0], torch.ones(1 << 20, dtype=torch.uint8))
    assert _Spy.advised == ([mmap.MADV_HUGEPAGE] * 2 if on == "1" else [])


@pytest.mark.skipif(
    not THP.exists() or "[never]" in THP.read_text(), reason="no transparent huge pages here"
)
def test_mapping_is_advised_for_huge_pages(monkeypatch):
    """The kernel took the advice: the weights' mapping carries the MADV_HUGEPAGE flag (`hg` in
    VmFlags) and is THP-eligible. (No unadvised mapping is compared with it: on some hosts
    every large allocation is advised, by glibc's `hugetlb` tunable or a process-wide THP
    policy, so that the advice itself is checked by the test above.)"""
    monkeypatch.setenv("ARC_HUGEPAGES", "1")
    big = hugepages.arena([torch.ones(4 << 20, dtype=torch.uint8)])[0]
    fields = dict(f.split(":", 1) for f in _vma_of(big.data_ptr()))
    assert "hg" in fields["VmFlags"].split()
    assert fields["THPeligible"].strip() == "1"


def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def test_prefault_commits_the_pages_and_keeps_the_zeros(monkeypatch):
    """After prefault's thread, writing every page of the tensor faults (almost) nothing: the
    kernel's work (finding and clearing huge pages) was done at load, not in the first
    request's KV writes; the contents are still zeros. A fresh tensor written the same way
    faults at least once per huge page."""
    monkeypatch.setenv("ARC_HUGEPAGES", "1")
    if not hugepages.enabled():
        pytest.skip("this Python's mmap has no MADV_HUGEPAGE: zeros are torch's, already written")
    shape, per_page = (16 << 20) // 4, 1024  # 16 MiB of fp32; floats in a 4 KiB page
    cold = hugepages.zeros((shape,))
    before = _minor_faults()
    cold[::per_page] = 1.0
    assert _minor_faults() - before >= 8  # 16 MiB: 8 huge pages, or 4096 small ones
    warm = hugepages.zeros((shape,))
    worker = hugepages.prefault(warm)
    assert worker is not None
    worker.join()
    assert not warm.any()
    before = _minor_faults()
    warm[::per_page] = 1.0
    assert _minor_faults() - before <= 2
    monkeypatch.setenv("ARC_HUGEPAGES", "0")
    assert hugepages.prefault(torch.zeros(4)) is None  # torch.zeros wrote its pages


def test_row_cache_waits_for_its_pages():
    from arc.ir import KVDecl
    from arc.runtime.rows import RowCache

    decl = KVDecl(layers=2, kv_heads=2, head_dim=16, max_seq_len=64, dtype="f32")
    cache = RowCache(decl)
    t = cache.tensor  # joins the prefault thread before anyone writes the cache
    assert cache._faulting is None and t.shape == (4, 2, 65, 16) and not t.any()
    cache.write(torch.tensor([3]), torch.ones(4, 2, 1, 16))
    assert float(cache.tensor[:, :, 3].sum()) == 4 * 2 * 16
