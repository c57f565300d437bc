"""benchmarks/spec_speed.py --paired: one engine, speculation on and off per prompt in one
process. The arms must produce the same ids (lossless), and the report must pick out the
prompts below 0.95x."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def _module():
    sys.path.insert(0, str(BENCH))  # spec_speed imports engine_cache from its folder
    try:
        spec = importlib.util.spec_from_file_location("spec_speed", BENCH / "spec_speed.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(BENCH))
    return mod


def test_paired_worker_runs_both_arms(tiny_engines):
    mod = _module()
    engine = next(iter(tiny_engines.values()))
    prompts = ["Write a function that adds two numbers.", "Hello there, how are you?"]
    greedy = json.dumps({"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 0})
    rows = mod.worker_paired(str(engine), prompts, 12, torch.get_num_threads(), 2, greedy)
    assert len(rows) == 2 and all(len(pairs) == 2 for pairs in rows)
    for pairs in rows:
        for on, off, same in pairs:
            assert on > 0 and off > 0
            assert same  # speculation on and off decode the same greedy ids


def test_workers_sample_when_asked(tiny_engines):
    """--temperature: the arc workers sample (seeded per prompt: a rerun draws the same)."""
    mod = _module()
    engine = next(iter(tiny_engines.values()))
    prompts = ["Hello there, how are you?"]
    sampled = json.dumps({"temperature": 1.5, "top_k": 0, "top_p": 0.95, "seed": 7})
    greedy = json.dumps({"temperature": 0.0, "top_k": 0, "top_p": 1.0, "seed": 7})
    runs = [mod.worker_arc(str(engine), prompts, 16, 1, s) for s in (sampled, sampled, greedy)]
    assert runs[0][0]["ids"] == runs[1][0]["ids"] and runs[0][0]["produced"] > 0
    assert runs[0][0]["ids"] != runs[2][0]["ids"]  # T = 1.5 leaves the greedy path
    rows = mod.worker_paired(str(engine), prompts, 12, 1, 1, sampled)
    assert rows[0][0][0] > 0 and rows[0][0][1] > 0


def test_paired_report_names_the_worst_prompt(capsys):
    mod = _module()
    kinds = [p["kind"] for p in __import__("json").loads(mod.PROMPTS.read_text())]
    rows = [[(100.0, 100.0, True), (102.0, 100.0, True)] for _ in kinds]
    rows[3] = [(90.0, 100.0, True), (92.0, 100.0, True), (80.0, 100.0, True)]  # median 0.90
    rows[5] = [(150.0, 100.0, False)]
    mod.report_paired("arc -O2", rows, SimpleNamespace(paired=2))
    out = capsys.readouterr().out
    assert f"worst prompt 3 ({kinds[3]}): 0.900x" in out
    assert "prompts below 0.95x: 1/" in out
    assert "geomean 1.039x" in out  # (1.01^8 * 0.90 * 1.50)^(1/10)
    line5 = next(line for line in out.splitlines() if line.startswith(" 5 "))
    assert "1.500x" in line5 and line5.rstrip().endswith("!")


def test_reports_take_the_prompt_set_asked_for(capsys):
    """--prompts: the per-prompt rows are the long set's kinds, not the default set's."""
    mod = _module()
    long = BENCH / "prompts_long.json"
    kinds = [p["kind"] for p in json.loads(long.read_text())]
    rows = [[(110.0, 100.0, True)] for _ in kinds]
    mod.report_paired("arc -O2", rows, SimpleNamespace(paired=1, prompts=str(long)))
    out = capsys.readouterr().out
    assert f"{len(kinds) - 1} {kinds[-1]}" in out.replace("  ", " ")
    assert "geomean 1.100x" in out


@pytest.mark.real
def test_long_prompt_set_fits_the_benchmark_engines():
    """prompts_long.json: each prompt, through SmolLM2's chat template, leaves room for 256 new
    tokens in the 1024-token cache spec_speed builds its engines with, and is long (400+
    tokens: the set is about decoding after a given text)."""
    from arc.runtime.load import prompt_ids
    from models.loader import load

    tok = load("smollm2-135m", weights=False).tokenizer
    prompts = json.loads((BENCH / "prompts_long.json").read_text())
    assert len(prompts) >= 8 and len({p["kind"] for p in prompts}) >= 5
    for p in prompts:
        n = len(prompt_ids(tok, p["prompt"]))
        assert 400 <= n <= 1024 - 256 - 1, (p["kind"], n)
