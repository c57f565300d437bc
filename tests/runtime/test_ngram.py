"""Prompt lookup's scores (arc/runtime/drafters/ngram.py): a path's score is the product, over
its tokens, of BY_LENGTH at the copy's length so far, the match followed back past the 4-gram
index while the text repeats."""

from __future__ import annotations

import pytest

from arc.runtime.drafters import ngram
from arc.runtime.drafters.ngram import BY_LENGTH, NGram


def _p(length: int) -> float:
    return next(p for least, p in BY_LENGTH if length >= least)


def test_a_long_copy_is_followed_back_and_scored_by_its_length():
    text = list(range(100, 140))  # 40 distinct tokens
    history = [*text, 7, *text[:20]]  # the first 20 repeat: a copy 20 long, then text[20]
    scored = NGram().propose(history, depth=3, budget=3)
    assert scored[(120,)] == pytest.approx(_p(20))
    assert scored[(120, 121, 122)] == pytest.approx(_p(20) * _p(21) * _p(22))
    assert _p(20) > _p(4)  # the index's 4-gram alone would have scored it lower


def test_a_one_token_match_scores_low_and_its_chain_grows():
    history = [1, 2, 3, 9, 8, 3]  # only [3] matches (2, 3 and 8, 3 differ): 9 followed it
    scored = NGram().propose(history, depth=2, budget=5)
    assert scored[(9,)] == pytest.approx(_p(1))
    assert scored[(9, 8)] == pytest.approx(_p(1) * _p(2))


def test_copy_length_off_gives_the_n_gram_scores(monkeypatch):
    monkeypatch.setattr(ngram, "COPY_LENGTH", 0)
    history = [1, 2, 3, 9, 8, 3]
    scored = NGram().propose(history, depth=2, budget=5)
    assert scored[(9,)] == pytest.approx(ngram.MATCH_SCORE[1])
    assert scored[(9, 8)] == pytest.approx(ngram.MATCH_SCORE[1] * ngram.DECAY)
