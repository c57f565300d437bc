"""`--target auto`: pick the target per device, and say why in the manifest.

Without timing (-O0..-O2), the first installed target of an ordered preference per device, the
order being what was measured on the machines arc runs on (benchmarks/targets_speed.py: on the
2-core CPU, TVM decodes fastest, then torch AOT, then ONNX Runtime). With timing (-O3), every
installed candidate is built, loaded, and timed over a few decode steps after a short prefill,
and the fastest is kept, as TVM's and TensorRT's auto-tuners choose among candidate kernels by
measuring them on the device rather than by a cost model.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from arc import targets
from arc.errors import ArcError, UnsupportedError

# CPU: TVM's hand-scheduled GEMV decodes SmolLM2 fastest, then torch AOT, then ONNX Runtime
# (which runs kept 4-bit blocks as fp32); see README "Targets". CUDA: torch (eager) first.
PREFERENCE = {"cpu": ("tvm", "torch", "onnx"), "cuda": ("torch", "onnx")}
TIMED_STEPS = 8  # decode steps timed per candidate (after 2 untimed)
TIMED_PROMPT = 32  # prompt tokens prefilled first, so attention reads a realistic cache


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if targets.cuda_available() else "cpu"
    if device not in PREFERENCE:
        raise ArcError(f"unknown device {device!r}; choose cpu, cuda or auto")
    if device == "cuda" and not targets.cuda_available():  # as a named target's resolve_device
        raise ArcError("device cuda requested but no CUDA GPU is visible")
    return device


def candidates(device: str) -> list[str]:
    """Targets that build for `device` and are installed here, in order of preference."""
    out = []
    for name in PREFERENCE[device]:
        modname, devices, _ = targets.TARGETS.get(name, (None, (), None))
        if modname and device in devices and targets.describe_one(name) == "installed":
            out.append(name)
    if not out:
        raise ArcError(f"--target auto: no installed target builds for {device}")
    return out


def by_preference(device: str) -> tuple[str, dict[str, Any]]:
    names = candidates(device)
    why = f"first installed of the {device} preference {', '.join(PREFERENCE[device])}"
    return names[0], {"rule": "preference", "candidates": names, "why": why}


def first_accepting(chosen: dict[str, Any], run: Callable[[str], Any]) -> tuple[str, dict, Any]:
    """(name, record, run's result) of the first of `chosen`'s candidates, in preference order,
    for which `run(name)` (the passes and the target's check_module) raises no
    UnsupportedError: tvm refuses some lossy passes, say; auto then builds torch and the
    record says why."""
    refused: dict[str, str] = {}
    for name in chosen["candidates"]:
        try:
            result = run(name)
        except UnsupportedError as e:
            refused[name] = str(e)
            continue
        if refused:
            why = "; ".join(f"{k}: {v}" for k, v in refused.items())
            chosen = {**chosen, "refused": refused, "why": f"{chosen['why']}; passed over {why}"}
        return name, chosen, result
    raise _refusal(refused)


def _refusal(refused: dict[str, str]) -> UnsupportedError:
    why = "; ".join(f"{k}: {v}" for k, v in refused.items())
    return UnsupportedError(f"--target auto: no installed target takes this pipeline ({why})")


def options_for(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The compile's target options as candidate `name` takes them (--torch-mode is torch's)."""
    return dict(options) if name == "torch" else {k: v for k, v in options.items() if k != "mode"}


def by_timing(
    device: str,
    build: Callable[[str, Path], tuple[dict, dict]],
    load: Callable[[str, dict, Path], Any],
    workdir: Path,
) -> tuple[str, dict[str, Any], tuple[dict, dict]]:
    """Build, load and time each candidate; (fastest, record, its build result).

    `build(name, dir)` returns the target's (info, artifacts); `load(name, info, dir)` its Steps.
    """
    import torch

    names, timed, built, refused = candidates(device), {}, {}, {}
    threads = torch.get_num_threads()
    for name in names:
        out = workdir / name
        try:
            built[name] = build(name, out)
        except UnsupportedError as e:  # this candidate cannot lower the module: not timed
            refused[name] = str(e)
            continue
        steps = load(name, built[name][0], out)
        timed[name] = round(_decode_ms(steps), 3)
        del steps  # free the candidate's sessions and caches before the next one
        torch.set_num_threads(threads)  # a target's load may have changed it (tvm: 1)
    if not timed:
        raise _refusal(refused)
    best = min(timed, key=timed.get)
    ms = ", ".join(f"{k} {v:.1f}" for k, v in timed.items())
    record = {
        "rule": "timed",
        "candidates": names,
        "decode_ms": timed,
        "why": f"fastest decode step on this {device} (ms per step: {ms})",
    }
    if refused:
        record["refused"] = refused
    return best, record, built[best]


def _decode_ms(steps) -> float:
    """Median ms of one decode step after a TIMED_PROMPT-token prefill."""
    steps.reset()
    steps.prefill(list(range(1, TIMED_PROMPT + 1)), 0)
    times = []
    for i in range(TIMED_STEPS + 2):
        t0 = time.perf_counter()
        steps.decode(1 + i % 7, TIMED_PROMPT + i)
        times.append(time.perf_counter() - t0)
    steps.reset()
    return 1000 * statistics.median(times[2:])
