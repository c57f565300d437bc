"""Engines as a user calls them: one `arc run --json` process per request, engines alternating,
every prompt `--reps` times; per prompt the median decode tok/s of each engine and its ratio to
the first engine's, then the geomean of those ratios.

    python benchmarks/run_processes.py ENGINE_A.arc ENGINE_B.arc [--reps 3] [--new-tokens 128]
        [--prompts benchmarks/prompts.json]
    python benchmarks/run_processes.py O2.arc@0 O2.arc@1 O2.arc@3 O2.arc   # --draft-max caps

`ENGINE@N` runs the engine with `arc run --draft-max N` (0: plain decoding from the same
engine), so caps of one speculative engine compare as systems.

Unlike spec_speed.py's workers (one process for all prompts, a warm-up request first), every
request here pays what a one-shot `arc run` pays inside its decode: the first call of each
function, the loop's first steps with nothing timed yet, cold caches. Wall time (imports, the
engine's load, the tokenizer) is printed too but not in the ratios: it is not decoding.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARC = Path(sys.executable).with_name("arc")


def run_once(system: str, prompt: str, new_tokens: int) -> tuple[dict, float]:
    """`arc run --json` of `system` (ENGINE or ENGINE@N: with --draft-max N) in a process."""
    engine, at, cap = system.rpartition("@")
    if not (at and cap.isdigit() and engine):  # a file name may hold an "@" of its own
        engine, at, cap = system, "", ""
    cmd = [str(ARC), "run", engine, "--prompt", prompt, "--json"]
    cmd += ["--max-new-tokens", str(new_tokens)] + (["--draft-max", cap] if at else [])
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"arc run {system} failed ({done.returncode}): {done.stderr[-500:]}")
    return json.loads(done.stdout), wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "engines",
        nargs="+",
        help="engine files (ENGINE@N: with --draft-max N); the first is the baseline",
    )
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompts", default=str(HERE / "prompts.json"))
    a = ap.parse_args()
    prompts = json.loads(Path(a.prompts).read_text())
    tps = {(i, e): [] for i in range(len(prompts)) for e in a.engines}
    walls = {e: [] for e in a.engines}
    ids = {}
    for r in range(a.reps):
        for i, p in enumerate(prompts):
            k = (r + i) % len(a.engines)  # who goes first rotates
            for e in a.engines[k:] + a.engines[:k]:
                res, wall = run_once(e, p["prompt"], a.new_tokens)
                tps[(i, e)].append(res["tokens_per_s"])
                walls[e].append(wall)
                ids.setdefault((i, e), res["token_ids"])
        print(f"rep {r + 1}/{a.reps} done", file=sys.stderr)
    base = a.engines[0]
    names = [Path(e).name for e in a.engines]
    head = f"one `arc run` process per request, {a.reps} reps, median decode tok/s"
    print(f"{head}; x = over {names[0]}, = ids equal to its")
    ratios = {e: [] for e in a.engines}
    for i, p in enumerate(prompts):
        b = statistics.median(tps[(i, base)])
        row = f"{i:>2} {p['kind']:<12}"
        for e in a.engines:
            m = statistics.median(tps[(i, e)])
            ratios[e].append(m / b)
            same = "=" if ids[(i, e)] == ids[(i, base)] else "!"
            row += f"  {m:7.1f} {m / b:5.2f}x{same}"
        print(row)
    for e, name in zip(a.engines, names, strict=True):
        geo = math.exp(statistics.mean(math.log(x) for x in ratios[e]))
        worst = min(ratios[e])
        print(
            f"{name}: geomean {geo:.3f}x, worst prompt {worst:.3f}x, "
            f"median wall {statistics.median(walls[e]):.2f} s a request"
        )


if __name__ == "__main__":
    main()
