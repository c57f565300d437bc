"""The onnx target: each IR function as an ONNX graph, run by ONNX Runtime (CPU, or CUDA where
onnxruntime-gpu and a GPU are present). Extra: `pip install 'arc-decode[onnx]'`.

The graphs follow the rows convention (arc/runtime/rows.py): the KV cache is an input bound by
pointer through IOBinding (no copy), and each call returns only its new K/V rows, which the
runtime writes into the cache. The graph file holds no weights: its initializers are external
data that ONNX Runtime is handed from the engine's safetensors at load (fp32; a weight kept in
a block format by `weight-format` is dequantized exactly to fp32 at load, and the manifest says
so). Graphs are built from the IR by targets/onnx_graph.py.

One ONNX graph can serve several IR functions: the graphs of `verify_2`, `verify_4`, ... differ
only in their static node count, so their ONNX forms (with symbolic dims) are byte-identical
and one file and one session serve them all. Each session prepacks the weights it multiplies
(MLAS), which costs a copy of them; prefill, compute-bound, runs without prepacking, so an
engine holds at most three copies of its weights (the engine's, decode's and verify's).
"""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import torch

from arc.errors import EngineError, UnsupportedError
from arc.ir import Module
from arc.lowering import as_f32, materialize
from arc.ops import Op
from arc.runtime.rows import row_steps
from arc.runtime.steps import Steps

NAME = "onnx"
DEVICES = ("cpu", "cuda")
EXTRA = "onnx"
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def installed() -> str | None:
    for mod, pkg in (("onnx", "onnx"), ("onnxruntime", "onnxruntime")):
        if importlib.util.find_spec(mod) is None:
            return f"needs {pkg}"
    return None


def check_module(module: Module) -> None:
    from arc.targets import check_ops
    from arc.targets.onnx_graph import OPS

    check_ops(module, NAME, OPS)
    for g in module.functions.values():
        if any(n.attr("act") for n in g.nodes):
            raise UnsupportedError(
                "target onnx runs projections on fp32 activations; weight-format{act=q8} "
                "lowers on the tvm target (torch: --torch-mode eager, a reference)"
            )
        written = {n.attrs["layer"] for n in g.nodes if n.op is Op.KV_WRITE}
        if written != set(range(module.kv.layers)):
            raise UnsupportedError(
                f"target onnx cannot lower function {g.name}: it writes the KV of "
                f"{len(written)} of {module.kv.layers} layers (a layer-skipped draft), and "
                "its graphs return every layer's rows"
            )


def _graphs(module: Module) -> dict[str, tuple[str, bytes]]:
    """IR function -> (artifact file, serialized ONNX model); equal models share one file."""
    from arc.targets.onnx_graph import build_model

    weights = module.used_weights()
    out, seen = {}, {}
    for name, graph in module.functions.items():
        used = [w for w in weights if any(w in n.weights() for n in graph.nodes)]
        blob = build_model(graph, module, used).SerializeToString()
        digest = hashlib.sha256(blob).hexdigest()
        seen.setdefault(digest, f"{name}.onnx")
        out[name] = (seen[digest], blob)
    return out


def build(
    module: Module, weights: dict, device: str, workdir: Path, options: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Path]]:
    import onnx
    import onnxruntime as ort

    if options.get("mode"):
        raise UnsupportedError("--torch-mode applies to the torch target, not onnx")
    # --cpu does not apply: ONNX Runtime's kernels pick the CPU's ISA at run time
    if device == "cuda" and PROVIDERS["cuda"] not in ort.get_available_providers():
        raise UnsupportedError(
            "target onnx on cuda needs onnxruntime-gpu (this onnxruntime has only "
            f"{', '.join(ort.get_available_providers())})"
        )
    workdir.mkdir(parents=True, exist_ok=True)
    artifacts, files = {}, {}
    values = _ort_values(_f32_weights(module, weights))
    for name, (file, blob) in _graphs(module).items():
        files[name] = file
        if file not in artifacts:
            path = workdir / file
            path.write_bytes(blob)
            artifacts[file] = path
            # ORT checks the graph (types, shapes, every op on this provider) as it loads it
            _session(path, values, "cpu", prepack=False)
    formats_used = sorted({module.weights[w].format for w in module.used_weights()})
    info = {
        "device": device,
        "onnxruntime_version": ort.__version__,
        "onnx_version": onnx.__version__,
        "opset": _opset(),
        "graphs": files,
        "weights_run_as": "f32",
        "weights_stored_as": formats_used,
    }
    return info, artifacts


def _opset() -> int:
    from arc.targets.onnx_graph import OPSET

    return OPSET


def check_engine(info: dict[str, Any]) -> None:
    import onnxruntime as ort

    device = info.get("device", "cpu")
    if device not in PROVIDERS:
        raise EngineError(f"engine's onnx device {str(device)[:20]!r} is not cpu or cuda")
    if PROVIDERS[device] not in ort.get_available_providers():
        raise EngineError(
            f"engine was built for onnx on {device}, and this onnxruntime has no "
            f"{PROVIDERS[device]} (install onnxruntime-gpu on a machine with a GPU)"
        )
    graphs = info.get("graphs")
    if not isinstance(graphs, dict) or not all(
        isinstance(v, str) and v.endswith(".onnx") and "/" not in v for v in graphs.values()
    ):
        raise EngineError("engine does not record its ONNX graphs; rebuild it")


