"""Open AOTInductor CUDA packages in a way this machine survives, found in a child process.

On the GPU machines arc has been tried on (torch 2.11.0+cu130; an H100 and an H200), loading
an AOTInductor CUDA package with torch's `aoti_load_package` killed the process with SIGSEGV
inside `AOTIModelPackageLoader`, before arc's code ran: a package of one `nn.Linear`, built
with torch's documented `aoti_compile_and_package`, crashed the same way. A crash cannot be
caught, so arc opens each CUDA package in a child process first, trying two ways in turn:

  package  torch's `aoti_load_package` (what torch documents);
  runner   the package's zip members (its model .so and kernel cubins) extracted into arc's
           cache, and the .so opened with `AOTIModelContainerRunnerCuda` directly, the runner
           `AOTIModelPackageLoader` would build, without the package loader itself.

The first way whose child loads the package and runs is used; at compile time (no engine is
written when none works) and before an engine's first run on a machine (the choice is cached
under $ARC_CACHE/probes, keyed by package digest, torch version and GPU).
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

import torch

from arc.cache import atomic_dir, cache_dir
from arc.errors import EngineError

WAYS = ("package", "runner")
CHILD = (
    "import sys; from arc.targets.aoti_probe import open_package; "
    "open_package(sys.argv[1], sys.argv[2]); print('loaded')"
)
Run = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def check_loads(package: Path, *, cached: bool = True) -> str:
    """The first of WAYS that opens `package` in a child process; EngineError (one line) when
    every way kills or fails its child."""
    marker = _marker(package) if cached else None
    known = marker.read_text().strip() if marker is not None and marker.exists() else None
    if known in WAYS:
        return known
    failures = []
    for way in WAYS:
        how = _try(package, way)
        if how is None:
            if marker is not None:
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(way + "\n")
            return way
        failures.append(f"{way}: {how}")
    raise EngineError(
        f"torch {torch.__version__} cannot load AOTInductor CUDA packages on this machine "
        f"(opening {package.name} in a probe process failed: {'; '.join(failures)}); "
        "use --torch-mode eager (see docs/ARCHITECTURE.md, CUDA)"
    )


def _try(package: Path, way: str) -> str | None:
    """None when a child process opens `package` the `way` given, else why not (short)."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(package), way],
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired:
        return "took over 600 s"
    if done.returncode == 0 and "loaded" in done.stdout:
        return None
    rc = done.returncode
    if rc < 0:
        return f"the process died with {signal.Signals(-rc).name}"
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:160]
    return f"exit {rc}: {tail}"


def open_package(package: str | Path, way: str) -> Run:
    """`run(inputs) -> outputs` of an AOTInductor package, opened the `way` given."""
    package = Path(package)
    if way == "package":
        return load_package(package).loader.boxed_run
    if way != "runner":
        raise EngineError(f"unknown way {way!r} to open an AOTInductor package")
    model = _extracted(package)
    sos = sorted(model.glob("*.so"))
    if len(sos) != 1:
        raise EngineError(f"{package.name}: expected one model library, found {len(sos)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # the same runner on CPU, where CI can test this way
        runner = torch._C._aoti.AOTIModelContainerRunnerCpu(str(sos[0]), 1)
    else:
        runner = torch._C._aoti.AOTIModelContainerRunnerCuda(str(sos[0]), 1, device, str(model))
    return runner.run


def load_package(path: Path):
    """aoti_load_package, without torch's warning that the package's vector ISA (AVX2 in an
    x86-64-v3 build, say) is not this CPU's best: the torch target's check_engine has checked
    what matters, that this CPU has every extension the code uses."""
    import logging

    log = logging.getLogger("torch.export.pt2_archive._package")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return torch._inductor.aoti_load_package(str(path))
    finally:
        log.setLevel(level)


def _extracted(package: Path) -> Path:
    """The package's `*/data/aotinductor/model/` members, extracted once into arc's cache
    (keyed by the package's digest); the folder holding them."""
    digest = hashlib.sha256(package.read_bytes()).hexdigest()[:32]
    out = cache_dir("aoti") / digest

    def make(tmp: Path) -> None:
        with zipfile.ZipFile(package) as zf:
            for info in zf.infolist():
                parts = PurePosixPath(info.filename).parts
                if (
                    info.is_dir()
                    or len(parts) != 5
                    or parts[1:4] != ("data", "aotinductor", "model")
                ):
                    continue
                name = parts[4]
                if name in (".", "..") or "/" in name or "\\" in name or name.startswith("."):
                    raise EngineError(f"{package.name}: bad member name {info.filename[:80]!r}")
                (tmp / name).write_bytes(zf.read(info))

    if not (out.is_dir() and any(out.glob("*.so"))):
        atomic_dir(out, make)
    return out


def _marker(package: Path) -> Path:
    h = hashlib.sha256(package.read_bytes())
    h.update(torch.__version__.encode())
    if torch.cuda.is_available():
        h.update(torch.cuda.get_device_name().encode())
    return cache_dir("probes") / h.hexdigest()[:32]
