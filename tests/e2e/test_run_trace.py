"""`arc run --trace FILE`: one JSON line per decode step after a header with the request's
totals, from a fresh process on an -O2 engine; a bad path is one clear line before any
decoding, and nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.cli import arc, assert_clean_error

PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the"


def test_trace_lines_are_the_output(tiny_engines, tmp_path):
    path = tmp_path / "steps.jsonl"
    engine = str(tiny_engines["tiny-llama"])
    done = arc("run", engine, "--prompt", PROMPT, "--max-new-tokens", "60", "--ignore-eos",
               "--trace", str(path), "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)
    head, *lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert head["engine"] == engine and head["token_ids"] == summary["token_ids"]
    assert head["steps"] == summary["steps"] and "trace" not in summary
    assert [t for line in lines for t in line["tokens"]] == summary["token_ids"][1:]
    assert len(lines) == summary["forward_passes"]
    assert sum(line["nodes"] > 1 for line in lines) == summary["verify_passes"] > 0
    assert lines[0]["pos"] == len(summary["prompt_ids"])
    sizes = {row["nodes"]: row["steps"] for row in summary["steps"]["by_size"]}
    assert sizes == {n: sum(line["nodes"] == n for line in lines) for n in sizes}
    # without --json: the steps' line on stderr
    done = arc("run", engine, "--prompt", PROMPT, "--max-new-tokens", "60", "--ignore-eos")
    assert done.returncode == 0 and "[steps: plain: " in done.stderr, done.stderr


def test_bad_trace_paths(tiny_engines, tmp_path):
    engine = str(tiny_engines["tiny-llama"])
    run = ("run", engine, "--prompt", "hi", "--max-new-tokens", "4", "--trace")
    assert_clean_error(arc(*run, str(tmp_path)), "is a directory")
    assert_clean_error(arc(*run, str(tmp_path / "nowhere" / "t.jsonl")), "no directory")
    assert list(tmp_path.iterdir()) == []
    if Path("/proc/self").is_dir():  # a directory no one may create files in, root included
        assert_clean_error(arc(*run, "/proc/arc-trace.jsonl"), "cannot write in '/proc'")
