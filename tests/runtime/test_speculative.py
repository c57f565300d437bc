"""Speculative decoding: greedy output identical to plain decoding for every drafter and tree
shape, stop rules inside an accepted run, and distribution-preserving sampled acceptance."""

from __future__ import annotations

import math

import pytest
import torch

from arc.errors import ArcError
from arc.lowering import lower
from arc.pipeline import PassManager
from arc.runtime.accept import TIE, accept_sampled, settle
from arc.runtime.generate import Generator
from arc.runtime.sampling import SamplingParams
from arc.runtime.steps import Steps
from arc.runtime.tree import Tree, best_first
from tests.conftest import TINY

REPEAT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the"
DRAFTERS = [(d, s) for d in ("ngram", "recycle", "jacobi", "auto") for s in ("static", "dynamic")]


def _gen(traced, ref, spec, seq=256, eos=(258,), steps_class=Steps):
    """(Generator, tokenizer) for tiny model `ref` through pipeline `spec`, lowered eagerly;
    `steps_class`: a Steps subclass standing in for a target (its rounding, say)."""
    loaded, module = traced(ref, max_seq_len=seq)
    module, _ = PassManager(spec).run(module)
    fns, kv = lower(module, loaded.weights)
    steps = steps_class(fns, max_seq_len=seq, reset=kv.reset, move=kv.move)
    plan = {"kind": module.plan.kind, "options": dict(module.plan.options)}
    return Generator(steps, loaded.tokenizer, list(eos), plan=plan), loaded.tokenizer


def _both(gen, ids, **kw):
    with torch.inference_mode():
        plain = gen.generate(ids, speculative=False, **kw)
        spec = gen.generate(ids, **kw)
        again = gen.generate(ids, **kw)  # Token Recycling's table is warm now
    return plain, spec, again


@pytest.mark.parametrize("ref", TINY)
@pytest.mark.parametrize("draft, shape", DRAFTERS)
def test_greedy_identical_to_plain(ref, draft, shape, traced):
    spec = f"kv-fusion,spec-tree{{draft={draft},shape={shape},budget=7,depth=4,adaptive=false}}"
    gen, tok = _gen(traced, ref, spec)
    plain, a, b = _both(gen, tok.encode(REPEAT), max_new_tokens=90, ignore_eos=True)
    assert a.token_ids == plain.token_ids == b.token_ids
    assert a.verify_passes > 0 and b.forward_passes < len(b.token_ids) - 1  # it speculated
    assert a.stop_reason == b.stop_reason == "max_new_tokens"


def test_stops_inside_an_accepted_run(traced):
    """EOS, stop strings and max_new_tokens landing in the middle of an accepted run stop
    exactly where plain decoding stops."""
    spec = "spec-tree{draft=auto,budget=7,depth=6,adaptive=false}"
    gen, tok = _gen(traced, "tiny-llama", spec)
    ids = tok.encode(REPEAT)
    with torch.inference_mode():
        ref = gen.generate(ids, max_new_tokens=80, ignore_eos=True, speculative=False)
    assert len(set(ref.token_ids)) > 3
    for n in (1, 2, 3, 5, 8, 13, 21, 34):  # max_new_tokens
        plain, a, _ = _both(gen, ids, max_new_tokens=n, ignore_eos=True)
        assert a.token_ids == plain.token_ids == ref.token_ids[:n], n
    for k in (4, 11, 30):  # an EOS that the model emits after k tokens
        eos_gen, _ = _gen(traced, "tiny-llama", spec, eos=(ref.token_ids[k],))
        plain, a, b = _both(eos_gen, ids, max_new_tokens=80)
        assert a.token_ids == plain.token_ids == b.token_ids and a.stop_reason == "eos"
    stop = ref.text[20:23]
    plain, a, b = _both(gen, ids, max_new_tokens=80, ignore_eos=True, stop=[stop])
    assert a.text == plain.text == b.text and a.stop_reason == "stop_string"
    assert a.token_ids == plain.token_ids


