"""SIGTERM during `arc compile` cleans up like Ctrl-C: no `arc-build-*` directory is left in
the temporary directory, no half engine, no traceback; exit 143 (128 + SIGTERM)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _wait_for(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _processes_naming(text: str) -> list[int]:
    """Pids of the processes whose command line contains `text`."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and text.encode() in (d / "cmdline").read_bytes():
                out.append(int(d.name))
        except OSError:
            pass  # gone meanwhile
    return out


@pytest.mark.parametrize("when", ["build", "jobs"])
def test_sigterm_during_build_removes_the_build_dir(tmp_path, when):
    """`jobs`: once the build's child processes (targets/torch_jobs.py) run; none outlives it."""
    tmp, out = tmp_path / "tmp", tmp_path / "x.arc"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "ARC_BUILD_JOBS": "2"}
    cmd = [
        sys.executable,
        "-m",
        "arc.cli",
        "compile",
        "tiny-llama",
        "--target",
        "torch",
        "-o",
        str(out),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        started = _wait_for(lambda: list(tmp.glob("arc-build-*")), 180)
        assert started, proc.communicate(timeout=600)[1].decode()[-2000:]
        if when == "jobs":
            assert _wait_for(lambda: _processes_naming(str(tmp)), 180)  # a child's jobdir
            time.sleep(2.0)  # the child imports torch and starts building
        else:
            time.sleep(1.0)  # inside the AOTInductor build (it takes ~20 s for a tiny model)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()[-2000:]
    assert b"Traceback" not in err, err.decode()[-2000:]
    assert not list(tmp.glob("arc-build-*")) and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".x.arc")]
    assert not _processes_naming(str(tmp))  # no build process left behind


def test_sigterm_handler_is_restored_after_main(capsys):
    """In-process callers (tests, notebooks) get their own SIGTERM handling back."""
    from arc.cli import main

    before = signal.getsignal(signal.SIGTERM)
    assert main(["passes"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before
    assert "kv-fusion" in capsys.readouterr().out


def test_sigterm_swallowed_in_a_destructor_is_delivered_again():
    """A SIGTERM whose exception Python had to swallow (raised inside a `__del__`) is sent
    again and raised outside it; the hooks are put back afterwards."""
    from arc import cli

    class Dies:
        def __del__(self):
            raise cli._Terminated  # as the handler does when the signal lands here

    before = (signal.getsignal(signal.SIGTERM), sys.unraisablehook)
    previous = cli._handle_sigterm()
    try:
        with pytest.raises(cli._Terminated):
            Dies()  # collected at once: its exception is unraisable
            for _ in range(500):
                time.sleep(0.01)
    finally:
        cli._restore(previous)
    assert (signal.getsignal(signal.SIGTERM), sys.unraisablehook) == before