def load(module: Module, weights: dict, root: Path, info: dict[str, Any], device: str) -> Steps:

    if device == "cuda" and not torch.cuda.is_available():
        raise EngineError("engine was built for CUDA but no CUDA GPU is visible here")
    tensors = _f32_weights(module, weights)
    values = _ort_values(tensors, device)
    sessions: dict[str, Any] = {}
    calls = {}
    for name in module.functions:
        file = info["graphs"].get(name)
        if file is None:
            raise EngineError(f"engine records no ONNX graph for function {name}")
        if file not in sessions:
            sessions[file] = _session(root / file, values, device, prepack=name != "prefill")
        calls[name] = _Call(sessions[file], device, module.functions[name])
    steps = row_steps(calls, module.kv, device, layout="slots")
    steps._keep_alive = (values, tensors)  # ORT reads these buffers; they outlive the sessions
    return steps


def _ort_values(tensors: dict[str, torch.Tensor], device: str = "cpu") -> dict:
    """OrtValues over the tensors' memory (CPU: shared, no copy; CUDA: one copy on the GPU,
    shared by the sessions)."""
    import onnxruntime as ort

    if device == "cuda":
        return {
            k: ort.OrtValue.ortvalue_from_numpy(t.numpy(), "cuda", 0) for k, t in tensors.items()
        }
    return {k: ort.OrtValue.ortvalue_from_numpy(t.numpy()) for k, t in tensors.items()}


def _f32_weights(module: Module, weights: dict) -> dict[str, torch.Tensor]:
    """Weight name -> contiguous fp32 CPU tensor (block formats dequantized: exact)."""
    stored = materialize(module, weights)
    return {name: as_f32(module, stored, name) for name in module.used_weights()}


def _session(path: Path, values: dict, device: str, *, prepack: bool):
    import onnx
    import onnxruntime as ort

    model = onnx.load_model(str(path), load_external_data=False)
    names = [
        t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
    ]
    missing = [n for n in names if n not in values]
    if missing:
        raise EngineError(f"{path.name} needs weights the engine lacks: {', '.join(missing[:3])}")
    so = ort.SessionOptions()
    so.intra_op_num_threads = torch.get_num_threads()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3  # warnings about unused initializers and such are not the user's
    if not prepack:
        so.add_session_config_entry("session.disable_prepacking", "1")
    so.add_external_initializers(names, [values[n] for n in names])
    try:
        return ort.InferenceSession(model.SerializeToString(), so, providers=[PROVIDERS[device]])
    except Exception as e:  # noqa: BLE001 - ORT raises its own error types
        raise EngineError(f"{path.name}: ONNX Runtime cannot load it ({str(e)[:160]})") from None


class _Call:
    """One function through IOBinding: inputs, and each layer's K/V over the slots read, by
    pointer (no copy); outputs into tensors allocated here, so CPU and CUDA take one path."""

    def __init__(self, session, device: str, graph):
        self.session, self.device = session, device
        names = [i.name for i in session.get_inputs()]
        self.feeds = [k for k in names if not k.startswith("past_")]
        self.pasts = len(names) - len(self.feeds)
        want = [n.attrs["name"] for n in graph.inputs()]
        if self.feeds != want or names[len(want) :] != [f"past_{i}" for i in range(self.pasts)]:
            raise EngineError(f"{graph.name}: the ONNX graph's inputs are not the IR's; rebuild")
        out = graph.node(graph.outputs[0])
        self.last, self.vocab = out.shape[1] == 1, int(out.shape[2])  # logits [1, 1|T, vocab]
        self.io = session.io_binding()

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        import numpy as np

        io, dev = self.io, self.device
        *feeds, cache = args  # cache [2N, S, KV*D]
        feeds = [t.contiguous() for t in feeds]  # held until the run returns
        for name, t in zip(self.feeds, feeds, strict=True):
            io.bind_input(name, dev, 0, _NP[t.dtype], list(t.shape), t.data_ptr())
        length = int(feeds[-1].shape[-1])  # L: slots [L] or visible [B, L]
        shape, step = [1, length, cache.shape[2]], cache.stride(0) * cache.element_size()
        base = cache.data_ptr()
        for i in range(self.pasts):  # the first L slots of layer block i: contiguous
            io.bind_input(f"past_{i}", dev, 0, np.float32, shape, base + i * step)
        t_in = int(feeds[0].shape[1])
        logits = torch.empty((1, 1 if self.last else t_in, self.vocab), device=cache.device)
        rows = torch.empty((cache.shape[0], t_in, cache.shape[2]), device=cache.device)
        io.bind_output("logits", dev, 0, np.float32, list(logits.shape), logits.data_ptr())
        io.bind_output("rows", dev, 0, np.float32, list(rows.shape), rows.data_ptr())
        self.session.run_with_iobinding(io)
        return logits, rows


def _np_types() -> dict:
    import numpy as np

    return {torch.int64: np.int64, torch.bool: np.bool_, torch.float32: np.float32}


_NP = _np_types()
