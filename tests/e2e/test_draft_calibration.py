"""benchmarks/draft_calibration.py: the counts of right drafted nodes must be true counts.
A drafter that knows the answer (spec_ceiling's Oracle) is right at every node; one that
drafts the answer shifted by one token is right at none."""

from __future__ import annotations

import torch

from tests.e2e.bench_scripts import load


class Wrong:
    """The answer's next tokens, each off by one: every first token is wrong."""

    name = "wrong"

    def __init__(self, truth: list[int]):
        self.truth = truth

    def propose(self, history: list[int], depth: int, budget: int) -> dict:
        n = len(history)
        chain = [t - 1 if t > 0 else t + 1 for t in self.truth[n : n + min(depth, budget)]]
        return {tuple(chain[: i + 1]): 1.0 for i in range(len(chain))}

    def observe(self, tree, topk) -> None:
        pass


def test_match_length_is_the_longest_match_followed_by_the_path():
    match_length = load("draft_calibration").match_length
    h = [5, 1, 2, 3, 9, 7, 2, 3, 4, 2, 3]
    assert match_length(h, (9,)) == 2  # [2, 3] then 9 at the start
    assert match_length(h, (4,)) == 2  # [2, 3] then 4 too; the 3-gram [4, 2, 3] is new
    assert match_length(h, (9, 7)) == 2
    assert match_length(h, (8,)) is None
    assert match_length([1, 2, 1, 2], (1,)) == 2  # [1, 2] then 1
    copy = [*range(10), 99, *range(10)]  # the last 10 tokens repeat the first 10, then 99
    assert match_length(copy, (99,)) == 10 and match_length(copy, (99,), max_n=4) == 4
    group = load("draft_calibration").length_group
    assert [group(n) for n in (None, 4, 5, 10, 16)] == [
        "match None",
        "match 4",
        "match 5-7",
        "match 8-15",
        "match 16+",
    ]


def test_counts_are_true_for_right_and_wrong_drafts(tiny_engines):
    cal, ceiling = load("draft_calibration"), load("spec_ceiling")
    from arc.runtime.load import load_engine

    eng = load_engine(str(next(iter(tiny_engines.values()))))
    gen = eng.generator
    plan = gen.plan
    b = 4
    opts = {**plan["options"], "adaptive": False, "depth": b - 1, "budget": b - 1}
    ids = eng.prompt_ids("Write a function that adds two numbers.")
    with torch.inference_mode():
        truth = ids + gen.generate(ids, max_new_tokens=16, speculative=False).token_ids
        got = {}
        for name, drafter in (("oracle", ceiling.Oracle(truth)), ("wrong", Wrong(truth))):
            rec = cal.Recorder(drafter)
            gen.plan, gen._drafter = (
                {"kind": "speculative", "options": opts | {"verify_tokens": b}},
                rec,
            )
            try:
                res = gen.generate(ids, max_new_tokens=16)
            finally:
                gen.plan, gen._drafter = plan, None
            assert res.token_ids == truth[len(ids) :]  # lossless either way
            got[name] = rec.counts
    nodes = sum(n for n, _ in got["oracle"].values())
    assert nodes >= 8 and all(n == r for n, r in got["oracle"].values())
    assert {place for _, _, place in got["oracle"]} == {"first", "later"}
    # every first token wrong: only first tokens have a right parent (the root), none right
    assert sum(n for n, _ in got["wrong"].values()) >= 8
    assert {place for _, _, place in got["wrong"]} == {"first"}
    assert all(r == 0 for _, r in got["wrong"].values())
