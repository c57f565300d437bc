"""IR Graph -> TVM Relax function, node by node, in the rows convention (arc/runtime/rows.py).

Built directly from the IR with Relax's BlockBuilder (tvm.relax, as MLC-LLM's model
definitions end up), not through torch.export + relax.frontend.torch.from_exported_program:
every IR op maps to one Relax op or one hand-scheduled TIR kernel (targets/tvm_kernels.py),
nothing has to be pattern-matched back out of an ATen graph, and the decode-critical kernels
(projections, attention) are ours to schedule rather than whatever legalization yields.
Activations are 2-D `[T, width]` (batch 1); the function's inputs and outputs keep the IR's
shapes.

Function signature (T: new tokens, L: slots read; L symbolic, T symbolic for prefill so one
function serves any prompt chunk, static for decode (1) and for each verify_B (B)):
    prefill/decode(tokens i64[1, T], pos i64[T], slots i64[L], cache, params)
    verify(tokens i64[1, T], pos i64[T], write i64[T], visible u8[T, L], cache, params)
with cache f32[2N, KV, S, D] and `params` a tuple of the engine's weight tensors (an opaque
object to the functions: `Builder.add`) in the order of `param_specs` (a block-format
weight's codes, d, m as stored; every other weight fp32), bound once at load, never baked
into the library; returns
(logits f32[1, 1|T, vocab], cache): the call's K/V rows are written into the cache in place
after its last attention has read it (`kv_rows`, arc/runtime/rows.py's reads), and the
cache is returned as the alias that orders those writes.
"""

from __future__ import annotations

import functools
from typing import Any

from arc import formats
from arc.errors import UnsupportedError
from arc.ir import Graph, KVDecl, Module, Node
from arc.ops import Op
from arc.targets import tvm_kernels as kernels
from arc.targets import tvm_vnni as vnni

INPUT_DIMS = {
    "tokens": (1, "T"),
    "pos": ("T",),
    "slots": ("L",),
    "write": ("T",),
    "visible": ("T", "L"),
}
OPAQUE = 8  # relay/relax OpPatternKind kOpaque
INPUT_DTYPES = {"i64": "int64", "bool": "uint8"}  # bool tensors cross as u8 (see tvm.py)


STATS = "logits_stats"  # the Relax function of the logits' argmax and top-k
MOVE = "kv_move"  # the Relax function copying accepted tree nodes' K/V rows into place
SAMPLE = "sample_rows"  # the Relax function drawing a sampled step's token (tvm_sample)
GET = "vm.builtin.tuple_getitem"  # a weight out of the params tuple (_Emit.w)


def graph_key(graph: Graph) -> tuple:
    """What the Relax function of `graph` depends on: its nodes without their shapes, and
    the token count it keeps static (`_static_tokens`: with STATIC_VERIFY, verify_2,
    verify_4, ... each get their own function; without, they share one)."""
    nodes = tuple(
        (n.op.value, n.inputs, tuple((k, v) for k, v in n.attrs.items() if k != "shape"))
        for n in graph.nodes
    )
    return (_static_tokens(graph), nodes)


# verify_B functions with B static (one Relax function each) rather than one function with a
# symbolic T shared by every B (A/B switch: 0 = shared)
STATIC_VERIFY = 1
BLOCK_KINDS = ("affine4", "sym8")  # formats whose blocks the kernels read as stored
BLOCK_USES = (Op.LINEAR, Op.LM_HEAD, Op.EMBED)
GGUF_SCALES = ("q4_0", "q4_1", "q8_0")  # formats whose d (and m) a GGUF stores as fp16


def _fmt(module: Module, name: str) -> tuple[str, tuple, int]:
    d = module.weights[name]
    return d.format, tuple(int(x) for x in d.shape), d.group or formats.get(d.format).group


def _uses(module: Module) -> dict[str, set[tuple[Op, str]]]:
    """Weight -> the (op, attribute) pairs that read it, over every function."""
    uses: dict[str, set] = {}
    for g in module.functions.values():
        for n in g.nodes:
            for key in ("w", "b"):
                if n.attr(key) is not None:
                    uses.setdefault(n.attrs[key], set()).add((n.op, key))
    return uses


