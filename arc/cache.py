"""Where arc keeps what it derives (converted checkpoints, unpacked engines): $ARC_CACHE or
~/.cache/arc."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    root = Path(os.environ.get("ARC_CACHE") or Path.home() / ".cache" / "arc")
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
