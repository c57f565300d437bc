"""A/B of the speculative loop's settings, in one process, on one engine: each arm sets some of
arc.runtime.speculative's constants (PRIOR_RATIO, MARGIN, PROBE_EVERY, ...) and runs every
prompt with speculation, drafting cold (Generator.forget), next to a plain run of the same
prompt; arms and the plain run rotate order per prompt and rep.

    python benchmarks/spec_ab.py --engine ENGINE.arc --arm PRIOR_RATIO=1.0 --arm PRIOR_RATIO=0.6
        [--reps 4] [--new-tokens 128] [--threads 2] [--prompts FILE.json] [--cold]

An arm is NAME=VALUE[,NAME=VALUE...]; a dotted NAME is a module's under arc.runtime
(`drafters.ngram.COPY_LENGTH=0`). Prints per prompt each arm's median over reps of its
tok/s over the same rep's plain tok/s, and tokens per forward; then each arm's geomean, worst
prompt and how many prompts fall below 0.95x. `--temperature T [--top-p P]` samples (each
prompt and rep seeded alike in every arm; ids are then not compared). Settings that differ by
a few percent cannot be
told apart across separate runs on a shared machine (spec_speed.py's rounds move by ~10%);
in one process, interleaved, they can. Ids must equal the plain run's: '!' marks a loss of
losslessness.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent


def owner(name: str):
    """(module, attribute) that a setting names: 'MARGIN' is arc.runtime.speculative's,
    'drafters.ngram.COPY_LENGTH' arc.runtime.drafters.ngram's; None if there is none."""
    import importlib

    path, _, attr = name.rpartition(".")
    try:
        module = importlib.import_module(f"arc.runtime.{path or 'speculative'}")
    except ImportError:
        return None
    return (module, attr) if hasattr(module, attr) else None


def parse_arm(text: str) -> dict[str, float]:
    """'PRIOR_RATIO=0.6,MARGIN=0.1' -> {'PRIOR_RATIO': 0.6, 'MARGIN': 0.1}: names that the
    speculative module defines (or, dotted, a module under arc.runtime), numeric values."""
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or owner(name.strip()) is None:
            raise SystemExit(
                f"--arm {text!r}: {name!r} is not a setting of arc.runtime.speculative "
                "(or, dotted, of a module under arc.runtime)"
            )
        out[name.strip()] = float(value)
    return out


def run(
    engine: str,
    prompts: list[str],
    arms: list[str],
    n: int,
    threads: int,
    reps: int,
    sampling: tuple[float, float] = (0.0, 1.0),
    cold: bool = False,
):
    """{(prompt index, arm): [(tok/s over plain, tokens per forward, same ids, verifies),
    ...reps]}. `sampling` (temperature, top_p): temperature > 0 samples, every run of prompt
    i in rep r seeded 1000 i + r (texts differ between arms: same ids is then None). `cold`:
    every request starts with no step timed (a fresh SpecMemory, as a one-shot `arc run`), so
    its first trees are chosen under the prior verify costs."""
    import torch

    from arc.runtime.load import load_engine
    from arc.runtime.sampling import SamplingParams
    from arc.runtime.speculative import SpecMemory

    settings = {a: parse_arm(a) for a in arms}
    default = {k: getattr(*owner(k)) for s in settings.values() for k in s}
    torch.set_num_threads(threads)
    eng = load_engine(engine)
    gen = eng.generator
    if not gen.speculative:
        raise SystemExit(f"{engine}: not a speculative engine (compile it with spec-tree)")
    order = ["plain", *arms]
    out: dict[tuple[int, str], list] = {}
    # each arm learns its own step costs across its requests (as one server would), so an arm
    # that measures differently does not steer another's tree sizes
    memories = {arm: SpecMemory() for arm in arms}
    try:
        with torch.inference_mode():
            gen.generate(eng.prompt_ids("Say hello."), max_new_tokens=16)  # warm-up
            for r in range(reps):
                for i, p in enumerate(prompts):
                    ids, got = eng.prompt_ids(p), {}
                    k = (r + i) % len(order)
                    for arm in order[k:] + order[:k]:
                        for name, value in settings.get(arm, default).items():
                            kind = type(default[name])
                            setattr(*owner(name), kind(value))
                        gen.forget()
                        gen._memory = SpecMemory() if cold else memories.get(arm)
                        t, top_p = sampling
                        params = SamplingParams(t, top_p=top_p, seed=1000 * i + r)
                        res = gen.generate(
                            ids, max_new_tokens=n, sampling=params, speculative=arm != "plain"
                        )
                        tps = (len(res.token_ids) - 1) / (res.decode_ms / 1e3)
                        got[arm] = (tps, res.accepted_per_step, res.token_ids, res.verify_passes)
                    plain = got["plain"]
                    for arm in arms:
                        tps, per_fwd, ids_out, verifies = got[arm]
                        out.setdefault((i, arm), []).append(
                            (tps / plain[0], per_fwd, ids_out == plain[2], verifies)
                        )
    finally:
        for name, value in default.items():
            setattr(*owner(name), value)
    return out


def report(out: dict, prompts: list[str], arms: list[str]) -> dict:
    geo = {}
    for i in range(len(prompts)):
        row = f"{i:>2}"
        for a in arms:
            reps = out[(i, a)]
            ratio = statistics.median(x[0] for x in reps)
            per_fwd = statistics.median(x[1] for x in reps)
            same = "=" if all(x[2] for x in reps) else "!"  # sampled too: same uniforms
            row += f"  {a}: {ratio:.3f}x {per_fwd:.2f} t/f {same}"
        print(row)
    for a in arms:
        cells = [statistics.median(x[0] for x in out[(i, a)]) for i in range(len(prompts))]
        geo[a] = math.exp(sum(map(math.log, cells)) / len(cells))
        worst = min(range(len(cells)), key=cells.__getitem__)
        below = sum(c < 0.95 for c in cells)
        print(
            f"{a}: geomean {geo[a]:.3f}x, worst prompt {worst} {cells[worst]:.3f}x, "
            f"below 0.95x: {below}/{len(cells)}"
        )
    return geo


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", required=True)
    ap.add_argument("--arm", action="append", required=True, help="NAME=VALUE[,NAME=VALUE]")
    ap.add_argument("--reps", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", default=str(HERE / "prompts.json"))
    ap.add_argument("--temperature", type=float, default=0.0, help="sample (0: greedy)")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument(
        "--cold", action="store_true", help="each request times its steps afresh (arc run)"
    )
    a = ap.parse_args()
    prompts = [p["prompt"] for p in json.loads(Path(a.prompts).read_text())]
    for arm in a.arm:
        parse_arm(arm)  # bad names fail before the engine loads
    sampling = (a.temperature, a.top_p)
    out = run(a.engine, prompts, a.arm, a.new_tokens, a.threads, a.reps, sampling, a.cold)
    print(
        f"{a.engine}: {len(prompts)} prompts x {a.reps} reps, {a.new_tokens} new tokens, "
        "each arm's tok/s over the same rep's plain run, cold drafts"
        + (", no step timed at each request's start" if a.cold else "")
    )
    report(out, prompts, a.arm)


if __name__ == "__main__":
    main()
