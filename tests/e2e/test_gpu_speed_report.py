"""benchmarks/gpu_speed.py's report (pure; runs without a GPU): the lossless column compares
arc's ids with HF fp32's up to the first EOS arc produced, since HF's min_new_tokens masks EOS
where arc's --ignore-eos takes it, and says so; a difference before that EOS is a NO."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_speed.py"


def _report(arc_ids, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("gpu_speed", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    hf = [{"ids": [5, 6, 7, 8], "decode_s": 1.0, "produced": 3, "eos": [2]}]
    arc = [{"ids": arc_ids, "decode_s": 0.25, "produced": 3}]
    out = tmp_path / "r.json"
    args = SimpleNamespace(model="m", new_tokens=4, prompts=1, rounds=1, json=str(out))
    mod.report({"HF eager fp32": [hf], "arc torch eager": [arc]}, {}, "GPU", args)
    return json.loads(out.read_text())["rows"], capsys.readouterr().out


def test_same_ids_are_yes(tmp_path, capsys):
    rows, text = _report([5, 6, 7, 8], tmp_path, capsys)
    assert rows["arc torch eager"]["same"] == "yes"
    assert rows["arc torch eager"]["x_hf_fp32"] == 4.0
    assert "first EOS" not in text


def test_ids_equal_up_to_arcs_eos_are_yes_starred(tmp_path, capsys):
    rows, text = _report([5, 6, 2, 9], tmp_path, capsys)
    assert rows["arc torch eager"]["same"] == "yes*"
    assert "compared up to the first EOS" in text


def test_a_difference_before_eos_is_no(tmp_path, capsys):
    rows, _ = _report([5, 9, 2, 8], tmp_path, capsys)
    assert rows["arc torch eager"]["same"] == "NO*"
    rows, _ = _report([5, 6, 7, 9], tmp_path, capsys)
    assert rows["arc torch eager"]["same"] == "NO"
