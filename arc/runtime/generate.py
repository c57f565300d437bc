"""Generation: chunked prefill, then the decode loop the engine's DecodePlan asks for:
`plain` (one decode step per token, here) or `speculative` (arc/runtime/speculative.py).

Both loops stop through one Stopper: on EOS (unless ignore_eos), on a stop string, at
max_new_tokens, or when the cache is full, so a speculative run stops exactly where plain
decoding would. Reports prefill ms, decode ms and tok/s, full-model forward passes, draft
passes, and mean tokens per forward, and profiles every decode step (arc/runtime/step_profile.py):
per step size its steps, tokens and time, drafting, and accepted tokens per drafter.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

from arc.errors import ArcError
from arc.runtime import adaptive
from arc.runtime.sampling import Sampler, SamplingParams
from arc.runtime.step_profile import StepProfile
from arc.runtime.steps import Steps
from arc.runtime.topk import argmax_rows


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    prefill_ms: float
    decode_ms: float
    tokens_per_s: float
    forward_passes: int  # full-model forwards after prefill (decode steps and verifies)
    accepted_per_step: float  # tokens per forward after prefill (1.0 for plain decoding)
    stop_reason: str  # eos | stop_string | max_new_tokens | cache_full
    draft_passes: int = 0  # forwards of the draft function (`self`; none for the lookups)
    verify_passes: int = 0  # tree verifies among forward_passes
    skipped_layers: list[int] = field(default_factory=list)  # adaptive layer-skip's choice
    steps: dict = field(default_factory=dict)  # the decode steps' profile (StepProfile.summary)
    trace: list[dict] | None = None  # one record per decode step, when asked for (trace=True)

    def to_json(self) -> dict:
        out = asdict(self)
        del out["trace"]  # per-step lines go to a file (arc run --trace), not the summary
        return out


class Generator:
    def __init__(
        self,
        steps: Steps,
        tokenizer,
        eos_ids: Sequence[int],
        prefill_chunk: int = 256,
        plan: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
    ):
        """`plan`: the engine's decode plan ({"kind", "options"}); speculative needs a verify."""
        self.steps, self.tok, self.eos = steps, tokenizer, set(eos_ids)
        self.chunk = prefill_chunk
        self.plan = dict(plan or {"kind": "plain", "options": {}})
        self.meta = meta or {}  # the module's meta: adaptive layer-skip's variants
        self.depths = adaptive.variants_of(self.meta)  # checked now, not mid-request
        self.speculative = self.plan["kind"] == "speculative" and bool(steps.verify_sizes)
        self._drafter = None  # made on first use; kept across requests (Token Recycling)
        self._memory = None  # the speculative loop's device timings (SpecMemory)
        if self.speculative:  # the loop's and drafters' modules load with the engine: inside
            # the first request they took ~6 ms of its decode (5% of a 40-token answer)
            from arc.runtime import drafters, speculative  # noqa: F401

            drafters.load()

    @property
    def draft_limit(self) -> int:
        """Most drafted tokens one verify of this engine holds (0: it does not speculate)."""
        if not self.speculative:
            return 0
        return int(self.plan["options"]["verify_tokens"]) - 1

    def _loop_options(self, draft_max: int | None) -> Mapping[str, Any]:
        """The speculative loop's options, its trees capped at `draft_max` drafted tokens
        (the engine's verify sizes up to draft_max + 1, paths no deeper than draft_max)."""
        opts = self.plan["options"]
        if draft_max is None or draft_max >= self.draft_limit:
            return opts
        depth = min(int(opts["depth"]), draft_max)
        return {**opts, "verify_tokens": draft_max + 1, "budget": draft_max, "depth": depth}

    def forget(self) -> None:
        """Drop what the drafter learned from earlier requests (Token Recycling's table, the
        n-gram and Jacobi pools): the next request drafts cold. A benchmark that repeats a
        prompt calls it, or the repeat drafts from the first run's own output."""
        self._drafter = None

    def drafter(self, vocab: int):
        if self._drafter is None:
            from arc.runtime import drafters

            opts = self.plan["options"]
            self._drafter = drafters.make(opts["draft"], opts, vocab, self.steps)
        return self._drafter

    def prefill(self, prompt_ids: list[int]):
        """Run the prompt through the cache in chunks; returns the last logits [vocab]."""
        self._check_prompt(prompt_ids)
        self.steps.reset()
        logits = None
        for start in range(0, len(prompt_ids), self.chunk):
            logits = self.steps.prefill(prompt_ids[start : start + self.chunk], start)
        return logits

    def _check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise ArcError("empty prompt")
        if len(prompt_ids) >= self.steps.max_seq_len:
            raise ArcError(
                f"prompt is {len(prompt_ids)} tokens; the engine's cache holds "
                f"{self.steps.max_seq_len} (compile with a larger --max-seq-len)"
            )

    def generate(
        self,
        prompt_ids: list[int],
        *,
        max_new_tokens: int = 128,
        sampling: SamplingParams = SamplingParams(),
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        on_text: Callable[[str], None] | None = None,
        speculative: bool | None = None,
        trace: bool = False,
        draft_max: int | None = None,
    ) -> GenerationResult:
        """Generate after `prompt_ids`; `speculative=False` forces the plain loop; `trace`
        keeps one record per decode step (GenerationResult.trace); `draft_max` caps the
        drafted tokens per verify of a speculative engine (0: plain decoding; None: the
        engine's spec-tree budget), as llama.cpp's --draft-max and vLLM's
        num_speculative_tokens do at run time. Greedy output is the same at every cap."""
        limit = self.draft_limit
        if draft_max is not None and not 0 <= draft_max <= limit:
            why = "spec-tree's budget" if limit else "compiled without spec-tree: -O2 adds it"
            raise ArcError(
                f"--draft-max {draft_max} is outside 0..{limit}: this engine drafts at most "
                f"{limit} tokens a verify ({why})"
            )
        stats = getattr(self.steps, "logit_stats", None)  # a target's argmax kernel (tvm)
        argmax = partial(argmax_rows, stats=stats) if stats else None
        sample = Sampler(sampling, argmax, getattr(self.steps, "sample_rows", None))
        t0 = time.perf_counter()
        logits, skipped = self._prefill_choosing(prompt_ids)
        out = [sample(logits, len(prompt_ids))]
        t1 = time.perf_counter()
        text = _TextTracker(self.tok, on_text, stop)
        stopper = Stopper(self, out, text, max_new_tokens, ignore_eos)
        reason = stopper.check(out[-1])
        forwards = verifies = drafts = 0
        profile = StepProfile(trace)
        if reason is None:
            spec = self.speculative if speculative is None else speculative and self.speculative
            spec = spec and draft_max != 0
            if spec:
                from arc.runtime.speculative import SpecMemory, SpeculativeLoop

                self._memory = self._memory or SpecMemory()
                loop = SpeculativeLoop(
                    self.steps,
                    self.drafter(int(logits.shape[-1])),
                    self._loop_options(draft_max),
                    self._memory,
                )
                history = list(prompt_ids) + out
                reason, stats = loop.run(history, len(prompt_ids), sample, stopper, profile)
                forwards, verifies = stats.forward_passes, stats.verifies
                drafts = stats.draft_passes
            else:
                reason, forwards = self._plain(out, len(prompt_ids), sample, stopper, profile)
        t2 = time.perf_counter()
        decode_s = t2 - t1
        produced = len(out) - 1  # tokens after the first, which prefill produced
        return GenerationResult(
            prompt_ids=list(prompt_ids),
            token_ids=out,
            text=text.finish(out),
            prefill_ms=round((t1 - t0) * 1e3, 3),
            decode_ms=round(decode_s * 1e3, 3),
            tokens_per_s=round(produced / decode_s, 3) if produced and decode_s > 0 else 0.0,
            forward_passes=forwards,
            accepted_per_step=round(produced / forwards, 3) if forwards else 1.0,
            stop_reason=reason,
            verify_passes=verifies,
            draft_passes=drafts,
            skipped_layers=list(skipped),
            steps=profile.summary(decode_s),
            trace=profile.lines,
        )

    def _prefill_choosing(self, prompt_ids: list[int]):
        """prefill; with adaptive layer-skip also the request's depth (arc/runtime/adaptive.py),
        which the decode steps then use. Returns (logits [vocab], layers skipped)."""
        facts = self.depths
        self.steps.decode_fn = "decode"
        if facts is None:
            return self.prefill(prompt_ids), ()
        self._check_prompt(prompt_ids)
        logits, choice = adaptive.prefill_and_choose(self.steps, prompt_ids, facts, self.chunk)
        self.steps.decode_fn = choice.function
        return logits, choice.skipped

    def _plain(
        self, out: list[int], pos: int, sample: Sampler, stopper, profile: StepProfile
    ) -> tuple[str, int]:
        """One decode step per token; `pos` is where the newest token goes in the cache."""
        forwards = 0
        clock = time.perf_counter
        while True:
            ring = getattr(self.steps, "ring", None)  # a ring cache (sink-window) never fills
            if pos >= self.steps.max_seq_len and not ring:
                return "cache_full", forwards
            t = clock()
            tok = sample(self.steps.decode(out[-1], pos), pos + 1)
            profile.step(pos, 1, [tok], clock() - t)
            pos, forwards = pos + 1, forwards + 1
            reason = stopper(tok)
            if reason:
                return reason, forwards


