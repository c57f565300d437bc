"""Contract 1 on every tiny family: `arc run --json` greedy ids == Hugging Face greedy ids,
from a fresh process that loads the AOTInductor engine without compiling anything."""

from __future__ import annotations

import pytest

from tests.conftest import TINY, hf_greedy
from tests.e2e.cli import arc_json

PROMPTS = [
    "Write a Python function that checks if a number is prime.",
    "The capital of France is",
    "a" * 70,  # long enough to cross tiny-mistral's 24-token sliding window during prefill
]


@pytest.mark.parametrize("ref", TINY)
def test_greedy_ids_equal_hugging_face(ref, tiny_engines, hf_model, tmp_path):
    inductor_cache = tmp_path / "inductor"
    inductor_cache.mkdir()
    env = {"TORCHINDUCTOR_CACHE_DIR": str(inductor_cache)}
    for prompt in PROMPTS:
        r = arc_json(
            "run", str(tiny_engines[ref]), "--prompt", prompt, "--max-new-tokens", "40", env=env
        )
        assert len(r["token_ids"]) >= 1 and r["forward_passes"] == len(r["token_ids"]) - 1
        assert r["accepted_per_step"] == 1.0
        want = hf_greedy(hf_model(ref), r["prompt_ids"], 40, eos=[258])
        assert r["token_ids"] == want, (ref, prompt)
    # nothing was compiled at run time: inductor wrote no model kernel to its cache (torch
    # itself compiles a few ~300-byte CPU feature probes, `__avx512_bf16_chk_kernel` and such)
    sources = [p.read_text() for p in inductor_cache.rglob("*.cpp")]
    assert not [s for s in sources if "cpp_fused" in s or "AOTInductorModel" in s]
    assert sum(len(s) for s in sources) < 16_000, [len(s) for s in sources]
