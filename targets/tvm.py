"""The tvm target: the IR as one TVM Relax module, compiled for llvm (CPU) into one shared
library stored in the engine. Extra: `pip install 'arc-decode[tvm]'`.

Lowering: Relax is built directly from the IR nodes (targets/tvm_graph.py, relax.BlockBuilder,
as MLC-LLM builds its models), not through torch.export + relax.frontend.torch: each IR op
is one Relax op or one hand-scheduled TIR kernel (targets/tvm_kernels.py), so the kernels that
decide decode speed (the weight-streaming GEMV, attention) are scheduled here instead of left
to legalization, and there is no ATen graph to pattern-match back. The rest (RMSNorm, SiLU,
adds, slices, the rows output) are Relax ops that TVM's default CPU pipeline
(tvm.relax.backend.cpu_generic: LegalizeOps, FuseOps, FuseTIR, ...) lowers and fuses.

Calling convention: rows (arc/runtime/rows.py), as the onnx target. Every function takes its
IR inputs, the whole KV cache (read only, passed by pointer through DLPack), and a tuple of
the weights; it returns (logits, rows) and the runtime writes the rows into the cache. The
library holds no weights: they are the engine's safetensors, handed to every call as one
tuple of DLPack views made once at load. A weight in a block format (q4_0/q4_1/q8_0 kept from
a GGUF by `weight-format`, or int4/int8) is passed as its stored blocks and each row is
dequantized inside the projection kernel with arc/formats.py's math (w = d*q + m), so a
decode step reads the packed bytes (111 MB for smollm2-135m at -O1 instead of 538 MB of
fp32); every other weight (f32, bf16) runs as fp32, bf16 widened exactly at load.

L (slots read) is symbolic, and T (new tokens) too for prefill; decode keeps T = 1 and
each verify_B its B static (one Relax function per size, `graph_key`: a shared function with
a symbolic T cost a 2-node verify 0.26-0.36 ms more on the AMD EPYC, its shapes computed and
its memory allocated at run time). Prefill, decode and the verifies share their kernels: one
library, built once.

The library is native code: the manifest records the tvm version, the llvm `mcpu` and the
CPU extensions that code may use (arc/cpu.py, `--cpu`), and check_engine refuses, before
loading it, an engine built by another tvm or for extensions this CPU lacks.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path
from typing import Any

import torch

from arc import cpu as arc_cpu
from arc import formats
from arc.errors import ArcError, EngineError, UnsupportedError
from arc.ir import Module
from arc.lowering import as_f32, materialize
from arc.ops import Op
from arc.runtime import hugepages
from arc.runtime.rows import row_steps
from arc.runtime.steps import Steps

NAME = "tvm"
DEVICES = ("cpu",)
EXTRA = "tvm"
LIBRARY = "model.so"
ALIGN = 64  # bytes: TVM's kernels assume their buffers are aligned to this
LAYOUT = "panel16-h"  # how projection weights reach the kernels (tvm_kernels.panel_specs)
STATS_OUT = ["best", "tokens", "probs"]  # logits_stats outputs (tvm_kernels.logits_stats)
# --cpu level -> llvm mcpu (native: the host CPU's name, as LLVM knows it)
MCPU = {"x86-64-v3": "x86-64-v3", "x86-64-v4": "x86-64-v4"}


def installed() -> str | None:
    if importlib.util.find_spec("tvm") is None:
        return "needs apache-tvm"
    return None


def check_module(module: Module) -> None:
    from arc.targets import check_ops
    from arc.targets.tvm_graph import OPS
    from arc.targets.tvm_kernels import LANES

    check_ops(module, NAME, OPS)
    for g in module.functions.values():
        for n in g.nodes:
            if n.op is Op.ATTENTION and n.attrs["head_dim"] % LANES:
                raise UnsupportedError(
                    f"target tvm cannot lower attention with head_dim {n.attrs['head_dim']} "
                    f"(a multiple of {LANES} is needed)"
                )


def _relax_module(
    module: Module,
    amx: bool = False,
    avx512: bool = True,
    lut: bool = False,
    plan: str | None = None,
    inlane: bool = False,
    amx_q8: bool = False,
) -> tuple[Any, dict[str, str], list[str]]:
    """(Relax IRModule, IR function -> Relax function, tensors of the params tuple), and
    `logits_stats` where the vocabulary splits into chunks (`_stats_chunk`). `avx512`: the
    build's CPU has AVX-512's 32 vector registers (the panel kernels' token tiles fit them);
    `lut`: and AVX-512 VBMI, so 4-bit codes become floats by table lookup (tvm_kernels);
    `plan`: the panel kernels' token tiles (tvm_kernels.PLANS; default by `avx512`);
    `inlane`: AVX2 code widening 4-bit codes by in-lane shuffles (tvm_kernels.widen_inlane);
    `amx_q8`: act=q8 projections of tvm_amx_q8.MIN_TOKENS or more tokens on AMX int8 tiles."""
    from arc.runtime.topk import TOPK
    from arc.targets.tvm_graph import Builder, graph_key

    builder, functions, seen = Builder(module, amx, avx512, lut, plan, inlane, amx_q8), {}, {}
    for name, graph in module.functions.items():
        key = graph_key(graph)
        if key not in seen:
            seen[key] = name
            builder.add(name, graph)
        functions[name] = seen[key]
    chunk = _stats_chunk(module)
    if chunk:
        builder.add_stats(_vocab(module), chunk, TOPK)
        builder.add_sample(_vocab(module), chunk, TOPK)
    if _verifies(module):
        builder.add_move()
    return builder.get(), functions, list(builder.params)


def _vocab(module: Module) -> int:
    for g in module.functions.values():
        for n in g.nodes:
            if n.op is Op.LM_HEAD:
                return int(module.weights[n.attrs["w"]].shape[0])
    return 0


def _verifies(module: Module) -> bool:
    """A speculative module: the runtime moves accepted tree rows (`kv_move`)."""
    return any(name.startswith("verify_") for name in module.functions)


def _stats_chunk(module: Module) -> int:
    """The chunk of arc/runtime/topk.py when the library gets `logits_stats` (the
    vocabulary splits into chunks), else 0. Every engine gets it: greedy decoding takes each
    step's argmax from it, and a speculative one Token Recycling's successors."""
    from arc.runtime.topk import CHUNK, TOPK
    from arc.targets.tvm_kernels import LANES

    vocab = _vocab(module)
    ok = vocab and vocab % CHUNK == 0 and CHUNK % LANES == 0 and vocab // CHUNK >= 2 * TOPK
    return CHUNK if ok else 0


def _target(cpu: str, q8: bool = False) -> tuple[Any, dict[str, Any]]:
    """The llvm target for `--cpu cpu` and what the manifest records of it. A native build
    on a CPU with AMX (tvm_amx.FLAGS) runs multi-token projections on AMX tiles, unless
    ARC_TVM_AMX=0 (to compare the two). `q8`: the module has act=q8 projections, whose
    kernel needs AVX-512 VNNI and VBMI (tvm_vnni.FLAGS): refused where a native build's CPU
    lacks them; a level build (x86-64-v4) records them as needed by the engine."""
    import tvm

    from arc.targets import tvm_amx, tvm_amx_q8, tvm_kernels, tvm_vnni

    march, flags = arc_cpu.build_target(cpu)
    if q8:
        missing = sorted(tvm_vnni.FLAGS - flags)
        if missing and (march == "native" or "avx512f" not in flags):
            raise UnsupportedError(
                f"weight-format{{act=q8}} on the tvm target needs AVX-512 VNNI and VBMI; "
                f"--cpu {cpu} lacks {', '.join(missing)} (build without act=q8, or with "
                "--cpu x86-64-v4 for a CPU that has them)"
            )
        flags = flags | tvm_vnni.FLAGS
    mcpu = MCPU.get(march) or tvm.target.codegen.llvm_get_system_cpu()
    spec = {"kind": "llvm", "mcpu": mcpu, "num-cores": os.cpu_count() or 1}
    native_amx = march == "native" and os.environ.get("ARC_TVM_AMX") != "0"
    amx = native_amx and tvm_amx.usable(flags)  # fp32 prefill on bf16 tiles
    amx_q8 = native_amx and q8 and tvm_amx_q8.usable(flags)  # act=q8 verify/prefill on int8
    mattr = (tvm_amx.MATTR if amx else []) + (tvm_vnni.MATTR if q8 else [])
    mattr += [f for f in tvm_amx_q8.MATTR if f not in mattr] if amx_q8 else []
    if mattr:  # LLVM's name for this CPU (a VM's) may not say it has AMX (or VNNI)
        spec["mattr"] = mattr
    # 4-bit codes to floats by vpermb + vpermps (tvm_kernels.panel_gemv), unless ARC_TVM_LUT=0
    lut = tvm_kernels.LUT_FLAGS <= set(flags) and os.environ.get("ARC_TVM_LUT") != "0"
    # "amx": the library runs AMX tiles (the loader asks Linux first); "amx_f32", "amx_q8":
    # which of its kernels do (tvm_amx, tvm_amx_q8)
    record = {"cpu": cpu, "march": mcpu, "cpu_flags": sorted(flags), "lut": lut}
    record |= {"amx": amx or amx_q8, "amx_f32": amx, "amx_q8": amx_q8}
    # the panel kernels' token tiles: by the registers, and for AVX2 whether the code runs
    # on this CPU (tvm_kernels.TILES_AVX2_NATIVE) or on any x86-64-v3 one; ARC_TVM_TILES=name
    # picks another plan of the same registers (to compare them)
    record["tiles"] = tvm_kernels.tile_plan("avx512f" in flags, march == "native")
    asked = os.environ.get("ARC_TVM_TILES")
    if asked:
        fits = [p for p in tvm_kernels.PLANS if ("avx512f" in flags) == (p == "avx512")]
        if asked not in fits:
            raise ArcError(f"ARC_TVM_TILES={asked[:20]!r}: choose {', '.join(fits)} on this CPU")
        record["tiles"] = asked
    # AVX2 plans widen 4-bit codes with vpshufb (x86 only: a native build elsewhere does not)
    record["inlane"] = record["tiles"] in tvm_kernels.INLANE_PLANS and "avx2" in flags
    return tvm.target.Target(spec), record | {"cpu_name": arc_cpu.host_name()}


def build(
    module: Module, weights: dict, device: str, workdir: Path, options: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Path]]:
    import tvm

    from arc.targets.tvm_graph import MOVE, SAMPLE, STATS
    from arc.targets.tvm_sample import OUTPUTS, SETTINGS

    if options.get("mode"):
        raise UnsupportedError("--torch-mode applies to the torch target, not tvm")
    if device != "cpu":
        raise UnsupportedError(f"target tvm builds for cpu only, not {device}")
    check_module(module)
    q8 = any(n.attr("act") == "q8" for g in module.functions.values() for n in g.nodes)
    target, cpu_info = _target(options.get("cpu") or "native", q8)
    avx512 = "avx512f" in cpu_info["cpu_flags"]
    mod, functions, names = _relax_module(
        module,
        cpu_info["amx_f32"],
        avx512,
        cpu_info["lut"],
        cpu_info["tiles"],
        cpu_info["inlane"],
        cpu_info["amx_q8"],
    )
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LIBRARY
    executable = tvm.compile(mod, target=target)
    executable.export_library(str(path))
    formats_used = sorted({module.weights[w].format for w in module.used_weights()})
    blocks = sorted({module.weights[w].format for w in _blocks(module)})
    info = {
        "device": device,
        "tvm_version": tvm.__version__,
        "library": LIBRARY,
        "functions": functions,
        "params": names,
        "weights_run_as": blocks + ["f32"],  # block formats read as stored, the rest fp32
        # projections over blocks: fp32 activations, or int8 ones by VNNI (act=q8)
        "activations": "q8" if q8 else "f32",
        "layout": LAYOUT,
        "weights_stored_as": formats_used,
        **cpu_info,
    }
    if _stats_chunk(module):
        from arc.runtime.topk import TOPK

        chunk = _stats_chunk(module)
        info["stats"] = {"function": STATS, "chunk": chunk, "k": TOPK, "outputs": STATS_OUT}
        info["sample"] = {
            "function": SAMPLE,
            "chunk": chunk,
            "k": TOPK,
            "settings": SETTINGS,
            "outputs": OUTPUTS,
        }
    if _verifies(module):
        info["move"] = MOVE
        # each verify node's logits are a decode step's at its position, to the bit (the tile
        # plans' summation order, TILES; tested): the loop may decide near ties on them
        info["verify_exact"] = True
    return info, {LIBRARY: path}


def check_engine(info: dict[str, Any]) -> None:
    """Refuse, before loading its library, an engine this machine or this tvm cannot run."""
    import tvm

    if info.get("device", "cpu") != "cpu":
        raise EngineError(f"engine's tvm device {str(info.get('device'))[:20]!r} is not cpu")
    if info.get("tvm_version") != tvm.__version__:
        raise EngineError(
            f"engine's library was built by tvm {str(info.get('tvm_version'))[:40]}, this is "
            f"tvm {tvm.__version__}: rebuild it"
        )
    functions, params = info.get("functions"), info.get("params")
    if (
        info.get("library") != LIBRARY
        or not isinstance(functions, dict)
        or not all(isinstance(v, str) and re.fullmatch(r"\w+", v) for v in functions.values())
        or not isinstance(params, list)
        or not all(isinstance(p, str) for p in params)
    ):
        raise EngineError("engine does not record its TVM library and functions; rebuild it")
    if info.get("layout") != LAYOUT:
        raise EngineError(
            f"engine's TVM library takes weights in layout {str(info.get('layout'))[:20]!r}, "
            f"this arc passes {LAYOUT!r}: rebuild it"
        )
    flags = info.get("cpu_flags")
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise EngineError("engine does not record the CPU extensions its code needs; rebuild it")
    if not isinstance(info.get("amx", False), bool):
        raise EngineError("engine's manifest has a bad 'amx' entry; rebuild it")
    missing = arc_cpu.missing_flags(flags)
    if missing:
        built = f"mcpu={info.get('march')} on {info.get('cpu_name', 'another CPU')}"
        raise EngineError(
            f"engine's native code needs CPU extensions this CPU lacks: {', '.join(missing)} "
            f"(built with {built}); rebuild it on this machine or with --cpu x86-64-v3"
        )


def load(module: Module, weights: dict, root: Path, info: dict[str, Any], device: str) -> Steps:
    import tvm
    from tvm.runtime.vm import VirtualMachine  # relax.VirtualMachine, in the runtime library

    from arc.targets.tvm_graph import MOVE, SAMPLE, STATS, param_specs
    from arc.targets.tvm_sample import OUTPUTS, SETTINGS

    names = list(param_specs(module, _blocks(module)))
    if info["params"] != names:
        raise EngineError("engine's TVM library takes other weights than its module has")
    if info.get("amx"):
        from arc.targets import tvm_amx

        why = tvm_amx.request()
        if why:
            raise EngineError(f"engine's library uses AMX, which this process may not: {why}")
    # TVM's thread pool reads this when it starts (its default here is one thread)
    os.environ.setdefault("TVM_NUM_THREADS", str(torch.get_num_threads()))
    # torch only glues here (cache row writes, masks, sampling): its OpenMP workers would
    # spin after each tiny op on the cores TVM's pool computes on (libgomp took 6% of a
    # verify's samples), so torch runs on the calling thread
    torch.set_num_threads(1)
    tensors = _param_tensors(module, weights)
    # one mapping on huge pages, each weight ALIGN-byte aligned (arc/runtime/hugepages.py)
    aligned = hugepages.arena([tensors.pop(name) for name in names], ALIGN)
    params = tvm.runtime.convert([tvm.runtime.from_dlpack(t) for t in aligned])
    vm = VirtualMachine(tvm.runtime.load_module(str(root / LIBRARY)), tvm.cpu())
    calls = {}
    for name in module.functions:
        fn = info["functions"].get(name)
        if fn is None:
            raise EngineError(f"engine records no TVM function for {name}")
        calls[name] = _Call(vm[fn], params)
    move = _Move(_library_fn(vm, MOVE)) if info.get("move") == MOVE else None
    steps = row_steps(calls, module.kv, device, move=move)
    steps._keep_alive = (vm, params, aligned)  # the library reads these buffers
    steps.verify_exact = info.get("verify_exact") is True  # older engines: not recorded
    stats = info.get("stats")  # absent where the vocabulary does not split into chunks
    if stats is not None:
        from arc.runtime.topk import TOPK

        if not isinstance(stats, dict) or stats.get("outputs") != STATS_OUT:
            raise EngineError(f"engine records an unknown {STATS}; rebuild it")
        if stats.get("k") != TOPK:
            raise EngineError(f"engine's {STATS} keeps top-{stats.get('k')}, not {TOPK}")
        steps.logit_stats = _Stats(_library_fn(vm, STATS), TOPK)
    sample = info.get("sample")  # absent from engines built before it (2026-12-06)
    if sample is not None:
        from arc.runtime.topk import TOPK

        known = isinstance(sample, dict) and sample.get("settings") == SETTINGS
        if not known or sample.get("outputs") != OUTPUTS:
            raise EngineError(f"engine records an unknown {SAMPLE}; rebuild it")
        if sample.get("k") != TOPK:
            raise EngineError(f"engine's {SAMPLE} keeps top-{sample.get('k')}, not {TOPK}")
        steps.sample_rows = _Sample(_library_fn(vm, SAMPLE), TOPK)
    return steps


def _library_fn(vm, name: str):
    """The library's Relax function `name`, or one line saying it has none."""
    try:
        return vm[name]
    except (AttributeError, TypeError, ValueError) as e:
        raise EngineError(f"engine's TVM library has no usable {name} ({e})") from None


def _blocks(module: Module) -> dict[str, tuple[str, int]]:
    from arc.targets.tvm_graph import block_weights

    return block_weights(module)


def _param_tensors(module: Module, weights: dict) -> dict[str, torch.Tensor]:
    """Stored tensor name -> CPU tensor for the params tuple: a block weight's components as
    stored, every other weight as fp32 (dequantized exactly, as the onnx target does)."""
    from arc.targets.tvm_graph import panel_weights
    from arc.targets.tvm_kernels import to_panels

    stored = materialize(module, weights)
    blocks = _blocks(module)
    panels = panel_weights(module, blocks)
    out = {}
    for name in module.used_weights():
        if name in blocks:  # codes, d (, m) as stored
            names = [formats.tensor_name(name, s) for s in ("", "d", "m")]
            comps = {t: stored[t] for t in names if t in stored}
        else:
            comps = {name: as_f32(module, stored, name)}
        if name in panels:  # the same values, rows moved innermost
            comps = {t: to_panels(c) for t, c in comps.items()}
            if panels[name][2] == "float16":  # a GGUF's scales: fp16 in the file
                comps = {t: c if t == name else _fp16(name, c) for t, c in comps.items()}
        out |= comps
    return out


def _fp16(name: str, t: torch.Tensor) -> torch.Tensor:
    """`t` (a GGUF block weight's scales) in fp16, which must hold it exactly."""
    h = t.to(torch.float16)
    if not torch.equal(h.to(t.dtype), t):
        raise EngineError(f"engine's weight {name[:80]}: its scales are not the GGUF's fp16 values")
    return h


class _CacheView:
    """The cache tensor as a TVM tensor by DLPack (no copy), made again only when the runtime
    hands another tensor."""

    def __init__(self):
        self.view: tuple[tuple, Any] | None = None

    def _cache(self, cache: torch.Tensor):
        import tvm

        key = (cache.data_ptr(), tuple(cache.shape))
        if self.view is None or self.view[0] != key:
            self.view = (key, tvm.runtime.from_dlpack(cache))
        return self.view[1]


class _Call(_CacheView):
    """One Relax function in the rows convention: inputs and cache by DLPack (no copy of the
    cache), weights as the one tuple made at load; outputs back to torch without a copy."""

    def __init__(self, fn, params):
        super().__init__()
        self.fn, self.params = fn, params

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, None]:
        """(logits, None): the library writes the call's K/V rows into the cache itself
        (tvm_kernels.kv_rows), so there are no rows for arc/runtime/rows.py to write."""
        import tvm

        *feeds, cache = args
        out = self.fn(
            *[tvm.runtime.from_dlpack(_feed(t)) for t in feeds], self._cache(cache), self.params
        )
        return torch.from_dlpack(out[0]), None  # out[1]: the cache, written in place