def block_weights(module: Module) -> dict[str, tuple[str, int]]:
    """Weight -> (format kind, group) for the weights run from their blocks (q4_*, q8_0,
    int4, int8 as stored: each row dequantized in registers, exactly as arc/formats.py does);
    the others (f32, bf16, a block weight used other than as a projection's or embedding's
    `w`) are passed as fp32."""
    out = {}
    for name, used in _uses(module).items():
        fmt, _, group = _fmt(module, name)
        kind = formats.get(fmt).kind
        if kind in BLOCK_KINDS and all(op in BLOCK_USES and key == "w" for op, key in used):
            out[name] = (kind, group)
    return out


def panel_weights(module: Module, blocks: dict) -> dict[str, tuple[str, int, str]]:
    """Weight -> (kind, group, scale dtype) for the weights passed in panel layout
    (kernels.panel_specs): rows a multiple of PANEL, read only as a projection's `w` (or, for
    a block weight, also by its embedding, whose kernel reads panels too); kind "f32" for an
    fp32 weight. A GGUF's blocks (q4_0, q4_1, q8_0) keep their scales in fp16, as the file
    stores them: fewer bytes per step, the same values (tvm.py checks it at load)."""
    out = {}
    for name, used in _uses(module).items():
        shape = module.weights[name].shape
        if len(shape) != 2 or int(shape[0]) % kernels.PANEL:
            continue
        allowed = {(Op.LINEAR, "w"), (Op.LM_HEAD, "w")}
        if name in blocks:
            allowed.add((Op.EMBED, "w"))
        if used <= allowed:
            kind, group = blocks.get(name, ("f32", 0))
            gguf = formats.get(module.weights[name].format).name in GGUF_SCALES
            out[name] = (kind, group, "float16" if gguf and kind != "f32" else "float32")
    return out


def param_specs(module: Module, blocks: dict) -> dict[str, tuple[tuple, str]]:
    """Stored tensor name -> (shape, dtype) of the functions' `params` tuple, in order: a
    block weight's components, or the fp32 weight; in panel layout where `panel_weights`
    says so (tvm.py repacks them at load)."""
    panels = panel_weights(module, blocks)
    out = {}
    for name in module.used_weights():
        if name in panels:
            n, k = (int(x) for x in module.weights[name].shape)
            kind, group, scale = panels[name]
            specs = kernels.panel_specs(kind, n, k, group, scale)
            out |= {formats.tensor_name(name, s): v for s, v in specs.items()}
        elif name in blocks:
            out |= formats.tensor_specs(name, *_fmt(module, name))
        else:
            out[name] = (tuple(int(x) for x in module.weights[name].shape), "float32")
    return out


def _one_token(graph: Graph) -> bool:
    """A decode function: one new token (its T stays static)."""
    return _static_tokens(graph) == 1


def _verifies(graph: Graph) -> bool:
    """A verify function (a tree's `visible` mask among its inputs), static T or not."""
    return any(n.attrs["name"] == "visible" for n in graph.inputs())


def _static_tokens(graph: Graph) -> int | None:
    """The token count a function keeps static: 1 for a decode step, B for a verify of B
    nodes (`visible` among its inputs), None for prefill (any prompt chunk). A static T
    makes every shape but L known when the function is built: no shape heap, ~400 fewer VM
    calls a verify (`make_shape` before each allocation), its memory planned once."""
    tokens = next((n for n in graph.inputs() if n.attrs["name"] == "tokens"), None)
    if tokens is None:
        return None
    t = tuple(tokens.attrs["shape"])[-1]
    if not isinstance(t, int):  # symbolic ("T"): prefill
        return None
    return t if t == 1 or (_verifies(graph) and STATIC_VERIFY) else None


def _fewer_layers(graph: Graph) -> bool:
    """A layer-skip function that runs only some layers (draft, decode_skip<k>)."""
    return graph.name == "draft" or graph.name.startswith("decode_skip")


