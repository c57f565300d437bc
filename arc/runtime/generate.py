"""The decode loop: chunked prefill, then one decode step per token (plain plan).

Stops on EOS (unless ignore_eos), on a stop string, at max_new_tokens, or when the cache is
full. Reports prefill ms, decode ms and tok/s, forward passes, and accepted tokens per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from arc.errors import ArcError
from arc.runtime.sampling import Sampler, SamplingParams
from arc.runtime.steps import Steps


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    token_ids: list[int]
    text: str
    prefill_ms: float
    decode_ms: float
    tokens_per_s: float
    forward_passes: int
    accepted_per_step: float
    stop_reason: str  # eos | stop_string | max_new_tokens | cache_full

    def to_json(self) -> dict:
        return asdict(self)


class Generator:
    def __init__(self, steps: Steps, tokenizer, eos_ids: Sequence[int], prefill_chunk: int = 256):
        self.steps, self.tok, self.eos = steps, tokenizer, set(eos_ids)
        self.chunk = prefill_chunk

    def prefill(self, prompt_ids: list[int]):
        """Run the prompt through the cache in chunks; returns the last logits [vocab]."""
        if not prompt_ids:
            raise ArcError("empty prompt")
        if len(prompt_ids) >= self.steps.max_seq_len:
            raise ArcError(
                f"prompt is {len(prompt_ids)} tokens; the engine's cache holds "
                f"{self.steps.max_seq_len} (compile with a larger --max-seq-len)"
            )
        self.steps.reset()
        logits = None
        for start in range(0, len(prompt_ids), self.chunk):
            logits = self.steps.prefill(prompt_ids[start : start + self.chunk], start)
        return logits

    def generate(
        self,
        prompt_ids: list[int],
        *,
        max_new_tokens: int = 128,
        sampling: SamplingParams = SamplingParams(),
        stop: Sequence[str] = (),
        ignore_eos: bool = False,
        on_text: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        sample = Sampler(sampling)
        t0 = time.perf_counter()
        logits = self.prefill(prompt_ids)
        out = [sample(logits)]
        t1 = time.perf_counter()
        text = _TextTracker(self.tok, on_text, stop)
        reason = self._stop(out[-1], text, 1, max_new_tokens, ignore_eos)
        forwards, pos = 0, len(prompt_ids)  # pos: where the newest token goes in the cache
        while reason is None:
            if pos >= self.steps.max_seq_len:
                reason = "cache_full"
                break
            out.append(sample(self.steps.decode(out[-1], pos)))
            pos, forwards = pos + 1, forwards + 1
            reason = self._stop(out[-1], text, len(out), max_new_tokens, ignore_eos)
        t2 = time.perf_counter()
        decode_s = t2 - t1
        return GenerationResult(
            prompt_ids=list(prompt_ids),
            token_ids=out,
            text=text.finish(out),
            prefill_ms=round((t1 - t0) * 1e3, 3),
            decode_ms=round(decode_s * 1e3, 3),
            tokens_per_s=round(forwards / decode_s, 3) if forwards and decode_s > 0 else 0.0,
            forward_passes=forwards,
            accepted_per_step=1.0,
            stop_reason=reason,
        )

    def _stop(self, token: int, text, n: int, max_new: int, ignore_eos: bool) -> str | None:
        if not ignore_eos and token in self.eos:
            return "eos"
        if text.push(token):
            return "stop_string"
        if n >= max_new:
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
