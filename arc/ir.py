"""arc's IR: small, typed, immutable, printable (after tinygrad's UOps and xDSL).

A `Module` holds named `Graph`s (prefill, decode, ...) that share weights and one KV-cache
declaration, plus the `DecodePlan` that tells the runtime how to drive them. Weights live
outside the graphs, by name; a `WeightDecl` either names a stored tensor or says how to derive
one from stored tensors (a fused projection is the concatenation of its parts), so passes stay
pure and never touch tensor data.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

from arc.ops import Op, Shape

IR_VERSION = 1


def _freeze(attrs: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(
        {k: tuple(v) if isinstance(v, list) else v for k, v in sorted(attrs.items())}
    )


@dataclass(frozen=True)
class Node:
    """One op application. `inputs` are ids of earlier nodes in the same graph."""

    id: int
    op: Op
    inputs: tuple[int, ...]
    attrs: Mapping[str, Any]
    shape: Shape
    dtype: str

    def attr(self, key: str, default: Any = None) -> Any:
        return self.attrs.get(key, default)

    def weights(self) -> list[str]:
        """Names of the weights this node reads."""
        return [self.attrs[k] for k in ("w", "b") if self.attrs.get(k) is not None]


@dataclass(frozen=True)
class Graph:
    """Nodes in topological order; `outputs` are node ids."""

    name: str
    nodes: tuple[Node, ...]
    outputs: tuple[int, ...]

    def node(self, nid: int) -> Node:
        return self._index()[nid]

    def _index(self) -> dict[int, Node]:
        idx = self.__dict__.get("_idx")
        if idx is None:
            idx = {n.id: n for n in self.nodes}
            object.__setattr__(self, "_idx", idx)
        return idx

    def inputs(self) -> list[Node]:
        return [n for n in self.nodes if n.op is Op.INPUT]

    def users(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {n.id: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                out[i].append(n.id)
        return out


@dataclass(frozen=True)
class WeightDecl:
    """A named weight: stored (`parts` empty) or the concatenation of stored `parts` on `axis`.

    `format` says how its values are stored (arc/formats.py: f32, bf16, q8_0, q4_1, int4, ...),
    with `group` weights of a row per scale for the block formats; the target picks the kernel.
    """

    shape: Shape
    dtype: str = "f32"
    parts: tuple[str, ...] = ()
    axis: int = 0
    format: str = "f32"
    group: int = 0


KV_DTYPES = ("f32", "int8")  # int8: plus one fp32 scale per token per head, for k and for v


@dataclass(frozen=True)
class KVDecl:
    """The shared KV cache: per layer, k and v of [1, kv_heads, max_seq_len, head_dim].

    `dtype` int8 (passes/kv_fusion.py): k and v are stored as int8 with an fp32 absmax scale
    per token per head ([1, kv_heads, max_seq_len, 1] each), dequantized where attention reads.

    `merged` (kv-fusion{share=N,merge=slerp}, MiniCache): the last `merged` layers each hold a
    pair of model layers: k and v are the pair's merged unit directions (in `dtype`), plus
    fp32 magnitudes of each of the two layers' k and v ([1, kv_heads, max_seq_len, 2] each).
    """

    layers: int
    kv_heads: int
    head_dim: int
    max_seq_len: int
    dtype: str = "f32"
    merged: int = 0

    def bytes_per_token(self) -> int:
        """Cache bytes one token's K and V take over all layers (scales and magnitudes
        included): a merged pair stores one layer's K/V plus 2 layers x (k, v) fp32 norms."""
        row = self.head_dim * 4 if self.dtype == "f32" else self.head_dim + 4  # one head's k
        return 2 * self.layers * self.kv_heads * row + self.merged * 2 * 2 * self.kv_heads * 4

    def is_merged(self, layer: int) -> bool:
        """Cache layer `layer` holds a merged pair (the last `merged` layers do)."""
        return layer >= self.layers - self.merged


