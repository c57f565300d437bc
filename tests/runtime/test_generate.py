"""The decode loop: chunked prefill, sampling, stop strings, streaming, cache limits."""

from __future__ import annotations

import pytest
import torch

from arc.lowering import lower
from arc.runtime.generate import Generator
from arc.runtime.sampling import SamplingParams, filter_logits
from arc.runtime.steps import Steps


@pytest.fixture(scope="module")
def make_gen(traced):
    def make(ref="tiny-llama", chunk=256):
        loaded, module = traced(ref)
        fns, kv = lower(module, loaded.weights)
        steps = Steps(fns, max_seq_len=module.kv.max_seq_len, reset=kv.reset)
        return Generator(steps, loaded.tokenizer, [258], prefill_chunk=chunk), loaded.tokenizer

    return make


def _ids(tok, text):
    return tok.encode(text)


def test_chunked_prefill_matches_one_chunk(make_gen):
    whole, tok = make_gen(chunk=256)
    chunked, _ = make_gen(chunk=7)
    ids = _ids(tok, "The quick brown fox jumps over the lazy dog, twice over.")
    with torch.inference_mode():
        a = whole.generate(ids, max_new_tokens=20, ignore_eos=True)
        b = chunked.generate(ids, max_new_tokens=20, ignore_eos=True)
    assert a.token_ids == b.token_ids


def test_seeded_sampling_is_reproducible_and_varies(make_gen):
    gen, tok = make_gen()
    ids = _ids(tok, "hello")
    p = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=3)
    with torch.inference_mode():
        a = gen.generate(ids, max_new_tokens=30, sampling=p, ignore_eos=True)
        b = gen.generate(ids, max_new_tokens=30, sampling=p, ignore_eos=True)
        c = gen.generate(
            ids, max_new_tokens=30, sampling=SamplingParams(1.0, seed=4), ignore_eos=True
        )
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_filters():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0])
    k2 = filter_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.isfinite(k2).tolist() == [True, True, False, False, False]
    probs = torch.softmax(logits, -1)  # 0.64, 0.24, 0.09, ...
    p = filter_logits(logits, SamplingParams(temperature=1.0, top_p=0.8))
    assert torch.isfinite(p).tolist() == [True, True, False, False, False]
    assert probs[0] < 0.8 < probs[0] + probs[1]
    t = filter_logits(logits, SamplingParams(temperature=0.5))
    assert torch.equal(t, (logits - 4) * 2)  # shifted so the top logit is 0, then scaled


def test_stop_string_and_streaming(make_gen):
    gen, tok = make_gen()
    ids = _ids(tok, "hello")
    with torch.inference_mode():
        full = gen.generate(ids, max_new_tokens=40, ignore_eos=True)
    stop = full.text[5:8]
    assert stop, "generation too short to pick a stop string"
    pieces: list[str] = []
    with torch.inference_mode():
        r = gen.generate(
            ids, max_new_tokens=40, ignore_eos=True, stop=[stop], on_text=pieces.append
        )
    assert r.stop_reason == "stop_string"
    assert r.text == full.text[: full.text.find(stop)]
    assert "".join(pieces) == r.text


def test_cache_full_stops_cleanly(traced):
    loaded, module = traced("tiny-llama", max_seq_len=32)
    fns, kv = lower(module, loaded.weights)
    gen = Generator(Steps(fns, max_seq_len=32, reset=kv.reset), loaded.tokenizer, [258])
    with torch.inference_mode():
        r = gen.generate(list(range(3, 23)), max_new_tokens=100, ignore_eos=True)
    assert r.stop_reason == "cache_full" and len(r.token_ids) == 32 - 20 + 1
