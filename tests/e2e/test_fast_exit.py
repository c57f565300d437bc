"""`arc run` leaves without the interpreter's module teardown (arc.cli.cli): its output is
whole, atexit handlers still run, exit codes stay, and nothing is left in the temporary
directory (the torch target's package loader unpacks there)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

CODE = """
import atexit, sys
atexit.register(lambda: print("atexit ran", file=sys.stderr, flush=True))
sys.argv = ["arc", *sys.argv[1:]]
from arc.cli import cli
cli()
"""


def _arc(tmp, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(tmp)}
    return subprocess.run(
        [sys.executable, "-c", CODE, *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_run_exits_fast_with_whole_output(tiny_engines, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    engine = str(tiny_engines["tiny-llama"])
    done = _arc(tmp, "run", engine, "--prompt", "hello", "--max-new-tokens", "40", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)  # the whole object, flushed before the exit
    assert len(result["token_ids"]) >= 1
    assert "atexit ran" in done.stderr
    bad = _arc(tmp, "run", engine, "--prompt", "hello", "--max-new-tokens", "0")
    assert bad.returncode == 2 and "arc: error: --max-new-tokens" in bad.stderr
    assert "atexit ran" in bad.stderr
    # no loader's files left behind (torch's Inductor cache directory stays, as at any exit)
    assert [p.name for p in tmp.iterdir() if not p.name.startswith("torchinductor_")] == []
    other = _arc(tmp, "passes")  # other commands exit as usual
    assert other.returncode == 0 and "atexit ran" in other.stderr