def test_cache_filling_up(traced):
    spec = "spec-tree{draft=auto,budget=5,depth=4,adaptive=false}"
    gen, tok = _gen(traced, "tiny-qwen2", spec, seq=48)
    plain, a, b = _both(gen, tok.encode(REPEAT[:30]), max_new_tokens=200, ignore_eos=True)
    assert a.stop_reason == plain.stop_reason == "cache_full"
    assert a.token_ids == plain.token_ids == b.token_ids and len(a.token_ids) == 48 - 30 + 1


def test_adaptive_output_identical(traced):
    """With adaptivity on, output is still identical (the loop mixes plain and tree steps)."""
    gen, tok = _gen(traced, "tiny-mistral", "kv-fusion,spec-tree")
    plain, a, b = _both(gen, tok.encode("hello there, "), max_new_tokens=60, ignore_eos=True)
    assert a.token_ids == plain.token_ids == b.token_ids


def test_best_first_keeps_prefixes():
    scored = {(1,): 0.9, (1, 2): 0.5, (1, 2, 3): 0.4, (4,): 0.45, (4, 5): 0.1, (1, 6): 0.3}
    assert best_first(scored, 3) == [(1,), (1, 2), (4,)]
    assert best_first(scored, 10)[-1] == (4, 5)


def _chi2_critical(df: int, z: float = 3.09) -> float:
    """Upper chi-square quantile (p ~ 0.001) by the Wilson-Hilferty approximation."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def test_sampled_acceptance_preserves_the_distribution():
    """Two-token outcomes of multi-branch rejection sampling over a tree match the model's
    own joint distribution p(a) p(b | a), by a chi-square test over many seeded draws."""
    g = torch.Generator().manual_seed(0)
    vocab = 6
    logits = torch.randn(8, vocab, generator=g) * 1.5  # rows: tree nodes
    tree = Tree(0)
    for path in ([2, 1], [2, 4], [3, 3], [5]):  # drafted branches, some likely, some not
        tree.add_path(path)
    params = SamplingParams(temperature=0.9, top_k=5)
    from arc.runtime.sampling import filter_logits

    probs = torch.softmax(filter_logits(logits.double(), params), dim=-1)
    expect = {}
    for a in range(vocab):
        child = tree.child(0, a)
        row = probs[child] if child is not None else None
        for b in range(vocab):
            if row is None:  # a is a bonus token: what comes after is not sampled this step
                expect[(a,)] = float(probs[0, a])
                continue
            expect[(a, b)] = float(probs[0, a] * row[b])
    counts = dict.fromkeys(expect, 0)
    n = 12000
    for _ in range(n):
        _, tokens = accept_sampled(tree, logits, params, g)
        key = tuple(tokens[:2]) if tree.child(0, tokens[0]) is not None else (tokens[0],)
        counts[key] += 1
    cells = [k for k in expect if expect[k] * n >= 5]
    chi2 = sum((counts[k] - n * expect[k]) ** 2 / (n * expect[k]) for k in cells)
    rare = sum(counts[k] for k in expect if k not in cells)
    assert rare <= 5 + 3 * sum(n * expect[k] for k in expect if k not in cells)
    assert chi2 < _chi2_critical(len(cells) - 1), (chi2, len(cells))


def test_sampled_generation_runs(traced):
    gen, tok = _gen(traced, "tiny-llama", "spec-tree{adaptive=false}")
    p = SamplingParams(temperature=0.8, top_p=0.95, seed=1)
    with torch.inference_mode():
        a = gen.generate(tok.encode(REPEAT), max_new_tokens=40, sampling=p, ignore_eos=True)
    assert len(a.token_ids) == 40 and a.verify_passes > 0


@pytest.mark.parametrize(
    "spec",
    ["spec-tree", "spec-tree{adaptive=false}", "spec-tree{draft=recycle,adaptive=false,budget=3}"],
)
def test_seeded_sampling_draws_what_plain_decoding_draws(traced, spec):
    """Sample-then-match: each position's token is drawn with that position's uniform, so a
    seeded speculative run emits exactly plain sampling's tokens (whatever trees it verified,
    and with drafts accepted), repeats after a warm drafter, and another seed draws others."""
    gen, tok = _gen(traced, "tiny-llama", spec)
    ids = tok.encode(REPEAT)
    accepted = 0.0
    settings = [
        SamplingParams(temperature=0.8, top_p=0.95, seed=1),
        SamplingParams(temperature=0.5, seed=2),
        SamplingParams(temperature=1.0, top_k=5, top_p=0.9, seed=3),
    ]
    plains = []
    for p in settings:
        kw = {"max_new_tokens": 48, "sampling": p, "ignore_eos": True}
        plain, first, again = _both(gen, ids, **kw)
        assert first.token_ids == plain.token_ids == again.token_ids, p
        plains.append(plain.token_ids)
        fixed = "adaptive=false" in spec  # the cost-aware loop may not verify on a tiny model
        assert first.verify_passes > 0 or not fixed
        accepted = max(accepted, first.accepted_per_step, again.accepted_per_step)
    assert accepted > 1.0 or not fixed  # drafted tokens were accepted, not only last draws
    other = SamplingParams(temperature=0.8, top_p=0.95, seed=9)  # settings[0], another seed
    with torch.inference_mode():
        b = gen.generate(ids, max_new_tokens=48, sampling=other, ignore_eos=True)
    assert b.token_ids != plains[0]


def test_memory_outlives_a_request(traced):
    """The Generator keeps the loop's device timings across requests (SpecMemory): a new
    request starts from them, its calibration starts afresh (the prior ratio), and output stays
    identical."""
    from arc.runtime.speculative import PRIOR_RATIO, SpeculativeLoop

    gen, tok = _gen(traced, "tiny-mistral", "kv-fusion,spec-tree{adaptive=false}")
    ids = tok.encode(REPEAT)
    with torch.inference_mode():
        plain = gen.generate(ids, speculative=False, max_new_tokens=40, ignore_eos=True)
        a = gen.generate(ids, max_new_tokens=40, ignore_eos=True)
        memory = gen._memory
        assert memory.cost[1].value is not None
        assert any(memory.cost[b].value is not None for b in gen.steps.verify_sizes)
        timed = {b: e.value for b, e in memory.cost.items()}
        b = gen.generate(ids, max_new_tokens=40, ignore_eos=True)
    assert a.token_ids == b.token_ids == plain.token_ids
    assert gen._memory is memory and any(memory.cost[k].value != v for k, v in timed.items())
    loop = SpeculativeLoop(gen.steps, gen.drafter(1), gen.plan["options"], memory)
    assert loop.cost is memory.cost and loop.calib.ratio == pytest.approx(PRIOR_RATIO)


def test_forget_drafts_cold(traced):
    """A repeated request drafts its own earlier output back from Token Recycling's table;
    after Generator.forget() it drafts exactly as the first request did (what a benchmark
    that repeats prompts needs, benchmarks/spec_speed.py's paired runs)."""
    gen, tok = _gen(traced, "tiny-llama", "spec-tree{draft=recycle,adaptive=false}")
    ids = tok.encode("Once upon a time")
    with torch.inference_mode():
        first = gen.generate(ids, max_new_tokens=60, ignore_eos=True)
        warm = gen.generate(ids, max_new_tokens=60, ignore_eos=True)
        gen.forget()
        cold = gen.generate(ids, max_new_tokens=60, ignore_eos=True)
    assert first.token_ids == warm.token_ids == cold.token_ids
    assert warm.forward_passes < first.forward_passes
    assert cold.forward_passes == first.forward_passes


def test_unmeasured_tree_sizes_are_interpolated():
    """A tree size never verified yet costs the line between the measured sizes around it,
    or, above them all, the largest measured one grown by the prior ratios; cost_ratio's
    gaps (sizes it does not list) are interpolated too."""
    from arc.runtime.speculative import SpecMemory, SpeculativeLoop, _between

    assert _between({1: 1.0, 4: 2.5}, 2) == pytest.approx(1.5)
    assert _between({1: 1.0, 4: 2.5}, 4) == 2.5
    assert _between({2: 1.0}, 3) is None and _between({2: 1.0}, 1) is None

    steps = Steps({f"verify_{b}": None for b in range(2, 9)}, max_seq_len=64)
    opts = {"verify_tokens": 8, "depth": 5, "cost_ratio": {"2": 1.2, "4": 1.8, "8": 3.4}}
    loop = SpeculativeLoop(steps, drafter=None, options=opts, memory=SpecMemory())
    assert loop.prior[3] == pytest.approx(1.5) and loop.prior[6] == pytest.approx(2.6)
    assert loop._time(5) == pytest.approx(2.2)  # nothing timed: the ratios themselves
    loop.cost[1].add(0.004)
    assert loop._time(6) == pytest.approx(0.004 * 2.6)
    loop.cost[4].add(0.008)  # measured dearer than its prior (1.8 x 4 ms = 7.2 ms)
    assert loop._time(3) == pytest.approx(0.004 + (0.008 - 0.004) * 2 / 3)
    assert loop._time(6) == pytest.approx(0.008 * 2.6 / 1.8)  # grown from the measured 4


def test_one_slow_step_does_not_lock_a_tree_size_out():
    """A hiccup (a verify timed at twice its cost) counts at most COST_CLIP x the estimate, or
    for a size's first sample x what the loop predicted, so one slow step cannot make a size
    look so dear that it is never chosen (and so never measured) again."""
    from arc.runtime import speculative as S

    steps = Steps({f"verify_{b}": None for b in (2, 4, 8)}, max_seq_len=64)
    opts = {"verify_tokens": 8, "depth": 7, "cost_ratio": {"2": 1.25, "4": 1.8, "8": 3.3}}
    loop = S.SpeculativeLoop(steps, drafter=None, options=opts, memory=S.SpecMemory())
    assert loop._predicted(8) is None  # nothing timed: no prediction in seconds yet
    loop.cost[1].add(0.004, loop._predicted(1))
    assert loop._predicted(8) == pytest.approx(0.004 * 3.3) and loop._predicted(1) is None
    loop.cost[8].add(0.027, loop._predicted(8))  # ~2x the 13.2 ms it costs
    assert loop.cost[8].value == pytest.approx(S.COST_CLIP * 0.0132)
    S.COST_CLIP, clip = 0, S.COST_CLIP
    try:  # off, the hiccup is taken whole
        unclipped = S._Ema(clip=True)
        unclipped.add(0.027, 0.0132)
        assert unclipped.value == 0.027
    finally:
        S.COST_CLIP = clip
    drafting = S._Ema(0.0)  # drafting's time is not a step's: it grows from 0 unclipped
    drafting.add(0.001)
    drafting.add(0.001)
    assert drafting.value == pytest.approx(0.001 * (1 - 0.8**2))
    for _ in range(8):  # later samples are clipped against the estimate, not the prediction
        loop.cost[8].add(0.0132)
    assert loop.cost[8].value < 0.0132 * 1.1
    before = loop.cost[1].value
    loop.cost[1].add(1.0)  # a 1 s stall of a plain step moves its estimate by at most 10%
    assert loop.cost[1].value <= before * (1 + 0.2 * (S.COST_CLIP - 1)) + 1e-12


def test_calibration_per_drafter():
    """`auto` says which drafter each path is from; each drafter's predicted and accepted
    tokens are kept apart, and a drafter's ratio starts at the request's and moves with its
    own evidence (prompt lookup's copies are not held back by Token Recycling's misses)."""
    from arc.runtime.drafters.auto import Merge
    from arc.runtime.speculative import CALIB_PRIOR, PRIOR_RATIO, SpecMemory, SpeculativeLoop
    from arc.runtime.tree import build

    class Fixed:
        def __init__(self, name, scored):
            self.name, self.scored = name, scored

        def propose(self, history, depth, budget):
            return dict(self.scored)

    copy = Fixed("ngram", {(5,): 0.6, (5, 6): 0.55})
    guess = Fixed("recycle", {(7,): 0.9, (5,): 0.3})  # (5,) is ngram's: its score is higher
    merged = Merge([copy, guess])
    assert merged.propose([1], 3, 8) == {(5,): 0.6, (5, 6): 0.55, (7,): 0.9}
    assert merged.sources == {(5,): "ngram", (5, 6): "ngram", (7,): "recycle"}

    steps = Steps({"verify_4": None}, max_seq_len=64)
    loop = SpeculativeLoop(steps, merged, {"verify_tokens": 4, "depth": 3}, SpecMemory())
    paths = loop._draft([1], 0)
    assert loop._calib_of((5,)) == loop._calib_of((7,)) == pytest.approx(PRIOR_RATIO)
    assert loop.calib.ratio == pytest.approx(PRIOR_RATIO)
    tree = build(1, [p for p, _ in paths])
    accepted = [tree.child(tree.child(0, 5), 6)]  # the copy, both tokens
    accepted.insert(0, tree.child(0, 5))
    loop.calib.add(len(accepted), sum(s for _, s in paths))
    loop._calibrate_sources(tree, paths, accepted)
    ngram, recycle = loop.by_source["ngram"], loop.by_source["recycle"]
    assert (ngram.accepted, ngram.predicted) == (2, pytest.approx(1.15))
    assert (recycle.accepted, recycle.predicted) == (0, pytest.approx(0.9))
    g = loop.calib.ratio
    assert loop._calib_of((5, 6)) == pytest.approx((2 + CALIB_PRIOR * g) / (1.15 + CALIB_PRIOR))
    assert loop._calib_of((7,)) == pytest.approx(CALIB_PRIOR * g / (0.9 + CALIB_PRIOR))
    assert loop._calib_of((5, 6)) > g > loop._calib_of((7,))
    assert loop._calib_of((9,)) == g  # a path no drafter claimed: the request's ratio
    # the next tree ranks by calibrated score: the copy chain (0.6 and 0.55 raw, its drafter
    # confirmed) now comes before the guess (0.9 raw, its drafter missed), and a child never
    # outranks its parent
    paths = loop._draft([1], 0)
    assert [p for p, _ in paths] == [(5,), (5, 6), (7,)]
    assert [s for _, s in paths] == [0.6, 0.55, 0.9]  # raw scores, for the calibration
    w = loop.weights
    assert w[(5,)] == pytest.approx(0.6 * loop._calib_of((5,)))
    assert w[(5, 6)] <= w[(5,)] and w[(7,)] == pytest.approx(0.9 * loop._calib_of((7,)))
    assert w[(5, 6)] > w[(7,)]


def test_draft_max_caps_the_trees_and_keeps_the_tokens(traced):
    """generate(draft_max=N): verifies of at most N + 1 nodes, paths at most N deep, the same
    greedy tokens; 0 decodes plainly; a cap outside 0..the engine's budget is refused."""
    spec = "spec-tree{draft=auto,budget=7,depth=7,adaptive=false}"
    gen, tok = _gen(traced, "tiny-llama", spec)
    ids = tok.encode(REPEAT)
    assert gen.draft_limit == 7
    with torch.inference_mode():
        plain = gen.generate(ids, max_new_tokens=60, ignore_eos=True, speculative=False)
        runs = {}
        for cap in (None, 7, 3, 1, 0):
            gen.forget()  # each run drafts cold, as the first did
            runs[cap] = gen.generate(
                ids, max_new_tokens=60, ignore_eos=True, draft_max=cap, trace=True
            )
    largest = {cap: max(row["nodes"] for row in r.steps["by_size"]) for cap, r in runs.items()}
    assert largest[None] == largest[7] == 8 and largest[3] == 4 and largest[1] == 2
    assert largest[0] == 1 and runs[0].verify_passes == 0
    for cap, r in runs.items():
        assert r.token_ids == plain.token_ids, cap
        longest = max(len(line["tokens"]) for line in r.trace)  # an accepted path + its bonus
        assert longest <= (7 if cap is None else cap) + 1, (cap, longest)
        if cap != 0:
            assert r.verify_passes > 0
    assert max(len(line["tokens"]) for line in runs[None].trace) > 4  # the caps cut something
    for bad in (-1, 8):
        with pytest.raises(ArcError, match="outside 0..7"):
            gen.generate(ids, max_new_tokens=4, draft_max=bad)
    plain_gen = Generator(gen.steps, tok, [258])  # no speculative plan: 0 is all it takes
    assert plain_gen.draft_limit == 0
    with pytest.raises(ArcError, match="outside 0..0"):
        plain_gen.generate(ids, max_new_tokens=4, draft_max=1)


class _Tied(Steps):
    """Steps whose decode and verify disagree at near ties, as two summation orders can: after
    the token at every slot s with s % 3 == 0 the two best logits are GAP apart, the decode
    step's best ahead and, in a verify, its second ahead."""

    GAP = 5e-5  # below accept.TIE (the tiny model's logits are below 1)

    def _tie(self, row, slot: int, flip: bool) -> None:
        if slot % 3 == 0:
            a, b = row.topk(2).indices.tolist()
            row[b] = row[a] + self.GAP if flip else row[a] - self.GAP

    def decode(self, token, pos):
        logits = super().decode(token, pos).clone()
        self._tie(logits, pos, False)
        return logits

    def verify_tree(self, tree, prefix, size):
        logits = super().verify_tree(tree, prefix, size).clone()
        for node, depth in enumerate(tree.depths[: len(tree)]):
            self._tie(logits[node], prefix + depth, True)
        return logits


def test_near_ties_are_left_to_a_decode_step(traced):
    """Where a target's verify is not the decode step bit for bit (torch, onnx), a greedy
    decision between two logits within accept.TIE is not the verify's: the walk stops before
    it and a decode step takes it, so the output is still plain decoding's. Without the rule
    (a verify said to be exact) the tied decisions go the verify's way."""
    spec = "kv-fusion,spec-tree{draft=ngram,budget=7,depth=6,adaptive=false}"
    gen, tok = _gen(traced, "tiny-llama", spec, steps_class=_Tied)
    steps, ids = gen.steps, tok.encode(REPEAT)
    plain, a, b = _both(gen, ids, max_new_tokens=90, ignore_eos=True)
    assert a.token_ids == plain.token_ids == b.token_ids
    assert a.verify_passes > 0 and b.forward_passes < len(b.token_ids) - 1  # it speculated
    steps.verify_exact = True
    gen.forget()
    with torch.inference_mode():
        trusted = gen.generate(ids, max_new_tokens=90, ignore_eos=True)
    assert trusted.verify_passes > 0 and trusted.token_ids != plain.token_ids


def test_settle_cuts_before_the_first_near_tie():
    """settle: tokens[i] is decided by node ([0] + path)[i]; the walk keeps what precedes the
    first decision within TIE x max(1, |best logit|), however large the logits are."""
    far, near = [0.6, 0.1], [0.5, 0.5 * math.exp(-TIE / 2)]  # top-2 probabilities
    path, tokens = [1, 4], [11, 14, 20]  # node 1, then node 4, then the bonus token
    row = [far] * 5  # each node's top-2 probabilities (nodes 2 and 3: off the path)
    assert settle(path, tokens, row, [3.0] * 5) == (path, tokens)
    row[4] = near  # the bonus token's decision is a near tie
    assert settle(path, tokens, row, [3.0] * 5) == ([1, 4], [11, 14])
    row[0] = near  # the root's: nothing is kept
    assert settle(path, tokens, row, [3.0] * 5) == ([], [])
    row = [far] * 5
    row[1] = [0.5, 0.5 * math.exp(-TIE * 10)]  # a gap of 10 TIE: a tie only at logits > 10
    assert settle(path, tokens, row, [3.0] * 5) == (path, tokens)
    assert settle(path, tokens, row, [-40.0] * 5) == ([1], [11])