@dataclass(frozen=True)
class DecodePlan:
    """How the runtime drives the graphs. `plain`: prefill once, then one decode per token."""

    kind: str = "plain"
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Module:
    name: str
    functions: Mapping[str, Graph]
    weights: Mapping[str, WeightDecl]
    kv: KVDecl
    plan: DecodePlan = DecodePlan()
    meta: Mapping[str, Any] = field(default_factory=dict)  # family, config, eos ids, ...

    def with_functions(self, functions: Mapping[str, Graph], **changes: Any) -> Module:
        return replace(self, functions=MappingProxyType(dict(functions)), **changes)

    def weight_shapes(self) -> dict[str, Shape]:
        return {k: w.shape for k, w in self.weights.items()}

    def used_weights(self) -> list[str]:
        """Weights some graph reads, in first-use order."""
        seen: dict[str, None] = {}
        for g in self.functions.values():
            for n in g.nodes:
                for w in n.weights():
                    seen.setdefault(w, None)
        return list(seen)

    def node_count(self) -> int:
        return sum(len(g.nodes) for g in self.functions.values())


# ---------------------------------------------------------------- building


class GraphBuilder:
    """Appends nodes with inferred shapes; used by tracing and by passes that rewrite graphs."""

    def __init__(self, name: str, weights: Mapping[str, Shape]):
        from arc.ops import infer_shape, result_dtype

        self._infer, self._dtype = infer_shape, result_dtype
        self.name, self.weights, self.nodes = name, weights, []
        self._by_id: dict[int, Node] = {}

    def add(self, op: Op, inputs: Iterable[int] = (), **attrs: Any) -> int:
        ins = tuple(inputs)
        src = [self._by_id[i] for i in ins]
        attrs = _freeze({k: v for k, v in attrs.items() if v is not None})
        shape = self._infer(op, [s.shape for s in src], attrs, self.weights)
        dtype = self._dtype(op, [s.dtype for s in src], attrs)
        node = Node(len(self.nodes), op, ins, attrs, shape, dtype)
        self.nodes.append(node)
        self._by_id[node.id] = node
        return node.id

    def copy(self, node: Node, inputs: Iterable[int]) -> int:
        return self.add(node.op, inputs, **dict(node.attrs))

    def input(self, name: str, shape: Shape, dtype: str) -> int:
        return self.add(Op.INPUT, name=name, shape=list(shape), dtype=dtype)

    def shape(self, nid: int) -> Shape:
        return self._by_id[nid].shape

    def build(self, outputs: Iterable[int]) -> Graph:
        return Graph(self.name, tuple(self.nodes), tuple(outputs))


def rebuild(graph: Graph, weights: Mapping[str, Shape], rewrite=None) -> Graph:
    """Copy `graph` node by node; `rewrite(builder, node, mapped_inputs)` may return a new id.

    Returning None keeps the node as it was. Ids are renumbered densely; dropped nodes vanish.
    """
    b = GraphBuilder(graph.name, weights)
    remap: dict[int, int] = {}
    for n in graph.nodes:
        ins = [remap[i] for i in n.inputs]
        new = rewrite(b, n, ins) if rewrite else None
        remap[n.id] = b.copy(n, ins) if new is None else new
    return b.build(remap[o] for o in graph.outputs)


# ---------------------------------------------------------------- printing


def _fmt_shape(shape: Shape, dtype: str) -> str:
    if dtype == "kv":
        return "kv"
    return f"{dtype}[{','.join(str(d) for d in shape)}]"


def _fmt_attr(v: Any) -> str:
    if isinstance(v, tuple):
        return "[" + ",".join(str(x) for x in v) + "]"
    return str(v)


def format_node(n: Node) -> str:
    if n.op is Op.INPUT:
        return f"  %{n.id} = input {n.attrs['name']}  # {_fmt_shape(n.shape, n.dtype)}"
    args = [f"%{i}" for i in n.inputs]
    args += [f"{k}={_fmt_attr(v)}" for k, v in n.attrs.items()]
    return f"  %{n.id} = {n.op.value}({', '.join(args)})  # {_fmt_shape(n.shape, n.dtype)}"


def format_graph(g: Graph) -> str:
    ins = ", ".join(
        f"%{n.id} {n.attrs['name']}: {_fmt_shape(n.shape, n.dtype)}" for n in g.inputs()
    )
    outs = ", ".join(_fmt_shape(g.node(o).shape, g.node(o).dtype) for o in g.outputs)
    body = [format_node(n) for n in g.nodes if n.op is not Op.INPUT]
    ret = ", ".join(f"%{o}" for o in g.outputs)
    return "\n".join([f"func @{g.name}({ins}) -> {outs} {{", *body, f"  return {ret}", "}"])


