"""The torch target's packages built side by side: one process per core, each claiming the
module's functions one at a time until none is left.

A function's AOTInductor package is ~85% Python (torch.export and Inductor's lowering) and
~15% g++, each on one core: smollm2-135m -O2 took 314 s to build its 5 functions one after
another, ~46 s of it in cc1plus, at 99% of one core (2026-12-05, 2-core Xeon). Threads cannot
share the Python part (the GIL), so the builds run in processes: the parent writes the module
(IR JSON) and its weights (safetensors) once, and each child lowers them itself. A process
claims a function by creating `<name>.claim` exclusively, so the work balances with no
channel between the processes. The parent builds too, and afterwards builds anything a child
claimed but did not finish (a child that died, for lack of memory say), so a child's failure
never changes the engine, only how long it took.

`ARC_BUILD_JOBS=N` sets the processes (1: build in this process only); the default is one
per core this process may run on, fewer where memory would not hold a copy of the weights
per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from arc.errors import ArcError

PER_JOB_OVERHEAD = 1.5e9  # bytes a build process holds beyond its weights (torch, Inductor)


def jobs_for(n_functions: int, weight_bytes: int) -> int:
    """How many processes to build `n_functions` with (ARC_BUILD_JOBS, else cores and memory)."""
    env = os.environ.get("ARC_BUILD_JOBS", "").strip()
    if env:
        if not env.isdigit() or int(env) < 1:
            raise ArcError(f"ARC_BUILD_JOBS={env[:20]!r}: give a whole number of processes >= 1")
        return max(1, min(int(env), n_functions))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_job = 3 * weight_bytes + PER_JOB_OVERHEAD  # weights, their lowered copy, slack
    by_memory = max(1, int(_available_memory() // per_job))
    return max(1, min(cores or 1, n_functions, by_memory))


def _available_memory() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return PER_JOB_OVERHEAD  # unknown: one process


def build_all(
    names: list[str],
    build_one: Callable[[str], None],
    jobdir: Path,
    job: dict[str, Any],
    jobs: int,
    in_parent: bool = True,
) -> dict[str, int]:
    """Build every function of `names` by `build_one(name)` here and in `jobs - 1` children.

    `jobdir` holds what the children read: `module.json`, `weights.safetensors` (the caller
    writes them) and `job.json` (written here from `job`). Returns {name: pid that built it}.
    `in_parent=False` leaves the claiming to the children first (tests: a child must build).
    """
    names = largest_first(names)
    (jobdir / "job.json").write_text(json.dumps({**job, "names": names}))
    children = [_start(jobdir) for _ in range(jobs - 1)]
    try:
        if in_parent:
            _claim_and_build(names, build_one, jobdir)
        for child in children:
            _wait(child)
        # what a child claimed and did not finish: built here (a child's failure costs time only)
        for name in names:
            if not (jobdir / f"{name}.done").exists():
                _build(name, build_one, jobdir)
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
                child.wait()
    return {name: int((jobdir / f"{name}.done").read_text()) for name in names}


def largest_first(names: list[str]) -> list[str]:
    """The order to claim functions in: the longest builds first, so that no process is left
    with one long build while the others idle. A verify's build grows with its nodes: on
    smollm2-135m -O2, two processes, verify_8 took 99 s, verify_4 67, prefill 56, verify_2 52
    and decode 45; claimed in module order, one process idled 75 s at the end."""

    def size(name: str) -> int:
        head, _, tail = name.rpartition("_")
        return int(tail) if head == "verify" and tail.isdigit() else 0

    return sorted(names, key=lambda n: -size(n))  # stable: the rest in module order


def _start(jobdir: Path) -> subprocess.Popen:
    log = jobdir / f"child-{time.monotonic_ns()}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ARC_BUILD_PARENT": str(os.getpid())}
    cmd = [sys.executable, "-m", "arc.targets.torch_jobs", str(jobdir)]
    with open(log, "wb") as out:  # the child has its own descriptor
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    child.log = log  # type: ignore[attr-defined]
    return child


def _wait(child: subprocess.Popen) -> None:
    """Wait for `child` (SIGINT and SIGTERM still interrupt: their handlers' exceptions leave
    the wait); a failed child is one warning line on stderr, its last line of output."""
    if child.wait() != 0:
        lines = child.log.read_text(errors="replace").strip().splitlines() or ["no output"]
        print(
            f"arc: a build process exited with {child.returncode} ({lines[-1][:200]}); "
            "its functions are built here",
            file=sys.stderr,
        )


def _claim_and_build(names: list[str], build_one: Callable[[str], None], jobdir: Path) -> None:
    for name in names:
        try:
            fd = os.open(jobdir / f"{name}.claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue  # another process has it
        os.close(fd)
        _build(name, build_one, jobdir)


def _build(name: str, build_one: Callable[[str], None], jobdir: Path) -> None:
    """Build `name` and mark it done, by this process."""
    build_one(name)
    (jobdir / f"{name}.done").write_text(str(os.getpid()))


def _watch_parent(parent: int) -> None:
    """Exit when the parent is gone (killed): an orphan would build on for minutes."""

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def child_main(jobdir: Path) -> None:
    """A child's work: lower the module from `jobdir` and build the functions it can claim."""
    _watch_parent(int(os.environ.get("ARC_BUILD_PARENT", os.getppid())))
    import torch
    from safetensors.torch import load_file

    from arc.ir import loads
    from arc.targets import torch_compile

    torch.set_num_threads(1)  # the parent and the other children have the other cores
    job = json.loads((jobdir / "job.json").read_text())
    module = loads((jobdir / "module.json").read_text())
    weights = load_file(str(jobdir / "weights.safetensors"))
    with torch_compile.cpu_build(job["device"], job["cpu"]):  # the parent's -march and ISAs
        build_one, _ = torch_compile.builder(module, weights, job)
        _claim_and_build(job["names"], build_one, jobdir)


if __name__ == "__main__":
    child_main(Path(sys.argv[1]))