class Builder:
    """One Relax IRModule for a Module's functions; kernels are shared between them."""

    def __init__(
        self,
        module: Module,
        amx: bool = False,
        avx512: bool = True,
        lut: bool = False,
        plan: str | None = None,
        inlane: bool = False,
        amx_q8: bool = False,
    ):
        from tvm import relax, tirx

        self.module = module
        self.amx = amx  # multi-token block projections on AMX tiles (targets/tvm_amx.py)
        # act=q8's multi-token projections on AMX int8 tiles (targets/tvm_amx_q8.py): the
        # VNNI kernel's outputs bit for bit, so verify functions use them too
        self.amx_q8 = amx_q8
        self.lut = lut and avx512  # 4-bit codes to floats by table lookup (panel_gemv)
        # token tiles that fit the vector registers (tvm_kernels.PLANS)
        self.plan = plan or kernels.tile_plan(avx512)
        self.inlane = inlane  # AVX2: 4-bit codes widened by in-lane shuffles (panel_gemv)
        self.blocks = block_weights(module)
        self.panels = panel_weights(module, self.blocks)
        self.params = param_specs(module, self.blocks)
        self.bb = relax.BlockBuilder()
        self.dims = {"T": tirx.Var("T", "int64"), "L": tirx.Var("L", "int64")}
        self.kernels: dict[Any, Any] = {}

    def kernel(self, key: tuple, make) -> Any:
        """The GlobalVar of kernel `key`, made (and added to the module) once."""
        if key not in self.kernels:
            name = "_".join(str(k).replace(".", "p").replace("-", "m") for k in key)
            # opaque: FuseOps must not merge a scheduled kernel into a generated one
            func = make().with_attr("op_pattern", OPAQUE).without_attr("global_symbol")
            self.kernels[key] = self.bb.add_func(func, name)
        return self.kernels[key]

    def add(self, name: str, graph: Graph) -> None:
        from tvm import relax

        kv = self.module.kv
        inputs, static = [], _static_tokens(graph)
        for n in graph.inputs():
            iname = n.attrs["name"]
            if iname not in INPUT_DIMS or n.attrs["dtype"] not in INPUT_DTYPES:
                raise UnsupportedError(f"target tvm cannot lower graph input {iname!r}")
            shape = [self.dims.get(d, d) for d in INPUT_DIMS[iname]]
            if static is not None:
                shape = [static if d == "T" else self.dims.get(d, d) for d in INPUT_DIMS[iname]]
            inputs.append(relax.Var(iname, relax.TensorType(shape, INPUT_DTYPES[n.attrs["dtype"]])))
        cache_shape = [2 * kv.layers, kv.kv_heads, kv.max_seq_len + 1, kv.head_dim]
        cache = relax.Var("cache", relax.TensorType(cache_shape, "float32"))
        # the weights' tuple as an opaque object: each function takes its weights out of it
        # with their shapes declared (`_Emit.w`), so the VM checks none of the ~430 on every
        # call (a typed tuple cost 3 builtins a weight: 1,280 of a decode step's 3,600 VM
        # calls); each kernel still checks its buffers' shapes and dtypes on entry
        params = relax.Var("params", relax.ObjectType())
        # decode (one token) keeps T = 1 static: its shapes are all static but L, so its
        # memory is planned once and its projections get one-token kernels
        bounds = {"T": kv.max_seq_len, "L": kv.max_seq_len + 1}
        attrs = {"tir_var_upper_bound": bounds, "relax.memory_plan_dynamic_func_output": True}
        with self.bb.function(name, [*inputs, cache, params], attrs=attrs):
            with self.bb.dataflow():
                out = _Emit(self, graph, inputs, cache, params).run()
                gv = self.bb.emit_output(out)
            self.bb.emit_func_output(gv)

    def add_stats(self, vocab: int, chunk: int, k: int) -> None:
        """Relax function `logits_stats(logits [T, V]) -> (best i64[T], tokens i64[T, k],
        probs [T, k])` (tvm_kernels.logits_stats), which the runtime calls on every step's
        logits (greedy argmax, Token Recycling's successors)."""
        from tvm import relax

        t_len = self.dims["T"]
        logits = relax.Var("logits", relax.TensorType([t_len, vocab], "float32"))
        attrs = {"tir_var_upper_bound": {"T": self.module.kv.max_seq_len}}
        make = lambda: kernels.logits_stats(vocab, chunk, k)  # noqa: E731
        gv = self.kernel(("logits_stats", vocab, chunk, k), make)
        types = [
            relax.TensorType([t_len], "int64"),
            relax.TensorType([t_len, k], "int64"),
            relax.TensorType([t_len, k], "float32"),
        ]
        # no dataflow block: RewriteDataflowReshape inspects every call_tir in one, and takes
        # only kernels with blocks (this one is TIR without blocks)
        with self.bb.function(STATS, [logits], attrs=attrs):
            self.bb.emit_func_output(self.bb.emit(relax.call_tir(gv, [logits], types)))

    def add_sample(self, vocab: int, chunk: int, k: int) -> None:
        """Relax function `sample_rows(logits [T, V], cfg f64[T, 4], out f64[T, 5 + 2k]) -> out`
        (tvm_sample.sample_rows), written in place: the runtime keeps cfg and out and reads
        them through NumPy (torch calls right after a step cost 10-60 us each, cold)."""
        from tvm import relax

        from arc.targets import tvm_sample

        t_len = self.dims["T"]
        logits = relax.Var("logits", relax.TensorType([t_len, vocab], "float32"))
        cfg = relax.Var("cfg", relax.TensorType([t_len, len(tvm_sample.SETTINGS)], "float64"))
        out_ty = relax.TensorType([t_len, 5 + 2 * k], "float64")
        out = relax.Var("out", out_ty)
        attrs = {"tir_var_upper_bound": {"T": self.module.kv.max_seq_len}}
        make = lambda: tvm_sample.sample_rows(vocab, chunk, k)  # noqa: E731
        gv = self.kernel(("sample_rows", vocab, chunk, k), make)
        with self.bb.function(SAMPLE, [logits, cfg, out], attrs=attrs):  # no dataflow: stats
            call = relax.call_tir_inplace(gv, [logits, cfg, out], 2, out_ty)
            self.bb.emit_func_output(self.bb.emit(call))

    def add_move(self) -> None:
        """Relax function `kv_move(cache, src i64[P], dst i64[P]) -> cache`: the K/V rows of
        slots src copied to slots dst in place (tvm_kernels.kv_move), which the runtime calls
        after a verify whose accepted path is not already in place."""
        from tvm import relax

        kv = self.module.kv
        seq = kv.max_seq_len + 1
        n = self.dims["T"]
        cache_ty = relax.TensorType([2 * kv.layers, kv.kv_heads, seq, kv.head_dim], "float32")
        cache = relax.Var("cache", cache_ty)
        src = relax.Var("src", relax.TensorType([n], "int64"))
        dst = relax.Var("dst", relax.TensorType([n], "int64"))
        make = functools.partial(kernels.kv_move, kv.kv_heads, kv.head_dim, kv.layers, seq)
        gv = self.kernel(("kv_move", kv.kv_heads, kv.head_dim, kv.layers, seq), make)
        attrs = {"tir_var_upper_bound": {"T": kv.max_seq_len}}
        with self.bb.function(MOVE, [cache, src, dst], attrs=attrs):
            out = self.bb.emit(relax.call_tir_inplace(gv, [cache, src, dst], 0, cache_ty))
            self.bb.emit_func_output(out)

    def get(self):
        return self.bb.get()


