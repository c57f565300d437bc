"""Targets: each lowers an IR Module to an artifact for one device and loads it back.

A target module provides NAME, DEVICES, EXTRA (the pip extra it needs, or None), and
    installed() -> str | None            why it cannot run here (None: it can)
    check_module(module)                 UnsupportedError for an op or mask kind it can't lower
    build(module, weights, device, workdir, options) -> (info for the manifest, {name: path})
    check_engine(target_info)            EngineError when this machine can't run that artifact
    load(module, weights, root, target_info, device) -> arc.runtime.steps.Steps
Targets are imported only when used, so a missing optional extra costs nothing until then.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from arc.errors import ArcError, MissingExtraError

# name -> (module, devices, pip extra); only built targets are listed
TARGETS: dict[str, tuple[str, tuple[str, ...], str | None]] = {
    "torch": ("arc.targets.torch_compile", ("cpu", "cuda"), None),
    "onnx": ("arc.targets.onnx", ("cpu", "cuda"), "onnx"),
    "tvm": ("arc.targets.tvm", ("cpu",), "tvm"),
}
# named in the product, not built yet: `arc targets` shows them as planned
PLANNED = {"tensorrt": "tensorrt"}


def get(name: str) -> ModuleType:
    if name == "auto":  # arc/autotarget.py chooses; callers resolve it before asking here
        raise ArcError("target auto must be resolved to a target first")
    if name == "tensorrt":
        raise ArcError(tensorrt_status())
    if name in PLANNED:
        raise ArcError(f"target {name!r} is not built yet; available: {', '.join(TARGETS)}")
    if name not in TARGETS:
        raise ArcError(f"unknown target {name!r}; available: {', '.join(TARGETS)}")
    module = importlib.import_module(TARGETS[name][0])
    why = module.installed()
    if why:
        raise MissingExtraError(f"target {name} ({why})", TARGETS[name][2] or name)
    return module


def check_ops(
    module, target: str, ops, kv_dtypes=("f32",), masks=None, kv_merge: bool = False
) -> None:
    """UnsupportedError naming the op (or mask kind, or KV dtype) and `target` for the first
    node of `module` that `target` cannot lower: what every target's check_module starts with.
    `masks`: the ATTENTION mask kinds it lowers (default: the dense ones, DENSE_MASKS);
    `kv_merge`: whether it lowers merged KV layers (kv-fusion{merge=slerp})."""
    from arc.errors import UnsupportedError
    from arc.ops import DENSE_MASKS, MASK_KINDS, Op

    masks = DENSE_MASKS if masks is None else masks

    if module.kv.dtype not in kv_dtypes:
        raise UnsupportedError(
            f"target {target} cannot lower KV cache dtype {module.kv.dtype} "
            f"(kv-fusion{{kv-dtype={module.kv.dtype}}}); it supports {', '.join(kv_dtypes)}"
        )

    if module.kv.merged and not kv_merge:
        raise UnsupportedError(
            f"target {target} cannot lower merged KV layers (kv-fusion{{merge=slerp}}); "
            "use --target torch, or merge=reuse"
        )

    for g in module.functions.values():
        for n in g.nodes:
            if n.op not in ops:
                raise UnsupportedError(
                    f"target {target} cannot lower op {n.op.value} (in {g.name})"
                )
            if n.op is Op.ATTENTION and n.attrs["mask"] not in masks:
                kind = n.attrs["mask"]
                why = " (sparse-attention); use --target torch" if kind in MASK_KINDS else ""
                raise UnsupportedError(f"target {target} cannot lower mask {kind}{why}")


def tensorrt_status() -> str:
    """Why the tensorrt target cannot build here (checked 2026-11-29): PyPI's TensorRT wheels
    are stubs that download the real ones from pypi.nvidia.com, which these machines cannot
    reach, and Debian packages no TensorRT; so the target waits for a machine that has it."""
    if importlib.util.find_spec("tensorrt") is None:
        return (
            "target tensorrt: TensorRT is not installed (PyPI's tensorrt-cu13 is a stub that "
            "downloads from pypi.nvidia.com: pip install --extra-index-url "
            "https://pypi.nvidia.com tensorrt-cu13); use --target torch"
        )
    return "target tensorrt is not built yet (TensorRT is installed); use --target torch"


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def resolve_device(target: ModuleType, device: str) -> str:
    if device == "auto":
        device = "cuda" if "cuda" in target.DEVICES and cuda_available() else "cpu"
    if device not in target.DEVICES:
        raise ArcError(f"target {target.NAME} does not build for device {device!r}")
    if device == "cuda" and not cuda_available():
        raise ArcError("device cuda requested but no CUDA GPU is visible")
    return device


def describe_one(name: str) -> str:
    """'installed', or why target `name` cannot run here."""
    if name not in TARGETS:
        return "not built"
    return importlib.import_module(TARGETS[name][0]).installed() or "installed"


def describe() -> list[dict]:
    """One row per target: name, devices, installed or why not."""
    rows = []
    for name, (modname, devices, _extra) in TARGETS.items():
        why = importlib.import_module(modname).installed()
        rows.append({"name": name, "devices": devices, "status": why or "installed"})
    for name, extra in PLANNED.items():
        status = f"planned (extra [{extra}])"
        if name == "tensorrt" and importlib.util.find_spec("tensorrt") is None:
            status = "unavailable: TensorRT is not installed (needs pypi.nvidia.com)"
        rows.append({"name": name, "devices": (), "status": status})
    return rows