class Stopper:
    """The stop rules, shared by every loop: appends each new token to `out` and says why to
    stop after it (eos, stop_string, max_new_tokens) or None."""

    def __init__(self, gen: Generator, out: list[int], text, max_new: int, ignore_eos: bool):
        self.eos, self.out, self.text = gen.eos, out, text
        self.max_new, self.ignore_eos = max_new, ignore_eos

    def __call__(self, token: int) -> str | None:
        self.out.append(token)
        return self.check(token)

    def check(self, token: int) -> str | None:
        if not self.ignore_eos and token in self.eos:
            return "eos"
        if self.text.push(token):
            return "stop_string"
        if len(self.out) >= self.max_new:
            return "max_new_tokens"
        return None


class _TextTracker:
    """Decodes text as tokens come, only when someone needs it (streaming or stop strings).

    Streams only text that can no longer change (see `_settled`).
    """

    def __init__(self, tok, on_text, stop: Sequence[str]):
        self.tok, self.on_text, self.stop = tok, on_text, [s for s in stop if s]
        self.ids: list[int] = []
        self.emitted = ""
        self.cut: int | None = None

    def push(self, token: int) -> bool:
        self.ids.append(token)
        if not self.on_text and not self.stop:
            return False
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            self.cut = min(hits)
            text = text[: self.cut]
        self._emit(text if hits else self._settled(text))
        return bool(hits)

    def _settled(self, text: str) -> str:
        """`text` less what may still change: an unfinished UTF-8 tail, or a tail that could
        be the start of a stop string (it would be cut if the stop string completes)."""
        text = text.rstrip("\ufffd")
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return text[: len(text) - hold]

    def _emit(self, text: str) -> None:
        if self.on_text and len(text) > len(self.emitted) and text.startswith(self.emitted):
            self.on_text(text[len(self.emitted) :])
            self.emitted = text

    def finish(self, ids: list[int]) -> str:
        text = self.tok.decode(ids, skip_special_tokens=True)
        if self.cut is not None:
            text = text[: self.cut]
        self._emit(text)
        return text