def _feed(t: torch.Tensor) -> torch.Tensor:
    """An input as the kernels take it: contiguous and ALIGN-byte aligned (a copy only where
    it is not, as a decode step's one-slot view of the positions), a bool mask as the same
    bytes read as u8 (the kernels read u8 masks). Each copy is a torch call after a step,
    whose caches it finds cold (~10 us); the runtime's own feed buffers (Steps.verify_tree,
    Steps.step) and the slots read (a view from slot 0) need none."""
    if not t.is_contiguous() or t.data_ptr() % ALIGN:
        t = t.clone(memory_format=torch.contiguous_format)  # torch's allocator aligns to 64
    return t.view(torch.uint8) if t.dtype == torch.bool else t


class _Move(_CacheView):
    """`(cache, src, dst)`: the library's kv_move, the accepted rows copied in place."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def __call__(self, cache: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> None:
        import tvm

        src, dst = (t.to(torch.long).contiguous() for t in (src, dst))
        self.fn(self._cache(cache), tvm.runtime.from_dlpack(src), tvm.runtime.from_dlpack(dst))


class _Stats:
    """`logits [n, V] -> (argmax i64[n] or -1, top-k tokens i64[n, k], their probabilities
    [n, k])` by the library's logits_stats kernel, which arc/runtime/topk.py takes in place of
    torch passes over the logits."""

    def __init__(self, fn, k: int):
        self.fn, self.k = fn, k

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import tvm

        out = self.fn(tvm.runtime.from_dlpack(logits.contiguous()))
        return torch.from_dlpack(out[0]), torch.from_dlpack(out[1]), torch.from_dlpack(out[2])


class _Sample:
    """`(logits [n, V], temperature, top_p, top_k, us) -> [[token or -1, max, cut, mass,
    total, k top tokens, their probabilities]] * n`, row i drawn with the uniform us[i], by
    the library's sample_rows kernel (targets/tvm_sample.py), which arc/runtime/sampling.py's
    Sampler takes in place of its torch passes. Settings and results go through buffers kept
    per row count, written and read by NumPy: right after a decode step each torch call costs
    10-60 us (cold caches), and making them per call took 0.07 of the call's 0.12 ms."""

    def __init__(self, fn, k: int):
        self.fn, self.k = fn, k
        self.bufs: dict[int, tuple] = {}  # rows -> (cfg, out) as (tvm view, NumPy view)

    def __call__(self, logits: torch.Tensor, temperature, top_p, top_k, us: list[float]):
        import tvm

        n = len(us)
        if n not in self.bufs:
            cfg = torch.zeros(n, 4, dtype=torch.float64)
            out = torch.zeros(n, 5 + 2 * self.k, dtype=torch.float64)
            self.bufs[n] = tuple((tvm.runtime.from_dlpack(t), t.numpy()) for t in (cfg, out))
        (cfg, cfg_np), (out, out_np) = self.bufs[n]
        cfg_np[:, 0], cfg_np[:, 1], cfg_np[:, 2], cfg_np[:, 3] = temperature, top_p, us, top_k
        x = logits if logits.dim() == 2 else logits.reshape(n, -1)
        self.fn(tvm.runtime.from_dlpack(x.contiguous()), cfg, out)
        return out_np.tolist()
