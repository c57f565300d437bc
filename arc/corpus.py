"""The `corpus` drafter's datastore (spec-tree{corpus=N}), written by the model itself at compile
time: self-instruct (Wang et al. 2023, "Self-Instruct") for retrieval drafting (REST, He et al.
2023).

Right after the target builds the engine, its step functions are loaded and the model writes N
user questions (sampled at temperature 1.0, top-p 0.95, after its chat template's user tag, one
seed per question) and answers each greedily, as `arc run` would (ANSWER_TOKENS at most). The
questions and answers, documents separated by -1, are the datastore: phrases this model says
again and again, which the drafter (arc/runtime/drafters/corpus.py) drafts where the request
itself holds nothing to copy (chat, instructions). No text is shipped or downloaded, and no
benchmark prompt is seen. A model without a chat template writes an opening from its BOS
token and continues it greedily.

Where the generator's plan is speculative, the corpus is written with the engine's own
speculative loop, drafting from the answers written so far (re-indexed every REINDEX
questions): greedy answers and seeded sampled questions are the tokens plain decoding emits
(sample-then-match, arc/runtime/speculative.py), so the datastore is the same, sooner.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from arc.runtime.drafters.corpus import SEP, CorpusIndex
from arc.runtime.sampling import SamplingParams

QUESTION_TOKENS = 48  # most tokens of a sampled question
ANSWER_TOKENS = 128  # most tokens of a greedy answer
MARK = "\x00ARC\x00"  # stands in for the question in the chat template, to find where it goes
SEED = 1000
REINDEX = 25  # questions between re-indexing the corpus written so far, to draft from it


def self_instruct(generator, n: int, progress: Callable[[], object] = lambda: None) -> np.ndarray:
    """[T] int32: `n` questions written and answered by `generator`'s model, -1 between;
    `progress()` after each question."""
    tok = generator.tok
    head = _question_head(tok)
    out: list[int] = []
    room = generator.steps.max_seq_len - 1
    spec = generator.speculative
    with torch.inference_mode():
        for i in range(n):
            if spec and out and i % REINDEX == 0:
                generator.steps.corpus = CorpusIndex(np.asarray(out, dtype=np.int32))
                generator.forget()  # the next request's drafter retrieves from it
            ask = SamplingParams(temperature=1.0, top_p=0.95, seed=SEED + i)
            q = generator.generate(
                head, max_new_tokens=min(QUESTION_TOKENS, room - len(head)), sampling=ask,
                stop=["\n\n"],
            )  # fmt: skip
            if tok.chat_template:
                text = tok.decode(q.token_ids, skip_special_tokens=True).strip()
                ids = _chat_ids(tok, text) if text else []
            else:
                ids = head + q.token_ids
            if ids and len(ids) < room:
                a = generator.generate(ids, max_new_tokens=min(ANSWER_TOKENS, room - len(ids)))
                out += ids + a.token_ids + [SEP]
            progress()
    return np.asarray(out, dtype=np.int32)


def _question_head(tok) -> list[int]:
    """The tokens before a user's question: the chat template up to where the question goes,
    or the BOS token (if any) without a template."""
    if tok.chat_template:
        text = tok.apply_chat_template(
            [{"role": "user", "content": MARK}], add_generation_prompt=True, tokenize=False
        )
        return list(tok.encode(text[: text.index(MARK)], add_special_tokens=False))
    bos = tok.bos_token_id
    return [bos] if bos is not None else list(tok.encode(" ", add_special_tokens=False))[:1]


def _chat_ids(tok, question: str) -> list[int]:
    return list(
        tok.apply_chat_template(
            [{"role": "user", "content": question}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
    )
