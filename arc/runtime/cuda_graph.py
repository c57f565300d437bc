"""Replay a step function from a CUDA graph: one launch per step instead of one per kernel.

At batch 1 a decode step of a small model is a few hundred tiny kernels; launching them costs
more than running them. A CUDA graph records the launches once and replays them with one call
(the idea of gpt-fast's `mode="reduce-overhead"` and TensorRT-LLM's decode graphs). The step's
inputs are copied into static tensors the graph reads; the weights and KV cache are the same
tensors every call, so the recorded pointers stay valid, and the KV writes happen on replay.

One graph per distinct set of input shapes (decode has one; a speculative `verify_B` one per
static tree size). The first call of a shape runs eagerly (it warms up the allocator and the
package's lazy kernel loading), the second captures. `ARC_CUDA_GRAPHS=0` turns graphs off.
If capture fails, the function runs without a graph from then on, and `graphed.failures` says
why (`arc run --json` reports it).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor


def enabled() -> bool:
    return os.environ.get("ARC_CUDA_GRAPHS", "1") != "0"


class GraphedStep:
    """`fn(*inputs) -> Tensor` replayed from a CUDA graph per input-shape signature."""

    def __init__(self, fn: Callable[..., Tensor]):
        self.fn = fn
        self.seen: set[tuple] = set()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[Tensor], Tensor]] = {}
        self.failures: list[str] = []
        self.replays = 0

    def __call__(self, *inputs: Tensor) -> Tensor:
        key = tuple((tuple(t.shape), t.dtype) for t in inputs)
        hit = self.graphs.get(key)
        if hit is None and key in self.seen and not self.failures:
            hit = self._capture(key, inputs)
        if hit is None:
            self.seen.add(key)
            return self.fn(*inputs)
        graph, static, out = hit
        for dst, src in zip(static, inputs, strict=True):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        self.replays += 1
        return out.clone()  # the next replay overwrites `out`

    def _capture(self, key: tuple, inputs: tuple[Tensor, ...]):
        static = [t.clone() for t in inputs]
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        try:
            # One run on the capture stream first, so that per-stream state (cuBLAS handle and
            # workspace) exists before capture. It repeats this step's KV writes exactly.
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.fn(*static)
            torch.cuda.current_stream().wait_stream(stream)
            torch.cuda.synchronize()
            # relaxed: the package's runner queries its own CUDA event while we capture
            with torch.cuda.graph(graph, stream=stream, capture_error_mode="relaxed"):
                out = self.fn(*static)
        except Exception as e:  # noqa: BLE001 - any capture failure: run without a graph
            self.failures.append(f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            torch.cuda.synchronize()
            return None
        self.graphs[key] = (graph, static, out)
        return self.graphs[key]


def graphed(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """`fn` wrapped in a GraphedStep where CUDA graphs are enabled, else `fn`."""
    return GraphedStep(fn) if enabled() else fn


def stats(functions: dict) -> dict | None:
    """Replays and capture failures over a Steps' functions; None where none is graphed."""
    graphed_fns = [f for f in functions.values() if isinstance(f, GraphedStep)]
    if not graphed_fns:
        return None
    return {
        "replays": sum(f.replays for f in graphed_fns),
        "failures": [x for f in graphed_fns for x in f.failures],
    }
