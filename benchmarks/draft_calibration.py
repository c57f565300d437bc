"""How often drafted tokens are right, by drafter and draft-side score: the data a drafter's
scores should match (they estimate the chance the model accepts a path, and the speculative
loop sizes its tree by them, arc/runtime/speculative.py).

    python benchmarks/draft_calibration.py --engine ENGINE.arc [--prompts FILE.json]
        [--new-tokens 128] [--threads 2] [--offline]

The engine decodes every prompt greedily with its own speculative loop, each request drafting
cold (Generator.forget). After each verify the model's top token after every tree node is
known, so each drafted node whose parent is the model's own continuation is scored: right if
its token is the model's top token after the parent (what greedy acceptance checks). Nodes
are grouped by drafter and, for prompt lookup (`ngram`), by the length of the match that
drafted them (recomputed from the history: 1-4 tokens, the drafter's classes, then how
far back the copy runs, 5-7, 8-15, 16+) and whether the node is the path's
first token or a later one; other drafters' nodes by their score, in fifths. The default
prompts (calibration_prompts.json) are not the benchmark's (prompts.json), so scores fitted
to this do not grade themselves on spec_speed.py.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def match_length(history: list[int], path: tuple[int, ...], max_n: int = 64) -> int | None:
    """The longest n <= max_n such that the last n tokens of `history` occur earlier in it
    followed by `path`: how long the copy is that prompt lookup drafted `path` from (its
    index holds n-grams up to 4; the match runs on further back where the text repeats)."""
    last, k, best = len(history) - 1, len(path), None
    for end in range(last):
        if tuple(history[end + 1 : end + 1 + k]) != path:
            continue
        n = 0
        while n < max_n and n <= end and history[end - n] == history[last - n]:
            n += 1
        if n and (best is None or n > best):
            best = n
    return best


def length_group(n: int | None) -> str:
    """Match lengths in groups: 1, 2, 3, 4 (the drafter's own classes), then 5-7, 8-15, 16+."""
    if n is None or n <= 4:
        return f"match {n}"
    return "match 5-7" if n < 8 else "match 8-15" if n < 16 else "match 16+"


class Recorder:
    """Wraps a drafter: remembers each proposal's scores and sources, and on `observe` counts,
    per group, the drafted nodes whose parent was right and how many of them were right."""

    def __init__(self, inner):
        self.inner, self.name = inner, inner.name
        self.counts: dict[tuple, list[int]] = {}  # group -> [nodes, right]
        self._proposal: dict = {}
        self._history: list[int] = []

    def __getattr__(self, attr):  # sources, forwards, expensive: the wrapped drafter's
        return getattr(self.inner, attr)

    @property
    def pos(self):
        return getattr(self.inner, "pos", None)

    @pos.setter
    def pos(self, value):
        if hasattr(self.inner, "pos"):
            self.inner.pos = value

    def propose(self, history: list[int], depth: int, budget: int) -> dict:
        scored = self.inner.propose(history, depth, budget)
        self._proposal, self._history = scored, list(history)
        return scored

    def group(self, path: tuple[int, ...], score: float) -> tuple:
        sources = getattr(self.inner, "sources", None) or {}
        src = sources.get(path, self.name)
        place = "first" if len(path) == 1 else "later"
        if src == "ngram":
            return (src, length_group(match_length(self._history, path)), place)
        low = min(int(score * 5), 4) / 5
        return (src, f"score {low:.1f}-{low + 0.2:.1f}", place)

    def observe(self, tree, topk) -> None:
        if len(tree) > 1:
            top = topk[0][:, 0].tolist()  # the model's top token after each node
            paths, right = {0: ()}, {0: True}  # node -> its path; whether it is right
            for node in range(1, len(tree)):  # parents come before their children
                parent = tree.parents[node]
                paths[node] = (*paths[parent], tree.tokens[node])
                right[node] = right[parent] and top[parent] == tree.tokens[node]
                if not right[parent]:
                    continue
                score = self._proposal.get(paths[node], 0.0)
                c = self.counts.setdefault(self.group(paths[node], score), [0, 0])
                c[0] += 1
                c[1] += int(right[node])
        self.inner.observe(tree, topk)


def run(engine: str, prompts: list[str], n: int, threads: int) -> dict[tuple, list[int]]:
    import torch

    from arc.runtime.load import load_engine

    torch.set_num_threads(threads)
    eng = load_engine(engine)
    gen = eng.generator
    if not gen.speculative:
        raise SystemExit(f"{engine}: not a speculative engine (compile it with spec-tree)")
    counts: dict[tuple, list[int]] = {}
    with torch.inference_mode():
        vocab = int(gen.prefill(eng.prompt_ids("Hi.")).shape[-1])
        for p in prompts:
            gen.forget()
            rec = Recorder(gen.drafter(vocab))
            gen._drafter = rec
            gen.generate(eng.prompt_ids(p), max_new_tokens=n)
            for k, (nodes, right) in rec.counts.items():
                c = counts.setdefault(k, [0, 0])
                c[0], c[1] = c[0] + nodes, c[1] + right
    return counts


def offline(engine: str, prompts: list[str], n: int, threads: int) -> dict[tuple, list[int]]:
    """Prompt lookup checked at every step, not only where the loop verified: each prompt is
    decoded plainly (greedy), then at each step every path the `ngram` drafter proposes
    (depth 7, 15 paths) is checked against what the model went on to generate. A node is
    counted where its parent is right; groups as `run`'s. The loop's choices (which drafts it
    verifies) cannot bias this, so this is what the drafter's scores are fitted to."""
    import torch

    from arc.runtime.drafters.ngram import NGram
    from arc.runtime.load import load_engine

    torch.set_num_threads(threads)
    eng = load_engine(engine)
    counts: dict[tuple, list[int]] = {}
    with torch.inference_mode():
        for p in prompts:
            ids = eng.prompt_ids(p)
            out = eng.generator.generate(ids, max_new_tokens=n, speculative=False).token_ids
            drafter = NGram()
            for t in range(len(out) - 1):
                history, actual = ids + out[: t + 1], out[t + 1 :]
                for path in drafter.propose(history, 7, 15):
                    if tuple(actual[: len(path) - 1]) != path[:-1]:
                        continue  # its parent is wrong: acceptance never reaches it
                    place = "first" if len(path) == 1 else "later"
                    key = ("ngram", length_group(match_length(history, path)), place)
                    c = counts.setdefault(key, [0, 0])
                    c[0] += 1
                    c[1] += int(len(actual) >= len(path) and actual[len(path) - 1] == path[-1])
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", required=True)
    ap.add_argument("--prompts", default=str(HERE / "calibration_prompts.json"))
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--offline", action="store_true", help="prompt lookup at every step")
    a = ap.parse_args()
    prompts = [p["prompt"] for p in json.loads(Path(a.prompts).read_text())]
    how = offline if a.offline else run
    counts = how(a.engine, prompts, a.new_tokens, a.threads)
    kind = "prompt lookup at every step" if a.offline else "cold drafts"
    print(f"{a.engine}: {len(prompts)} prompts, {a.new_tokens} new tokens, {kind}")
    print(f"{'drafter':10} {'group':16} {'token':6} {'nodes':>6} {'right':>6} {'share':>6}")
    for (src, group, place), (nodes, right) in sorted(counts.items()):
        print(f"{src:10} {group:16} {place:6} {nodes:6d} {right:6d} {right / nodes:6.2f}")


if __name__ == "__main__":
    main()
