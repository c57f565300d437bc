"""Load an AOTInductor CUDA package in a child process before this process does.

On the GPU machines arc has been tried on (torch 2.11.0+cu130; an H100 and an H200), loading
any AOTInductor CUDA package kills the process with SIGSEGV inside torch's
`AOTIModelPackageLoader`, before arc's code runs: a package of one `nn.Linear`, built with
torch's documented `aoti_compile_and_package` and loaded with `aoti_load_package`, crashes the
same way, with or without constants in the .so, with CUDA initialized first or not. A crash
cannot be caught, so arc loads each CUDA package once in a child process: at compile time (no
engine is written when it fails) and before an engine's first run on a machine (the result is
cached under $ARC_CACHE/probes, keyed by package digest, torch version and GPU).
"""

from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
from pathlib import Path

import torch

from arc.cache import cache_dir
from arc.errors import EngineError

CHILD = "import sys, torch; torch._inductor.aoti_load_package(sys.argv[1]); print('loaded')"


def check_loads(package: Path, *, cached: bool = True) -> None:
    """Raise EngineError (one line) if loading `package` kills or fails a child process."""
    marker = _marker(package) if cached else None
    if marker is not None and marker.exists():
        return
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(package)],
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired:
        raise EngineError(f"loading {package.name} took over 600 s in a probe process") from None
    if done.returncode != 0 or "loaded" not in done.stdout:
        rc = done.returncode
        if rc < 0:
            how = f"the process died with {signal.Signals(-rc).name}"
        else:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
            how = f"exit {rc}: {tail}"
        raise EngineError(
            f"torch {torch.__version__} cannot load AOTInductor CUDA packages on this machine "
            f"(loading {package.name} in a probe process failed: {how}); "
            "use --torch-mode eager (see docs/ARCHITECTURE.md, CUDA)"
        )
    if marker is not None:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("loaded\n")


def _marker(package: Path) -> Path:
    h = hashlib.sha256(package.read_bytes())
    h.update(torch.__version__.encode())
    if torch.cuda.is_available():
        h.update(torch.cuda.get_device_name().encode())
    return cache_dir("probes") / h.hexdigest()[:32]
