"""`arc eval`: greedy agreement and perplexity of a pipeline's Module against no passes.

A lossless pipeline must measure as exactly lossless; perturbed weights must not; the
perplexity of the no-pass Module is Hugging Face's own on the same token ids."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from arc.errors import ArcError
from arc.evaluate import (
    agreement,
    compare,
    corpus_ids,
    evaluate,
    load_prompts,
    perplexity,
    subject,
    windows,
)
from tests.conftest import TINY
from tests.e2e.cli import arc, arc_json, assert_clean_error

PROMPTS = ["The capital of France is", "Write a haiku about the sea.", "a" * 40]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("eval") / "prompts.json"
    path.write_text(json.dumps([{"prompt": p} for p in PROMPTS[:2]] + [PROMPTS[2]]))
    return path


def test_agreement_counts_up_to_the_reference_eos():
    eos = [9]
    assert agreement([1, 2, 3], [1, 2, 3], 3, eos) == {
        "compared": 3,
        "matching": 3,
        "agreement": 1.0,
        "first_divergence": 3,
    }
    # compared through the reference's EOS; what the candidate does after it does not count
    r = agreement([1, 9], [1, 9, 5, 5], 4, eos)
    assert (r["compared"], r["agreement"], r["first_divergence"]) == (2, 1.0, 4)
    r = agreement([1, 2, 3, 4], [1, 7, 3], 4, eos)  # a differing and a missing position
    assert (r["matching"], r["agreement"], r["first_divergence"]) == (2, 0.5, 1)


def test_windows_predict_every_token_once():
    assert windows(150, 64) == [(0, 64), (63, 127), (126, 150)]
    assert windows(64, 64) == [(0, 64)]
    assert windows(65, 64) == [(0, 64), (63, 65)]


def test_lossless_pipeline_measures_lossless(prompts_file):
    r = arc_json(
        "eval", "tiny-qwen2", "--passes", "kv-fusion", "--prompts", str(prompts_file),
        "--max-new-tokens", "12", "--ppl-tokens", "200",
    )  # fmt: skip
    assert r["model"] == "tiny-qwen2" and r["pipeline"] == "kv-fusion"
    g, p = r["greedy"], r["perplexity"]
    assert set(g) == {"prompts", "max_new_tokens", "agreement", "mean_first_divergence",
                      "per_prompt"}  # fmt: skip
    assert (g["prompts"], g["max_new_tokens"], g["agreement"]) == (3, 12, 1.0)
    assert g["mean_first_divergence"] == 12.0
    assert [row["index"] for row in g["per_prompt"]] == [0, 1, 2]
    for row in g["per_prompt"]:
        assert set(row) == {"index", "prompt_tokens", "compared", "matching", "agreement",
                            "first_divergence"}  # fmt: skip
        assert 1 <= row["compared"] <= 12 and row["matching"] == row["compared"]
    assert set(p) == {"tokens", "window", "reference", "passes", "delta_pct", "corpus"}
    assert p["tokens"] == 200 and p["corpus"].startswith("pydoc_data.topics")
    assert p["reference"] > 1 and abs(p["delta_pct"]) < 1e-3
    assert r["wall_s"] > 0


def test_text_output_is_a_table(prompts_file):
    done = arc(
        "eval", "tiny-llama", "--passes", "kv-fusion", "--prompts", str(prompts_file),
        "--max-new-tokens", "4", "--ppl-tokens", "50",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "agreement 1.0000" in done.stdout and "delta +0.0000 %" in done.stdout
    assert "\r" not in done.stderr  # no progress bar when stderr is not a terminal


def test_lossy_pass_measures_lossy(prompts_file):
    r = arc_json(
        "eval", "tiny-llama", "--passes", "kv-fusion,weight-format{mode=int4}",
        "--prompts", str(prompts_file), "--max-new-tokens", "12", "--ppl-tokens", "200",
    )  # fmt: skip
    assert r["pipeline"] == "kv-fusion,weight-format{mode=int4}"
    assert r["greedy"]["agreement"] < 1.0 and r["greedy"]["mean_first_divergence"] < 12
    assert r["perplexity"]["delta_pct"] != 0.0


def test_perturbed_weights_measure_lossy():
    from arc.compiler import trace_model

    loaded, _ = trace_model("tiny-llama", 64)
    gen = torch.Generator().manual_seed(0)
    noisy = {k: v + 0.5 * v.std() * torch.randn(v.shape, generator=gen) if v.numel() > 1 else v
             for k, v in loaded.weights.items()}  # fmt: skip
    r = evaluate(
        "tiny-llama", "", PROMPTS, max_new_tokens=16, ppl_tokens=100, max_seq_len=64,
        candidate_weights=noisy,
    )  # fmt: skip
    assert r["pipeline"] == ""
    assert r["greedy"]["agreement"] < 1.0
    assert r["greedy"]["mean_first_divergence"] < 16
    assert abs(r["perplexity"]["delta_pct"]) > 1.0


@pytest.mark.parametrize("ref", TINY)
def test_perplexity_equals_hugging_face(ref, traced, hf_model):
    """Three windows of a 64-slot cache (tiny-mistral's 24-token sliding window inside each);
    Hugging Face scores the same windows with its own forward."""
    loaded, module = traced(ref, 64)
    ids = corpus_ids(loaded.tokenizer, 150)
    ours = perplexity(subject(module, loaded.weights, loaded.tokenizer), ids)
    nll = 0.0
    with torch.inference_mode():
        for start, end in [(0, 64), (63, 127), (126, 150)]:
            chunk = torch.tensor([ids[start:end]])
            logits = hf_model(ref)(input_ids=chunk).logits[0, :-1]
            nll += float(F.cross_entropy(logits, chunk[0, 1:], reduction="sum"))
    want = torch.tensor(nll / 149).exp().item()
    assert ours == pytest.approx(want, rel=1e-4)


def test_compare_of_a_module_with_itself_is_exact(traced):
    loaded, module = traced("tiny-mistral", 64)
    s = subject(module, loaded.weights, loaded.tokenizer)
    ids = [list(loaded.tokenizer.encode(p)) for p in PROMPTS]
    r = compare(s, s, ids, corpus_ids(loaded.tokenizer, 80), 8)
    assert r["greedy"]["agreement"] == 1.0 and r["perplexity"]["delta_pct"] == 0.0


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["no-such-model"], "unknown model"),
        (["tiny-llama", "--passes", "no-such-pass"], "unknown pass"),
        (["tiny-llama", "--passes", "kv-fusion{x=1}"], "bad option"),
        (["tiny-llama", "--prompts", "/nonexistent/prompts.json"], "--prompts"),
        (["tiny-llama", "--max-new-tokens", "0"], "--max-new-tokens"),
        (["tiny-llama", "--ppl-tokens", "1"], "--ppl-tokens"),
        (["tiny-llama", "--ppl-tokens", "x"], "--ppl-tokens"),
    ],
)
def test_bad_input_is_one_line(args, fragment):
    assert_clean_error(arc("eval", *args), fragment)


def test_prompts_file_that_is_not_a_prompt_list(tmp_path):
    path = tmp_path / "p.json"
    for text in ["{}", "[]", '[{"kind": "x"}]', '["ok", 3]', "not json"]:
        path.write_text(text)
        with pytest.raises(ArcError, match="--prompts"):
            load_prompts(path)
    path.write_text('["a", {"prompt": "b", "kind": "x"}]')
    assert load_prompts(path) == ["a", "b"]


# ---------------------------------------------------------------- long context (sparse attention)


def test_streamed_perplexity_equals_one_window(traced):
    """Streaming (a prefill, then one decode step per token) scores the same text as one dense
    window does, when the cache holds all of it."""
    from arc.long_context import stream_nll

    loaded, module = traced("tiny-llama", 256)
    s = subject(module, loaded.weights, loaded.tokenizer)
    ids = corpus_ids(loaded.tokenizer, 200)
    streamed = torch.tensor(stream_nll(s, ids, 16) / 199).exp().item()
    assert streamed == pytest.approx(perplexity(s, ids), rel=1e-5)


def test_long_context_through_a_ring_and_through_blocks():
    kw = dict(max_new_tokens=4, ppl_tokens=50, max_seq_len=64, long_context=300)
    ring = evaluate("tiny-llama", "sparse-attention{sink=4}", PROMPTS[:2], **kw)
    lc = ring["long_context"]
    assert set(lc) == {"tokens", "prefix", "cache", "reference", "passes", "delta_pct"}
    assert lc["tokens"] == 300 and lc["prefix"] == 64  # the prefill fits the 64-slot ring
    assert lc["cache"] == {"reference": 300, "passes": 64}  # the text runs past the ring
    assert lc["reference"] > 1 and abs(lc["delta_pct"]) > 0.1
    assert ring["perplexity"]["delta_pct"] == 0.0  # windows of the ring never wrap it
    quest = evaluate(
        "tiny-llama", "sparse-attention{kind=block-topk,block=8,topk=4}", PROMPTS[:2], **kw
    )
    lc = quest["long_context"]
    assert lc["cache"] == {"reference": 300, "passes": 300} and lc["prefix"] == 128
    # the same reference, prefilled 128 tokens instead of 64: equal to rounding
    assert lc["reference"] == pytest.approx(ring["long_context"]["reference"], rel=1e-5)
    assert abs(lc["delta_pct"]) > 0.1
    covering = "sparse-attention{kind=block-topk,block=8,topk=38}"  # 38 * 8 >= 300: dense
    assert evaluate("tiny-llama", covering, PROMPTS[:2], **kw)["long_context"]["delta_pct"] == 0
    plain = dict(kw, long_context=0)
    assert "long_context" not in evaluate("tiny-llama", "kv-fusion", PROMPTS[:2], **plain)


def test_long_context_cli(prompts_file):
    done = arc(
        "eval", "tiny-llama", "--passes", "sparse-attention{sink=4}", "--prompts",
        str(prompts_file), "--max-new-tokens", "4", "--ppl-tokens", "50", "--max-seq-len",
        "64", "--long-context", "200",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "long ctx    reference" in done.stdout and "caches 200 / 64 slots" in done.stdout
    assert_clean_error(arc("eval", "tiny-llama", "--long-context", "1"), "--long-context")
    bad = arc("eval", "tiny-llama", "--long-context", "5000", "--ppl-tokens", "50")
    assert_clean_error(bad, "--long-context 5000")
