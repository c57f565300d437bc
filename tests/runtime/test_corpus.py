"""The `corpus` drafter (arc/runtime/drafters/corpus.py) and its datastore written at compile time
(arc/corpus.py, spec-tree{corpus=N}): lookups agree with a brute-force scan, scores behave as
chances, an engine carries and checks its corpus, drafts from it are accepted and the output is
plain decoding's, and bad options or a crafted corpus are one clear line."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from arc.runtime.drafters import corpus as C
from tests.e2e.cli import arc, arc_json, assert_clean_error


def _docs(seed=0, n=60, length=40, vocab=12):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(length)] for _ in range(n)]


def _flat(docs):
    out = []
    for d in docs:
        out += d + [C.SEP]
    return out


def _brute(flat, history):
    """(n, newest MAX_HITS ends) of the longest suffix of `history` (N_MIN..N_MAX tokens) that
    occurs in `flat` within one document."""
    for n in range(min(C.N_MAX, len(history)), C.N_MIN - 1, -1):
        gram = history[-n:]
        ends = [
            i + n - 1
            for i in range(len(flat) - n + 1)
            if flat[i : i + n] == gram and C.SEP not in flat[i : i + n]
        ]
        if ends:
            return n, ends[-C.MAX_HITS :]
    return 0, []


def test_lookups_agree_with_a_scan():
    docs = _docs()
    flat = _flat(docs)
    index = C.CorpusIndex(np.array(flat, dtype=np.int32))
    rng = random.Random(1)
    found = 0
    for _ in range(300):
        d = rng.choice(docs)
        cut = rng.randrange(1, len(d))
        history = [rng.randrange(12) for _ in range(rng.randrange(0, 4))] + d[:cut]
        want = _brute(flat, history)
        assert index.longest(history) == want, history
        found += want[0] >= 4
    assert found > 50  # long matches were among the cases


def test_matches_never_span_two_documents():
    index = C.CorpusIndex(np.array([5, 6, C.SEP, 7, 8, 9, C.SEP], dtype=np.int32))
    assert index.longest([6, 7]) == (0, [])  # 6 | 7 only across the separator
    assert index.longest([1, 7, 8]) == (2, [4])


def test_scores_are_chances_along_paths():
    # after (1, 2): 3 4 five times, 3 9 once, 7 once
    docs = [[1, 2, 3, 4]] * 5 + [[1, 2, 3, 9], [1, 2, 7]]
    drafter = C.Corpus(C.CorpusIndex(np.array(_flat(docs), dtype=np.int32)))
    got = drafter.propose([0, 1, 2], depth=3, budget=7)
    assert set(got) >= {(3,), (3, 4)}
    for path, score in got.items():
        assert 0 < score <= C.CAP
        if len(path) > 1:
            assert path[:-1] in got and score <= got[path[:-1]]  # closed under prefixes
    assert got[(3,)] > got.get((7,), 0.0)  # the continuation most occurrences share
    assert got[(3, 4)] > got.get((3, 9), 0.0)
    single = C.Corpus(C.CorpusIndex(np.array(_flat([[1, 2, 3, 4]]), dtype=np.int32)))
    agreed = C.Corpus(C.CorpusIndex(np.array(_flat([[1, 2, 3, 4]] * 6), dtype=np.int32)))
    assert agreed.propose([1, 2], 1, 1)[(3,)] > single.propose([1, 2], 1, 1)[(3,)]
    assert drafter.hint([0, 1, 2]) == got[(3,)]
    assert drafter.propose([11, 12], 3, 7) == {} and drafter.hint([11, 12]) == 0.0


@pytest.fixture(scope="module")
def corpus_engine(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "tc.arc"
    arc_json(
        "compile", "tiny-llama", "--passes", "kv-fusion,spec-tree{corpus=6}",
        "--torch-mode", "eager", "--max-seq-len", "512", "-o", str(out),
    )  # fmt: skip
    return out


def test_engine_drafts_from_its_corpus_losslessly(corpus_engine):
    from arc.runtime.generate import Generator
    from arc.runtime.load import load_engine
    from arc.runtime.sampling import SamplingParams

    eng = load_engine(corpus_engine)
    store = np.array(eng.generator.steps.corpus.tokens)
    assert (store == C.SEP).sum() == 6
    assert eng.manifest["decode_plan"]["options"]["corpus"] == 6
    assert "corpus" in [d.name for d in eng.generator.drafter(1).drafters]  # auto merges it
    plan = {"kind": "speculative", "options": {**eng.generator.plan["options"], "draft": "corpus"}}
    alone = Generator(eng.generator.steps, eng.tokenizer, [], plan=plan)
    docs = np.split(store, np.nonzero(store == C.SEP)[0] + 1)[:-1]
    doc = max(docs, key=len)[:-1].tolist()  # a question and the model's greedy answer
    assert len(doc) > 40
    with torch.inference_mode():
        for gen in (eng.generator, alone):
            for ids in (doc[:-30], eng.prompt_ids("Tell me something else.")):
                for sampling in (SamplingParams(), SamplingParams(0.8, top_p=0.95, seed=3)):
                    kw = dict(max_new_tokens=48, ignore_eos=True, sampling=sampling)
                    plain = gen.generate(ids, speculative=False, **kw)
                    spec = gen.generate(ids, **kw)
                    assert spec.token_ids == plain.token_ids  # sampled: the same draws
        # inside an answer the corpus holds: what follows is drafted from it and accepted
        alone.forget()
        spec = alone.generate(doc[:-30], max_new_tokens=24, ignore_eos=True)
    assert spec.token_ids == doc[-30:-6]
    assert spec.accepted_per_step > 2.0


def test_speculative_writer_writes_the_plain_writers_corpus(corpus_engine, monkeypatch):
    """The compile writes the corpus with the engine's speculative loop, drafting from the
    answers so far: the same tokens as plain decoding, greedy answers and seeded questions."""
    from arc import corpus as writer
    from arc.compiler import _writing_plan
    from arc.runtime.generate import Generator
    from arc.runtime.load import load_engine

    eng = load_engine(corpus_engine)
    steps, eos = eng.generator.steps, list(eng.generator.eos)
    plan = _writing_plan({"kind": "speculative", "options": {**eng.generator.plan["options"],
                                                             "draft": "corpus"}})  # fmt: skip
    assert plan["options"]["draft"] == "auto"
    monkeypatch.setattr(writer, "REINDEX", 2)
    spec = Generator(steps, eng.tokenizer, eos, plan=plan)
    runs = []
    real = spec.generate
    monkeypatch.setattr(spec, "generate", lambda *a, **k: runs.append(real(*a, **k)) or runs[-1])
    steps.corpus = None
    fast = writer.self_instruct(spec, 5)
    slow = writer.self_instruct(Generator(steps, eng.tokenizer, eos), 5)
    assert fast.tolist() == slow.tolist() and (slow == C.SEP).sum() == 5
    assert steps.corpus is not None  # re-indexed while writing
    assert sum(r.forward_passes for r in runs) < sum(len(r.token_ids) - 1 for r in runs)


@pytest.mark.parametrize(
    "passes, fragment",
    [
        ("spec-tree{corpus=-1}", "corpus=-1 must be"),
        ("spec-tree{draft=ngram,corpus=4}", "needs draft=corpus or auto"),
        ("spec-tree{draft=corpus}", "draft=corpus needs corpus=N"),
    ],
)
def test_bad_corpus_options_are_one_line(tmp_path, passes, fragment):
    done = arc("compile", "tiny-llama", "--passes", passes, "-o", str(tmp_path / "x.arc"))
    assert_clean_error(done, fragment)
    assert not (tmp_path / "x.arc").exists()


def _with_corpus(src, dst, tokens):
    """Engine `src` with its corpus payload replaced by `tokens` (an array), or removed
    (None), listed in the manifest with its true size and SHA-256."""
    import json

    from safetensors.numpy import save

    from tests.e2e.engine_tools import MANIFEST, MANIFEST_SHA, file_entry, read_members
    from tests.e2e.engine_tools import write_engine as write

    members = read_members(src)
    del members[MANIFEST_SHA]
    manifest = json.loads(members.pop(MANIFEST))
    del members["corpus.safetensors"], manifest["files"]["corpus.safetensors"]
    if tokens is not None:
        data = save({"tokens": tokens})
        members["corpus.safetensors"] = data
        manifest["files"]["corpus.safetensors"] = file_entry(data)
    return write(dst, manifest, members)


@pytest.mark.parametrize(
    "tokens, fragment",
    [
        (np.array([1, 2, 10**6, C.SEP], dtype=np.int32), "outside the vocabulary"),
        (np.array([1, -5, 3], dtype=np.int32), "outside the vocabulary"),
        (np.array([1.0, 2.0], dtype=np.float32), "no 1-D int32"),
        (np.array([[1, 2]], dtype=np.int32), "no 1-D int32"),
        (None, "lacks corpus.safetensors"),
    ],
)
def test_crafted_corpus_is_refused(corpus_engine, tmp_path, tokens, fragment):
    bad = _with_corpus(corpus_engine, tmp_path / "bad.arc", tokens)
    done = arc("run", str(bad), "--prompt", "hi", "--max-new-tokens", "2")
    assert_clean_error(done, fragment)


def test_auto_asks_the_corpus_only_where_the_others_draft_little():
    from arc.runtime.drafters.auto import FALLBACK_BELOW, Merge

    class Fixed:
        def __init__(self, name, scored, fallback=False):
            self.name, self.scored, self.fallback, self.asked = name, scored, fallback, 0

        def propose(self, history, depth, budget):
            self.asked += 1
            return self.scored

    sure = Fixed("ngram", {(5,): FALLBACK_BELOW, (5, 6): 0.4})
    unsure = Fixed("ngram", {(5,): FALLBACK_BELOW / 2})
    store = Fixed("corpus", {(7,): 0.3}, fallback=True)
    assert Merge([sure, store]).propose([1], 2, 4) == sure.scored and store.asked == 0
    merged = Merge([unsure, store])
    assert merged.propose([1], 2, 4) == {(5,): FALLBACK_BELOW / 2, (7,): 0.3}
    assert store.asked == 1 and merged.sources[(7,)] == "corpus"


def test_tuning_drafts_with_the_corpus(tmp_path):
    """-O3's tuning (arc/tune.py) with a corpus: written first, both kept in the plan."""
    from arc.runtime.load import load_engine

    out = tmp_path / "tuned.arc"
    arc_json(
        "compile", "tiny-llama", "--passes", "kv-fusion,spec-tree{tune=true,corpus=2}",
        "--torch-mode", "eager", "--max-seq-len", "512", "-o", str(out),
    )  # fmt: skip
    eng = load_engine(out)
    opts = eng.manifest["decode_plan"]["options"]
    assert opts["corpus"] == 2 and opts["tune"]["chosen"] in opts["verify_sizes"]
    assert len(eng.generator.steps.corpus.tokens) > 10
