"""Did a process compile anything at run time? Point TORCHINDUCTOR_CACHE_DIR at an empty
directory, run it, and look at what Inductor left there.

Loading an AOTInductor engine compiles nothing of the model, but torch compiles a few CPU
feature probes (`__avx512_bf16_chk_kernel` and such): each a C++ source under 1 KB, its .so
and its lock file, all named by one hash. Anything else (a kernel source, a .so, Python
wrappers, fxgraph or aotautograd entries, under any name) is evidence of a compile.
`compile_on_purpose` is the positive control: a check that cannot see a deliberate compile
would pass vacuously, for instance after torch renames its files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROBE_MAX_BYTES = 1000
MARKERS = (b"cpp_fused", b"AOTInductorModel")  # the names of compiled kernels, today


def compiled_files(cache: Path) -> list[str]:
    """Files in Inductor cache `cache` that are not CPU feature probes."""
    files = [p for p in Path(cache).rglob("*") if p.is_file()]
    probes = {_stem(p) for p in files if p.suffix == ".cpp" and p.stat().st_size < PROBE_MAX_BYTES}
    return sorted(str(p.relative_to(cache)) for p in files if _stem(p) not in probes)


def kernel_sources(cache: Path) -> list[str]:
    """Files in `cache` that name a compiled kernel (a second, name-based check)."""
    files = [p for p in Path(cache).rglob("*") if p.is_file()]
    return sorted(str(p) for p in files if any(m in p.read_bytes() for m in MARKERS))


def compile_on_purpose(cache: Path) -> None:
    """torch.compile a small CPU function in a fresh process with Inductor's cache at `cache`."""
    code = (
        "import torch\n"
        "f = torch.compile(lambda x: torch.relu(x) * 2 + 1)\n"
        "assert f(torch.randn(64)).shape == (64,)\n"
    )
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-2000:]


def _stem(p: Path) -> str:
    return p.name.split(".")[0]