class _Emit:
    """Emission state of one function: values by IR node id, weights, KV rows written."""

    def __init__(self, b: Builder, graph: Graph, inputs: list, cache, params):
        self.b, self.bb, self.graph, self.kv = b, b.bb, graph, b.module.kv
        self.inputs = {n.attrs["name"]: v for n, v in zip(graph.inputs(), inputs, strict=True)}
        self.cache, self.params = cache, params
        self.index = {w: i for i, w in enumerate(b.params)}
        self.weights: dict[str, Any] = {}
        self.written: dict[int, tuple] = {}  # layer -> ((k, at), (v, at)): `_in_place`
        self.slots: dict[int, Any] = {}  # layer -> the slots its rows go to, i64 [T]
        self.masks: dict[Any, Any] = {}
        self.tables: dict[Any, Any] = {}  # (inv_freq, scale, pos) -> RoPE's cos/sin table
        static = _static_tokens(graph)
        self.t = b.dims["T"] if static is None else static

    def emit(self, expr):
        return self.bb.emit(expr)

    def value(self, x):
        """A Relax value for `x`: a pending slice or sum (`_Pending`) is emitted now, once."""
        if isinstance(x, _Pending):
            if x.done is None:
                x.done = self.emit(x.make())
            return x.done
        return x

    def w(self, name: str):
        """Weight `name`, taken out of the params tuple once per function, its shape and dtype
        declared rather than checked (`Builder.add`)."""
        from tvm import relax

        if name not in self.weights:
            shape, dtype = self.b.params[name]
            index = relax.prim_value(self.index[name], "int64")
            ty = relax.TensorType(list(shape), dtype)
            get = relax.call_pure_packed(GET, self.params, index, ty_args=ty)
            self.weights[name] = self.emit(get)
        return self.weights[name]

    def comps(self, name: str) -> list:
        """The components of block-format weight `name`: codes, d (, m)."""
        from arc import formats

        return [self.w(t) for t in formats.tensor_specs(name, *_fmt(self.b.module, name))]

    def run(self):
        from tvm import relax

        env: dict[int, Any] = {}
        for n in self.graph.nodes:
            if n.op is Op.INPUT:
                env[n.id] = self.inputs[n.attrs["name"]]
                continue
            args = [env[i] for i in n.inputs]
            if n.op not in _TAKES_PENDING:
                args = [self.value(a) for a in args]
            env[n.id] = EMIT[n.op](self, n, *args)
        out = self.value(env[self.graph.outputs[0]])
        logits = self.emit(relax.op.expand_dims(out, 0))  # [1, T|1, V]
        return relax.Tuple([logits, self.write_rows()])

    def write_rows(self):
        """Every layer's new K and V rows into the cache, in place, after every attention has
        read it (the calls chain through the cache, so none is dropped or reordered); returns
        the cache (an alias of the input). A layer-skip function (draft, decode_skip<k>)
        writes only the layers it runs: the skipped layers' slots are not read before the full
        model rewrites them."""
        from tvm import relax

        kv, cache = self.kv, self.cache
        seq = kv.max_seq_len + 1
        for layer in range(kv.layers):
            if layer not in self.written:
                if _fewer_layers(self.graph):
                    continue
                raise UnsupportedError(f"target tvm: layer {layer} writes no KV")
            ((k, k_at), (v, v_at)), write = self.written[layer], self.slots[layer]
            key = ("kv_rows", kv.kv_heads, kv.head_dim, kv.layers, seq, k_at, v_at)
            make = functools.partial(
                kernels.kv_rows, kv.kv_heads, kv.head_dim, kv.layers, seq, k_at, v_at
            )
            args = [cache, k, v, write, relax.prim_value(layer, "int64")]
            cache = self.emit(relax.call_tir_inplace(self.b.kernel(key, make), args, 0, cache.ty))
        return cache

    def call(self, key: tuple, make, args: list, shapes: list, dtype: str = "float32"):
        """call_tir of kernel `key` with outputs of `shapes`; returns the first output."""
        from tvm import relax

        gv = self.b.kernel(key, make)
        types = [relax.TensorType(s, dtype) for s in shapes]
        out = self.emit(relax.call_tir(gv, args, types if len(types) > 1 else types[0]))
        return self.emit(relax.TupleGetItem(out, 0)) if len(types) > 1 else out


