"""How far an engine's verify is from its decode step, and how close greedy decisions come to a
tie: the figures behind accept.TIE, the gap below which the speculative loop lets a decode step
decide a token on targets whose verify is not the decode step bit for bit.

    python benchmarks/verify_drift.py --engine model.arc [--new-tokens 64] [--threads 2]

Per shipped prompt (benchmarks/prompts.json): greedy plain decoding of --new-tokens, each
decode step's logits kept; then, at a few offsets into that output, the prompt and the output
before it are prefilled again and a chain of the next tokens is verified at every size of the
engine's ladder (the nodes are the tokens the decode steps took, so each node's logits should
be the decode step's at its position). Prints the largest |verify - decode| logit difference
per verify size, absolute and over max(1, |the step's best logit|) (the scale accept.TIE is
in), and over the decode steps the smallest gap between the two best logits so scaled and how
many fall below accept.TIE. A tvm engine prints 0 differences (bit for bit).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from arc.runtime.accept import TIE
from arc.runtime.load import load_engine
from arc.runtime.tree import Tree

PROMPTS = Path(__file__).parent / "prompts.json"
OFFSETS = (1, 17, 40)  # where in the output a verified chain starts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", required=True)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", default=str(PROMPTS))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    eng = load_engine(a.engine)
    steps = eng.generator.steps
    sizes = list(getattr(steps, "verify_sizes", []))
    if not sizes:
        raise SystemExit("the engine has no verify functions (compile it with -O2)")
    worst = dict.fromkeys(sizes, 0.0)  # verify size -> max |verify - decode|
    scaled = dict.fromkeys(sizes, 0.0)  # the same over max(1, |best logit|)
    gaps: list[float] = []  # (top1 - top2) / max(1, |top1|) of each decode step
    prompts = json.loads(Path(a.prompts).read_text())
    with torch.inference_mode():
        for item in prompts:
            ids = eng.prompt_ids(item["prompt"])
            out = eng.generator.generate(
                ids, max_new_tokens=a.new_tokens, ignore_eos=True, speculative=False
            )
            text = ids + out.token_ids  # out.token_ids[0] came from the prefill
            n = len(ids)
            steps.prefill(ids, 0)
            want = [steps.decode(text[n + i], n + i).clone() for i in range(len(out.token_ids) - 1)]
            for row in want:
                top = row.topk(2).values.tolist()
                gaps.append((top[0] - top[1]) / max(1.0, abs(top[0])))
            for off in OFFSETS:
                start = n + off
                for size in sizes:
                    nodes = min(size, len(want) - off)
                    if nodes < 2:
                        continue
                    steps.prefill(text[:start], 0)
                    tree = Tree(text[start])
                    tree.add_path(text[start + 1 : start + nodes])
                    got = steps.verify_tree(tree, start, size)
                    for node in range(len(tree)):
                        ref = want[off + node]
                        diff = (got[node] - ref).abs().max().item()
                        worst[size] = max(worst[size], diff)
                        scale = max(1.0, abs(ref.max().item()))
                        scaled[size] = max(scaled[size], diff / scale)
            below = sum(g < TIE for g in gaps)
            print(
                f"{item['kind']:>12}: largest difference so far {max(worst.values()):.3g}"
                f" ({max(scaled.values()):.3g} scaled); smallest scaled gap {min(gaps):.3g},"
                f" {below} of {len(gaps)} below {TIE:g}",
                flush=True,
            )
    print(f"\nengine: {a.engine}")
    print("largest |verify - decode step| logit difference, by verify size (scaled):")
    for size, diff in worst.items():
        print(f"  {size:>3} nodes: {diff:.3g} ({scaled[size]:.3g})")
    below = sum(g < TIE for g in gaps)
    print(
        f"greedy decisions: {len(gaps)}; smallest scaled gap between the two best logits"
        f" {min(gaps):.3g}; below accept.TIE ({TIE:g}): {below} ({below / len(gaps):.2%})"
    )


if __name__ == "__main__":
    main()
