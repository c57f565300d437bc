"""IR Graph -> ONNX graph, node by node, in the rows convention (arc/runtime/rows.py).

Built directly from the IR rather than through torch.onnx.export: every IR op maps to a few
standard ONNX ops, the graph is built in well under a second (an export of the same model
took 18 s, STACK-NOTES), and the forms ONNX Runtime runs fastest are chosen here:
- one-token and few-token projections are `Gemm(transB=1)` on 2-D activations, so the weights
  stay [out, in] as the engine stores them (tied embeddings share one tensor) and ORT's MLAS
  prepacks them; measured on this CPU, a 49152x576 Gemm reads its weights at ~22 GB/s for one
  token and costs 1.2x that for 8 tokens (a tree verify);
- RMSNorm is written as Pow/ReduceMean/Add/Sqrt/Div/Mul, the pattern ORT fuses into its
  SimplifiedLayerNormalization kernel;
- rotary embedding and grouped-query attention are the standard ops of opset 23
  (`RotaryEmbedding`, `Attention` with q/kv head counts and a boolean mask), one kernel each
  instead of ~20 small ops per layer;
- batch is 1, so activations are 2-D [T, width] (3-D [1, T, width] around rope and
  attention); the graph's inputs and outputs keep the IR's [1, T] / [1, T, vocab] shapes.
Weights are initializers with external data that ORT is handed from memory at load (the
engine's safetensors, not a copy inside the .onnx file).

The cache uses the rows convention's `slots` layout, [2N, S, KV*D] (arc/runtime/rows.py): each
layer's K and V over the L slots read are graph inputs `past_<2l>`, `past_<2l+1>` of
[1, L, KV*D], bound by pointer to the start of that layer's block (zero copy). Attention reads
`concat(past, new rows)` under the mask of arc/runtime/rows.py.

Graph inputs: the IR function's inputs in order, then past_0 .. past_<2N-1>.
Graph outputs: `logits` f32[1, T or 1, vocab] and `rows` f32[2N, T, KV*D].
"""

from __future__ import annotations

from typing import Any

from arc.errors import UnsupportedError
from arc.ir import Graph, KVDecl, Module, Node
from arc.ops import Op

OPSET = 23  # RotaryEmbedding and Attention
IR_VERSION = 11  # what opset 23 needs; ORT 1.31 rejects IR 14 (STACK-NOTES)
INT64_MAX = 2**63 - 1
# IR input name -> ONNX dims (the IR's static token counts become symbols: one ONNX graph
# serves every verify size, see targets/onnx.py)
INPUT_DIMS = {
    "tokens": [1, "T"],
    "pos": ["T"],
    "slots": ["L"],
    "write": ["T"],
    "visible": ["T", "L"],
}
INPUT_TYPES = {"i64": "INT64", "bool": "BOOL"}


class _Emitter:
    """Collects ONNX nodes and constants; `op` returns the name of the (first) output."""

    def __init__(self):
        from onnx import helper

        self.h, self.nodes, self.consts, self._n = helper, [], [], 0
        self.memo: dict[Any, Any] = {}

    def fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def op(self, kind: str, inputs: list[str], outputs: int = 1, **attrs: Any):
        names = [self.fresh(kind.lower()) for _ in range(outputs)]
        self.nodes.append(self.h.make_node(kind, inputs, names, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, values: list, dtype: str = "INT64", dims: list[int] | None = None) -> str:
        """A 1-D (or `dims`-shaped) constant tensor, created once per value."""
        key = (tuple(values), dtype, tuple(dims) if dims is not None else None)
        if key not in self.memo:
            import onnx

            name = self.fresh("c")
            shape = [len(values)] if dims is None else dims
            self.consts.append(
                self.h.make_tensor(name, getattr(onnx.TensorProto, dtype), shape, values)
            )
            self.memo[key] = name
        return self.memo[key]

    def scalar(self, value: float) -> str:
        return self.const([value], "FLOAT", [])


def build_model(graph: Graph, module: Module, weight_names: list[str]):
    """The ONNX ModelProto for IR `graph` (weights by name, as external initializers)."""
    import onnx

    e = _Emitter()
    env: dict[int, Any] = {}
    inputs = []
    for n in graph.inputs():
        name = n.attrs["name"]
        if name not in INPUT_DIMS:
            raise UnsupportedError(f"target onnx cannot lower graph input {name!r}")
        dtype = getattr(onnx.TensorProto, INPUT_TYPES[n.attrs["dtype"]])
        inputs.append(e.h.make_tensor_value_info(name, dtype, INPUT_DIMS[name]))
        env[n.id] = name
    inputs += _past_inputs(e, module.kv)
    graph_inputs = {n.attrs["name"]: n.attrs["name"] for n in graph.inputs()}
    ctx = _Ctx(e, module.kv, graph_inputs)
    for n in graph.nodes:
        if n.op is not Op.INPUT:
            env[n.id] = EMIT[n.op](ctx, n, *[ctx.arg(n.op, env[i]) for i in n.inputs])
    logits = e.op("Unsqueeze", [env[graph.outputs[0]], e.const([0])])  # [1, T, vocab]
    rows = ctx.rows()
    outputs = [
        e.h.make_tensor_value_info(logits, onnx.TensorProto.FLOAT, [1, "T_out", "vocab"]),
        e.h.make_tensor_value_info(rows, onnx.TensorProto.FLOAT, ["kv2", "T", "kv_width"]),
    ]
    e.nodes.append(e.h.make_node("Identity", [logits], ["logits"]))
    e.nodes.append(e.h.make_node("Identity", [rows], ["rows"]))
    outputs[0].name, outputs[1].name = "logits", "rows"
    inits = [external_initializer(w, module) for w in weight_names] + e.consts
    # one name for all: graphs that differ only in static sizes serialize the same (shared)
    g = e.h.make_graph(e.nodes, "arc", inputs, outputs, initializer=inits)
    model = e.h.make_model(g, opset_imports=[e.h.make_opsetid("", OPSET)], producer_name="arc")
    model.ir_version = IR_VERSION
    return model


def _past_inputs(e: _Emitter, kv: KVDecl) -> list:
    """past_i [1, L, KV*D]: layer i // 2's K (i even) or V over the L slots read."""
    import onnx

    width = kv.kv_heads * kv.head_dim
    return [
        e.h.make_tensor_value_info(f"past_{i}", onnx.TensorProto.FLOAT, [1, "L", width])
        for i in range(2 * kv.layers)
    ]


def external_initializer(name: str, module: Module):
    """An f32 initializer whose data ORT gets from memory at load (add_external_initializers)."""
    import onnx

    shape = [int(d) for d in module.weights[name].shape]
    t = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=shape)
    t.data_location = onnx.TensorProto.EXTERNAL
    length = 4
    for d in shape:
        length *= d
    for key, value in (("location", "weights.safetensors"), ("offset", "0"), ("length", length)):
        entry = t.external_data.add()
        entry.key, entry.value = key, str(value)
    return t


