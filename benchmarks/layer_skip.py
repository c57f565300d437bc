"""What layer-skip's `draft` function is worth for self-speculative decoding: its greedy
acceptance against the full model, and its cost per token relative to `decode`.

    arc compile smollm2-135m --passes 'kv-fusion,weight-format,layer-skip{mode=draft,ratio=0.5}' \
        -o /tmp/draft.arc
    python benchmarks/layer_skip.py /tmp/draft.arc [--depth 4] [--new-tokens 64] [--reps 30]

This isolates the draft's acceptance from the speculative loop (the runtime's own `self`
drafter, spec-tree{draft=self}, is measured end to end by benchmarks/spec_speed.py): the loop
is emulated with the engine's step functions (Draft & Verify, Zhang et al. 2023): from the last
committed token, `draft` proposes
`depth` tokens greedily (writing K/V for the layers it runs), then `decode` runs on the same
positions one token at a time as the verifier (rewriting every layer's K/V), accepting drafted
tokens while they equal its greedy choice, plus its own next token. The output is exactly plain
greedy decoding. A tree verify would run the `depth + 1` tokens in one forward; here only the
acceptance is measured, not a speed-up. Costs are ms per call at `--context` slots: the fastest
of `--reps` calls per round, the median over interleaved rounds (robust on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from arc.evaluate import DEFAULT_PROMPTS, load_prompts
from arc.runtime.load import load_engine


def _call(steps, name: str, token: int, pos: int) -> int:
    """Greedy next token after `token` at `pos` through function `name` (decode or draft)."""
    fn = steps.functions[name]
    ids = torch.tensor([[token]], dtype=torch.long)  # [1, 1]
    logits = fn(ids, steps._positions[pos : pos + 1], steps._slots(pos + 1))
    return int(logits[0, -1].argmax())


def speculate(steps, prompt: list[int], new_tokens: int, depth: int) -> dict[str, int]:
    """One prompt through the emulated draft -> verify loop; counts drafted/accepted."""
    steps.reset()
    token, pos = int(steps.prefill(prompt, 0).argmax()), len(prompt)
    out, drafted, accepted, first, rounds = [token], 0, 0, 0, 0
    while len(out) < new_tokens and pos + depth + 1 < steps.max_seq_len:
        guess, t = [], token
        for j in range(depth):  # draft: the kept layers only
            t = _call(steps, "draft", t, pos + j)
            guess.append(t)
        t, n_ok = token, 0
        for j in range(depth + 1):  # verify: the full model on the same positions
            t = _call(steps, "decode", t, pos + j)
            out.append(t)
            if j == depth or t != guess[j]:
                break
            n_ok += 1
        drafted, accepted, first, rounds = (
            drafted + depth,
            accepted + n_ok,
            first + (n_ok > 0),
            rounds + 1,
        )
        token, pos = out[-1], pos + n_ok + 1
    return {
        "prompts": 1,
        "drafted": drafted,
        "accepted": accepted,
        "first": first,
        "rounds": rounds,
    }


def step_ms(steps, name: str, pos: int, reps: int) -> float:
    for _ in range(3):
        _call(steps, name, 1, pos)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        _call(steps, name, 1, pos)
        times.append(time.perf_counter() - t)
    return min(times) * 1e3  # the least disturbed call: the machine may be shared


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("engine", type=Path)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    eng = load_engine(a.engine)
    steps = eng.generator.steps
    if "draft" not in steps.functions:
        raise SystemExit(
            f"{a.engine} has no draft function (build it with layer-skip{{mode=draft}})"
        )
    totals = {"prompts": 0, "drafted": 0, "accepted": 0, "first": 0, "rounds": 0}
    with torch.inference_mode():
        for prompt in load_prompts(DEFAULT_PROMPTS):
            ids = eng.prompt_ids(prompt)
            if len(ids) + a.new_tokens + a.depth + 1 > min(steps.max_seq_len, 256 + a.new_tokens):
                continue  # one prefill chunk, and room to decode
            counts = speculate(steps, ids, a.new_tokens, a.depth)
            totals = {k: totals[k] + counts[k] for k in totals}
        steps.reset()
        steps.prefill(list(range(1, a.context + 1)), 0)
        cost = {}
        for _ in range(5):  # interleaved rounds: the machine is shared
            for name in ("decode", "draft"):
                cost.setdefault(name, []).append(step_ms(steps, name, a.context, a.reps))
    decode_ms, draft_ms = (statistics.median(cost[k]) for k in ("decode", "draft"))
    facts = eng.module.meta.get("layer_skip", {})
    print(
        json.dumps(
            {
                "engine": str(a.engine),
                "pipeline": eng.manifest["pipeline"],
                "skipped": facts.get("skipped"),
                "calibration_acceptance": facts.get("acceptance"),
                "depth": a.depth,
                **totals,
                "acceptance": totals["accepted"] / max(totals["drafted"], 1),
                "first_token_acceptance": totals["first"] / max(totals["rounds"], 1),
                "tokens_per_round": (totals["accepted"] + totals["rounds"])
                / max(totals["rounds"], 1),
                "decode_ms": round(decode_ms, 3),
                "draft_ms": round(draft_ms, 3),
                "draft_cost_vs_decode": round(draft_ms / decode_ms, 3),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
