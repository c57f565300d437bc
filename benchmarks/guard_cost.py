"""What the near-tie guard costs and cuts on an engine whose verify is not its decode step bit
for bit (torch, onnx): `accept.settle` (greedy) and `near_draws.draw_settled` (seeded sampling).

    python benchmarks/verify_drift.py ... (the error the guard is sized on)
    python benchmarks/guard_cost.py --engine model.arc [--new-tokens 128] [--rounds 2]

Per shipped prompt (benchmarks/prompts.json), greedy and seeded sampling (temperature 0.7,
top-p 0.9, seed = the prompt's index): plain decoding once, then the speculative loop with the
guard and with the engine's verify declared exact (`verify_exact`: the guard off), alternating
which goes first each round, each from cold drafts (`forget`). The two are one engine with one
flag changed, so they share a process. Prints, per mode, decode tok/s of each and their
ratio, how many of the loop's decisions the guard cut (the walk stopped before a token, left
to a decode step), and whether each run's ids equal plain decoding's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import arc.runtime.speculative as spec
from arc.runtime.load import load_engine
from arc.runtime.sampling import SamplingParams

PROMPTS = Path(__file__).parent / "prompts.json"
CUTS = {"decisions": 0, "cut": 0}


def _counting(fn):
    """fn (settle or cut_unsettled) counting the decisions it saw and the walks it cut."""

    def wrapped(path, tokens, *args, **kw):
        out = fn(path, tokens, *args, **kw)
        CUTS["decisions"] += len(tokens)
        CUTS["cut"] += len(out[1]) < len(tokens)
        return out

    return wrapped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", required=True)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", default=str(PROMPTS))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    spec.settle = _counting(spec.settle)
    spec.cut_unsettled = _counting(spec.cut_unsettled)
    eng = load_engine(a.engine)
    gen, steps = eng.generator, eng.generator.steps
    if getattr(steps, "verify_exact", False):
        raise SystemExit("this engine's verify is its decode step bit for bit: no guard runs")
    prompts = json.loads(Path(a.prompts).read_text())
    modes = {
        "greedy": lambda i: SamplingParams(),
        "sampled": lambda i: SamplingParams(temperature=0.7, top_p=0.9, seed=i),
    }
    with torch.inference_mode():
        for mode, params in modes.items():
            tok = {True: [0, 0.0], False: [0, 0.0]}  # guard on? -> tokens, seconds
            same = {True: 0, False: 0}
            CUTS.update(decisions=0, cut=0)
            cuts = dict(CUTS)
            for i, item in enumerate(prompts):
                ids = eng.prompt_ids(item["prompt"])
                kw = {"max_new_tokens": a.new_tokens, "ignore_eos": True, "sampling": params(i)}
                plain = gen.generate(ids, speculative=False, **kw).token_ids
                for r in range(a.rounds):
                    for guard in (True, False) if (i + r) % 2 == 0 else (False, True):
                        steps.verify_exact = not guard
                        gen.forget()
                        before = dict(CUTS)
                        out = gen.generate(ids, **kw)
                        if guard:
                            for k in cuts:
                                cuts[k] += CUTS[k] - before[k]
                        tok[guard][0] += len(out.token_ids) - 1
                        tok[guard][1] += out.decode_ms / 1e3
                        same[guard] += out.token_ids == plain
            steps.verify_exact = False
            rate = {g: n / s for g, (n, s) in tok.items()}
            runs = len(prompts) * a.rounds
            print(
                f"{mode:8} guard {rate[True]:7.1f} tok/s  off {rate[False]:7.1f} tok/s  "
                f"ratio {rate[True] / rate[False]:.3f}  cut {cuts['cut']} of "
                f"{cuts['decisions']} decisions  ids = plain: guard {same[True]}/{runs}, "
                f"off {same[False]}/{runs}"
            )


if __name__ == "__main__":
    main()