class _Ctx:
    """Emission state of one graph: the emitter, the cache layout, KV rows written so far."""

    def __init__(self, e: _Emitter, kv: KVDecl, inputs: dict[str, str]):
        self.e, self.kv, self.inputs = e, kv, inputs
        self.written: dict[int, tuple[str, str]] = {}  # layer -> (k, v) as [1, T, KV*D]
        self.three_d: set[str] = set()  # values kept [1, T, W] (rope out) for attention

    def arg(self, op: Op, x: Any) -> Any:
        """`x` as op `op` takes it: 2-D for all but KV_WRITE and ATTENTION."""
        if isinstance(x, str) and x in self.three_d and op not in (Op.KV_WRITE, Op.ATTENTION):
            return self.e.op("Squeeze", [x, self.e.const([0])])
        return x

    def rows(self) -> str:
        """rows [2N, T, KV*D]: every layer's new K then V."""
        parts = []
        for layer in range(self.kv.layers):
            if layer not in self.written:
                raise UnsupportedError(f"target onnx: layer {layer} writes no KV")
            parts += list(self.written[layer])
        return self.e.op("Concat", parts, axis=0)


# ---------------------------------------------------------------- per-op emitters


def _linear(c: _Ctx, n: Node, x: str) -> str:
    """x [T, K] @ w[N, K].T (+ b) -> [T, N]: Gemm with transB, the weight as stored."""
    ins = [x, n.attrs["w"]] + ([n.attrs["b"]] if n.attr("b") else [])
    return c.e.op("Gemm", ins, transB=1)


def _embed(c: _Ctx, n: Node, tokens: str) -> str:
    flat = c.e.op("Reshape", [tokens, c.e.const([-1])])  # [T]
    return c.e.op("Gather", [n.attrs["w"], flat], axis=0)  # [T, hidden]


def _rmsnorm(c: _Ctx, n: Node, x: str) -> str:
    e = c.e
    var = e.op("ReduceMean", [e.op("Pow", [x, e.scalar(2.0)]), e.const([-1])], keepdims=1)
    norm = e.op("Div", [x, e.op("Sqrt", [e.op("Add", [var, e.scalar(float(n.attrs["eps"]))])])])
    return e.op("Mul", [norm, n.attrs["w"]])


def _slice(c: _Ctx, n: Node, x: str) -> str:
    e = c.e
    return e.op("Slice", [x, e.const([n.attrs["start"]]), e.const([n.attrs["stop"]]), e.const([1])])


def _cos_sin(c: _Ctx, n: Node, pos: str) -> tuple[str, str]:
    """cos, sin [1, T, D/2] of the rotary angles at `pos` (once per graph)."""
    key = ("rope", pos, n.attrs["w"], n.attr("scale", 1.0))
    if key not in c.e.memo:
        e = c.e
        p = e.op("Unsqueeze", [e.op("Cast", [pos], to=1), e.const([1])])  # [T, 1] f32
        freqs = e.op("Mul", [p, n.attrs["w"]])  # [T, D/2]
        cos, sin = e.op("Cos", [freqs]), e.op("Sin", [freqs])
        scale = n.attr("scale", 1.0)
        if scale != 1.0:
            cos, sin = e.op("Mul", [cos, e.scalar(scale)]), e.op("Mul", [sin, e.scalar(scale)])
        e.memo[key] = tuple(e.op("Unsqueeze", [t, e.const([0])]) for t in (cos, sin))
    return c.e.memo[key]


