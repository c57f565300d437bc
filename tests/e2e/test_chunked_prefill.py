"""Contract 1 with chunked prefill: a prompt longer than the engine's prefill chunk, fed to the
cache chunk by chunk, gives Hugging Face's greedy ids (HF runs the prompt in one forward).

tiny-mistral, so the chunks also cross its 24-token sliding window; lengths chosen so the last
chunk has several tokens, one token (which goes to the decode function), or is full.
"""

from __future__ import annotations

import pytest

from tests.conftest import hf_greedy
from tests.e2e.cli import arc_json

REF, CHUNK, N = "tiny-mistral", 16, 24
TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. "


@pytest.fixture(scope="module")
def chunked_engine(engine_dir):
    out = engine_dir / f"{REF}-chunk{CHUNK}.arc"
    summary = arc_json(
        "compile",
        REF,
        "--target",
        "torch",
        "-O1",
        "--max-seq-len",
        "128",
        "--prefill-chunk",
        str(CHUNK),
        "-o",
        str(out),
    )
    assert summary["target"] == "torch"
    return out


@pytest.mark.parametrize("length", [50, 49, 64])  # chunks 16+16+16+2, 16+16+16+1, 4 x 16
def test_chunked_prefill_equals_hugging_face(chunked_engine, hf_model, length):
    prompt = (TEXT * 2)[:length]
    r = arc_json(
        "run", str(chunked_engine), "--prompt", prompt, "--no-chat-template",
        "--max-new-tokens", str(N), "--ignore-eos",
    )  # fmt: skip
    assert len(r["prompt_ids"]) == length > CHUNK  # the byte tokenizer: one token a character
    assert r["token_ids"] == hf_greedy(hf_model(REF), r["prompt_ids"], N, eos=None)
