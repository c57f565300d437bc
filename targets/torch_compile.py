"""The torch target: IR -> torch modules -> an AOTInductor package per function (CPU or CUDA).

Modes (`--torch-mode`):
  aot    torch.export with dynamic T (new tokens) and L (slots read), compiled ahead of time by
         AOTInductor into one .pt2 per IR function, stored in the engine. Weights stay out of
         the .so (`aot_inductor.package_constants_in_so=False`): the engine's safetensors are
         bound at load as user-managed constants, so prefill and decode share one copy of the
         weights and one KV cache, which the compiled code updates in place.
  jit    no artifact; torch.compile at load (in-process use; first call compiles).
  eager  no artifact; the lowered modules run as they are (the reference, and for debugging;
         on CUDA, the default there, the steps are replayed from CUDA graphs).
The AOT package is tied to the torch version and, on CUDA, to the GPU arch: both are recorded
and checked before the package is loaded.

Binding (`bind`, recorded in the manifest):
  constants  (CPU default) weights and KV cache are the package's user-managed constants.
  inputs     (CUDA default) weights and KV cache are trailing inputs of every call, in the order
             recorded in the manifest; the KV inputs are mutated in place. On CUDA (torch 2.11,
             H100/H200) a package with user-managed constants crashed at load, while input
             mutation is plain AOTInductor; arguments cost ~1 us each per call, and on CUDA
             the decode step is replayed from a CUDA graph anyway (arc/runtime/cuda_graph.py).
On CUDA the slot count L is static (the whole cache; dynamic L leaves stride guards export
cannot prove) and attention is written out (SDPA's kernel choice guards strides too).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from arc import cpu as arc_cpu
from arc.errors import EngineError, UnsupportedError
from arc.ir import KV_DTYPES, Graph, Module, dumps
from arc.lowering import lower
from arc.ops import Op
from arc.runtime.steps import Steps, ring_of
from arc.targets import torch_jobs

NAME = "torch"
DEVICES = ("cpu", "cuda")
EXTRA = None
OPS = frozenset(Op)
MODES = ("aot", "jit", "eager")


def installed() -> str | None:
    return None  # torch is a core dependency


def check_module(module: Module) -> None:
    from arc.ops import MASK_KINDS
    from arc.targets import check_ops

    check_ops(module, NAME, OPS, kv_dtypes=KV_DTYPES, masks=MASK_KINDS, kv_merge=True)


def _device_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"torch_version": torch.__version__}
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        info |= {"gpu_arch": f"sm_{major}{minor}", "gpu_name": torch.cuda.get_device_name()}
    return info


def build(
    module: Module, weights: dict, device: str, workdir: Path, options: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Path]]:
    # eager by default on CUDA: AOT packages crash torch 2.11's loader on the GPUs tried (see
    # targets/aoti_probe.py); --torch-mode aot builds one and checks that it loads
    mode = options.get("mode") or ("aot" if device == "cpu" else "eager")
    if mode not in MODES:
        raise UnsupportedError(f"torch mode {mode!r}; choose from {', '.join(MODES)}")
    if mode != "eager" and any(n.attr("act") for g in module.functions.values() for n in g.nodes):
        # weight-format{act=q8}: lowering.py's form dequantizes each weight per call (the
        # value, for eval and as a reference), no integer kernel: a slow engine, so refused
        raise UnsupportedError(
            "target torch runs weight-format{act=q8} only with --torch-mode eager (a "
            "reference); its int8 kernels are the tvm target's"
        )
    info = {"mode": mode, "device": device, **_device_info(device)}
    if mode != "aot":
        return info, {}
    bind = options.get("bind") or ("inputs" if device == "cuda" else "constants")
    if bind not in BINDS:
        raise UnsupportedError(f"torch bind {bind!r}; choose from {', '.join(BINDS)}")
    info |= {"bind": bind, "static_slots": bool(options.get("static_slots", device == "cuda"))}
    workdir.mkdir(parents=True, exist_ok=True)
    job = {
        "device": device,
        "cpu": options.get("cpu") or "native",
        "bind": bind,
        "static_slots": info["static_slots"],
        "kernels": _kernels(info),
        "workdir": str(workdir),
    }
    with cpu_build(device, job["cpu"]) as cpu_info:
        build_one, fns = builder(module, weights, job)
        if bind == "inputs":
            info["inputs"] = {name: _buffer_names(fn) for name, fn in fns.items()}
        names = list(fns)
        # CUDA: one by one, each package load-checked before the rest are built
        jobs = 1 if device == "cuda" else torch_jobs.jobs_for(len(names), _nbytes(weights))
        if jobs == 1:
            for name in names:
                build_one(name)
        else:
            with tempfile.TemporaryDirectory(prefix="jobs-", dir=workdir.parent) as tmp:
                jobdir = Path(tmp)
                (jobdir / "module.json").write_text(dumps(module))
                save_file(
                    {k: v.contiguous() for k, v in weights.items()},
                    str(jobdir / "weights.safetensors"),
                )
                torch_jobs.build_all(names, build_one, jobdir, job, jobs)
    artifacts = {f"{name}.pt2": workdir / f"{name}.pt2" for name in names}
    return info | cpu_info, artifacts


BINDS = ("constants", "inputs")


def builder(module: Module, weights: dict, job: dict[str, Any]):
    """(build_one, lowered functions): `build_one(name)` AOT-compiles function `name` of
    `module` into `job["workdir"]/name.pt2` (torch_jobs runs it in several processes)."""
    device = job["device"]
    fns, _ = lower(module, weights, device, **job["kernels"])

    def build_one(name: str) -> None:
        fn = fns[name]
        if job["bind"] == "inputs":
            fn = _WithBuffers(fn, _buffer_names(fn))
        path = Path(job["workdir"]) / f"{name}.pt2"
        _aot_compile(
            fn, module.functions[name], module.kv.max_seq_len, device, path, job["static_slots"]
        )
        if device == "cuda":
            from arc.targets import aoti_probe

            aoti_probe.check_loads(path, cached=False)  # before building the rest

    return build_one, fns


def _buffer_names(fn: torch.nn.Module) -> list[str]:
    """The weight and KV tensors that bind=inputs appends to every call, in order."""
    return [k for k, _ in fn.named_buffers()]


def _nbytes(weights: dict) -> int:
    return sum(t.numel() * t.element_size() for t in weights.values())


class _WithBuffers(torch.nn.Module):
    """`fn(*feeds)` as `forward(*feeds, *buffers)`: the weights and KV cache become inputs
    (the KV ones mutated in place), in the order of `names`."""

    def __init__(self, fn: torch.nn.Module, names: list[str]):
        super().__init__()
        self.names = names
        # not a submodule: export would lift its buffers too, aliasing the inputs
        self.__dict__["fn"] = fn

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        feeds = args[: len(args) - len(self.names)]
        bound = dict(zip(self.names, args[len(feeds) :], strict=True))
        return torch.func.functional_call(self.fn, bound, feeds)


@contextmanager
def cpu_build(device: str, cpu: str) -> Iterator[dict[str, Any]]:
    """Build CPU code for `--cpu cpu` (see arc.cpu), and yield what the manifest records of it:
    `cpu`, `march`, `cpu_flags` (the extensions the code may use), `cpu_name`.

    Inductor passes `-march` (default native) and, on top of it, its vector ISA's own options
    (`-mavx512vnni`, `-mamx-tile`, ... where this CPU has them). So both are set here: the
    march, and the vector ISAs Inductor may pick, cut to those within the march's extensions.
    """
    if device != "cpu":
        yield {}
        return
    import torch._inductor.config as inductor_config
    from torch._inductor import cpu_vec_isa

    march, allowed = arc_cpu.build_target(cpu)
    original = cpu_vec_isa.valid_vec_isa_list
    usable = [
        isa
        for isa in _vec_isa_candidates(original())
        if arc_cpu.gcc_flags_to_cpuinfo(isa.build_arch_flags()) <= allowed
    ]
    record = {"cpu": cpu, "march": march, "cpu_flags": sorted(allowed)}
    cpu_vec_isa.valid_vec_isa_list = lambda: usable  # pick_vec_isa() reads it per call
    try:
        with inductor_config.patch({"cpp.march": march}):
            yield record | {"cpu_name": arc_cpu.host_name()}
    finally:
        cpu_vec_isa.valid_vec_isa_list = original


def _vec_isa_candidates(isas: list) -> list:
    """Inductor's valid vector ISAs, plus AVX-512 without `-mavx512bf16`, so that an
    x86-64-v4 build on a CPU with AVX512-BF16 still gets AVX-512 kernels (fp32 needs no BF16)."""
    from torch._inductor.cpu_vec_isa import VecAVX512

    class VecAVX512NoBF16(VecAVX512):
        _is_avx512_bf16_supported = False

        def __bool__(self) -> bool:
            return True  # listed only where Inductor found VecAVX512 valid here

        def build_arch_flags(self) -> str:
            return self._arch_flags

    out = []
    for isa in isas:
        out.append(isa)
        if type(isa) is VecAVX512 and "bf16" in isa.build_arch_flags():
            out.append(VecAVX512NoBF16())
    return out


def _aot_compile(
    fn, graph: Graph, max_seq_len: int, device: str, path: Path, static_slots: bool
) -> None:
    import warnings

    from torch.export import export

    sample, dims = _export_inputs(graph, max_seq_len, device, static_slots)
    if isinstance(fn, _WithBuffers):
        buffers = dict(fn.fn.named_buffers())
        sample = sample + tuple(buffers[k] for k in fn.names)
        dims = dims + (None,) * len(fn.names)
        shapes = {"args": dims}  # forward(*args)
    else:
        shapes = {"feeds": dims}  # forward(*feeds)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation noise
        # Inductor's advice to enable TF32 on CUDA: fp32 stays fp32 (lossless), and a warning
        # line would break the one-line error contract when the compile then fails
        warnings.filterwarnings("ignore", message=".*TensorFloat32 tensor cores")
        ep = export(fn, sample, dynamic_shapes=shapes)
        torch._inductor.aoti_compile_and_package(
            ep,
            package_path=str(path),
            # bound constants: weights come from the engine; inputs: any constant left
            # (none expected) stays in the .so
            inductor_configs={
                "aot_inductor.package_constants_in_so": isinstance(fn, _WithBuffers),
            },
        )


def _export_inputs(
    graph: Graph, max_seq_len: int, device: str, static_slots: bool = False
) -> tuple[tuple, tuple]:
    """Example inputs and dynamic dims for `graph`'s inputs: symbol T (new tokens, >= 2: a
    one-token chunk goes to decode, and with T == 1 allowed export on CUDA cannot prove
    stride guards that differ for size-1 dims) and L (slots read; with `static_slots` always
    the whole cache, max_seq_len); int dims stay static."""
    from torch.export import Dim

    syms = {"T": Dim("T", min=2, max=max_seq_len), "L": Dim("L", min=1, max=max_seq_len)}
    sizes = {"T": 4, "L": min(37, max_seq_len - 1)}  # L unlike any static size: no unifying
    if static_slots:
        del syms["L"]
        sizes["L"] = max_seq_len
    samples, dims = [], []
    for n in graph.inputs():
        shape = [sizes.get(d, d) for d in n.attrs["shape"]]
        if n.attrs["dtype"] == "bool":
            samples.append(torch.ones(shape, dtype=torch.bool, device=device))
        else:  # positions and slots must be valid indices: 0, 1, 2, ...
            samples.append(torch.arange(_numel(shape), device=device).reshape(shape))
        dyn = {i: syms[d] for i, d in enumerate(n.attrs["shape"]) if d in syms}
        dims.append(dyn or None)
    return tuple(samples), tuple(dims)


def _numel(shape: list[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def check_engine(info: dict[str, Any]) -> None:
    """Refuse, before loading native code, an artifact this machine cannot run."""
    device = info.get("device", "cpu")
    if info.get("mode", "aot") not in MODES:
        raise EngineError(
            f"engine's torch mode {str(info.get('mode'))[:40]!r} is not one of {MODES}"
        )
    if device == "cuda":
        if not torch.cuda.is_available():
            raise EngineError("engine was built for CUDA but no CUDA GPU is visible here")
        here = _device_info("cuda")["gpu_arch"]
        if info.get("mode") == "aot" and info.get("gpu_arch") != here:
            raise EngineError(
                f"engine was built for GPU arch {info.get('gpu_arch')} "
                f"({info.get('gpu_name')}); this GPU is {here}: rebuild it here"
            )
    if info.get("mode") == "aot" and info.get("torch_version") != torch.__version__:
        raise EngineError(
            f"engine's AOTInductor package needs torch {info.get('torch_version')}, "
            f"this is {torch.__version__}: rebuild it"
        )
    if info.get("mode") == "aot" and device == "cpu":
        _check_cpu(info)


def _check_cpu(info: dict[str, Any]) -> None:
    """Refuse CPU code that uses an extension this CPU lacks (it would die with SIGILL)."""
    flags = info.get("cpu_flags")
    if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
        raise EngineError("engine does not record the CPU extensions its code needs; rebuild it")
    missing = arc_cpu.missing_flags(flags)
    if missing:
        built = f"-march={info.get('march')} on {info.get('cpu_name', 'another CPU')}"
        raise EngineError(
            f"engine's native code needs CPU extensions this CPU lacks: {', '.join(missing)} "
            f"(built with {built}); rebuild it on this machine or with --cpu x86-64-v3"
        )


def _kernels(info: dict[str, Any]) -> dict[str, bool]:
    """Kernel forms per device and mode (see arc.lowering): compiled CPU code gets one-token
    projections as fused reductions (2.6x faster decode on a 2-core CPU)."""
    compiled = info.get("mode") in ("aot", "jit")
    # static slots (CUDA AOT): written-out attention, whose export leaves no stride guards
    return {
        "gemv": info.get("device", "cpu") == "cpu" and compiled,
        "sdpa": not info.get("static_slots"),
    }


def load(module: Module, weights: dict, root: Path, info: dict[str, Any], device: str) -> Steps:
    fns, kv = lower(module, weights, device, **_kernels({"device": device, **info}))
    mode = info.get("mode", "aot")
    ways = dict.fromkeys(fns, "package")
    if mode == "aot" and device == "cuda":
        from arc.targets import aoti_probe

        ways = {name: aoti_probe.check_loads(root / f"{name}.pt2") for name in fns}
    if mode == "aot" and info.get("bind") == "inputs":
        calls = _load_aot_inputs(fns, root, info.get("inputs"), ways)
    elif mode == "aot":
        calls = _load_aot(fns, root)
    elif mode == "jit":
        calls = {k: torch.compile(fn, dynamic=True) for k, fn in fns.items()}
    else:
        calls = dict(fns)
    if device == "cuda" and mode in ("aot", "eager"):
        from arc.runtime.cuda_graph import graphed

        calls = {k: graphed(fn) if k != "prefill" else fn for k, fn in calls.items()}
    max_len = module.kv.max_seq_len
    return Steps(
        calls,
        max_seq_len=max_len,
        device=device,
        reset=kv.reset,
        move=kv.move,
        bucket=max_len if info.get("static_slots") else 64,
        ring=ring_of(module.meta),
    )


def _load_aot_inputs(fns: dict, root: Path, names: Any, ways: dict[str, str]) -> dict:
    """Load each package built with bind=inputs: our weight and KV tensors are appended to
    every call's inputs, in the order the manifest records (and the package was built with).
    `ways[name]` is how to open it (targets/aoti_probe.py)."""
    from arc.targets.aoti_probe import open_package

    if not isinstance(names, dict):
        raise EngineError("engine does not record its packages' inputs; rebuild it")
    calls = {}
    for name, fn in fns.items():
        ours = dict(fn.named_buffers())
        if names.get(name) != list(ours):
            raise EngineError(f"{name}.pt2: recorded inputs differ from the engine's tensors")
        tensors = [ours[k] for k in names[name]]
        if not all(t.is_contiguous() for t in tensors):
            raise EngineError(f"{name}.pt2: weights must be contiguous")
        run = open_package(root / f"{name}.pt2", ways[name])

        def call(*feeds, run=run, tensors=tensors):
            return run([*feeds, *tensors])[0]

        calls[name] = call
    return calls


def _load_aot(fns: dict, root: Path) -> dict:
    """Load each package and bind our weight and KV tensors to it (shared, not copied).

    AOTInductor keeps raw pointers to user-managed constants and ignores strides, so every
    bound tensor must be contiguous and must outlive the package (the lowered modules own them).
    """
    from arc.targets.aoti_probe import load_package

    calls = {}
    for name, fn in fns.items():
        compiled = load_package(root / f"{name}.pt2")
        ours = dict(fn.named_buffers())
        # Inductor may fold small constants (rope.inv_freq) into the code; bind the rest.
        expected = set(compiled.get_constant_fqns())
        if expected - set(ours):
            missing = ", ".join(sorted(expected - set(ours))[:3])
            raise EngineError(f"{name}.pt2 expects constants the engine lacks: {missing}")
        constants = {k: ours[k] for k in expected}
        if not all(t.is_contiguous() for t in constants.values()):
            raise EngineError(f"{name}.pt2: weights must be contiguous")
        compiled.load_constants(constants, check_full_update=True, user_managed=True)
        calls[name] = _boxed(compiled)
    return calls


def _boxed(compiled):
    """Call the package's runner directly: skips per-call pytree flattening (~2x less overhead)."""
    run = compiled.loader.boxed_run

    def call(*inputs):
        return run(list(inputs))[0]

    return call
