"""The ceiling of lossless speculation on this device: an engine's speculative loop fed perfect
drafts, against its own plain decoding; and where each real drafter stands below it.

    python benchmarks/spec_ceiling.py --engine ENGINE.arc [--new-tokens 128] [--reps 3]
        [--sizes 2,4,8,16] [--prompts 0,2,5]
        [--drafters ngram,recycle,jacobi,auto [--drafter-size 8]]

What speculation can buy is bounded by the verify's cost: a verify of B nodes yields at most B
tokens (B-1 drafted plus the bonus), so no drafter can beat B / (verify time / step time).
This measures that bound end to end instead of computing it from `verify_cost.py`: per
prompt, the engine first decodes plainly (its `decode` function, -O1's computation); then,
for each tree size B, the speculative loop runs with a drafter that proposes the next B-1
tokens of that very output as one chain (every draft is right: acceptance rate alpha = 1 in
the analysis of Leviathan et al. 2023, "Fast Inference from Transformers via Speculative
Decoding") and the tree size fixed at B (the loop's cost model off), so each verify accepts
its whole chain. `--drafters` adds each named drafter at one fixed tree size (its acceptance
length, tokens per forward, with every step a verify) and the engine as shipped (its own
drafter and cost model). All arms are the same engine in one process, interleaved per prompt
in rotating order; ids must equal the plain run's (any difference is a lossless-ness bug).
It prints per arm the median over reps of each prompt's tok/s ratio to plain, and tokens per
forward.
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


def arms_of(sizes: list[int], drafters: list[str], size: int) -> list[str]:
    """The arms of a run, by name: plain, the oracle at each tree size, each drafter at one
    fixed tree size (its acceptance without the cost model), and the engine as shipped."""
    return (
        ["plain"]
        + [f"oracle B={b}" for b in sizes]
        + [f"{d} B={size}" for d in drafters]
        + (["engine"] if drafters else [])
    )


def run(
    engine: str,
    prompts: list[str],
    sizes: list[int],
    n: int,
    threads: int,
    reps: int,
    drafters: tuple[str, ...] = (),
    size: int = 8,
) -> dict[str, list[list]]:
    """{arm: [[(tok/s, tokens per forward, same ids as plain), ...reps] per prompt]}."""
    import torch

    from arc.runtime import drafters as made
    from arc.runtime.load import load_engine

    torch.set_num_threads(threads)
    eng = load_engine(engine)
    gen = eng.generator
    have = gen.steps.verify_sizes
    if not gen.speculative or not have:
        raise SystemExit(f"{engine}: no verify functions (compile it with spec-tree)")
    missing = [b for b in [*sizes, *([size] if drafters else [])] if b not in have]
    if missing:
        raise SystemExit(f"{engine}: no verify of {missing} nodes (it has {have})")
    arms = arms_of(sizes, list(drafters), size)
    out: dict[str, list[list]] = {a: [[] for _ in prompts] for a in arms}
    plan = gen.plan

    def fixed_tree(b: int, depth: int) -> dict:
        opts = {**plan["options"], "adaptive": False, "depth": depth, "budget": b - 1}
        return {"kind": "speculative", "options": opts | {"verify_tokens": b}}

    with torch.inference_mode():
        vocab = int(gen.prefill(eng.prompt_ids("Hi.")).shape[-1])
        shipped = gen.drafter(vocab)

        def cold(name: str):
            """A fresh drafter: one kept across reps would draft a repeated prompt's output
            back from the previous rep (Token Recycling's table), which no first run can."""
            return made.make(name, plan["options"], vocab, gen.steps)

        gen.generate(eng.prompt_ids("Say hello."), max_new_tokens=16, speculative=False)
        truths = []  # each prompt's plain output: what the oracle drafts
        for p in prompts:
            ids = eng.prompt_ids(p)
            truths.append((ids, gen.generate(ids, max_new_tokens=n, speculative=False).token_ids))
        for r in range(reps):
            for i, (ids, plain) in enumerate(truths):
                k = (r + i) % len(arms)
                for arm in arms[k:] + arms[:k]:  # rotating which arm goes first
                    name, _, b = arm.partition(" B=")
                    if arm == "plain":
                        gen.plan, gen._drafter = plan, shipped
                    elif arm == "engine":
                        gen.plan, gen._drafter = plan, cold(plan["options"]["draft"])
                    elif name == "oracle":
                        gen.plan, gen._drafter = fixed_tree(int(b), int(b) - 1), Oracle(ids + plain)
                    else:
                        depth = min(int(plan["options"]["depth"]), int(b) - 1)
                        gen.plan, gen._drafter = fixed_tree(int(b), depth), cold(name)
                    try:
                        res = gen.generate(ids, max_new_tokens=n, speculative=arm != "plain")
                    finally:
                        gen.plan, gen._drafter = plan, shipped
                    tps = (len(res.token_ids) - 1) / (res.decode_ms / 1e3)
                    out[arm][i].append((tps, res.accepted_per_step, res.token_ids == plain))
    return out


def report(out: dict, kinds: list[str]) -> None:
    arms = [a for a in out if a != "plain"]
    plain = [statistics.median(t for t, _, _ in reps) for reps in out["plain"]]
    print("per prompt: tok/s ratio to plain, tokens per forward (! ids differ from plain)")
    print(f"{'':3} {'prompt':16} {'plain tok/s':>11}" + "".join(f"{a:>17}" for a in arms))
    cells: dict[str, list[float]] = {a: [] for a in arms}
    for i, kind in enumerate(kinds):
        row = f"{i:>2}  {kind[:16]:16} {plain[i]:>11.1f}"
        for a in arms:
            reps = out[a][i]
            ratio = statistics.median(t for t, _, _ in reps) / plain[i]
            cells[a].append(ratio)
            tpf = statistics.median(x for _, x, _ in reps)
            same = all(s for _, _, s in reps)
            row += f"{ratio:>10.2f}x {tpf:>4.2f}" + ("" if same else "!")
        print(row)
    print("overall (geomean of prompt ratios; mean tokens per forward):")
    for a in arms:
        geo = statistics.geometric_mean(cells[a])
        tpf = statistics.mean(x for reps in out[a] for _, x, _ in reps)
        ids = "same" if all(s for reps in out[a] for _, _, s in reps) else "DIFFER"
        print(f"  {a:14} {geo:.2f}x plain, {tpf:.2f} tokens/forward, ids {ids}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", required=True, help="an engine compiled with spec-tree")
    ap.add_argument("--sizes", default="2,4,8,16")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", help="indices into prompts.json (default: all)")
    ap.add_argument("--drafters", default="", help="also these drafters at one tree size")
    ap.add_argument("--drafter-size", type=int, default=8, help="their tree size (nodes)")
    ap.add_argument("--json", help="also write the raw results here")
    a = ap.parse_args()
    shipped = json.loads(PROMPTS.read_text())
    pick = [int(x) for x in a.prompts.split(",")] if a.prompts else range(len(shipped))
    chosen = [shipped[i] for i in pick]
    sizes = [int(x) for x in a.sizes.split(",")]
    drafters = tuple(d for d in a.drafters.split(",") if d)
    texts = [p["prompt"] for p in chosen]
    out = run(a.engine, texts, sizes, a.new_tokens, a.threads, a.reps, drafters, a.drafter_size)
    print(
        f"{a.engine}: perfect drafts, {a.new_tokens} new tokens, {a.threads} threads, {a.reps} reps"
    )
    report(out, [p["kind"] for p in chosen])
    if a.json:
        Path(a.json).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
