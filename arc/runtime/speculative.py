"""The speculative loop: draft a tree -> verify it in one forward -> accept -> move KV.

Driven by a `speculative` DecodePlan (passes/spec_tree.py). Each step the drafter proposes
scored paths after the last token, the best become a tree (arc.runtime.tree), one `verify_B`
forward returns logits for every node, acceptance keeps the path the model agrees with plus a
bonus token (arc.runtime.accept), and the accepted nodes' K/V rows move from their scratch
slots to their place in the sequence. Accepted tokens pass one by one through the same stop
rules as plain decoding (generate.Stopper), so output stops exactly where it would.

Cost-aware (`adaptive`): a verify of B nodes costs more than a decode step, and more the
larger B is, and drafting costs time too (little for lookups, a partial forward per token for
`self`). Each step the loop picks B (or a plain decode step, B = 1) to maximize expected
tokens per second: expected tokens of a tree of the B-1 best paths are 1 + c * (sum of their
scores) -- a path's score estimates the chance the model accepts it, so the sum is the
expected accepted length (EAGLE-2's reasoning) -- with c a running calibration of accepted over
predicted tokens over recent verifies (decayed sums, with a prior of CALIB_PRIOR predicted
tokens taken at PRIOR_RATIO, what a request's first verifies measured, so a few verifies with
tiny predictions cannot swing it: a ratio of running means did, and chat prompts verified too
often), kept per drafter where `auto`
says which drafter each path is from, each shrunk toward the request's ratio (prompt
lookup's copies are then not held back by Token Recycling's misses: -O2 on tvm measured
1.057x against 1.017x plain with one shared ratio, 10 prompts x 4 in one process on the AMD
EPYC; `ARC_CALIB=global` keeps the one ratio), and the tree is the best paths by that
calibrated score (ranked by raw score, Token Recycling's guesses crowded out prompt lookup's
copies: 1.036x -> 1.176x plain, code-edit 0.97/1.11x -> 1.39/1.70x); the time of each B, plus the
drafting's, is a running mean measured on this device, kept across requests (SpecMemory).
A tree must promise MARGIN more tokens per second than a plain step (estimates err, and a
wasted verify costs more than a missed one gains where drafts are poor). When plain steps
win, the draft they beat is checked against the tokens they go on to produce (_Shadow): what
its tree would have accepted calibrates as a verify's outcome does, so the estimates follow
the request at no verify's cost (-O2 tvm, 10 benchmark prompts x 5-6 paired with plain in one
process, cold, two runs: geomean 1.195x against 1.178x with probes; each accepted token credited
as soon as a plain step confirms it, not once the tree is decided: 1.212 / 1.218x against
1.200 / 1.211x; 2026-12-05 Intel Xeon).
An expensive drafter (`self`) rests while plain steps win; for it the smallest tree is still
verified now and then (every 8 steps, doubling up to 64 while such probes find nothing), and
it drafts only for those probes. The model's top successors after every node, which Token
Recycling records, come from arc/runtime/topk.py (a full softmax and topk per step cost 2-3%
of it)."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from arc.runtime.accept import accept_greedy, accept_matched, cut_unsettled, settle
from arc.runtime.drafters import Drafter
from arc.runtime.near_draws import draw_settled
from arc.runtime.relaxed import accept_relaxed_greedy, accept_relaxed_sampled
from arc.runtime.sampling import Sampler, dists, successors_under
from arc.runtime.step_profile import StepProfile
from arc.runtime.steps import Steps
from arc.runtime.topk import TOPK, argmax_and_successors
from arc.runtime.tree import Tree, best_first, build

PROBE_EVERY, MAX_PROBE_EVERY = 8, 64  # plain steps with a draft at hand before a probe
PRIOR_COST = 0.15  # untimed, unmeasured sizes: a decode step's time x (1 + PRIOR_COST * (B - 1))
CALIB_DECAY, CALIB_PRIOR = 0.9, 0.5  # calibration: weight of older verifies, prior tokens
# what the prior tokens are taken at: a request's first verify, measured on the 32 prompts of
# benchmarks/calibration_prompts.json (-O2 tvm, cold, prior 1.0), accepted 22 of 34.8 predicted
# tokens (0.63). Taken at face value (1.0), failed first verifies cost short chat answers the
# most; 0.6 against 1.0, 10 benchmark prompts paired with -O1 in one process, cold: geomean
# 1.189x vs 1.154x (4 reps) and 1.188x vs 1.180x (6 reps), worst prompt 0.947 vs 0.942x and
# 0.958 vs 0.952x (2026-12-05, Intel Xeon)
PRIOR_RATIO = 0.6
# bare decode steps while drafts do not pay (_quiet): drafting one step in 8, not 4, kept the
# chat and instruction prompts 1-1.5% closer to plain (worst prompt 0.954 -> 0.968x and 0.955 ->
# 0.971x) at an equal geomean (1.184 -> 1.191x, 1.187 -> 1.189x); one in 16 lost 1%. spec_ab,
# -O2 tvm, 10 prompts x 5-6 paired, cold, with shadow calibration (2026-12-05, Intel Xeon)
QUIET_AFTER, QUIET_EVERY = 8, 8
# a quiet step drafts after all when the drafter's cheap hint (prompt lookup's best next-token
# score) reaches this: a copy that starts mid-answer (code-write 1 copied 21 tokens of its own
# earlier code while quiet, taking 9 plain steps). 0: quiet steps never draft. Replayed
# (benchmarks/spec_sim.py, -O2, prompt lookup's SHAPE): 0.5 1.318x against 1.308x without
# (benchmark prompts), 1.138 against 1.125x (calibration prompts); 0.6 1.310 / 1.141x, 0.75
# 1.305 / 1.138x
WAKE = 0.5
MARGIN = 0.05  # a tree must promise this much more tokens/s than a plain step to be verified
# calibrate on drafts not verified: a draft that loses to a plain step is checked against the
# tokens the plain steps then produce (_Shadow), instead of probing it with a verify; 0: probes
SHADOW = 1
# a path's expected acceptance is at most this (0: uncapped): a calibration ratio above 1 (a
# drafter that underrates itself: copies in code editing) made some paths "more than certain"
# (weights up to ~3), which skewed which paths a tree holds; 0.97 is the best per-token rate
# measured (prompt lookup's copies 32+ tokens long, drafters/ngram.py). spec_ab, -O2 tvm, 10
# prompts paired with plain, cold, two runs (6 and 8 reps): geomean 1.234 / 1.233x against
# 1.218 / 1.226x uncapped and 1.221 / 1.227x at 1.0; code-edit 2 3.06 -> 3.44 tokens per
# forward (2026-12-05, Intel Xeon)
WEIGHT_CAP = 0.97
# a step's measured time counts at most COST_CLIP x its size's estimate (its first sample: x
# what _time predicted from the other sizes): a machine's hiccup (a 27 ms verify of 8 nodes
# against ~14 ms) otherwise made that size look twice as dear, the loop never chose it again to
# learn better, and the estimate outlives the request (SpecMemory). A size that is
# underestimated is chosen and so measured again; one overestimated never is. 0: off.
# Measured (2026-12-06, AMD EPYC, -O2 tvm): spec_ab, 10 prompts x 5 paired, each arm its own
# SpecMemory: geomean 1.230x against 1.221x off; fresh `arc run` processes, 5 prompts x 5:
# per-prompt medians 0.92-1.13x off's, geomean ~1.01x: within this machine's noise, so it
# lands for the failure it removes (seen once in a dozen code-edit runs), not for a speedup
COST_CLIP = 1.5
DEPTH = 0  # A/B runs (benchmarks/spec_ab.py): the longest drafted path; 0: the plan's depth
MAX_TREE = 0  # A/B runs: the largest tree verified (budget + 1); 0: the plan's verify_tokens


@dataclass
class SpecStats:
    verifies: int = 0
    plain_steps: int = 0
    draft_passes: int = 0  # forwards of the layer-skipped draft function (`self`)
    profile: StepProfile = field(default_factory=StepProfile)  # per step: size, yield, time

    @property
    def forward_passes(self) -> int:
        return self.verifies + self.plain_steps


class _Ema:
    def __init__(self, value: float | None = None, rate: float = 0.2, clip: bool = False):
        self.value, self.rate, self.clip = value, rate, clip

    def add(self, x: float, ref: float | None = None) -> None:
        """Take sample x; a step time (`clip`) counts at most COST_CLIP x the estimate (or, for
        the first sample, x `ref`, what the loop predicted for it)."""
        base = self.value if self.value is not None else ref
        if self.clip and COST_CLIP and base:
            x = min(x, COST_CLIP * base)
        self.value = x if self.value is None else self.value + self.rate * (x - self.value)


class _Calibration:
    """Accepted over predicted drafted tokens, recent verifies weighing most: decayed sums
    plus CALIB_PRIOR predicted tokens accepted at PRIOR_RATIO (the ratio before any data)."""

    def __init__(self):
        self.accepted = self.predicted = 0.0

    def add(self, accepted: float, predicted: float) -> None:
        self.accepted = CALIB_DECAY * self.accepted + accepted
        self.predicted = CALIB_DECAY * self.predicted + predicted

    def credit(self, accepted: float) -> None:
        """Accepted tokens of the newest outcome, learned after it was added (_Shadow)."""
        self.accepted += accepted

    @property
    def ratio(self) -> float:
        return (self.accepted + CALIB_PRIOR * PRIOR_RATIO) / (self.predicted + CALIB_PRIOR)


class _Shadow:
    """A draft that lost to a plain step, checked against the tokens that follow: what its
    tree would have accepted, had it been verified. The verify's evidence for calibration
    without the verify's cost (on chat prompts, probes that accepted nothing cost ~1.5% of the
    decode: 4-5 verifies of 2-4 nodes per 128 tokens). Its predicted tokens are counted when
    it is drafted and each accepted token as soon as it is known, so a copy that the plain
    steps confirm raises the calibration at the next step, not `depth` steps later."""

    def __init__(self, paths: list, sources: Mapping, start: int):
        self.paths = {p: score for p, score in paths}  # closed under prefixes
        self.sources = {p: sources.get(p) for p in self.paths}
        self.start = start  # the history's length when drafted: paths follow history[:start]
        self.matched = 0  # drafted tokens known to be accepted

    def advance(self, history: list[int]) -> tuple[list[tuple[int, ...]], bool]:
        """The paths newly known to be accepted (the tokens after `start` begin with them),
        and whether the tree is decided (a token left every path, or no path goes on)."""
        after = history[self.start :]
        new = []
        while self.matched < len(after):
            path = tuple(after[: self.matched + 1])
            if path not in self.paths:
                return new, True
            new.append(path)
            self.matched += 1
        prefix = tuple(after[: self.matched])
        grows = any(len(p) > self.matched and p[: self.matched] == prefix for p in self.paths)
        return new, not grows


class SpecMemory:
    """The time of each step size and of drafting on this device: facts of the engine and the
    machine, not of a request, so the Generator keeps them across requests (as a server
    would) instead of each request starting from guessed verify costs.

    Calibration stays per request: a prior carried from earlier requests was measured
    (2026-12-01, AMD EPYC, -O2, 10 prompts x 3 rounds) to cost 0.97x against 1.02x without
    it; high-acceptance prompts after chat ones started too skeptical to verify at all."""

    def __init__(self):
        self.cost: dict[int, _Ema] = {}  # seconds per step of each size (1: plain)
        self.draft_cost = _Ema(0.0)  # seconds of drafting per step


class SpeculativeLoop:
    def __init__(
        self,
        steps: Steps,
        drafter: Drafter,
        options: Mapping[str, Any],
        memory: SpecMemory | None = None,
    ):
        self.steps, self.drafter = steps, drafter
        top = int(options["verify_tokens"])
        top = min(top, MAX_TREE) if MAX_TREE else top
        self.sizes = [b for b in steps.verify_sizes if b <= top] or [min(steps.verify_sizes)]
        self.budget = max(self.sizes) - 1
        self.depth = min(int(DEPTH or options["depth"]), self.budget)
        self.adaptive = bool(options.get("adaptive", True))
        memory = memory or SpecMemory()
        for b in [1, *self.sizes]:
            memory.cost.setdefault(b, _Ema(clip=True))
        self.cost = memory.cost  # seconds per step of each size
        # -O3's measured verify cost / decode cost per size (arc/tune.py), else a guess
        ratio = {int(b): float(r) for b, r in (options.get("cost_ratio") or {}).items()}
        ratio[1] = 1.0
        self.prior = {b: _between(ratio, b) or 1 + PRIOR_COST * (b - 1) for b in [1, *self.sizes]}
        self.calib = _Calibration()  # accepted / predicted drafted tokens, this request's own
        # the same per drafter (`auto` merges several whose scores err differently)
        self.by_source: dict[str, _Calibration] = {}
        self.source: dict[tuple[int, ...], str] = {}  # drafted path -> the drafter it is from
        self.weights: dict[tuple[int, ...], float] = {}  # drafted path -> expected acceptance
        self.per_source = os.environ.get("ARC_CALIB", "source") == "source"
        self.draft_cost = memory.draft_cost  # seconds of drafting per step
        self.idle, self.probe_every = 0, PROBE_EVERY
        # drafts that lose to plain steps calibrate in the shadow (no probes), unless drafting
        # is expensive: then the drafter rests while plain steps win, and only probes draft
        self.shadowing = bool(SHADOW) and not getattr(drafter, "expensive", False)
        self.shadow: _Shadow | None = None
        self.alt = 1  # the best tree size when a plain step beat it (_choose)
        self.dry = 0  # steps in a row that yielded one token (plain, or nothing accepted)
        self.step_s = self.draft_s = 0.0  # the last step's and drafting's seconds (profile)
        self.accepted_by: dict[str, int] = {}  # the last verify's accepted tokens per drafter
        self.relaxed = None  # LANTERN's relaxed acceptance (lossy, opt-in): (latents, delta, sim)
        # a verify that is not the decode step bit for bit (torch, onnx) decides no near tie
        # (accept.settle) and no seeded draw its rounding could move (near_draws); the token it
        # leaves is a decode step's to take (`unsettled`)
        self.exact = bool(getattr(steps, "verify_exact", False))
        self.unsettled = False
        if options.get("accept") == "relaxed":
            self.relaxed = (steps.latents, float(options["delta"]), float(options["sim"]))

    def run(
        self,
        history: list[int],
        pos: int,
        sample: Sampler,
        stopper,
        profile: StepProfile | None = None,
    ) -> tuple[str, SpecStats]:
        """Decode after `history` (prompt + first token; the last one is not in the cache yet,
        it goes to slot `pos`) until `stopper` says stop. Returns (stop reason, stats); each
        step is recorded in `profile` (stats.profile)."""
        # the engine's first step is plain: it times a decode step (SpecMemory keeps it)
        stats, first = SpecStats(profile=profile or StepProfile()), self.cost[1].value is None
        drafted = getattr(self.drafter, "forwards", 0)
        try:
            return self._run(history, pos, sample, stopper, stats, first)
        finally:
            stats.draft_passes = getattr(self.drafter, "forwards", 0) - drafted

    def _run(self, history, pos, sample, stopper, stats, first):
        profile = stats.profile
        while True:
            room = self.steps.max_seq_len - pos
            if room <= 0:
                return "cache_full", stats
            quiet = not first and self._quiet() and not self._woken(history)
            drafted = False
            if first or self.unsettled:  # the next token is a decode step's to decide
                paths = []
            elif quiet or self._rest():
                paths, self.idle = [], self.idle + 1
            else:
                paths, drafted = self._draft(history, pos), True
            size = 1 if self.unsettled else self._choose(paths, room)
            first = self.unsettled = False
            if size == 1:
                if paths and self.shadowing and self.shadow is None and self.adaptive:
                    tree = paths[: self.alt - 1]  # what verifying instead would have verified
                    self._start_shadow(_Shadow(tree, self.source, len(history)))
                new = [self._plain(history[-1], pos, sample, teach=not quiet)]
                stats.plain_steps += 1
                expected, accepted_by = None, None
            else:
                self.shadow = None  # the verify's own outcome calibrates from here
                tree = paths[: size - 1]
                new = self._verify(history[-1], tree, size, pos, sample)
                stats.verifies += 1
                expected = 1.0 + sum(self.weights.get(p, 0.0) for p, _ in tree)
                accepted_by = self.accepted_by
            self.dry = self.dry + 1 if len(new) <= 1 else 0
            start, reason = pos, None
            for tok in new:
                history.append(tok)
                pos += 1
                reason = stopper(tok)
                if reason:
                    break
            profile.step(
                start,
                size,
                new[: pos - start],  # the tokens emitted: a stop may cut an accepted run
                self.step_s,
                draft_s=self.draft_s if drafted else None,
                expected=expected,
                accepted_by=accepted_by,
                quiet=quiet,
            )
            if reason:
                return reason, stats
            if self.shadow is not None:
                self._follow_shadow(history)

    def _quiet(self) -> bool:
        """A bare decode step, no drafting or teaching: after QUIET_AFTER steps in a row that
        yielded one token each (plain steps, or verifies that accepted nothing: drafts are not
        paying), on all but every QUIET_EVERY-th step. Drafting and Token
        Recycling's top-k of the logits cost ~0.5 ms a step, 4% of a decode step, which a
        request that drafts nothing (chat) pays for nothing."""
        dry = self.dry
        return self.adaptive and dry >= QUIET_AFTER and dry % QUIET_EVERY != 0

    def _woken(self, history: list[int]) -> bool:
        """Whether a quiet step drafts after all: the drafter's hint says a copy may start."""
        hint = getattr(self.drafter, "hint", None)
        return bool(WAKE) and hint is not None and hint(history) >= WAKE

    def _rest(self) -> bool:
        """Skip drafting this step: an expensive drafter (one that runs the model, `self`)
        while plain steps win, except before a probe."""
        expensive = getattr(self.drafter, "expensive", False)
        return expensive and self.adaptive and 0 < self.idle < self.probe_every - 1

    def _draft(self, history: list[int], pos: int) -> list[tuple[tuple[int, ...], float]]:
        """The best drafted paths, best first, with their scores; any prefix of the list is
        a tree (closed under prefixes). Times the drafting (a tree's cost includes it)."""
        t = time.perf_counter()
        if hasattr(self.drafter, "pos"):
            self.drafter.pos = pos  # a drafter that runs the model writes from this slot
        scored = self.drafter.propose(history, self.depth, self.budget)
        self.source = getattr(self.drafter, "sources", None) or {}
        self.draft_s = time.perf_counter() - t
        self.draft_cost.add(self.draft_s)
        self.weights = self._weights(scored)
        return [(p, scored[p]) for p in best_first(self.weights, self.budget)]

    def _weights(self, scored: Mapping[tuple[int, ...], float]) -> dict:
        """Each drafted path's expected acceptance: its score times its drafter's calibration,
        at most WEIGHT_CAP and at most its parent's (a path is accepted only after its
        parent). The tree takes the best paths by this, not by raw score: `auto`'s drafters
        score on different scales, and ranked raw, Token Recycling's confident-looking
        guesses took a small tree's nodes from prompt lookup's copies on copy prompts, where
        the copies are the ones accepted (code-edit, every step a 4-node verify: 2.5 tokens
        per verify merged by raw score, 3.2-3.4 from prompt lookup alone)."""
        out: dict[tuple[int, ...], float] = {}
        ratio: dict = {}  # drafter -> its calibration, the same for all its paths this step
        for p in sorted(scored, key=len):
            src = self.source.get(p) if self.per_source else None
            if src not in ratio:
                ratio[src] = self._ratio_of(src)
            w = ratio[src] * scored[p]
            if WEIGHT_CAP:
                w = min(w, WEIGHT_CAP)  # a chance: no path is more than certain
            parent = out.get(p[:-1])
            out[p] = w if parent is None else min(w, parent)
        return out

    def _choose(self, paths: list, room: int) -> int:
        """The tree size (nodes) for this step; 1 is a plain decode step."""
        fits = [b for b in self.sizes if b <= room]
        if not paths or not fits:
            return 1
        if not self.adaptive:  # the smallest verify that holds the draft (up to the budget)
            return next((b for b in fits if b > len(paths)), fits[-1])
        weights = [self.weights[p] for p, _ in paths]
        rate = {1: 1.0 / self._time(1)}
        for b in fits:
            expect = 1.0 + sum(weights[: b - 1])
            rate[b] = expect / (self._time(b) + self.draft_cost.value)
        rate[1] *= 1 + MARGIN  # estimates err: speculate only for a clear gain
        best = max(rate, key=rate.get)
        self.alt = max((b for b in rate if b > 1), key=rate.get)  # the tree plain steps beat
        if best == 1:
            self.idle += 1
            if self.shadowing or self.idle < self.probe_every:
                return 1
            # probe with the smallest tree: cheap, and enough to see acceptance return; each
            # probe that finds nothing doubles the wait before the next (_verify resets it)
            self.probe_every = min(2 * self.probe_every, MAX_PROBE_EVERY)
            best = min(b for b in rate if b > 1)
        self.idle = 0
        return best

    def _time(self, size: int) -> float:
        """Seconds per step of `size` nodes: measured, else interpolated between the
        measured sizes around it (a verify's cost grows about linearly in its nodes between
        two measured sizes), else the largest smaller measured size's time grown by the prior
        ratios (a decode step's time x the prior ratio, once a step is timed)."""
        known = self.cost[size].value
        if known is not None:
            return known
        measured = {b: c.value for b, c in self.cost.items() if c.value is not None}
        between = _between(measured, size)
        if between is not None:
            return between
        # above every measured size: the prior's growth from the largest one measured
        lo = max((b for b in measured if b < size), default=None)
        if lo is None:
            return self.prior[size]  # nothing measured yet: only ratios are used
        return measured[lo] * self.prior[size] / self.prior[lo]

    def _predicted(self, size: int) -> float | None:
        """Seconds _time expects of a step of `size` before its first sample; None while no
        step of any size is timed (its priors are then ratios, not seconds)."""
        if self.cost[size].value is not None or all(c.value is None for c in self.cost.values()):
            return None
        return self._time(size)

    def _plain(self, token: int, pos: int, sample: Sampler, teach: bool = True) -> int:
        t = time.perf_counter()
        logits = self.steps.decode(token, pos)
        if not teach:
            out = sample(logits, pos + 1)
        elif sample.params.greedy:  # the argmax and the drafter's successors from shared passes
            best, top = argmax_and_successors(
                logits[None], TOPK, getattr(self.steps, "logit_stats", None)
            )
            out = best[0]
            self.drafter.observe(Tree(token), top)
        else:
            out, row = sample.pick(logits, pos + 1)
            self._teach(Tree(token), logits[None], sample, [row])
        self.step_s = time.perf_counter() - t
        cost = self.cost[1]  # timed every plain step: a prediction only before the first
        cost.add(self.step_s, None if cost.value is not None else self._predicted(1))
        return out

    def _verify(self, root: int, paths: list, size: int, pos: int, sample: Sampler) -> list[int]:
        t = time.perf_counter()
        tree = build(root, [p for p, _ in paths])
        logits = self.steps.verify_tree(tree, pos, size)[: len(tree)]  # [n, V]
        rows = None  # each node's sampling distribution (relaxed acceptance: dense Dists)
        ats = [pos + 1 + d for d in tree.depths[: len(tree)]]  # the position after each node
        if not sample.params.greedy:
            rows = dists(logits, sample.params) if self.relaxed else sample.dists(logits, ats)
        if self.relaxed is not None:
            path, new = (
                accept_relaxed_greedy(tree, logits, *self.relaxed)
                if sample.params.greedy
                else accept_relaxed_sampled(
                    tree, logits, sample.params, sample.gen, *self.relaxed, rows=rows
                )
            )
        elif sample.params.greedy:
            best, top = argmax_and_successors(
                logits, TOPK, getattr(self.steps, "logit_stats", None)
            )
            path, new = accept_greedy(tree, logits, best)
            if not self.exact:
                highest = logits[list(range(len(best))), best].tolist()  # [n]
                path, new = settle(path, new, top[1][:, :2].tolist(), highest)
                self.unsettled = len(new) == len(path)
        else:  # each node's token drawn as plain sampling draws it there (same uniform)
            path, new = accept_matched(tree, lambda node: sample.draw(rows[node], ats[node]))
            if not self.exact:  # and none a verify's rounding could draw otherwise
                p = sample.params
                u = sample.uniform
                path, new = cut_unsettled(
                    path, new, lambda node: draw_settled(rows[node], u(ats[node]), p)
                )
                self.unsettled = len(new) == len(path)
        src = [pos + node for node in path]
        dst = [pos + 1 + i for i in range(len(path))]
        if src != dst:
            self.steps.move(src, dst)
        if self.relaxed is None and sample.params.greedy:
            self.drafter.observe(tree, top)
        else:
            self._teach(tree, logits, sample, rows)
        self.step_s = time.perf_counter() - t
        self.cost[size].add(self.step_s, self._predicted(size))
        self.calib.add(len(path), sum(score for _, score in paths))
        got = self._calibrate_sources(tree, paths, path)
        if not self.source and path:  # one drafter: every accepted token is its own
            got = {self.drafter.name: len(path)}
        self.accepted_by = got  # accepted drafted tokens per drafter (the profile)
        if path:
            self.probe_every = PROBE_EVERY
        return new

    def _start_shadow(self, shadow: _Shadow) -> None:
        """Count a shadowed tree's predicted tokens, as a verify of it would."""
        self.shadow = shadow
        self.calib.add(0, sum(shadow.paths.values()))
        if self.per_source:
            for src, pred in _by_source(shadow.paths.items(), shadow.sources).items():
                self.by_source.setdefault(src, _Calibration()).add(0, pred)

    def _follow_shadow(self, history: list[int]) -> None:
        """Credit each token the shadowed tree would have accepted, once the plain steps have
        produced it; drop the tree once it is decided."""
        shadow = self.shadow
        accepted, done = shadow.advance(history)
        for p in accepted:
            self.calib.credit(1)
            src = shadow.sources[p] if self.per_source else None
            if src is not None:
                self.by_source[src].credit(1)
        if done:
            self.shadow = None

    def _calib_of(self, path: tuple[int, ...]) -> float:
        """The calibration that scales `path`'s score: its drafter's, where the drafter says
        which paths are whose (`auto`: prompt lookup's copies and Token Recycling's guesses err
        very differently, and one shared ratio held copies back after guesses failed), else the
        request's one ratio."""
        return self._ratio_of(self.source.get(path) if self.per_source else None)

    def _ratio_of(self, src: str | None) -> float:
        """Drafter `src`'s calibration (None: the request's one ratio)."""
        if src is None:
            return self.calib.ratio
        # shrunk toward the request's ratio: a drafter with little evidence yet follows it
        # (each drafter starting at face value made chat requests pay one failed start each)
        c = self.by_source.setdefault(src, _Calibration())
        return (c.accepted + CALIB_PRIOR * self.calib.ratio) / (c.predicted + CALIB_PRIOR)

    def _calibrate_sources(self, tree: Tree, paths: list, accepted: list[int]) -> dict:
        """Each drafter's predicted (its paths' scores in the tree) and accepted tokens (the
        accepted nodes whose path is its) for this verify; returns the accepted per drafter."""
        predicted = _by_source(paths, self.source)
        got = dict.fromkeys(predicted, 0)
        # tree node -> its path's drafter (the tree holds each path already: add_path finds it)
        node_src = {tree.add_path(p): self.source[p] for p, _ in paths if p in self.source}
        for node in accepted:
            if node in node_src:
                got[node_src[node]] += 1
        for src, pred in predicted.items():
            self.by_source.setdefault(src, _Calibration()).add(got[src], pred)
        return {src: n for src, n in got.items() if n}

    def _teach(self, tree, logits, sample: Sampler, rows: list | None = None) -> None:
        """Hand the drafter the model's top successors after every node (Token Recycling):
        by logit, with their probabilities under the sampling distribution `rows` (each
        node's `dists`) when sampling; a successor outside a row's support is left out."""
        top = None if rows is None else successors_under(rows, None, TOPK)  # sorted supports
        if top is None:
            stats = getattr(self.steps, "logit_stats", None)
            _, top = argmax_and_successors(logits, TOPK, stats)
            if rows is not None:
                top = successors_under(rows, top[0], TOPK)
        self.drafter.observe(tree, top)


