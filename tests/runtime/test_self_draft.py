"""The `self` drafter: layer-skip's draft function drives speculative decoding. Greedy output
is identical to plain decoding (alone and merged into `auto`), drafts are accepted when the
skipped layers matter little, stops land exactly, and a plan without a draft function is
refused. The tiny catalog models have 2 layers (none may go), so this builds a 6-layer one
whose layers 2 and 3 are nearly silent (their output projections scaled by 1e-3): the draft
that skips them is then close to the full model, so its tokens get accepted."""

from __future__ import annotations

import pytest
import torch

from arc.errors import ArcError
from arc.lowering import lower
from arc.pipeline import PassManager
from arc.runtime import speculative
from arc.runtime.drafters import selfdraft
from arc.runtime.generate import Generator
from arc.runtime.steps import Steps

REPEAT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the"
SKIP = "layer-skip{mode=draft,layers=2+3}"


def _gen(quiet, spec: str, seq: int = 256) -> tuple[Generator, object]:
    loaded, module = quiet[seq]
    module, _ = PassManager(spec).run(module)
    fns, kv = lower(module, loaded.weights)
    steps = Steps(fns, max_seq_len=seq, reset=kv.reset, move=kv.move)
    plan = {"kind": module.plan.kind, "options": dict(module.plan.options)}
    return Generator(steps, loaded.tokenizer, [258], plan=plan), loaded.tokenizer


@pytest.fixture
def eager_drafts(monkeypatch):
    """Draft the full depth: a random model's flat distributions would stop drafts early."""
    monkeypatch.setattr(selfdraft, "STOP", 0.0)


@pytest.mark.parametrize("draft", ["self", "auto"])
def test_greedy_identical_and_drafts_accepted(quiet, draft, eager_drafts):
    spec = f"kv-fusion,{SKIP},spec-tree{{draft={draft},budget=7,depth=4,adaptive=false}}"
    gen, tok = _gen(quiet, spec)
    ids = tok.encode(REPEAT)
    with torch.inference_mode():
        plain = gen.generate(ids, max_new_tokens=80, ignore_eos=True, speculative=False)
        spec_run = gen.generate(ids, max_new_tokens=80, ignore_eos=True)
    assert spec_run.token_ids == plain.token_ids
    assert spec_run.draft_passes > 0 and spec_run.verify_passes > 0
    assert spec_run.forward_passes < len(spec_run.token_ids) - 1  # drafts were accepted
    assert plain.draft_passes == 0


def test_stops_land_exactly(quiet, eager_drafts):
    """max_new_tokens inside an accepted run, and the cache filling up (96 slots)."""
    spec = f"kv-fusion,{SKIP},spec-tree{{draft=self,budget=7,depth=4,adaptive=false}}"
    gen, tok = _gen(quiet, spec)
    ids = tok.encode(REPEAT)
    with torch.inference_mode():
        for n in (5, 13, 22):
            plain = gen.generate(ids, max_new_tokens=n, ignore_eos=True, speculative=False)
            got = gen.generate(ids, max_new_tokens=n, ignore_eos=True)
            assert got.token_ids == plain.token_ids and len(got.token_ids) == n
        small, _ = _gen(quiet, spec, seq=96)
        plain = small.generate(ids, max_new_tokens=200, ignore_eos=True, speculative=False)
        got = small.generate(ids, max_new_tokens=200, ignore_eos=True)
    assert got.stop_reason == plain.stop_reason == "cache_full"
    assert got.token_ids == plain.token_ids


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"adaptive": "x"}, "adaptive must be true or false"),
        ({"adaptive": []}, "adaptive must be true or false"),
        ({"adaptive": 0}, "adaptive must be true or false"),
        ({"tune": 1}, "tune must be true, false or a tuning record"),
        ({"ladder": [2]}, "ladder must be"),
        ({"ladder": 3}, "ladder must be"),
    ],
)
def test_plan_flags_of_another_type_are_refused(quiet, edit, match):
    """An edited manifest's flags: the loop read `adaptive` with bool(), so "x" switched the
    cost-aware loop on and [] off; now only a JSON boolean passes (`tune` a boolean or -O3's
    record, `ladder` a known kind or the booleans older engines recorded)."""
    loaded, module = quiet[256]
    module, _ = PassManager("kv-fusion,spec-tree{draft=ngram}").run(module)
    speculative.check_plan("speculative", dict(module.plan.options), module)
    for ok in ({"ladder": True}, {"ladder": "none"}, {"adaptive": False}, {"tune": {"chosen": 4}}):
        speculative.check_plan("speculative", {**dict(module.plan.options), **ok}, module)
    with pytest.raises(ArcError, match=match):
        speculative.check_plan("speculative", {**dict(module.plan.options), **edit}, module)


def test_plan_without_draft_function_is_refused(quiet):
    loaded, module = quiet[256]
    module, _ = PassManager("kv-fusion,spec-tree{draft=ngram}").run(module)
    options = {**dict(module.plan.options), "draft": "self"}  # an edited manifest
    with pytest.raises(ArcError, match="needs the engine's draft function"):
        speculative.check_plan("speculative", options, module)
