"""Contract 1 on every tiny family: `arc run --json` greedy ids == Hugging Face greedy ids,
from a fresh process that loads the AOTInductor engine without compiling anything."""

from __future__ import annotations

import pytest

from tests.conftest import TINY, hf_greedy
from tests.e2e.cli import arc_json
from tests.e2e.recompile import compile_on_purpose, compiled_files, kernel_sources

PROMPTS = [
    "Write a Python function that checks if a number is prime.",
    "The capital of France is",
    "a" * 70,  # long enough to cross tiny-mistral's 24-token sliding window during prefill
]


@pytest.fixture(scope="module")
def recompile_check_can_fail(tmp_path_factory):
    """The no-recompile check below must see a compile when there is one: compiling on purpose
    the same way (a fresh process, TORCHINDUCTOR_CACHE_DIR set) must trip both of its tests."""
    cache = tmp_path_factory.mktemp("inductor-control")
    compile_on_purpose(cache)
    assert compiled_files(cache), "Inductor wrote nothing to TORCHINDUCTOR_CACHE_DIR"
    assert kernel_sources(cache), "kernel names changed: update MARKERS in tests/e2e/recompile.py"


@pytest.mark.parametrize("ref", TINY)
def test_greedy_ids_equal_hugging_face(
    ref, tiny_engines, hf_model, tmp_path, recompile_check_can_fail
):
    inductor_cache = tmp_path / "inductor"
    inductor_cache.mkdir()
    env = {"TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)}
    verifies = 0
    for prompt in PROMPTS:
        r = arc_json(
            "run", str(tiny_engines[ref]), "--prompt", prompt, "--max-new-tokens", "40", env=env
        )
        # -O2 speculates: fewer forwards than tokens when drafts are accepted
        assert len(r["token_ids"]) >= 1 and r["forward_passes"] <= len(r["token_ids"]) - 1
        assert r["accepted_per_step"] >= 1.0
        verifies += r["verify_passes"]
        want = hf_greedy(hf_model(ref), r["prompt_ids"], 40, eos=[258])
        assert r["token_ids"] == want, (ref, prompt)
    assert verifies > 0  # the AOT verify ran, and its output is HF's
    # nothing was compiled at run time: Inductor left only torch's CPU feature probes
    assert compiled_files(inductor_cache) == []
    assert kernel_sources(inductor_cache) == []