def format_module(m: Module) -> str:
    used = set(m.used_weights())
    params = sum(_numel(w.shape) for k, w in m.weights.items() if k in used)
    fmts = sorted({m.weights[k].format for k in used})
    kv = m.kv
    head = [
        f"module @{m.name}  // family={m.meta.get('family')} plan={m.plan.kind}",
        f"// weights: {len(used)} used tensors, {params / 1e6:.1f}M params, {'/'.join(fmts)}",
        f"// kv: {kv.layers} layers x k,v {kv.dtype}[1,{kv.kv_heads},{kv.max_seq_len},"
        f"{kv.head_dim}]{' + f32 scales' if kv.dtype == 'int8' else ''}"
        f"{f' ({kv.merged} merged pairs + f32 norms)' if kv.merged else ''}"
        f"  ({kv.bytes_per_token()} B/token)",
    ]
    return "\n".join(head + [format_graph(g) for g in m.functions.values()])


def _numel(shape: Shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ---------------------------------------------------------------- JSON


def module_to_json(m: Module) -> dict[str, Any]:
    return {
        "ir_version": IR_VERSION,
        "name": m.name,
        "meta": dict(m.meta),
        "kv": {k: v for k, v in vars(m.kv).items() if k != "merged" or v},  # old manifests' form
        "plan": {"kind": m.plan.kind, "options": dict(m.plan.options)},
        "weights": {
            k: {
                "shape": list(w.shape),
                "dtype": w.dtype,
                "parts": list(w.parts),
                "axis": w.axis,
                "format": w.format,
                "group": w.group,
            }
            for k, w in m.weights.items()
        },
        "functions": [_graph_to_json(g) for g in m.functions.values()],  # a list: order kept
    }


def _graph_to_json(g: Graph) -> dict[str, Any]:
    nodes = [
        {
            "id": n.id,
            "op": n.op.value,
            "inputs": list(n.inputs),
            "attrs": {k: list(v) if isinstance(v, tuple) else v for k, v in n.attrs.items()},
            "shape": list(n.shape),
            "dtype": n.dtype,
        }
        for n in g.nodes
    ]
    return {"name": g.name, "nodes": nodes, "outputs": list(g.outputs)}


def module_from_json(d: Mapping[str, Any]) -> Module:
    if d.get("ir_version") != IR_VERSION:
        raise ValueError(f"IR version {d.get('ir_version')} is not {IR_VERSION}")
    functions = {}
    for gd in d["functions"]:
        name = gd["name"]
        nodes = tuple(
            Node(
                nd["id"],
                Op(nd["op"]),
                tuple(nd["inputs"]),
                _freeze(nd["attrs"]),
                tuple(nd["shape"]),
                nd["dtype"],
            )
            for nd in gd["nodes"]
        )
        functions[name] = Graph(name, nodes, tuple(gd["outputs"]))
    weights = {
        k: WeightDecl(
            tuple(w["shape"]),
            w["dtype"],
            tuple(w["parts"]),
            w["axis"],
            w.get("format", "f32"),
            w.get("group", 0),
        )
        for k, w in d["weights"].items()
    }
    return Module(
        name=d["name"],
        functions=MappingProxyType(functions),
        weights=MappingProxyType(weights),
        kv=KVDecl(**d["kv"]),
        plan=DecodePlan(d["plan"]["kind"], MappingProxyType(dict(d["plan"]["options"]))),
        meta=MappingProxyType(dict(d["meta"])),
    )


def dumps(m: Module) -> str:
    return json.dumps(module_to_json(m), indent=1, sort_keys=True)


def loads(s: str) -> Module:
    return module_from_json(json.loads(s))


# ---------------------------------------------------------------- networkx


def to_networkx(g: Graph):
    """A networkx DiGraph of `g`: node attrs op/shape/label, edges input -> user."""
    import networkx as nx

    dg = nx.DiGraph(name=g.name)
    for n in g.nodes:
        dg.add_node(n.id, op=n.op.value, shape=n.shape, label=format_node(n).strip())
        for i in n.inputs:
            dg.add_edge(i, n.id)
    return dg


def to_dot(g: Graph) -> str:
    """Graphviz DOT text of `g` (for `arc inspect --dot`)."""
    lines = [f'digraph "{g.name}" {{', "  node [shape=box, fontname=monospace];"]
    for n in g.nodes:
        label = n.op.value + (f"\\n{n.attrs['w']}" if "w" in n.attrs else "")
        label += f"\\n{_fmt_shape(n.shape, n.dtype)}"
        lines.append(f'  n{n.id} [label="{label}"];')
        lines += [f"  n{i} -> n{n.id};" for i in n.inputs]
    lines.append("}")
    return "\n".join(lines)
