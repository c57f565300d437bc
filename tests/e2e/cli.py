"""Run the `arc` CLI in a fresh process, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def arc(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "arc.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def arc_json(*args: str, env: dict | None = None) -> dict:
    done = arc(*args, "--json", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def assert_clean_error(done: subprocess.CompletedProcess, fragment: str) -> None:
    """Exit 2, one line on stderr naming the problem, no traceback."""
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("arc: error: ") and fragment in lines[0], lines[0]
    assert "Traceback" not in done.stderr
