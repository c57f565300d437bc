"""benchmarks/spec_ceiling.py: the speculative loop fed perfect drafts (the engine's own plain
output) must accept every drafted token and keep the ids identical."""

from __future__ import annotations

import torch

from tests.e2e.bench_scripts import load


def test_oracle_proposes_the_known_continuation():
    oracle = load("spec_ceiling").Oracle([1, 2, 3, 4, 5, 6])
    assert oracle.propose([1, 2], 3, 8) == {(3,): 1.0, (3, 4): 1.0, (3, 4, 5): 1.0}
    assert oracle.propose([1, 2, 3, 4, 5], 3, 8) == {(6,): 1.0}  # the output's end
    assert oracle.propose([1, 9], 3, 8) == {}  # off the known output


def test_perfect_drafts_are_all_accepted(tiny_engines):
    mod = load("spec_ceiling")
    engine = next(iter(tiny_engines.values()))
    prompts = ["Write a function that adds two numbers."]
    threads = torch.get_num_threads()
    out = mod.run(str(engine), prompts, [2], 16, threads, 1, drafters=("ngram",), size=4)
    assert list(out) == ["plain", "oracle B=2", "ngram B=4", "engine"]
    ((tps, per_forward, same),) = out["oracle B=2"][0]
    assert same and tps > 0
    # 15 tokens after the first: a 2-node verify yields 2 each, so 8 forwards at most
    assert per_forward >= 15 / 8
    ((_, plain_per_forward, plain_same),) = out["plain"][0]
    assert plain_same and plain_per_forward == 1.0
    for arm in ("ngram B=4", "engine"):  # real drafters: lossless, at least one token a forward
        ((tps, per_forward, same),) = out[arm][0]
        assert same and tps > 0 and per_forward >= 1.0
