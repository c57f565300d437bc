"""Trace a model family's forward into an IR Module with prefill and decode functions.

The family module (models/<family>.py) describes the architecture once, as IR-emitting code;
tracing runs it twice: `prefill` over a chunk of T new tokens returning the last position's
logits, and `decode` over one token. Both read and write the same declared KV cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Protocol

from arc.ir import DecodePlan, GraphBuilder, KVDecl, Module, WeightDecl
from arc.verify import verify


class Family(Protocol):
    FAMILY: str

    def weight_shapes(self, arch: Any) -> Mapping[str, tuple[int, ...]]: ...

    def forward(self, b: GraphBuilder, arch: Any, *, new_tokens: int | str, last_only: bool): ...


def trace(
    name: str, family: Family, arch: Any, *, max_seq_len: int, meta: Mapping[str, Any]
) -> Module:
    """Build and verify the Module for `arch` with a KV cache of `max_seq_len` slots."""
    shapes = dict(family.weight_shapes(arch))
    functions = {}
    for fn, t, last_only in (("prefill", "T", True), ("decode", 1, False)):
        b = GraphBuilder(fn, shapes)
        functions[fn] = b.build(family.forward(b, arch, new_tokens=t, last_only=last_only))
    module = Module(
        name=name,
        functions=MappingProxyType(functions),
        weights=MappingProxyType({k: WeightDecl(tuple(s)) for k, s in shapes.items()}),
        kv=KVDecl(arch.layers, arch.kv_heads, arch.head_dim, max_seq_len),
        plan=DecodePlan("plain"),
        meta=MappingProxyType({"family": family.FAMILY, **meta}),
    )
    verify(module)
    return module
