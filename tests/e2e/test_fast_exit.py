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
def bye():
    tvm = sys.modules.get("tvm")
    print("atexit ran", "relax" if tvm and hasattr(tvm, "relax") else "-", file=sys.stderr)
atexit.register(bye)
sys.argv = ["arc", *sys.argv[1:]]
from arc.cli import cli
cli()
"""


def _arc(tmp, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(tmp), **(env or {})}
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


def test_run_loads_tvms_runtime_library_only(tmp_path):
    """A tvm engine runs in `arc run` without TVM's compiler or its Relax package, and
    decodes the ids the full library decodes (TVM_USE_RUNTIME_LIB=0 asks for it)."""
    import importlib.util

    import pytest

    from tests.e2e.cli import arc_json

    if importlib.util.find_spec("tvm") is None:
        pytest.skip("the tvm extra is not installed")
    engine = str(tmp_path / "t.arc")
    arc_json("compile", "tiny-llama", "--target", "tvm", "-O2", "--max-seq-len", "128",
             "-o", engine)  # fmt: skip
    run = ("run", engine, "--prompt", "The quick brown fox", "--max-new-tokens", "24", "--json")
    lean, full = _arc(tmp_path, *run), _arc(tmp_path, *run, env={"TVM_USE_RUNTIME_LIB": "0"})
    assert lean.returncode == 0 and full.returncode == 0, lean.stderr[-2000:] + full.stderr[-2000:]
    assert "atexit ran -" in lean.stderr and "atexit ran relax" in full.stderr
    assert json.loads(lean.stdout)["token_ids"] == json.loads(full.stdout)["token_ids"]
