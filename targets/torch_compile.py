"""The torch target: IR -> torch modules -> an AOTInductor package per function (CPU or CUDA).

Modes (`--torch-mode`):
  aot    torch.export with dynamic T (new tokens) and L (slots read), compiled ahead of time by
         AOTInductor into one .pt2 per IR function, stored in the engine. Weights stay out of
         the .so (`aot_inductor.package_constants_in_so=False`): the engine's safetensors are
         bound at load as user-managed constants, so prefill and decode share one copy of the
         weights and one KV cache, which the compiled code updates in place.
  jit    no artifact; torch.compile at load (in-process use; first call compiles).
  eager  no artifact; the lowered modules run as they are (the reference, and for debugging).
The AOT package is tied to the torch version and, on CUDA, to the GPU arch: both are recorded
and checked before the package is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from arc.errors import EngineError, UnsupportedError
from arc.ir import Module
from arc.lowering import lower
from arc.ops import MASK_KINDS, Op
from arc.runtime.steps import Steps

NAME = "torch"
DEVICES = ("cpu", "cuda")
EXTRA = None
OPS = frozenset(Op)
MODES = ("aot", "jit", "eager")


def installed() -> str | None:
    return None  # torch is a core dependency


def check_module(module: Module) -> None:
    for g in module.functions.values():
        for n in g.nodes:
            if n.op not in OPS:
                raise UnsupportedError(f"target torch cannot lower op {n.op.value}")
            if n.op is Op.ATTENTION and n.attrs["mask"] not in MASK_KINDS:
                raise UnsupportedError(f"target torch cannot lower mask {n.attrs['mask']}")


def _device_info(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {"torch_version": torch.__version__}
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        info |= {"gpu_arch": f"sm_{major}{minor}", "gpu_name": torch.cuda.get_device_name()}
    return info


def build(
    module: Module, weights: dict, device: str, workdir: Path, options: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Path]]:
    mode = options.get("mode") or ("aot" if device == "cpu" else "eager")
    if mode not in MODES:
        raise UnsupportedError(f"torch mode {mode!r}; choose from {', '.join(MODES)}")
    if mode == "aot" and device == "cuda":
        # Tried on an H100 (torch 2.11): export needs the written-out attention
        # (lower(sdpa=False)) and a static slot count (dynamic L leaves stride guards export
        # cannot prove); it then builds, but loading the package segfaulted. Refuse rather
        # than hand out an engine that crashes; see docs/ARCHITECTURE.md.
        raise UnsupportedError(
            "torch AOT engines for CUDA are not verified yet (their load crashed in testing); "
            "use --torch-mode eager or jit with --device cuda"
        )
    info = {"mode": mode, "device": device, **_device_info(device)}
    if mode != "aot":
        return info, {}
    workdir.mkdir(parents=True, exist_ok=True)
    fns, _ = lower(module, weights, device, **_kernels(info))
    artifacts = {}
    for name, fn in fns.items():
        path = workdir / f"{name}.pt2"
        _aot_compile(fn, name, module.kv.max_seq_len, device, path)
        artifacts[f"{name}.pt2"] = path
    return info, artifacts


def _aot_compile(fn, name: str, max_seq_len: int, device: str, path: Path) -> None:
    import warnings

    from torch.export import Dim, export

    t = 1 if name == "decode" else 4  # a dynamic T needs an example of 2 or more
    sample = (
        torch.zeros(1, t, dtype=torch.long, device=device),
        torch.arange(t, device=device),
        torch.arange(t + 3, device=device),
    )
    dims: dict[str, Any] = {"slots": {0: Dim("L", min=1, max=max_seq_len)}}
    if name != "decode":
        # T >= 2: a one-token chunk goes to decode (Steps.prefill), and with T == 1 allowed,
        # export on CUDA cannot prove stride guards that differ for size-1 dims.
        tdim = Dim("T", min=2, max=max_seq_len)
        dims |= {"tokens": {1: tdim}, "pos": {0: tdim}}
    else:
        dims |= {"tokens": None, "pos": None}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation noise
        ep = export(fn, sample, dynamic_shapes=dims)
        torch._inductor.aoti_compile_and_package(
            ep,
            package_path=str(path),
            inductor_configs={
                "aot_inductor.package_constants_in_so": False,  # weights come from the engine
            },
        )


def check_engine(info: dict[str, Any]) -> None:
    """Refuse, before loading native code, an artifact this machine cannot run."""
    device = info.get("device", "cpu")
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


def _kernels(info: dict[str, Any]) -> dict[str, bool]:
    """Kernel forms per device and mode (see arc.lowering): compiled CPU code gets one-token
    projections as fused reductions (2.6x faster decode on a 2-core CPU)."""
    compiled = info.get("mode") in ("aot", "jit")
    return {"gemv": info.get("device", "cpu") == "cpu" and compiled}


def load(module: Module, weights: dict, root: Path, info: dict[str, Any], device: str) -> Steps:
    fns, kv = lower(module, weights, device, **_kernels({"device": device, **info}))
    mode = info.get("mode", "aot")
    if mode == "aot":
        calls = _load_aot(fns, root)
    elif mode == "jit":
        calls = {k: torch.compile(fn, dynamic=True) for k, fn in fns.items()}
    else:
        calls = dict(fns)
    return Steps(calls, max_seq_len=module.kv.max_seq_len, device=device, reset=kv.reset)


def _load_aot(fns: dict, root: Path) -> dict:
    """Load each package and bind our weight and KV tensors to it (shared, not copied).

    AOTInductor keeps raw pointers to user-managed constants and ignores strides, so every
    bound tensor must be contiguous and must outlive the package (the lowered modules own them).
    """
    calls = {}
    for name, fn in fns.items():
        compiled = torch._inductor.aoti_load_package(str(root / f"{name}.pt2"))
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

    def call(tokens, pos, slots):
        return run([tokens, pos, slots])[0]

    return call