# ---------------------------------------------------------------- per-op emitters


def _linear(e: _Emit, n: Node, x):
    """x [R, K] @ w[N, K].T (+ b) -> [R, N], the weight as stored (targets/tvm_kernels.gemv)."""
    from tvm import relax

    out, k = (int(d) for d in e.b.module.weights[n.attrs["w"]].shape)
    rows = x.ty.shape[0]  # T, or 1 after LAST or in decode
    one = isinstance(rows, int) or (hasattr(rows, "value") and int(rows.value) == 1)
    w, tokens = n.attrs["w"], 1 if one else None
    if n.attr("act") == "q8":  # int8 activations x integer codes (weight-format{act=q8})
        kind, group, scale = e.b.panels.get(w, ("f32", 0, ""))
        if not vnni.applies(kind, group, k):
            raise UnsupportedError(
                f"target tvm: act=q8 needs {w} in 4-bit or 8-bit blocks of rows a multiple of "
                f"{kernels.PANEL}, read only as a projection"
            )
        amx = e.b.amx_q8 and not one
        make = lambda: vnni.panel_gemv_q8(kind, out, k, group, scale, amx=amx)  # noqa: E731
        key = ("pgemv_q8", kind, out, k, group, scale) + (("amx",) if amx else ())
        y = e.call(key, make, [x, *e.comps(w)], [[rows, out]])
    elif w in e.b.panels:  # any T: the kernel picks its token tiling at run time
        kind, group, scale = e.b.panels[w]
        args = [x, *e.comps(w)] if kind != "f32" else [x, e.w(w)]
        # AMX (another summation order) for prefill only: a verify's rows must sum as a
        # decode step's do (tvm_kernels.TILES)
        amx, plan, lut = e.b.amx and not _verifies(e.graph), e.b.plan, e.b.lut
        spec = (kind, out, k, group, scale, amx, plan, lut, e.b.inlane)
        make = lambda: kernels.panel_gemv(*spec)  # noqa: E731
        key = ("pgemv", kind, out, k, group, scale) + (("amx",) if amx else ())
        key += ("lut",) if lut else ()
        key += ("inlane",) if e.b.inlane else ()
        key += () if e.b.plan == "avx512" else (e.b.plan,)
        y = e.call(key, make, args, [[rows, out]])
    elif w in e.b.blocks:
        kind, group = e.b.blocks[w]
        key = ("qgemv", kind, out, k, group) + (("t1",) if one else ())
        make = lambda: kernels.qgemv(kind, out, k, group, tokens)  # noqa: E731
        y = e.call(key, make, [x, *e.comps(w)], [[rows, out]])
    else:
        key = ("gemv", out, k) + (("t1",) if one else ())
        make = lambda: kernels.gemv(out, k, tokens)  # noqa: E731
        y = e.call(key, make, [x, e.w(w)], [[rows, out]])
    if n.attr("b"):
        y = e.emit(relax.op.add(y, e.w(n.attrs["b"])))
    return y


