"""benchmarks/spec_sim.py: the replayed loop stays on the recorded path (lossless), speeds up
where the recorded text copies itself and not where nothing repeats, and a replay that leaves
the record is caught; a recording of a tiny engine replays to its own output."""

from __future__ import annotations

import json

import pytest

from tests.e2e.bench_scripts import load

OPTIONS = {"draft": "ngram", "verify_sizes": [2, 4, 8], "verify_tokens": 8, "budget": 7,
           "depth": 7, "adaptive": True, "shape": "dynamic"}  # fmt: skip
COST = {1: 5.0, 2: 6.0, 4: 8.0, 8: 12.0}


def _record(ids, out):
    """A recording as spec_sim.record writes one: each decode step's position (the prompt's
    end onward) -> the model's top successors, here the recorded next token only."""
    succ = {str(len(ids) + i): [[t] * 4, [1.0, 0.0, 0.0, 0.0]] for i, t in enumerate(out[1:])}
    return {"ids": ids, "out": out, "succ": succ}


def test_a_copy_replays_faster_and_identical():
    from arc.runtime.speculative import SpecMemory

    sim = load("spec_sim")
    text = [5 + (i * 7919) % 3001 for i in range(60)]  # no n-gram repeats inside it
    rec = _record([1, *text, 2], text[:48])  # the answer copies the prompt's text
    speedup, per_fwd, same = sim.replay(rec, OPTIONS, COST, SpecMemory(), wall=False)
    assert same and per_fwd > 2.5 and speedup > 1.8


def test_nothing_to_draft_replays_at_plain_speed():
    from arc.runtime.speculative import SpecMemory

    sim = load("spec_sim")
    rec = _record([1, 2, 3], [10 + i for i in range(40)])  # nothing ever repeats
    speedup, per_fwd, same = sim.replay(rec, OPTIONS, COST, SpecMemory(), wall=False)
    assert same and per_fwd == 1.0 and 0.9 < speedup <= 1.0


def test_leaving_the_record_is_caught():
    sim = load("spec_sim")
    steps = sim.Replay(_record([1, 2], [3, 4]), [2], COST, sim.Clock(), 4)
    steps.decode(3, 2)
    with pytest.raises(AssertionError, match="left the recorded path"):
        steps.decode(9, 3)


def test_off_path_nodes_answer_with_the_tokens_latest_successors():
    sim = load("spec_sim")
    rec = _record([1, 2], [7, 8, 7, 9, 5])  # seq 1 2 7 8 7 9 5: after 7 came 8, then 9
    steps = sim.Replay(rec, [4], COST, sim.Clock(), 4)
    assert steps._off(7, before=3)[0] == 8
    assert steps._off(7, before=5)[0] == 9  # the latest place before `before` wins
    assert steps._off(42, before=5)[0] == 42  # never seen: itself, which no draft continues


def test_a_tiny_engines_recording_replays_to_its_output(tiny_engines, tmp_path):
    from arc.runtime.load import load_engine
    from arc.runtime.speculative import SpecMemory

    sim = load("spec_sim")
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["a b c a b c a b c a b c", "the cat sat on the mat"]))
    engine = str(tiny_engines["tiny-llama"])
    recs = sim.record(engine, [str(prompts)], 24, 1)
    options = load_engine(engine).generator.plan["options"]
    cost = {1: 5.0} | {b: 5.0 + b for b in options["verify_sizes"]}
    memory = SpecMemory()
    for rec in recs:
        assert len(rec["succ"]) == len(rec["out"]) - 1  # a decode step after every token
        _, _, same = sim.replay(rec, options, cost, memory)
        assert same
