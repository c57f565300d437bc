"""The ceiling of lossless speculation on this device: an engine's speculative loop fed perfect
drafts, against its own plain decoding.

    python benchmarks/spec_ceiling.py --engine ENGINE.arc [--new-tokens 128] [--reps 3]
        [--sizes 2,4,8,16] [--prompts 0,2,5]

What speculation can buy is bounded by the verify's cost: a verify of B nodes yields at most B
tokens (B-1 drafted plus the bonus), so no drafter can beat B / (verify time / step time).
This measures that bound end to end instead of computing it from `verify_cost.py`: per
prompt, the engine first decodes plainly (its `decode` function, -O1's computation); then,
for each tree size B, the speculative loop runs with a drafter that proposes the next B-1
tokens of that very output as one chain (every draft is right: the oracle of "Fast
Inference from Transformers via Speculative Decoding", Leviathan et al. 2023, §3's
alpha = 1) and the tree size fixed at B (the loop's cost model off), so each verify accepts
its whole chain. All arms are the same engine in one process, interleaved per prompt in
rotating order; ids must equal the plain run's (they are its own output, so any difference
is a lossless-ness bug). It prints per size the median over reps of each prompt's tok/s
ratio to plain, and tokens per forward. A real drafter's speedup at size B is at most this.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

PROMPTS = Path(__file__).resolve().parent / "prompts.json"


class Oracle:
    """A drafter that knows the answer: the next `depth` tokens of `truth` after the history,
    one chain, each scored 1."""

    name = "oracle"

    def __init__(self, truth: list[int]):
        self.truth = truth

    def propose(self, history: list[int], depth: int, budget: int) -> dict:
        n = len(history)
        if self.truth[:n] != history:  # off the known output: nothing to propose
            return {}
        chain = self.truth[n : n + min(depth, budget)]
        return {tuple(chain[: i + 1]): 1.0 for i in range(len(chain))}

    def observe(self, tree, topk) -> None:
        pass


def run(engine: str, prompts: list[str], sizes: list[int], n: int, threads: int, reps: int):
    """{size (1: plain): [[(tok/s, tokens per forward, same ids), ...reps] per prompt]}."""
    import torch

    from arc.runtime.load import load_engine

    torch.set_num_threads(threads)
    eng = load_engine(engine)
    gen = eng.generator
    have = gen.steps.verify_sizes
    if not gen.speculative or not have:
        raise SystemExit(f"{engine}: no verify functions (compile it with spec-tree)")
    missing = [b for b in sizes if b not in have]
    if missing:
        raise SystemExit(f"{engine}: no verify of {missing} nodes (it has {have})")
    plan = gen.plan
    out: dict[int, list[list]] = {b: [[] for _ in prompts] for b in [1, *sizes]}
    with torch.inference_mode():
        gen.generate(eng.prompt_ids("Say hello."), max_new_tokens=16, speculative=False)
        truths = []  # each prompt's plain output: what the oracle drafts
        for p in prompts:
            ids = eng.prompt_ids(p)
            truths.append((ids, gen.generate(ids, max_new_tokens=n, speculative=False).token_ids))
        order = [1, *sizes]
        for r in range(reps):
            for i, (ids, plain) in enumerate(truths):
                k = (r + i) % len(order)
                for b in order[k:] + order[:k]:  # rotating which arm goes first
                    if b == 1:
                        res = gen.generate(ids, max_new_tokens=n, speculative=False)
                    else:
                        opts = {
                            **plan["options"],
                            "adaptive": False,
                            "depth": b - 1,
                            "budget": b - 1,
                            "verify_tokens": b,
                        }
                        gen.plan = {"kind": "speculative", "options": opts}
                        gen._drafter = Oracle(ids + plain)
                        try:
                            res = gen.generate(ids, max_new_tokens=n, speculative=True)
                        finally:
                            gen.plan, gen._drafter = plan, None
                    tps = (len(res.token_ids) - 1) / (res.decode_ms / 1e3)
                    out[b][i].append((tps, res.accepted_per_step, res.token_ids == plain))
    return out


def report(out: dict, kinds: list[str]) -> None:
    sizes = [b for b in out if b != 1]
    plain = [statistics.median(t for t, _, _ in reps) for reps in out[1]]
    print(
        f"{'':3} {'prompt':16} {'plain tok/s':>11}" + "".join(f"{'B=' + str(b):>14}" for b in sizes)
    )
    cells: dict[int, list[float]] = {b: [] for b in sizes}
    for i, kind in enumerate(kinds):
        row = f"{i:>2}  {kind[:16]:16} {plain[i]:>11.1f}"
        for b in sizes:
            reps = out[b][i]
            ratio = statistics.median(t for t, _, _ in reps) / plain[i]
            cells[b].append(ratio)
            tpf = statistics.median(a for _, a, _ in reps)
            same = all(s for _, _, s in reps)
            row += f"{ratio:>8.2f}x {tpf:>4.1f}" + ("" if same else "!")
        print(row)
    print("overall (geomean of prompt ratios; then tokens per forward):")
    for b in sizes:
        geo = statistics.geometric_mean(cells[b])
        tpf = statistics.mean(a for reps in out[b] for _, a, _ in reps)
        same = all(s for reps in out[b] for _, _, s in reps)
        ids = "same" if same else "DIFFER"
        print(f"  B={b:<3} {geo:.2f}x plain, {tpf:.2f} tokens/forward, ids {ids}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", required=True, help="an engine compiled with spec-tree")
    ap.add_argument("--sizes", default="2,4,8,16")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", help="indices into prompts.json (default: all)")
    ap.add_argument("--json", help="also write the raw results here")
    a = ap.parse_args()
    shipped = json.loads(PROMPTS.read_text())
    pick = [int(x) for x in a.prompts.split(",")] if a.prompts else range(len(shipped))
    chosen = [shipped[i] for i in pick]
    sizes = [int(x) for x in a.sizes.split(",")]
    out = run(a.engine, [p["prompt"] for p in chosen], sizes, a.new_tokens, a.threads, a.reps)
    print(
        f"{a.engine}: perfect drafts, {a.new_tokens} new tokens, {a.threads} threads, {a.reps} reps"
    )
    report(out, [p["kind"] for p in chosen])
    if a.json:
        Path(a.json).write_text(json.dumps({str(b): v for b, v in out.items()}))


if __name__ == "__main__":
    main()