def _embed(e: _Emit, n: Node, tokens):
    from tvm import relax

    w = n.attrs["w"]
    flat = e.emit(relax.op.reshape(tokens, [e.t]))  # [T]
    if w in e.b.blocks:
        kind, group = e.b.blocks[w]
        vocab, hidden = (int(d) for d in e.b.module.weights[w].shape)
        if w in e.b.panels:
            scale = e.b.panels[w][2]
            make = lambda: kernels.panel_embed(kind, vocab, hidden, group, scale)  # noqa: E731
            key = ("pembed", kind, vocab, hidden, group, scale)
        else:
            make = lambda: kernels.qembed(kind, vocab, hidden, group)  # noqa: E731
            key = ("qembed", kind, vocab, hidden, group)
        return e.call(key, make, [flat, *e.comps(w)], [[e.t, hidden]])
    return e.emit(relax.op.take(e.w(w), flat, axis=0, mode="clip"))  # [T, hidden]


class _Pending:
    """A slice, a residual sum or a SiLU not emitted yet (`kind`: slice, add, silu): its
    readers that can take it as it is do (RoPE reads q and k in place in the QKV output; an
    RMSNorm computes the sum with itself; SwiGLU's product reads gate and up in place), any
    other reader has it emitted (`_Emit.value`), once."""

    def __init__(self, make, *parts, kind: str, span: tuple[int, int] | None = None):
        self.make, self.parts, self.kind, self.span, self.done = make, parts, kind, span, None

    def fresh(self, kind: str) -> bool:
        return self.kind == kind and self.done is None


