"""Relaxed acceptance (LANTERN, spec-tree{accept=relaxed}): which drafted tokens it accepts
in greedy mode, the distribution it samples from (within total variation delta of the
model's, checked against its closed form over many seeded draws), the engine path from the
pass to the loop, and the options it refuses."""

from __future__ import annotations

import pytest
import torch

from arc.errors import ArcError
from arc.lowering import lower, materialize
from arc.pipeline import PassManager, registry
from arc.runtime.generate import Generator
from arc.runtime.relaxed import (
    Latents,
    accept_relaxed_greedy,
    accept_relaxed_sampled,
    latents_of,
)
from arc.runtime.sampling import SamplingParams
from arc.runtime.steps import Steps
from arc.runtime.tree import Tree

# five tokens in 2-d latent space: 0 and 1 point the same way, 2 nearly so, 3 and 4 elsewhere
LAT = Latents(torch.tensor([[1.0, 0.0], [2.0, 0.05], [1.0, 0.3], [0.0, 1.0], [-1.0, 0.0]]))


def _logits(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float64).log()


def test_greedy_accepts_a_near_tie_neighbour_only():
    tree = Tree(4)
    a = tree.add(0, 1)  # the root's child: token 1
    logits = torch.stack([_logits([0.40, 0.35, 0.05, 0.15, 0.05])] * 2)  # argmax 0
    path, tokens = accept_relaxed_greedy(tree, logits, LAT, delta=0.1, sim=0.9)
    assert path == [a] and tokens == [1, 0]  # 1 is 0's neighbour, 0.05 less likely
    path, tokens = accept_relaxed_greedy(tree, logits, LAT, delta=0.01, sim=0.9)
    assert path == [] and tokens == [0]  # not within delta
    far = Tree(4)
    far.add(0, 3)  # likely enough but far away in latent space
    logits = torch.stack([_logits([0.40, 0.05, 0.05, 0.45 - 0.1, 0.15])] * 2)
    assert accept_relaxed_greedy(far, logits, LAT, delta=0.2, sim=0.9) == ([], [0])


def test_sampled_distribution_is_within_delta_of_the_model():
    """Draft token 1 at the root: it is emitted with the mass of {1, 0} (0 is its nearest
    neighbour and fits delta; 2 would not), 0 never, the rest as the model says."""
    p = [0.08, 0.30, 0.12, 0.25, 0.25]
    tree = Tree(4)
    tree.add(0, 1)
    logits = torch.stack([_logits(p)] * 2)
    params = SamplingParams(temperature=1.0)
    gen = torch.Generator().manual_seed(0)
    n, counts = 20000, torch.zeros(5)
    for _ in range(n):
        _, tokens = accept_relaxed_sampled(tree, logits, params, gen, LAT, delta=0.1, sim=0.9)
        counts[tokens[0]] += 1
    want = torch.tensor([0.0, 0.38, 0.12, 0.25, 0.25])
    assert counts[0] == 0
    assert torch.allclose(counts / n, want, atol=0.012)
    tv = 0.5 * (want - torch.tensor(p)).abs().sum()
    assert tv <= 0.1 + 1e-9


def _gen(traced, spec, seq=256):
    loaded, module = traced("tiny-llama", max_seq_len=seq)
    module, _ = PassManager(spec).run(module)
    fns, kv = lower(module, loaded.weights)
    steps = Steps(fns, max_seq_len=seq, reset=kv.reset, move=kv.move)
    steps.latents = latents_of(module, materialize(module, loaded.weights))  # as load_engine
    plan = {"kind": module.plan.kind, "options": dict(module.plan.options)}
    return Generator(steps, loaded.tokenizer, [258], plan=plan), loaded.tokenizer, module


def test_relaxed_runs_and_accepts_at_least_what_exact_does(traced):
    text = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the"
    exact, tok, _ = _gen(traced, "kv-fusion,spec-tree{adaptive=false}")
    relaxed, _, module = _gen(
        traced, "kv-fusion,spec-tree{adaptive=false,accept=relaxed,delta=0.5,sim=-1}"
    )
    assert module.plan.options["accept"] == "relaxed"
    ids = tok.encode(text)
    with torch.inference_mode():
        a = exact.generate(ids, max_new_tokens=64, ignore_eos=True)
        b = relaxed.generate(ids, max_new_tokens=64, ignore_eos=True)
    assert len(b.token_ids) == len(a.token_ids) == 64
    assert b.accepted_per_step >= a.accepted_per_step


def test_pass_is_lossy_only_when_relaxed():
    info = registry()["spec-tree"]
    assert info.is_lossless({}) and info.is_lossless({"accept": "exact"})
    assert not info.is_lossless({"accept": "relaxed"})


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("spec-tree{accept=loose}", "unknown accept"),
        ("spec-tree{accept=relaxed,delta=0}", "delta=0"),
        ("spec-tree{accept=relaxed,delta=1.5}", "delta=1.5"),
        ("spec-tree{accept=relaxed,sim=2}", "sim=2"),
    ],
)
def test_bad_options(spec, fragment, traced):
    _, m = traced("tiny-llama")
    with pytest.raises(ArcError, match=fragment):
        PassManager(spec).run(m)


def test_eval_measures_what_relaxed_acceptance_costs():
    """arc eval runs the speculative loop for a relaxed plan (a plain decode would hide it):
    loose settings on a random tiny model change greedy output."""
    from arc.evaluate import evaluate

    spec = "kv-fusion,spec-tree{accept=relaxed,delta=0.3,sim=0,adaptive=false}"
    r = evaluate(
        "tiny-llama", spec, prompts=["Hello there", "Tell me"], max_new_tokens=24, ppl_tokens=32
    )
    assert r["greedy"]["agreement"] < 1.0
    assert r["perplexity"]["delta_pct"] == 0.0  # acceptance does not change the model's scores
