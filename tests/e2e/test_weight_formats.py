"""Lossy weight formats through the AOT engine: the compiled kernels (one-token GEMV, the fused
per-token reductions of a verify, the dequantize-then-matmul prefill) give the same greedy ids
as the same quantized Module run eagerly, and `arc inspect` reports the formats."""

from __future__ import annotations

import pytest

from tests.e2e.cli import arc, arc_json, assert_clean_error

SPEC = "kv-fusion,weight-format{mode=int4,group=16},spec-tree{budget=3,depth=3}"
PROMPTS = ["Write a Python function that checks if a number is prime.", "a b a b a b a b a b"]


@pytest.fixture(scope="module")
def int4_engines(engine_dir):
    out = {}
    for mode in ("aot", "eager"):
        path = engine_dir / f"tiny-llama-int4-{mode}.arc"
        arc_json(
            "compile",
            "tiny-llama",
            "--passes",
            SPEC,
            "--torch-mode",
            mode,
            "--max-seq-len",
            "128",
            "-o",
            str(path),
        )
        out[mode] = path
    return out


@pytest.mark.parametrize("prompt", PROMPTS)
def test_aot_kernels_equal_eager_module(int4_engines, prompt):
    got = {
        mode: arc_json(
            "run", str(path), "--prompt", prompt, "--max-new-tokens", "24", "--ignore-eos"
        )
        for mode, path in int4_engines.items()
    }
    assert got["aot"]["token_ids"] == got["eager"]["token_ids"]
    assert len(got["aot"]["token_ids"]) == 24


def test_inspect_shows_formats(int4_engines):
    shown = arc("inspect", str(int4_engines["aot"])).stdout
    assert "int4" in shown and "int8" in shown and "bits/weight" in shown


def test_bad_option_is_one_line(tmp_path):
    done = arc(
        "compile",
        "tiny-llama",
        "--passes",
        "weight-format{mode=int3}",
        "-o",
        str(tmp_path / "x.arc"),
    )
    assert_clean_error(done, "weight-format: mode='int3'")
    assert not (tmp_path / "x.arc").exists()