def _rmsnorm(e: _Emit, n: Node, x):
    from tvm import relax

    w, eps = e.w(n.attrs["w"]), n.attrs["eps"]
    if isinstance(x, _Pending) and x.fresh("add"):  # a residual add
        dim = int(e.b.module.weights[n.attrs["w"]].shape[0])
        make = lambda: kernels.add_rms_norm(dim, float(eps))  # noqa: E731
        shape = [x.parts[0].ty.shape[0], dim]
        out = e.emit(
            relax.call_tir(
                e.b.kernel(("add_rms_norm", dim, float(eps)), make),
                [*x.parts, w],
                [relax.TensorType(shape, "float32")] * 2,
            )
        )
        x.done = e.emit(relax.TupleGetItem(out, 0))  # the sum, for its other readers
        return e.emit(relax.TupleGetItem(out, 1))
    return e.emit(relax.op.nn.rms_norm(e.value(x), w, axes=[-1], epsilon=eps))


def _add(e: _Emit, n: Node, a, b):
    from tvm import relax

    return _Pending(lambda: relax.op.add(a, b), a, b, kind="add")


def _slice(e: _Emit, n: Node, x):
    from tvm import relax

    start, stop = n.attrs["start"], n.attrs["stop"]
    slice_ = lambda: relax.op.strided_slice(x, axes=[1], begin=[start], end=[stop])  # noqa: E731
    return _Pending(slice_, x, kind="slice", span=(start, stop))


def _silu(e: _Emit, n: Node, x):
    return _Pending(lambda: _relax_op().nn.silu(e.value(x)), x, kind="silu")


def _mul(e: _Emit, n: Node, a, b):
    """a * b; SwiGLU's silu(gate) * up over two slices of one gate/up output is one
    `silu_mul` kernel reading both in place."""
    for gate, up in ((a, b), (b, a)):
        if not (isinstance(gate, _Pending) and gate.fresh("silu")):
            continue
        sl = gate.parts[0]
        if not (isinstance(sl, _Pending) and sl.kind == "slice" and isinstance(up, _Pending)):
            continue
        if up.kind != "slice" or up.parts[0] is not sl.parts[0]:
            continue
        (a0, a1), (b0, b1), src = sl.span, up.span, sl.parts[0]
        width = a1 - a0
        if b1 - b0 != width or width % kernels.LANES:
            continue
        cols = int(src.ty.shape[1])
        make = functools.partial(kernels.silu_mul, cols, a0, b0, width)
        key = ("silu_mul", cols, a0, b0, width)
        return e.call(key, make, [src], [[src.ty.shape[0], width]])
    return e.emit(_relax_op().multiply(e.value(a), e.value(b)))


def _rope(e: _Emit, n: Node, x, pos):
    heads, d, scale = n.attrs["heads"], n.attrs["head_dim"], float(n.attr("scale", 1.0))
    width, start = None, 0
    if isinstance(x, _Pending) and x.fresh("slice"):  # in place
        node = e.graph.node(n.inputs[0])
        src = x.parts[0]
        width, start = int(src.ty.shape[1]), int(node.attrs["start"])
        x = src
    x = e.value(x)
    half = d // 2
    table = (n.attrs["w"], scale, id(pos))  # pos: a live value of this function's env
    if table not in e.tables:  # cos and sin [T, 2, D/2], once per function
        make_cs = lambda: kernels.rope_table(half, scale)  # noqa: E731
        e.tables[table] = e.call(
            ("rope_table", half, scale), make_cs, [pos, e.w(n.attrs["w"])], [[e.t, 2, half]]
        )
    key = ("rope", heads, d) + ((width, start) if width else ())
    make = lambda: kernels.rope(heads, d, width, start)  # noqa: E731
    return e.call(key, make, [x, e.tables[table]], [[e.t, heads * d]])


