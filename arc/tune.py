"""-O3's tree tuning (spec-tree{tune=true}): size the speculative tree on this device, at
compile time, by measured tokens per second rather than tokens per step.

Right after the target builds the engine, its step functions are loaded and measured:
1. cost: one decode step and one verify of every built tree size B (a chain tree) at
   context CONTEXT, medians of REPS calls; `cost_ratio[B]` = verify time / decode time. The
   runtime starts its per-size cost estimates from these (arc/runtime/speculative.py) instead
   of a guess, and keeps measuring while it decodes.
2. throughput: the speculative loop itself, with the largest tree capped at each built
   power-of-two size and the largest in turn (and plain decoding), decodes NEW_TOKENS greedy
   tokens after each calibration prompt, in ROUNDS interleaved rounds; the smallest cap
   within TIE of the best overall tokens per second becomes the plan's `verify_tokens` (and
   `budget`): caps within a few percent are a tie on two prompts, and where they tie the
   smaller tree is the safer (a big tree costs more where drafts fail and drafting for it
   costs more every step). On the AMD EPYC the best cap measured 337 tok/s at 16 nodes
   against 332 at 4 and 330 at 8 (one round), and the largest was chosen; on the 10
   benchmark prompts (benchmarks/spec_ab.py, MAX_TREE arms, 4 reps paired, 2026-12-06) the
   cap of 4 decoded at 1.198x plain against 1.175x at 8 and 1.174x at 16.
   The calibration prompts are made from the end of Python's pydoc_data.topics, the text
   layer-skip calibrates on (arc eval scores on its start; benchmarks/prompts.json is not
   used, so the benchmark does not grade the data it was tuned on): one asks to copy a
   passage, one to explain it, so both drafting regimes weigh in.
The record (`tune` in the plan options) keeps every measurement; `arc inspect` shows the plan.
EAGLE-2 (Li et al. 2024) and Sequoia (Chen et al. 2024) size trees by expected accepted
tokens against measured verify cost in the same spirit.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

CONTEXT = 200  # tokens in the cache while verify cost is measured
REPS = 7
NEW_TOKENS = 48
ROUNDS = 2  # interleaved rounds over the caps (the machine's speed drifts between caps)
TIE = 0.02  # caps this close to the best tokens per second count as the best: take the smallest
PASSAGE_CHARS = 600


def tune_tree(steps, tokenizer, eos_ids: list[int], options: dict[str, Any]) -> dict[str, Any]:
    """Plan options for `steps` (a loaded engine's, speculative) tuned on this device."""
    from arc.runtime.generate import Generator
    from arc.runtime.tree import Tree

    sizes = sorted(int(b) for b in options["verify_sizes"])
    context = max(8, min(CONTEXT, steps.max_seq_len - 2 * sizes[-1]))
    prompts = calibration_prompts(tokenizer, steps.max_seq_len - NEW_TOKENS - 2 * sizes[-1])
    with torch.inference_mode():
        steps.reset()
        steps.prefill(list(range(1, context + 1)), 0)
        base = _median_s(lambda: steps.decode(7, context))
        ratio = {}
        for b in sizes:
            tree = Tree(7)
            tree.add_path(range(8, 8 + b - 1))
            # as the loop verifies: its inputs written into the kept buffers each call
            timed = lambda tree=tree, b=b: steps.verify_tree(tree, context, b)  # noqa: E731
            ratio[b] = round(_median_s(timed) / base, 3)
        steps.reset()
        # caps: the powers of two and the largest size (a dense ladder's every size would
        # multiply the compile-time decoding for little: tok/s varies slowly with the cap)
        caps = [1, *(b for b in sizes if b & (b - 1) == 0 or b == sizes[-1])]
        gens = {}
        for cap in caps:
            opts = {**options, "verify_tokens": max(cap, 2)}
            opts["cost_ratio"] = {str(b): r for b, r in ratio.items()}
            plan = {"kind": "speculative", "options": opts}
            gens[cap] = Generator(steps, tokenizer, eos_ids, plan=plan)
        done = {cap: [0.0, 0.0] for cap in caps}  # tokens, seconds
        for _ in range(ROUNDS):
            for cap in caps:
                for prompt in prompts:
                    gens[cap].forget()  # each round drafts cold, as a new request would
                    r = gens[cap].generate(prompt, max_new_tokens=NEW_TOKENS, speculative=cap > 1)
                    done[cap][0] += len(r.token_ids) - 1
                    done[cap][1] += r.decode_ms / 1e3
        rates = {c: round(n / s, 2) if s else 0.0 for c, (n, s) in done.items()}
    if not prompts:  # a cache too small for the calibration prompts: keep every size
        rates = {sizes[-1]: 0.0}
    best = choose_cap(rates)
    top = max(best, 2)  # a plan keeps at least its smallest tree; the loop can still go plain
    return {
        **options,
        "verify_tokens": top,
        "budget": top - 1,
        "depth": min(int(options["depth"]), top - 1),
        "verify_sizes": [b for b in sizes if b <= top],
        "cost_ratio": {str(b): r for b, r in ratio.items()},
        "tune": {
            "decode_ms": round(base * 1e3, 3),
            "context": context,
            "tok_s_by_largest_tree": {str(c): v for c, v in rates.items()},
            "chosen": top,
            "why": f"largest tree {best}: the smallest within {TIE:.0%} of the fastest here "
            + f"({rates[best]} tok/s; "
            + ", ".join(f"{c}: {v}" for c, v in rates.items())
            + ")",
        },
    }


def choose_cap(rates: dict[int, float]) -> int:
    """The smallest cap whose tokens per second are within TIE of the best cap's."""
    fastest = max(rates.values())
    return min(c for c, v in rates.items() if v >= (1 - TIE) * fastest)


def calibration_prompts(tokenizer, limit: int) -> list[list[int]]:
    """Two prompts on a passage from the end of Python's pydoc_data.topics: copy it, explain it;
    the passage shortened until each prompt has at most `limit` tokens ([] if none fits)."""
    from arc.evaluate import corpus_text

    chars = PASSAGE_CHARS
    while chars >= 40:
        passage = corpus_text()[-chars:]
        asks = [
            f"Repeat this text exactly:\n\n{passage}\n\nRepeated text:\n",
            f"{passage}\n\nExplain in a few sentences what the text above says.\n",
        ]
        prompts = [list(tokenizer.encode(a)) for a in asks]
        if max(len(p) for p in prompts) <= limit:
            return prompts
        chars //= 2
    return []


def _median_s(fn) -> float:
    fn()
    times = []
    for _ in range(REPS):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)
