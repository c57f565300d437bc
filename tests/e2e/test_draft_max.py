"""`arc run --draft-max N`: a speculative engine's trees capped at run time (0: plain
decoding), as llama.cpp's --draft-max and vLLM's num_speculative_tokens are; the greedy tokens
are the same at every cap. A value out of range is one clear line (exit 2)."""

from __future__ import annotations

from tests.e2e.cli import arc, arc_json, assert_clean_error

PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the"


def _run(engine: str, *extra: str) -> dict:
    return arc_json("run", engine, "--prompt", PROMPT, "--max-new-tokens", "60", "--ignore-eos",
                    *extra)  # fmt: skip


def test_caps_keep_the_tokens_and_bound_the_trees(tiny_engines):
    """From fresh processes, as a user runs them (the loop's tree choices at a cap depend on
    timing here; tests/runtime/test_speculative.py checks every cap with fixed trees)."""
    engine = str(tiny_engines["tiny-llama"])
    base = _run(engine)
    assert base["verify_passes"] > 0
    one = _run(engine, "--draft-max", "1")
    assert one["token_ids"] == base["token_ids"]
    assert max(row["nodes"] for row in one["steps"]["by_size"]) <= 2
    zero = _run(engine, "--draft-max", "0")  # plain decoding: a forward per token
    assert zero["token_ids"] == base["token_ids"]
    assert zero["verify_passes"] == 0 and zero["forward_passes"] == len(zero["token_ids"]) - 1


def test_out_of_range_caps_are_one_line(tiny_engines, tmp_path):
    engine = str(tiny_engines["tiny-llama"])
    run = ("run", engine, "--prompt", "hi", "--max-new-tokens", "4", "--draft-max")
    assert_clean_error(arc(*run, "-1"), "--draft-max must be 0")
    assert_clean_error(arc(*run, "8"), "this engine drafts at most 7 tokens a verify")
    plain = tmp_path / "plain.arc"
    arc_json("compile", "tiny-qwen2", "-O1", "--torch-mode", "eager", "--max-seq-len", "64",
             "-o", str(plain))  # fmt: skip
    done = arc("run", str(plain), "--prompt", "hi", "--max-new-tokens", "4", "--draft-max", "2")
    assert_clean_error(done, "compiled without spec-tree")
    assert arc_json("run", str(plain), "--prompt", "hi", "--max-new-tokens", "4",
                    "--draft-max", "0")["verify_passes"] == 0  # fmt: skip
