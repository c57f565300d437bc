"""Per-request depth for layer-skip{mode=adaptive}: the prompt decides which decode function
(all layers, or a `decode_skip<k>` variant) serves the whole request.

After prefilling all but the last `probe` prompt tokens, each of those tokens runs through
every variant and then through the full model at its position. A variant's step writes the
K/V of the layers it runs at that slot; the full model's step that follows rewrites every
layer's there, so the cache stays the full model's. Each variant's greedy token is compared
with the full model's at every probed position; the deepest skip that agrees on at least
`agree` of them decodes the request (ties go to fewer skipped layers), else the full model
does. The full model's logits after the last prompt token are the prefill's result, as
without the probe. Cost: `probe` x (variants + 1) one-token steps instead of one chunk.

The chosen variant then skips the same layers for every decoded token: those layers' K/V at
decoded positions is never written, and no step reads it (FiRST, Jain et al. 2024, fixes the
skip set per request for the same reason; VARiant switches whole depth variants like this).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from arc.errors import EngineError


@dataclass(frozen=True)
class Choice:
    function: str  # the decode function for this request ("decode": all layers)
    skipped: tuple[int, ...]  # the model layers it skips
    agreement: dict[str, float]  # variant function -> agreement on the probed prompt tokens


def variants_of(meta: Any) -> dict[str, Any] | None:
    """The adaptive layer-skip facts of a module's meta, or None; EngineError when they are
    malformed (an engine's manifest can be edited)."""
    facts = meta.get("layer_skip") if hasattr(meta, "get") else None
    if not isinstance(facts, dict) or facts.get("mode") != "adaptive":
        return None
    variants, agree, probe = facts.get("variants"), facts.get("agree"), facts.get("probe")
    ok = (
        isinstance(variants, list)
        and all(_variant_ok(v) for v in variants)
        and isinstance(agree, int | float)
        and not isinstance(agree, bool)
        and 0 < agree <= 1
        and type(probe) is int
        and 1 <= probe <= 64
    )
    if not ok:
        raise EngineError("engine's adaptive layer-skip record (model.layer_skip) is malformed")
    return facts


def _variant_ok(v: Any) -> bool:
    return (
        isinstance(v, dict)
        and isinstance(v.get("function"), str)
        and v["function"].startswith("decode_skip")
        and isinstance(v.get("skipped"), list)
        and all(type(i) is int for i in v["skipped"])
    )


def prefill_and_choose(steps, prompt_ids: list[int], facts: dict, chunk: int):
    """Prefill `prompt_ids` (the cache is reset) probing the variants on its tail; returns
    (logits [vocab] after the prompt, Choice)."""
    variants = [v for v in facts["variants"] if v["function"] in steps.functions]
    probe = min(int(facts["probe"]), len(prompt_ids) - 1) if variants else 0
    head = len(prompt_ids) - probe
    steps.reset()
    logits: Tensor | None = None
    for start in range(0, head, chunk):
        logits = steps.prefill(prompt_ids[start : min(start + chunk, head)], start)
    agree = {v["function"]: 0 for v in variants}
    for pos in range(head, len(prompt_ids)):
        token = prompt_ids[pos]
        guesses = {v["function"]: _argmax(steps.step(v["function"], token, pos)) for v in variants}
        logits = steps.decode(token, pos)  # last: every layer's K/V at pos is the full model's
        best = _argmax(logits)
        for name, guess in guesses.items():
            agree[name] += guess == best
    rates = {name: n / probe for name, n in agree.items()} if probe else {}
    chosen = {"function": "decode", "skipped": []}
    for v in variants:  # fewest layers skipped first: a deeper skip must agree as well
        if rates.get(v["function"], 0.0) >= float(facts["agree"]):
            chosen = v
    choice = Choice(chosen["function"], tuple(chosen["skipped"]), rates)
    return logits, choice


def _argmax(logits: Tensor) -> int:
    return int(logits.argmax(-1))