def _kv_write(e: _Emit, n: Node, k, v, write) -> dict[str, Any]:
    """Records the layer's new K and V rows for its attention and the cache write after it;
    a row still a slice of another output (V of the fused QKV projection) is kept as that
    output and its columns (`_in_place`), so no copy of it is made."""
    e.written[n.attrs["layer"]] = (_in_place(e, k), _in_place(e, v))
    e.slots[n.attrs["layer"]] = e.value(write)
    return {"layer": n.attrs["layer"], "write": e.slots[n.attrs["layer"]]}


def _in_place(e: _Emit, x) -> tuple[Any, tuple[int, int] | None]:
    """(buffer, (its width, first column)) of a pending column slice KV*D wide, read in place
    by the attention and kv_rows kernels; (value, None) for anything else, whose shape the
    kernels then check on entry."""
    width = e.kv.kv_heads * e.kv.head_dim
    if isinstance(x, _Pending) and x.kind == "slice" and x.span[1] - x.span[0] == width:
        src = x.parts[0]
        return src, (int(src.ty.shape[1]), x.span[0])
    return e.value(x), None


def _mask(e: _Emit, n: Node, pos, last, write):
    """u8 [T, L + T], once per function and mask kind (arc/runtime/rows.py)."""
    kind, window = n.attrs["mask"], int(n.attr("window") or 0)
    if (kind, window) not in e.masks:
        length = e.b.dims["L"]
        make = lambda: kernels.mask(kind, window)  # noqa: E731
        e.masks[kind, window] = e.call(
            ("mask", kind, window), make, [pos, last, write], [[e.t, length + e.t]], "uint8"
        )
    return e.masks[kind, window]


def _attention(e: _Emit, n: Node, q, kv: dict, pos, last):
    """Grouped-query attention over the cache's L slots plus this call's new rows."""
    from tvm import relax

    heads, kv_heads, d = n.attrs["heads"], n.attrs["kv_heads"], n.attrs["head_dim"]
    decl: KVDecl = e.kv
    if kv_heads != decl.kv_heads or d != decl.head_dim:
        raise UnsupportedError("target tvm: attention heads differ from the KV cache's")
    mask = _mask(e, n, pos, last, kv["write"])
    (k, k_at), (v, v_at) = e.written[kv["layer"]]
    length = e.b.dims["L"]
    # T > 1 (verify, prefill): a task per token and GQA group, which shares its K/V row loads
    grouped = not _one_token(e.graph) and heads > kv_heads
    pv = kernels.PV_FLOATS["avx512" if e.b.plan == "avx512" else "avx2"]
    params = (heads, kv_heads, d, decl.layers, decl.max_seq_len + 1, grouped, pv, k_at, v_at)
    key = ("attention", *params)
    make = functools.partial(kernels.attention, *params)
    layer = relax.prim_value(kv["layer"], "int64")
    shapes = [[e.t, heads * d], [heads, e.t, length + e.t]]
    return e.call(key, make, [q, k, v, e.cache, mask, pos, layer], shapes)


def _last(e: _Emit, n: Node, x):
    from tvm import relax

    y = e.emit(relax.op.strided_slice(x, axes=[0], begin=[e.t - 1], end=[e.t]))
    return e.bb.match_cast(y, relax.TensorType([1, n.shape[-1]], "float32"))  # [1, D]


EMIT = {
    Op.EMBED: _embed,
    Op.RMSNORM: _rmsnorm,
    Op.LINEAR: _linear,
    Op.SLICE: _slice,
    Op.ROPE: _rope,
    Op.KV_WRITE: _kv_write,
    Op.ATTENTION: _attention,
    Op.ADD: _add,
    Op.MUL: _mul,
    Op.SILU: _silu,
    Op.LAST: _last,
    Op.LM_HEAD: _linear,
}
OPS = frozenset(EMIT) | {Op.INPUT}
# emitters that take a `_Pending`
_TAKES_PENDING = (Op.ROPE, Op.RMSNORM, Op.SILU, Op.MUL, Op.KV_WRITE)


def _relax_op():
    from tvm import relax

    return relax.op
