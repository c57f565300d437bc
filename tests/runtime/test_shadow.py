"""Shadow calibration (arc/runtime/speculative.py, _Shadow): a draft that loses to a plain step
is checked against the tokens that follow, and what its tree would have accepted calibrates
the loop as a verify would, so the loop needs no probe verifies to notice drafts improving."""

from __future__ import annotations

import pytest
import torch

from arc.runtime import speculative
from arc.runtime.speculative import _Shadow
from tests.runtime.test_speculative import REPEAT, _gen


def test_shadow_counts_what_the_tree_would_have_accepted():
    tree = [((5,), 0.5), ((5, 6), 0.4), ((7,), 0.2)]
    start = 3  # paths follow history[:3]
    told = {  # tokens after start -> (paths known accepted, decided)
        (): ([], False),
        (5,): ([(5,)], False),  # (5, 6) may follow
        (5, 6): ([(5,), (5, 6)], True),
        (5, 9): ([(5,)], True),
        (7,): ([(7,)], True),  # a leaf: nothing longer to wait for
        (8,): ([], True),
    }
    for after, want in told.items():
        assert _Shadow(tree, {}, start).advance([1, 2, 3, *after]) == want, after
    shadow = _Shadow(tree, {}, start)  # followed token by token: each path credited once
    assert shadow.advance([1, 2, 3, 5]) == ([(5,)], False)
    assert shadow.advance([1, 2, 3, 5, 6]) == ([(5, 6)], True)


class _Fixed:
    """Drafts `path` after every token with `score`, whatever the history."""

    name = "fixed"

    def __init__(self, path, score):
        self.path, self.score = tuple(path), score

    def propose(self, history, depth, budget):
        return {self.path[: i + 1]: self.score for i in range(len(self.path))}

    def observe(self, tree, topk):
        pass


class _Oracle(_Fixed):
    """Drafts the true continuation (known from a plain run), scored far too low."""

    def __init__(self, ids, score):
        super().__init__((), score)
        self.ids = ids

    def propose(self, history, depth, budget):
        n = len(history)
        self.path = tuple(self.ids[n : n + depth])
        return super().propose(history, depth, budget)


def _run(gen, ids, drafter, shadow, monkeypatch, n=120, **kw):
    monkeypatch.setattr(speculative, "SHADOW", shadow)
    # step costs from a fixed model, not this machine's timings: the loop's choices repeat
    cost = lambda self, size: 1.0 + 0.15 * (size - 1)  # noqa: E731
    monkeypatch.setattr(speculative.SpeculativeLoop, "_time", cost)
    gen._drafter = drafter
    with torch.inference_mode():
        return gen.generate(ids, max_new_tokens=n, ignore_eos=True, **kw)


@pytest.fixture
def tiny(traced):
    gen, tok = _gen(traced, "tiny-llama", "kv-fusion,spec-tree{budget=7,depth=4}")
    ids = tok.encode(REPEAT)
    with torch.inference_mode():
        plain = gen.generate(ids, max_new_tokens=120, ignore_eos=True, speculative=False)
    return gen, ids, plain


def test_drafts_that_fail_cost_no_probe_verifies(tiny, monkeypatch):
    """A drafter that is always wrong: probes verify it again and again; in the shadow its
    failures are seen without a verify."""
    gen, ids, plain = tiny
    never = max(plain.token_ids) + 1  # a token the model does not produce here
    probed = _run(gen, ids, _Fixed([never, never], 0.9), 0, monkeypatch)
    shadowed = _run(gen, ids, _Fixed([never, never], 0.9), 1, monkeypatch)
    assert probed.token_ids == shadowed.token_ids == plain.token_ids
    assert probed.verify_passes >= 3  # probes after 8, 16, 32, 64 plain steps (4 here)
    assert shadowed.verify_passes <= 1  # at most the first, at the prior's face value


