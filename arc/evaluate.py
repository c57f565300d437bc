"""`arc eval`: what a pass pipeline costs in output quality, against the same model with no
passes (the reference).

Two measures, on Modules lowered eagerly (arc/lowering.py), never on built engines:
- greedy agreement: N new tokens greedily from each prompt of a prompt set with both; the
  fraction of position-wise identical tokens up to the reference's first EOS, and where the
  first divergence falls (N when there is none);
- perplexity on English text nobody here wrote, the documentation in Python's own
  `pydoc_data.topics`, scored in windows that fit the KV cache, and its relative change.

A speculative plan's verify functions are left out: speculative decoding accepts only the tokens
decode would pick, so what a pipeline changes in quality is in its prefill and decode functions.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arc import long_context as long_mod
from arc.errors import ArcError
from arc.ir import Graph, Module, rebuild
from arc.ops import Op

DEFAULT_PROMPTS = Path(__file__).resolve().parents[1] / "benchmarks" / "prompts.json"
CORPUS = "pydoc_data.topics"


@dataclass
class Subject:
    """A Module lowered for evaluation: a plain greedy Generator over its prefill and decode,
    and `score`, its prefill without the LAST op (logits at every position)."""

    generator: Any  # arc.runtime.generate.Generator
    score: nn.Module  # (tokens i64[1,T], pos i64[T], slots i64[L]) -> logits f32[1, T, vocab]
    reset: Callable[[], None]  # empties the KV cache
    max_seq_len: int


def score_graph(module: Module) -> Graph:
    """`module`'s prefill graph with its LAST op mapped to its input: logits at every position."""
    prefill = module.functions["prefill"]
    if not any(n.op is Op.LAST for n in prefill.nodes):
        raise ArcError("the prefill graph has no LAST op; cannot score every position")
    graph = rebuild(
        prefill, module.weight_shapes(), lambda b, n, ins: ins[0] if n.op is Op.LAST else None
    )
    return replace(graph, name="score")


def subject(
    module: Module,
    weights: Mapping[str, Tensor],
    tokenizer,
    blocks: Mapping[str, tuple] | None = None,
) -> Subject:
    """Lower `module`'s prefill, decode and score functions on CPU, sharing one KV cache.

    `weights` (fp32 by IR name) and `blocks` (a quantized checkpoint's kept blocks) are what
    `loaded` has; each weight is made in the format the module declares, as compile does."""
    from arc.lowering import lower, materialize
    from arc.runtime.generate import Generator
    from arc.runtime.steps import Steps, ring_of

    relaxed = module.plan.kind == "speculative" and module.plan.options.get("accept") == "relaxed"
    keep = ("prefill", "decode", *_depth_variants(module))
    if relaxed:  # lossy acceptance: greedy agreement runs the speculative loop itself
        keep += tuple(k for k in module.functions if k.startswith("verify_"))
    fns = {k: module.functions[k] for k in keep} | {"score": _score(module)}
    module = module.with_functions(fns)
    stored = materialize(module, weights, blocks)
    lowered, kv = lower(module, stored)
    ring = ring_of(module.meta)
    steps = Steps(
        lowered, max_seq_len=module.kv.max_seq_len, reset=kv.reset, move=kv.move, ring=ring
    )
    plan = None
    if relaxed:
        from arc.runtime.relaxed import latents_of

        steps.latents = latents_of(module, stored)
        plan = {"kind": "speculative", "options": dict(module.plan.options)}
    eos = module.meta.get("eos_ids", [])
    gen = Generator(steps, tokenizer, eos, plan=plan, meta=module.meta)
    return Subject(gen, lowered["score"], kv.reset, module.kv.max_seq_len)


def _depth_variants(module: Module) -> list[str]:
    """layer-skip{mode=adaptive}'s decode variants: greedy agreement runs the real per-request
    choice (arc/runtime/adaptive.py) over them."""
    facts = module.meta.get("layer_skip")
    if not isinstance(facts, Mapping) or facts.get("mode") != "adaptive":
        return []
    return [v["function"] for v in facts["variants"]]


def _score(module: Module) -> Graph:
    """The scoring graph. With adaptive layer-skip, prefill runs every layer while a request
    may decode with its deepest variant: perplexity is scored with that variant's layers
    skipped, the cost when every request takes it (an upper bound)."""
    g = score_graph(module)
    facts = module.meta.get("layer_skip")
    if _depth_variants(module):
        from arc.passes.layer_skip import skip_layers

        g = replace(skip_layers(g, module, facts["variants"][-1]["skipped"]), name="score")
    return g


# ---------------------------------------------------------------- greedy agreement


