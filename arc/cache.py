"""Where arc keeps what it derives (converted checkpoints, unpacked engines): $ARC_CACHE or
~/.cache/arc."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("ARC_CACHE") or Path.home() / ".cache" / "arc")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_dir(out: Path, make: Callable[[Path], object]) -> Path:
    """Build directory `out` with `make(tmp)` in a sibling temp dir, then rename it into place,
    so a crash or a failed build never leaves half of it."""
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        make(tmp)
        if out.exists():
            out.rmdir()  # the empty placeholder cache_dir() made
        tmp.rename(out)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
