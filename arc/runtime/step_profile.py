"""A decode's per-step profile: what each step was (a plain decode step, or a verify of a tree
of B nodes), what it yielded and what it cost, and whose drafted tokens the model accepted.

The evidence for why speculation did or did not pay on a request, the way vLLM's and
SGLang's speculative-decoding metrics (acceptance per position, drafts per step) and
llama.cpp's `--draft` statistics report it, but per tree size and per drafter, with the
device time of each: `arc run --json` carries the summary (`steps`), `arc run --trace FILE`
writes one JSON line per step. Recording a step is a few dict updates (~1 us against a
~5 ms decode step); the per-step lines are kept only when a trace is asked for.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path


class StepProfile:
    def __init__(self, trace: bool = False):
        self.by_size: dict[int, list[float]] = {}  # nodes -> [steps, tokens, seconds]
        self.draft_steps, self.draft_s = 0, 0.0  # steps that drafted, and their drafting time
        self.expected = 0.0  # tokens the verified trees promised (calibrated scores, + 1 each)
        self.accepted_by: dict[str, int] = {}  # drafter -> its drafted tokens accepted
        self.lines: list[dict] | None = [] if trace else None

    def step(
        self,
        pos: int,
        nodes: int,
        tokens: list[int],
        seconds: float,
        *,
        draft_s: float | None = None,
        expected: float | None = None,
        accepted_by: Mapping[str, int] | None = None,
        quiet: bool = False,
    ) -> None:
        """One step at cache slot `pos`: `nodes` = 1 for a plain decode step, else the tree
        size verified; `tokens` the tokens it yielded (accepted drafted ones + the model's
        own); `draft_s` the drafting before it (None: it did not draft); `expected` the
        tokens its tree promised (verifies); `accepted_by` its accepted drafted tokens per
        drafter; `quiet` a bare step of a request whose drafts stopped paying."""
        row = self.by_size.setdefault(nodes, [0, 0, 0.0])
        row[0] += 1
        row[1] += len(tokens)
        row[2] += seconds
        if draft_s is not None:
            self.draft_steps += 1
            self.draft_s += draft_s
        if expected is not None:
            self.expected += expected
        for src, n in (accepted_by or {}).items():
            self.accepted_by[src] = self.accepted_by.get(src, 0) + n
        if self.lines is not None:
            line = {"pos": pos, "nodes": nodes, "tokens": list(tokens), "ms": _ms(seconds)}
            if draft_s is not None:
                line["draft_ms"] = _ms(draft_s)
            if expected is not None:
                line["expected_tokens"] = round(expected, 3)
            if accepted_by:
                line["accepted_by"] = dict(accepted_by)
            if quiet:
                line["quiet"] = True
            self.lines.append(line)

    def summary(self, decode_s: float) -> dict:
        """JSON-ready totals: per step size its steps, tokens, time; drafting; the verified
        trees' promised against yielded tokens; accepted drafted tokens per drafter; and the
        decode time outside the steps and drafting (the loop's own Python, stop checks)."""
        sizes = []
        for nodes in sorted(self.by_size):
            steps, tokens, secs = self.by_size[nodes]
            sizes.append(
                {
                    "nodes": nodes,
                    "steps": int(steps),
                    "tokens": int(tokens),
                    "ms": _ms(secs),
                    "tokens_per_step": round(tokens / steps, 3),
                    "ms_per_step": _ms(secs / steps),
                }
            )
        stepped = sum(r[2] for r in self.by_size.values())
        verify_tokens = sum(int(r[1]) for n, r in self.by_size.items() if n > 1)
        return {
            "by_size": sizes,
            "drafting": {"steps": self.draft_steps, "ms": _ms(self.draft_s)},
            "verified_tokens": {"expected": round(self.expected, 3), "yielded": verify_tokens},
            "accepted_by_drafter": dict(sorted(self.accepted_by.items())),
            "other_ms": _ms(max(decode_s - stepped - self.draft_s, 0.0)),
        }


def describe(summary: Mapping) -> str:
    """One line for `arc run`'s stderr: each step size's count, tokens per step and time per
    step, drafting time and accepted tokens per drafter."""
    parts = []
    for row in summary["by_size"]:
        kind = "plain" if row["nodes"] == 1 else f"verify {row['nodes']}"
        parts.append(
            f"{kind}: {row['steps']} x {row['tokens_per_step']:.2f} tokens, "
            f"{row['ms_per_step']:.2f} ms"
        )
    d = summary["drafting"]
    if d["steps"]:
        parts.append(f"drafting {d['ms']:.1f} ms over {d['steps']} steps")
    acc = summary["accepted_by_drafter"]
    if acc:
        parts.append("accepted " + ", ".join(f"{k} {v}" for k, v in acc.items()))
    return "; ".join(parts)


def write_trace(path: Path, header: Mapping, lines: list[dict]) -> None:
    """JSON Lines: the header (engine, prompt, totals), then one line per step; written to a
    temporary file beside `path` and renamed, so a failed run leaves no half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as f:
            f.write(json.dumps(dict(header)) + "\n")
            for line in lines:
                f.write(json.dumps(line) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 3)