def greedy(s: Subject, prompt_ids: list[int], n: int, *, ignore_eos: bool = False) -> list[int]:
    """Up to `n` greedy tokens after `prompt_ids` (the last is the first EOS unless ignored)."""
    with torch.inference_mode():
        return s.generator.generate(prompt_ids, max_new_tokens=n, ignore_eos=ignore_eos).token_ids


def agreement(reference: list[int], candidate: list[int], n: int, eos: Sequence[int]) -> dict:
    """Position-wise agreement of `candidate` with `reference` up to and including the
    reference's first EOS; `first_divergence` is the first differing position, `n` when none."""
    stop = next((i + 1 for i, t in enumerate(reference) if t in set(eos)), len(reference))
    ref = reference[:stop]
    same = [i < len(candidate) and candidate[i] == t for i, t in enumerate(ref)]
    first = next((i for i, ok in enumerate(same) if not ok), n)
    return {
        "compared": len(ref),
        "matching": sum(same),
        "agreement": sum(same) / len(ref) if ref else 1.0,
        "first_divergence": first,
    }


# ---------------------------------------------------------------- perplexity


def corpus_text() -> str:
    """Python's pydoc_data.topics: its values in sorted key order, joined by blank lines."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def corpus_ids(tokenizer, n: int, flag: str = "--ppl-tokens") -> list[int]:
    """The first `n` tokens of Python's pydoc_data.topics: its values in sorted key order,
    joined by blank lines (English reference documentation, fixed per Python version)."""
    ids = list(tokenizer.encode(corpus_text(), add_special_tokens=True))
    if len(ids) < n:
        raise ArcError(f"{flag} {n}: {CORPUS} has only {len(ids)} tokens")
    return ids[:n]


def windows(n: int, size: int) -> list[tuple[int, int]]:
    """[start, end) windows of at most `size` tokens over `n` tokens, each starting at the last
    token of the one before, so every token after the first is predicted exactly once."""
    return [(s, min(s + size, n)) for s in range(0, n - 1, size - 1)]


def window_nll(s: Subject, ids: list[int]) -> float:
    """Summed negative log-likelihood of ids[1:] given the tokens before them, in one call."""
    s.reset()
    tokens = torch.tensor([ids], dtype=torch.long)  # [1, T]
    pos = torch.arange(len(ids), dtype=torch.long)  # [T]; the slots read are the same 0..T-1
    with torch.inference_mode():
        # slots read = the same 0..T-1; a ring cache (sink-window) also takes `write` = pos
        feeds = (pos, pos, pos) if s.generator.steps.ring else (pos, pos)
        logits = s.score(tokens, *feeds)[0, :-1]  # [T-1, vocab]
        nll = F.cross_entropy(logits, tokens[0, 1:], reduction="none")
    return float(nll.double().sum())


def perplexity(s: Subject, ids: list[int], tick: Callable[[], None] = lambda: None) -> float:
    """exp(mean NLL) of ids[1:], scored in windows that fit the cache (see `windows`)."""
    total = 0.0
    for start, end in windows(len(ids), s.max_seq_len):
        total += window_nll(s, ids[start:end])
        tick()
    return math.exp(total / (len(ids) - 1))


# ---------------------------------------------------------------- both together


def load_prompts(path: Path) -> list[str]:
    """Prompts from a JSON list of strings or of objects with a "prompt" string."""
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as e:
        raise ArcError(f"--prompts {path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise ArcError(f"--prompts {path}: not JSON ({e})") from None
    items = [
        r.get("prompt") if isinstance(r, dict) else r
        for r in (raw if isinstance(raw, list) else [])
    ]
    if not items or not all(isinstance(p, str) and p for p in items):
        raise ArcError(f'--prompts {path}: want a non-empty JSON list of strings or {{"prompt"}}')
    return items


def compare(
    reference: Subject,
    candidate: Subject,
    prompts: Sequence[list[int]],
    text_ids: list[int],
    n: int,
    tick: Callable[[str], None] = lambda stage: None,
) -> dict[str, Any]:
    """Greedy agreement over `prompts` (token ids) and perplexity of `text_ids`, both Subjects;
    `tick(stage)` after each unit of work (a prompt, a window)."""
    eos = list(reference.generator.eos)
    rows = []
    for i, ids in enumerate(prompts):
        ref = greedy(reference, ids, n)
        cand = greedy(candidate, ids, len(ref), ignore_eos=True)  # as far as the reference went
        rows.append({"index": i, "prompt_tokens": len(ids), **agreement(ref, cand, n, eos)})
        tick("greedy")
    ppl_ref = perplexity(reference, text_ids, lambda: tick("perplexity reference"))
    ppl_cand = perplexity(candidate, text_ids, lambda: tick("perplexity passes"))
    compared = sum(r["compared"] for r in rows)
    return {
        "greedy": {
            "prompts": len(rows),
            "max_new_tokens": n,
            "agreement": sum(r["matching"] for r in rows) / compared if compared else 1.0,
            "mean_first_divergence": sum(r["first_divergence"] for r in rows) / len(rows),
            "per_prompt": rows,
        },
        "perplexity": {
            "tokens": len(text_ids),
            "window": reference.max_seq_len,
            "reference": ppl_ref,
            "passes": ppl_cand,
            "delta_pct": 100.0 * (ppl_cand - ppl_ref) / ppl_ref,
        },
    }


def evaluate(
    model: str,
    spec: str,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    ppl_tokens: int = 1024,
    max_seq_len: int | None = None,
    long_context: int = 0,
    candidate_weights: Mapping[str, Tensor] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The `arc eval --json` object: `model` after pipeline `spec` against `model` with no
    passes. `long_context` > 0 adds streamed perplexity over that many tokens (arc/
    long_context.py). `candidate_weights` replaces the weights the pipeline's Module runs with
    (tests use it to make a lossy candidate from perturbed weights)."""
    from tqdm import tqdm

    from arc.compiler import trace_model
    from arc.pipeline import PassContext, PassManager, format_spec
    from arc.runtime.load import prompt_ids

    t0 = time.perf_counter()
    if max_new_tokens < 1:
        raise ArcError("--max-new-tokens must be at least 1")
    if ppl_tokens < 2:
        raise ArcError("--ppl-tokens must be at least 2")
    if long_context and long_context < 2:
        raise ArcError("--long-context must be at least 2 tokens (0: off)")
    pm = PassManager(spec)  # a bad spec fails here, before the model loads
    loaded, module = trace_model(model, max_seq_len)
    ctx = PassContext("cpu", "torch", weights=loaded.weights, tokenizer=loaded.tokenizer)
    passed, _ = pm.run(module, ctx)
    tok = loaded.tokenizer
    reference = subject(module, loaded.weights, tok, loaded.blocks)
    candidate = subject(passed, candidate_weights or loaded.weights, tok, loaded.blocks)
    ids = [prompt_ids(tok, p) for p in prompts]
    text = corpus_ids(tok, ppl_tokens)
    units = len(ids) + 2 * len(windows(len(text), module.kv.max_seq_len))
    if long_context:
        long_ids = corpus_ids(tok, long_context, flag="--long-context")
        weights = candidate_weights or loaded.weights
        long_pair = _long_subjects(
            loaded, module, passed, pm, long_context, (reference, candidate), weights
        )
        units += 2 * (len(long_ids) - min(len(long_ids), long_mod.PREFIX))
    with tqdm(total=units, desc="eval", disable=not progress, file=sys.stderr, leave=False) as bar:

        def tick(stage: str) -> None:
            bar.set_description(stage, refresh=False)
            bar.update(1)

        result = compare(reference, candidate, ids, text, max_new_tokens, tick)
        if long_context:
            result["long_context"] = long_mod.long_context(*long_pair, long_ids, tick)
    result["perplexity"]["corpus"] = f"{CORPUS} (Python {sys.version.split()[0]})"
    return {
        "model": loaded.name,
        "pipeline": format_spec(pm.items),
        **result,
        **({"facts": ctx.facts} if ctx.facts else {}),  # what passes measured (layer-skip)
        "wall_s": round(time.perf_counter() - t0, 3),
    }


def _long_subjects(loaded, module: Module, passed: Module, pm, n: int, pair, weights):
    """(reference, candidate) Subjects for streaming `n` tokens: the reference with a dense
    cache of at least `n` slots; the candidate is the pipeline's Module when its cache is a
    ring (it runs past its cache) or already holds `n`, else the pipeline run again on the
    Module with `n` slots."""
    from arc.pipeline import PassContext
    from arc.runtime.steps import ring_of

    limit = loaded.arch.max_positions
    if n > limit:
        raise ArcError(f"--long-context {n}: the model has only {limit} positions")
    reference, candidate = pair
    tok, blocks = loaded.tokenizer, loaded.blocks
    big = module
    if module.kv.max_seq_len < n:
        big = module.with_functions(module.functions, kv=replace(module.kv, max_seq_len=n))
        reference = subject(big, loaded.weights, tok, blocks)
    if not ring_of(passed.meta) and passed.kv.max_seq_len < n:
        ctx = PassContext("cpu", "torch", weights=loaded.weights, tokenizer=tok)
        candidate = subject(pm.run(big, ctx)[0], weights, tok, blocks)
    return reference, candidate
