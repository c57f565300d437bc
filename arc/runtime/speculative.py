"""The speculative loop: draft a tree -> verify it in one forward -> accept -> move KV.

Driven by a `speculative` DecodePlan (passes/spec_tree.py). Each step the drafter proposes
scored paths after the last token, the best `budget` become a tree (arc.runtime.tree), one
`verify` forward returns logits for every node, acceptance keeps the path the model agrees
with plus a bonus token (arc.runtime.accept), and the accepted nodes' K/V rows move from their
scratch slots to their place in the sequence. Accepted tokens pass one by one through the same
stop rules as plain decoding (generate.Stopper), so output stops exactly where it would.

Cost-aware (`adaptive`): a verify costs more than a decode step, so speculation pays only when
enough tokens are accepted. The loop keeps running estimates of both step times and of tokens
per verify, and takes a plain decode step whenever the tree would not pay for itself: when the
drafter has nothing to propose, when the cache has no room for the tree, or when measured
tokens per verify over verify time falls below one token per decode time (then it probes the
tree again every few steps, as acceptance changes along a request).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from arc.runtime.accept import accept_greedy, accept_sampled
from arc.runtime.drafters import Drafter
from arc.runtime.sampling import Sampler, _filtered
from arc.runtime.steps import Steps
from arc.runtime.tree import Tree, best_first, build

TOPK = 4  # successors kept per verified node for Token Recycling
PROBE_EVERY = 8  # plain steps between probes while speculation does not pay


@dataclass
class SpecStats:
    verifies: int = 0
    plain_steps: int = 0
    tokens_from_verify: int = 0

    @property
    def forward_passes(self) -> int:
        return self.verifies + self.plain_steps


class _Ema:
    def __init__(self, value: float | None = None, rate: float = 0.2):
        self.value, self.rate = value, rate

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.rate * (x - self.value)


class SpeculativeLoop:
    def __init__(self, steps: Steps, drafter: Drafter, options: Mapping[str, Any]):
        self.steps, self.drafter = steps, drafter
        self.size = int(options["verify_tokens"])  # B: the verify's static node count
        self.budget, self.depth = int(options["budget"]), int(options["depth"])
        self.adaptive = bool(options.get("adaptive", True))
        self.t_verify, self.t_decode = _Ema(), _Ema()
        self.per_verify = _Ema(2.0)  # tokens per verify; optimistic start, so it is tried

    def run(self, history: list[int], pos: int, sample: Sampler, stopper) -> tuple[str, SpecStats]:
        """Decode after `history` (prompt + first token; the last one is not in the cache yet,
        it goes to slot `pos`) until `stopper` says stop. Returns (stop reason, stats)."""
        stats, wait = SpecStats(), 1  # the first step is plain: it times a decode step
        while True:
            if pos >= self.steps.max_seq_len:
                return "cache_full", stats
            tree, t0 = None, time.perf_counter()
            if wait <= 0 and pos + self.size <= self.steps.max_seq_len:
                tree = self._draft(history)
            if tree is None or len(tree) == 1:
                wait -= 1
                new = [self._plain(history[-1], pos, sample)]
                stats.plain_steps += 1
            else:
                new = self._verify(tree, pos, sample, t0)
                stats.verifies += 1
                stats.tokens_from_verify += len(new)
                if self.adaptive and not self._pays():
                    wait = PROBE_EVERY
            for tok in new:
                history.append(tok)
                pos += 1
                reason = stopper(tok)
                if reason:
                    return reason, stats

    def _draft(self, history: list[int]):
        scored = self.drafter.propose(history, self.depth, self.budget)
        return build(history[-1], best_first(scored, self.budget))

    def _plain(self, token: int, pos: int, sample: Sampler) -> int:
        t = time.perf_counter()
        logits = self.steps.decode(token, pos)
        out = sample(logits)
        self.t_decode.add(time.perf_counter() - t)
        self._teach(Tree(token), logits[None], sample)
        return out

    def _verify(self, tree, pos: int, sample: Sampler, t0: float) -> list[int]:
        """One tree step; its time, drafting included, starts at `t0`."""
        logits = self.steps.verify(*tree.inputs(pos, self.size))[: len(tree)]  # [n, V]
        if sample.params.greedy:
            path, new = accept_greedy(tree, logits)
        else:
            path, new = accept_sampled(tree, logits, sample.params, sample.gen)
        src = [pos + node for node in path]
        dst = [pos + 1 + i for i in range(len(path))]
        if src != dst:
            self.steps.move(src, dst)
        self._teach(tree, logits, sample)
        self.t_verify.add(time.perf_counter() - t0)
        self.per_verify.add(len(new))
        return new

    def _teach(self, tree, logits, sample: Sampler) -> None:
        """Hand the drafter the model's top successors after every node (Token Recycling)."""
        x = logits if sample.params.greedy else _filtered(logits.detach().cpu(), sample.params)
        top = torch.topk(x.float(), TOPK, dim=-1)
        probs = torch.softmax(x.float(), dim=-1).gather(-1, top.indices)
        self.drafter.observe(tree, top.indices[:, 0].tolist(), (top.indices, probs))

    def _pays(self) -> bool:
        """Whether tokens per verify over verify time beats one token per decode step."""
        if self.t_decode.value is None or self.t_verify.value is None:
            return True  # no decode step timed yet: keep speculating
        return self.per_verify.value / self.t_verify.value >= 1.0 / self.t_decode.value


DRAFTERS = ("ngram", "recycle", "auto")  # what this runtime drives ("jacobi", "self": not yet)


def check_plan(kind: Any, options: Any, module) -> None:
    """Raise ArcError (one line) unless the plan is one this runtime can drive for `module`:
    an engine's plan comes from its manifest, which anyone can edit."""
    from arc.errors import ArcError

    if kind == "plain":
        return
    if kind != "speculative":
        raise ArcError(f"decode plan {str(kind)[:40]!r} is not plain or speculative")
    if "verify" not in module.functions:
        raise ArcError("speculative decode plan without a verify function")
    opts = options if isinstance(options, Mapping) else {}
    size = module.functions["verify"].inputs()[0].shape[1]  # tokens: [1, B]
    ints = {k: opts.get(k) for k in ("budget", "depth", "verify_tokens")}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints.values()):
        raise ArcError("speculative plan: budget, depth, verify_tokens must be integers")
    if ints["verify_tokens"] != size or not 1 <= ints["budget"] < size:
        raise ArcError(f"speculative plan: budget/verify_tokens disagree with verify ({size})")
    if not 1 <= ints["depth"] <= ints["budget"]:
        raise ArcError("speculative plan: depth must be 1..budget")
    if opts.get("draft") not in DRAFTERS:
        raise ArcError(f"speculative plan: drafter {str(opts.get('draft'))[:40]!r} unknown")
    if opts.get("shape") not in ("static", "dynamic"):
        raise ArcError("speculative plan: shape must be static or dynamic")
