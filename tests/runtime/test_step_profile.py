"""The decode's per-step profile (arc/runtime/step_profile.py): its totals add up to what the
generation reports, each traced step's tokens are the output's, and accepted drafted tokens
are credited to the drafter whose path they were on."""

from __future__ import annotations

import json

import pytest
import torch

from arc.runtime.step_profile import StepProfile, describe, write_trace
from tests.runtime.test_shadow import _Oracle, _run, tiny  # noqa: F401 (fixture)


def test_summary_adds_up():
    p = StepProfile(trace=True)
    p.step(10, 1, [5], 0.004, draft_s=0.0001)
    p.step(11, 4, [6, 7, 8], 0.008, draft_s=0.0002, expected=2.5, accepted_by={"ngram": 2})
    p.step(14, 4, [9], 0.008, draft_s=0.0001, expected=1.5)
    p.step(15, 1, [3], 0.005, quiet=True)
    s = p.summary(decode_s=0.030)
    assert s["by_size"] == [
        {
            "nodes": 1,
            "steps": 2,
            "tokens": 2,
            "ms": 9.0,
            "tokens_per_step": 1.0,
            "ms_per_step": 4.5,
        },
        {
            "nodes": 4,
            "steps": 2,
            "tokens": 4,
            "ms": 16.0,
            "tokens_per_step": 2.0,
            "ms_per_step": 8.0,
        },
    ]
    assert s["drafting"] == {"steps": 3, "ms": 0.4}
    assert s["verified_tokens"] == {"expected": 4.0, "yielded": 4}
    assert s["accepted_by_drafter"] == {"ngram": 2}
    assert s["other_ms"] == pytest.approx(30 - 25 - 0.4)
    assert [line["pos"] for line in p.lines] == [10, 11, 14, 15]
    assert p.lines[1] == {
        "pos": 11, "nodes": 4, "tokens": [6, 7, 8], "ms": 8.0, "draft_ms": 0.2,
        "expected_tokens": 2.5, "accepted_by": {"ngram": 2},
    }  # fmt: skip
    assert p.lines[3] == {"pos": 15, "nodes": 1, "tokens": [3], "ms": 5.0, "quiet": True}
    text = describe(s)
    assert "plain: 2 x 1.00 tokens, 4.50 ms" in text and "verify 4: 2 x 2.00 tokens" in text
    assert "accepted ngram 2" in text
    assert StepProfile().lines is None  # no per-step lines unless traced


def test_trace_file_is_whole_or_absent(tmp_path):
    path = tmp_path / "t.jsonl"
    write_trace(path, {"a": 1}, [{"pos": 0}, {"pos": 1}])
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert lines == [{"a": 1}, {"pos": 0}, {"pos": 1}]
    with pytest.raises(TypeError):  # fails after a line is written
        write_trace(tmp_path / "u.jsonl", {"a": 1}, [{"pos": 0}, {"pos": object()}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]  # no half file, no tmp


def test_speculative_profile_matches_the_output(tiny, monkeypatch):  # noqa: F811
    """An always-right drafter (most steps verify): the traced steps' tokens, in order, are
    the output; the steps per size add up to forwards and verifies; every accepted drafted
    token is credited to the drafter."""
    gen, ids, plain = tiny
    drafter = _Oracle(list(ids) + plain.token_ids, 0.9)
    r = _run(gen, ids, drafter, 1, monkeypatch, trace=True)
    assert r.token_ids == plain.token_ids and r.verify_passes > 5
    lines, s = r.trace, r.steps
    assert [t for line in lines for t in line["tokens"]] == r.token_ids[1:]
    pos = len(ids)
    for line in lines:  # each step starts where the last one's tokens ended
        assert line["pos"] == pos
        pos += len(line["tokens"])
    by = {row["nodes"]: row for row in s["by_size"]}
    assert sum(row["steps"] for row in by.values()) == r.forward_passes == len(lines)
    assert sum(row["steps"] for n, row in by.items() if n > 1) == r.verify_passes
    assert sum(row["tokens"] for row in by.values()) == len(r.token_ids) - 1
    verifies = [line for line in lines if line["nodes"] > 1]
    accepted = sum(len(line["tokens"]) - 1 for line in verifies)
    assert sum(s["accepted_by_drafter"].values()) >= accepted > 0  # a stop may cut the last
    assert set(s["accepted_by_drafter"]) == {"fixed"}
    assert all(line["expected_tokens"] > 1 for line in verifies)
    with torch.inference_mode():  # plain decoding: every step one token, no drafting
        p = gen.generate(ids, max_new_tokens=20, ignore_eos=True, speculative=False)
    assert p.steps["by_size"][0]["steps"] == p.forward_passes == 19
    assert p.steps["drafting"]["steps"] == 0 and p.trace is None
