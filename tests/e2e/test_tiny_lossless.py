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
    # nothing was compiled at run time: inductor never wrote to its cache
    assert not any(inductor_cache.rglob("*")), list(inductor_cache.rglob("*"))[:5]


def test_o0_and_o2_agree_and_decode_long(tiny_engines, engine_dir, hf_model):
    """-O0 (no passes, eager) and -O2 (aot) give the same ids over a long generation."""
    o0 = engine_dir / "tiny-llama-O0-eager.arc"
    arc_json(
        "compile",
        "tiny-llama",
        "-O0",
        "--torch-mode",
        "eager",
        "--max-seq-len",
        "256",
        "-o",
        str(o0),
    )
    args = ["--prompt", "hello", "--max-new-tokens", "150", "--ignore-eos"]
    a = arc_json("run", str(o0), *args)
    b = arc_json("run", str(tiny_engines["tiny-llama"]), *args)
    assert a["token_ids"] == b["token_ids"] and len(a["token_ids"]) == 150
    want = hf_greedy(hf_model("tiny-llama"), a["prompt_ids"], 150, eos=None)
    assert a["token_ids"] == want