def _by_source(paths, sources: Mapping) -> dict[str, float]:
    """The summed scores of (path, score) pairs per drafter that `sources` names."""
    out: dict[str, float] = {}
    for p, score in paths:
        src = sources.get(p)
        if src is not None:
            out[src] = out.get(src, 0.0) + score
    return out


def _between(points: Mapping[int, float], x: int) -> float | None:
    """`points[x]`, or the straight line between the nearest points below and above `x`;
    None when `x` has no point on one side."""
    if x in points:
        return points[x]
    lo = max((b for b in points if b < x), default=None)
    hi = min((b for b in points if b > x), default=None)
    if lo is None or hi is None:
        return None
    return points[lo] + (points[hi] - points[lo]) * (x - lo) / (hi - lo)


DRAFTERS = ("ngram", "recycle", "jacobi", "self", "corpus", "auto")  # what this runtime drives


# every key spec-tree (passes/spec_tree.py) and -O3's tuning (arc/tune.py) write
PLAN_KEYS = frozenset(
    ("draft", "budget", "depth", "shape", "adaptive", "ladder", "verify_tokens", "verify_sizes")
    + ("tune", "accept", "delta", "sim", "corpus", "cost_ratio")
)


def check_plan(kind: Any, options: Any, module) -> None:
    """Raise ArcError (one line) unless the plan is one this runtime can drive for `module`:
    an engine's plan comes from its manifest, which anyone can edit."""
    from arc.errors import ArcError

    if kind == "plain":
        if options:  # nothing reads them: a key here is a crafted or foreign plan
            raise ArcError("plain decode plan: takes no options")
        return
    if kind != "speculative":
        raise ArcError(f"decode plan {str(kind)[:40]!r} is not plain or speculative")
    opts = options if isinstance(options, Mapping) else {}
    unknown = sorted(str(k)[:40] for k in opts if k not in PLAN_KEYS)
    if unknown:  # a misspelt key would otherwise be ignored, its intent silently lost
        raise ArcError(f"speculative plan: unknown option {unknown[0]!r}")
    sizes = opts.get("verify_sizes")
    if not isinstance(sizes, list) or not sizes or any(type(b) is not int for b in sizes):
        raise ArcError("speculative plan: verify_sizes must be a list of tree sizes")
    for b in sizes:
        g = module.functions.get(f"verify_{b}")
        if g is None or g.inputs()[0].shape != (1, b):  # tokens: [1, B]
            raise ArcError(f"speculative plan: no verify function for {b} nodes")
    size = max(sizes)
    ints = {k: opts.get(k) for k in ("budget", "depth", "verify_tokens")}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints.values()):
        raise ArcError("speculative plan: budget, depth, verify_tokens must be integers")
    if ints["verify_tokens"] != size or not 1 <= ints["budget"] < size:
        raise ArcError(f"speculative plan: budget/verify_tokens disagree with verify ({size})")
    if not 1 <= ints["depth"] <= ints["budget"]:
        raise ArcError("speculative plan: depth must be 1..budget")
    if opts.get("draft") not in DRAFTERS:
        raise ArcError(f"speculative plan: drafter {str(opts.get('draft'))[:40]!r} unknown")
    if opts.get("draft") == "self" and "draft" not in module.functions:
        raise ArcError("speculative plan: drafter self needs the engine's draft function")
    n = opts.get("corpus", 0)
    if type(n) is not int or n < 0:
        raise ArcError("speculative plan: corpus must be a count of questions (0 or more)")
    if opts.get("draft") == "corpus" and not n:
        raise ArcError("speculative plan: drafter corpus needs the engine's corpus")
    if opts.get("shape") not in ("static", "dynamic"):
        raise ArcError("speculative plan: shape must be static or dynamic")
    if opts.get("accept", "exact") not in ("exact", "relaxed"):
        raise ArcError("speculative plan: accept must be exact or relaxed")
    if opts.get("accept") == "relaxed":
        d, s = opts.get("delta"), opts.get("sim")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (d, s)):
            raise ArcError("speculative plan: relaxed acceptance needs numbers delta and sim")
        if not (0 < d < 1 and -1 <= s <= 1):
            raise ArcError("speculative plan: delta must be in (0, 1) and sim in [-1, 1]")
    if not isinstance(opts.get("adaptive", True), bool):  # not bool(): "x" or [] is no flag
        raise ArcError("speculative plan: adaptive must be true or false")
    if not isinstance(opts.get("tune", False), bool | Mapping):  # a flag, or -O3's record
        raise ArcError("speculative plan: tune must be true, false or a tuning record")
    if opts.get("ladder", "pow2") not in ("pow2", "dense", "none", True, False):  # bools: older
        raise ArcError("speculative plan: ladder must be pow2, dense or none")
    ratio = opts.get("cost_ratio", {})
    if (
        not isinstance(ratio, Mapping)
        or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < 1e6
            for v in ratio.values()
        )
        or not all(isinstance(b, str) and b.isdecimal() and 0 < int(b) < 1e6 for b in ratio)
    ):
        raise ArcError("speculative plan: cost_ratio must map tree sizes to positive numbers")