def test_underrated_drafts_are_found_without_probes(tiny, monkeypatch):
    """A drafter that is always right but scores its drafts at 0.02: a plain step beats
    them at face value; the shadow sees them accepted, the calibration rises, and the loop
    verifies them (most steps then yield several tokens)."""
    gen, ids, plain = tiny
    ids_all = list(ids) + plain.token_ids
    got = _run(gen, ids, _Oracle(ids_all, 0.02), 1, monkeypatch)
    assert got.token_ids == plain.token_ids
    assert got.accepted_per_step > 2.5  # 3.3 here; with probes instead (SHADOW=0) 1.7


def test_no_path_is_more_than_certain(tiny):
    """Calibrated above 1 (a drafter that underrates itself), a path's expected acceptance
    is still a chance: at most WEIGHT_CAP, and at most its parent's."""
    gen, _, _ = tiny
    loop = speculative.SpeculativeLoop(gen.steps, _Fixed([1], 0.5), gen.plan["options"])
    loop.calib.add(12.0, 4.0)  # accepted 3x what was predicted
    w = loop._weights({(1,): 0.9, (1, 2): 0.5, (3,): 0.2})
    assert w[(1,)] == speculative.WEIGHT_CAP < 1
    assert w[(1, 2)] == speculative.WEIGHT_CAP  # 0.5 x ~2.9, capped
    assert 0.5 < w[(3,)] < speculative.WEIGHT_CAP  # the ratio still lifts a weak path


class _Late(_Oracle):
    """Drafts nothing until the history reaches `start` tokens, then the true continuation;
    its hint (the next token's best score) says so from then on."""

    def __init__(self, ids, start):
        super().__init__(ids, 0.95)
        self.start = start

    def propose(self, history, depth, budget):
        return super().propose(history, depth, budget) if len(history) >= self.start else {}

    def hint(self, history):
        return 0.95 if len(history) >= self.start else 0.0


def test_a_quiet_request_wakes_when_a_copy_starts(tiny, monkeypatch):
    """After QUIET_AFTER dry steps the loop stops drafting; a drafter's hint that a copy
    starts wakes it at once (WAKE), where without WAKE it waits for the next drafting step."""
    gen, ids, plain = tiny
    ids_all = list(ids) + plain.token_ids

    def step_at(res, start):  # the step whose history holds `start` tokens
        return next(s for s in res.trace if s["pos"] == start - 1)

    monkeypatch.setattr(speculative, "WAKE", 0)
    for start in range(len(ids) + 40, len(ids) + 48):  # one a quiet step lands on
        asleep = _run(gen, ids, _Late(ids_all, start), 1, monkeypatch, trace=True)
        if step_at(asleep, start).get("quiet"):
            break
    assert step_at(asleep, start).get("quiet") and step_at(asleep, start)["nodes"] == 1
    monkeypatch.setattr(speculative, "WAKE", 0.5)
    woken = _run(gen, ids, _Late(ids_all, start), 1, monkeypatch, trace=True)
    assert woken.token_ids == asleep.token_ids == plain.token_ids
    assert step_at(woken, start)["nodes"] > 1 and not step_at(woken, start).get("quiet")
    assert woken.forward_passes < asleep.forward_passes


def test_max_tree_caps_the_tree_for_ab_runs(tiny, monkeypatch):
    """speculative.MAX_TREE (an A/B setting, benchmarks/spec_ab.py) caps the trees verified,
    and the budget and depth with them; output stays plain decoding's."""
    gen, ids, plain = tiny
    monkeypatch.setattr(speculative, "MAX_TREE", 4)
    loop = speculative.SpeculativeLoop(gen.steps, _Fixed([1], 0.5), gen.plan["options"])
    assert (loop.sizes, loop.budget, loop.depth) == ([2, 4], 3, 3)
    got = _run(gen, ids, _Oracle(list(ids) + plain.token_ids, 0.9), 1, monkeypatch, trace=True)
    assert got.token_ids == plain.token_ids
    nodes = {line["nodes"] for line in got.trace}
    assert 4 in nodes and max(nodes) == 4  # an oracle's long drafts fill every tree allowed
