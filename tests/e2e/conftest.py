"""Fixtures for the end-to-end tests."""

from __future__ import annotations

import pytest

from tests.conftest import built_once
from tests.e2e.cli import arc_json


@pytest.fixture(scope="session")
def eager_engine(tmp_path_factory):
    """A small eager engine (tiny-qwen2, 64 slots, no native artifact) to damage and craft
    (tests copy it; none writes to it)."""

    def build(directory):
        out = directory / "eager-tiny-qwen2.arc"
        arc_json(
            "compile", "tiny-qwen2", "--torch-mode", "eager", "--max-seq-len", "64", "-o", str(out)
        )

    return built_once(tmp_path_factory, "eager-engine", build) / "eager-tiny-qwen2.arc"
