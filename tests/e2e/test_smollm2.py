"""The real model: SmolLM2-135M-Instruct compiled -O2 for CPU (AOTInductor, speculative
decoding on), its greedy ids from `arc run --json` in a fresh process equal Hugging Face's
greedy generation."""

from __future__ import annotations

import pytest

from tests.conftest import hf_greedy
from tests.e2e.cli import arc, arc_json

pytestmark = pytest.mark.real

PROMPTS = [
    "Write a Python function that checks if a number is prime.",
    "What is the capital of France?",
    "List three colors of the rainbow.",
    "Add type hints to this code:\n\ndef add(a, b):\n    return a + b\n\ndef neg(a):\n    return a",
]
N = 48


@pytest.fixture(scope="module")
def smol_engine(engine_dir):
    out = engine_dir / "smollm2-O2.arc"
    summary = arc_json("compile", "smollm2-135m", "-O2", "--max-seq-len", "1024", "-o", str(out))
    assert summary["compile_s"] > 0
    assert [p["name"] for p in summary["passes"]] == ["kv-fusion", "spec-tree"]
    return out


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_ids_equal_hugging_face(smol_engine, hf_model, prompt):
    r = arc_json("run", str(smol_engine), "--prompt", prompt, "--max-new-tokens", str(N))
    assert r["prompt_ids"][:3] == [1, 9690, 198]  # <|im_start|>system\n from the chat template
    want = hf_greedy(hf_model("smollm2-135m"), r["prompt_ids"], N, eos=[2])
    assert r["token_ids"] == want
    assert r["tokens_per_s"] > 0 and r["forward_passes"] <= len(r["token_ids"]) - 1


def test_answers_coherently(smol_engine):
    done = arc("run", str(smol_engine), "--prompt", PROMPTS[0], "--max-new-tokens", "96")
    assert done.returncode == 0
    assert "def " in done.stdout and "prime" in done.stdout.lower()
