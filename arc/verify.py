"""verify(module): types, shapes, dangling nodes, weight and KV declarations.

Every pass's output is verified by the PassManager's Verify instrument, so a pass that breaks an
invariant is named at once instead of surfacing as a wrong token three stages later.
"""

from __future__ import annotations

import networkx as nx

from arc.errors import ArcError
from arc.formats import FORMATS, components
from arc.ir import KV_DTYPES, Graph, Module
from arc.ops import ARITY, DENSE_MASKS, REQUIRED_ATTRS, Op, ShapeError, infer_shape, result_dtype


class VerifyError(ValueError):
    pass


def verify(m: Module) -> None:
    """Raise VerifyError naming the first broken invariant of `m`."""
    _verify_weights(m)
    if m.kv.dtype not in KV_DTYPES:
        raise VerifyError(f"kv dtype {m.kv.dtype!r} is not one of {', '.join(KV_DTYPES)}")
    if not m.functions:
        raise VerifyError("module has no functions")
    for g in m.functions.values():
        _verify_graph(m, g)


def _verify_weights(m: Module) -> None:
    for name, w in m.weights.items():
        if w.format != "f32":
            if w.format not in FORMATS:
                raise VerifyError(f"weight {name}: unknown format {w.format!r}")
            try:
                components(w.format, w.shape, w.group)
            except ArcError as e:
                raise VerifyError(f"weight {name}: {e}") from None
            if w.parts and w.axis != 0:
                raise VerifyError(f"weight {name}: a {w.format} weight is fused on rows only")
        if not w.parts:
            continue
        parts = [m.weights.get(p) for p in w.parts]
        if any(p is None or p.parts for p in parts):
            raise VerifyError(f"weight {name}: parts {w.parts} must be stored weights")
        total = sum(p.shape[w.axis] for p in parts)
        expect = list(parts[0].shape)
        expect[w.axis] = total
        if tuple(expect) != tuple(w.shape):
            raise VerifyError(f"weight {name}: shape {w.shape} != concat of parts {expect}")


def _verify_graph(m: Module, g: Graph) -> None:
    shapes = m.weight_shapes()
    seen: dict[int, object] = {}
    for n in g.nodes:
        where = f"@{g.name} %{n.id} ({n.op.value})"
        if n.id in seen:
            raise VerifyError(f"{where}: duplicate id")
        arity = ARITY[n.op] + (n.op is Op.KV_WRITE and n.attr("merge") == 1)  # + the first write
        if len(n.inputs) != arity:
            raise VerifyError(f"{where}: {len(n.inputs)} inputs, expected {arity}")
        missing = [a for a in REQUIRED_ATTRS.get(n.op, ()) if a not in n.attrs]
        if missing:
            raise VerifyError(f"{where}: missing attrs {missing}")
        for i in n.inputs:
            if i not in seen:
                raise VerifyError(f"{where}: input %{i} is not defined before use")
        for w in n.weights():
            if w not in m.weights:
                raise VerifyError(f"{where}: unknown weight {w!r}")
        _verify_format(m, n, where)
        ins = [seen[i] for i in n.inputs]
        try:
            shape = infer_shape(n.op, [x.shape for x in ins], n.attrs, shapes)
        except ShapeError as e:
            raise VerifyError(f"{where}: {e}") from None
        if tuple(shape) != tuple(n.shape):
            raise VerifyError(f"{where}: recorded shape {n.shape} != inferred {shape}")
        if n.dtype != result_dtype(n.op, [x.dtype for x in ins], n.attrs):
            raise VerifyError(f"{where}: dtype {n.dtype} is wrong")
        _verify_kv(m, g, n, ins, where)
        seen[n.id] = n
    for o in g.outputs:
        if o not in seen:
            raise VerifyError(f"@{g.name}: output %{o} is not a node")
    _verify_no_dangling(g)


def _verify_format(m: Module, n, where: str) -> None:
    """A node's `fmt` is its weight's format; only LINEAR / LM_HEAD / EMBED read formatted
    weights (a norm's or rope's weight is always f32)."""
    formatted = n.op in (Op.LINEAR, Op.LM_HEAD, Op.EMBED)
    if formatted and m.weights[n.attrs["w"]].format != n.attr("fmt", "f32"):
        raise VerifyError(f"{where}: fmt {n.attr('fmt', 'f32')} != its weight's format")
    for key in ("w", "b"):
        w = n.attr(key)
        if w is not None and m.weights[w].format != "f32" and not (formatted and key == "w"):
            raise VerifyError(f"{where}: {key}={w} must be f32, not {m.weights[w].format}")


def _verify_kv(m: Module, g: Graph, n, ins, where: str) -> None:
    if n.op not in (Op.KV_WRITE, Op.ATTENTION):
        return
    layer = n.attrs["layer"]
    if not 0 <= layer < m.kv.layers:
        raise VerifyError(f"{where}: layer {layer} has no KV declaration")
    _verify_merge(m, n, ins, where)
    if n.op is Op.ATTENTION:
        kv = ins[1]
        if kv.op is not Op.KV_WRITE or kv.attrs["layer"] != layer:
            raise VerifyError(f"{where}: reads kv of another layer or no kv_write")
        if (n.attrs["kv_heads"], n.attrs["head_dim"]) != (m.kv.kv_heads, m.kv.head_dim):
            raise VerifyError(f"{where}: kv_heads/head_dim disagree with the KV declaration")
    else:
        width = m.kv.kv_heads * m.kv.head_dim
        if ins[0].shape[-1] != width or ins[1].shape[-1] != width:
            raise VerifyError(f"{where}: k/v width != kv_heads*head_dim ({width})")


def _verify_merge(m: Module, n, ins, where: str) -> None:
    """A merged cache layer (kv-fusion merge=slerp) is written by its pair's two KV_WRITEs,
    `merge=0` (the earlier layer: stores nothing) then `merge=1` (reads the first write as a
    4th input and stores the merged rows), and read by dense ATTENTIONs of the same `merge`."""
    role = n.attr("merge")
    if m.kv.is_merged(n.attrs["layer"]) != (role is not None):
        raise VerifyError(f"{where}: merge={role} disagrees with the KV declaration's layer")
    if role is None:
        return
    if role not in (0, 1):
        raise VerifyError(f"{where}: merge={role} must be 0 (earlier layer) or 1 (later)")
    if n.op is Op.ATTENTION:
        if ins[1].attr("merge") != role:
            raise VerifyError(
                f"{where}: merge={role} reads a kv_write of merge={ins[1].attr('merge')}"
            )
        if n.attrs["mask"] not in DENSE_MASKS:
            raise VerifyError(f"{where}: a merged KV layer is read by dense masks only")
    elif role == 1:
        first = ins[3]
        if first.op is not Op.KV_WRITE or first.attr("merge") != 0:
            raise VerifyError(f"{where}: merge=1 must read its pair's merge=0 kv_write")
        if first.attrs["layer"] != n.attrs["layer"]:
            raise VerifyError(f"{where}: merge=1 reads the first write of another layer")


def _verify_no_dangling(g: Graph) -> None:
    from arc.ir import to_networkx

    dg = to_networkx(g)
    live = set(g.outputs)
    for o in g.outputs:
        live |= nx.ancestors(dg, o)
    dead = [n.id for n in g.nodes if n.id not in live and n.op is not Op.INPUT]
    if dead:
        raise VerifyError(f"@{g.name}: dangling nodes {['%' + str(d) for d in dead[:5]]}")
