"""Fixtures for the end-to-end tests."""

from __future__ import annotations

import pytest

from tests.e2e.cli import arc_json


@pytest.fixture(scope="session")
def eager_engine(engine_dir):
    """A small eager engine (tiny-qwen2, 64 slots, no native artifact) to damage and craft."""
    out = engine_dir / "eager-tiny-qwen2.arc"
    arc_json(
        "compile", "tiny-qwen2", "--torch-mode", "eager", "--max-seq-len", "64", "-o", str(out)
    )
    return out