def _rope(c: _Ctx, n: Node, x: str, pos: str) -> str:
    """Half-split rotary embedding (RotaryEmbedding-23, not interleaved) -> [1, T, H*D]."""
    e = c.e
    cos, sin = _cos_sin(c, n, pos)
    x3 = e.op("Unsqueeze", [x, e.const([0])])  # [1, T, H*D]
    out = e.op("RotaryEmbedding", [x3, cos, sin], num_heads=n.attrs["heads"])
    c.three_d.add(out)
    return out


def _kv_write(c: _Ctx, n: Node, k: str, v: str, write: str) -> dict[str, Any]:
    """Records the layer's new rows; k arrives [1, T, KV*D] from ROPE, v [T, KV*D]."""
    e = c.e
    if k not in c.three_d:  # k without rope (none today): make it [1, T, KV*D] too
        k = e.op("Unsqueeze", [k, e.const([0])])
    v3 = e.op("Unsqueeze", [v, e.const([0])])  # [1, T, KV*D]
    layer = n.attrs["layer"]
    c.written[layer] = (k, v3)
    return {"layer": layer, "write": write}


def _mask(c: _Ctx, n: Node, pos: str, last: str, write: str) -> str:
    """[T, L + T] bool: the IR mask over the L slots read, the slots this call writes masked
    out, then the new rows' columns (see arc/runtime/rows.py). Once per graph and mask."""
    kind, window = n.attrs["mask"], n.attr("window")
    key = ("mask", kind, window, pos, last, write)
    if key in c.e.memo:
        return c.e.memo[key]
    e = c.e
    if kind == "tree":
        length = e.op("Gather", [e.op("Shape", [last]), e.const([1])], axis=0)  # [1]
        slots = e.op(
            "Range", [e.const([0], dims=[]), e.op("Squeeze", [length]), e.const([1], dims=[])]
        )
        base = last  # visible [T, L]
    else:
        slots = last
        base = e.op("LessOrEqual", [e.op("Unsqueeze", [slots, e.const([0])]), _col(e, pos)])
    if window:
        dist = e.op("Sub", [_col(e, pos), e.op("Unsqueeze", [slots, e.const([0])])])  # [T, L]
        base = e.op("And", [base, e.op("Less", [dist, e.const([int(window)], dims=[])])])
    hit = e.op("Equal", [e.op("Unsqueeze", [slots, e.const([0])]), _col(e, write)])  # [T, L]
    hit = e.op("ReduceMax", [e.op("Cast", [hit], to=1), e.const([0])], keepdims=1)  # [1, L]
    stale = e.op("Cast", [hit], to=9)  # bool
    old = e.op("And", [base, e.op("Not", [stale])])
    new = e.op("Gather", [base, write], axis=1)  # [T, T]: column j is slot write[j]
    e.memo[key] = e.op("Concat", [old, new], axis=1)  # [T, L + T]
    return e.memo[key]


def _col(e: _Emitter, x: str) -> str:
    return e.op("Unsqueeze", [x, e.const([1])])  # [T] -> [T, 1]


def _attention(c: _Ctx, n: Node, q: str, kv: dict, pos: str, last: str) -> str:
    """Grouped-query attention (Attention-23) over the L slots read plus this call's rows."""
    e, layer = c.e, kv["layer"]
    k, v = (
        e.op("Concat", [f"past_{2 * layer + i}", new], axis=1)  # [1, L + T, KV*D]
        for i, new in enumerate(c.written[layer])
    )
    if q not in c.three_d:
        q = e.op("Unsqueeze", [q, e.const([0])])
    mask = _mask(c, n, pos, last, kv["write"])  # [T, L + T]
    out = e.op(
        "Attention",
        [q, k, v, mask],
        q_num_heads=n.attrs["heads"],
        kv_num_heads=n.attrs["kv_heads"],
        scale=float(n.attrs["head_dim"] ** -0.5),
    )  # [1, T, H*D]
    return e.op("Squeeze", [out, e.const([0])])  # [T, H*D]


def _last(c: _Ctx, n: Node, x: str) -> str:
    e = c.e
    return e.op("Slice", [x, e.const([-1]), e.const([INT64_MAX]), e.const([0])])  # [1, D]


EMIT = {
    Op.EMBED: _embed,
    Op.RMSNORM: _rmsnorm,
    Op.LINEAR: _linear,
    Op.SLICE: _slice,
    Op.ROPE: _rope,
    Op.KV_WRITE: _kv_write,
    Op.ATTENTION: _attention,
    Op.ADD: lambda c, n, a, b: c.e.op("Add", [a, b]),
    Op.MUL: lambda c, n, a, b: c.e.op("Mul", [a, b]),
    Op.SILU: lambda c, n, x: c.e.op("Mul", [x, c.e.op("Sigmoid", [x])]),
    Op.LAST: _last,
    Op.LM_HEAD: _linear,
}
OPS = frozenset(EMIT) | {Op.INPUT}
