"""Prompt lookup's scores (arc/runtime/drafters/ngram.py): a path's score is the product, over
its tokens, of the chance each is right at the copy's length so far, the match followed back
past the 4-gram index while the text repeats: for the newest occurrence by FIRST (or
FIRST_AMBIGUOUS where the n-gram's occurrences go on differently) and LATER (SHAPE), for older
ones and with SHAPE off by BY_LENGTH."""

from __future__ import annotations

import pytest

from arc.runtime.drafters import ngram
from arc.runtime.drafters.ngram import BY_LENGTH, FIRST, FIRST_AMBIGUOUS, LATER, NGram


def _at(table, length: int) -> float:
    return next(p for least, p in table if length >= least)


def test_a_long_copy_is_followed_back_and_scored_by_its_length():
    text = list(range(100, 140))  # 40 distinct tokens
    history = [*text, 7, *text[:20]]  # the first 20 repeat: a copy 20 long, then text[20]
    scored = NGram().propose(history, depth=3, budget=3)
    assert scored[(120,)] == pytest.approx(_at(FIRST, 20))
    assert scored[(120, 121, 122)] == pytest.approx(
        _at(FIRST, 20) * _at(LATER, 21) * _at(LATER, 22)
    )
    assert _at(FIRST, 20) > _at(FIRST, 4)  # the index's 4-gram alone would have scored it lower


def test_a_one_token_match_scores_low_and_its_chain_grows():
    history = [1, 2, 3, 9, 8, 3]  # only [3] matches (2, 3 and 8, 3 differ): 9 followed it
    scored = NGram().propose(history, depth=2, budget=5)
    assert scored[(9,)] == pytest.approx(_at(FIRST, 1))
    assert scored[(9, 8)] == pytest.approx(_at(FIRST, 1) * _at(LATER, 2))


def test_an_ambiguous_match_scores_lower_and_older_occurrences_by_length():
    # [3] occurs twice before the end, followed by 9 (older) and by 5 (newest)
    history = [1, 3, 9, 2, 3, 5, 8, 3]
    scored = NGram().propose(history, depth=1, budget=5)
    assert scored[(5,)] == pytest.approx(_at(FIRST_AMBIGUOUS, 1))  # newest, ambiguous
    assert scored[(9,)] == pytest.approx(_at(BY_LENGTH, 1))  # older
    assert _at(FIRST_AMBIGUOUS, 1) < _at(FIRST, 1)


def test_shape_off_scores_by_length_alone(monkeypatch):
    monkeypatch.setattr(ngram, "SHAPE", 0)
    history = [1, 2, 3, 9, 8, 3]
    scored = NGram().propose(history, depth=2, budget=5)
    assert scored[(9,)] == pytest.approx(_at(BY_LENGTH, 1))
    assert scored[(9, 8)] == pytest.approx(_at(BY_LENGTH, 1) * _at(BY_LENGTH, 2))


def test_copy_length_off_gives_the_n_gram_scores(monkeypatch):
    monkeypatch.setattr(ngram, "SHAPE", 0)
    monkeypatch.setattr(ngram, "COPY_LENGTH", 0)
    history = [1, 2, 3, 9, 8, 3]
    scored = NGram().propose(history, depth=2, budget=5)
    assert scored[(9,)] == pytest.approx(ngram.MATCH_SCORE[1])
    assert scored[(9, 8)] == pytest.approx(ngram.MATCH_SCORE[1] * ngram.DECAY)


def test_hint_is_the_best_next_token_score():
    text = list(range(100, 140))
    assert NGram().hint([*text, 7, *text[:20]]) == pytest.approx(_at(FIRST, 20))
    assert NGram().hint([1, 2, 3, 4]) == 0.0  # nothing repeats: nothing to draft


def test_hint_early_exit_changes_no_score():
    """hint() returns at once when the last two tokens never occurred before (then no longer
    n-gram did either); on random histories, repetitive or not, it equals the full search over
    the 4-, 3- and 2-gram matches."""
    import random

    def full(history):
        last = len(history) - 1
        for n in range(min(4, len(history)), 1, -1):
            ends = [e for e in range(n - 1, last) if history[e - n + 1 : e + 1] == history[-n:]]
            if ends:
                length = ngram._copy_length(history, ends[-1], n)
                amb = ngram._ambiguous(history, ends[-ngram.AMBIGUITY_SCAN :], last)
                return ngram._shaped(length, True, amb)
        return 0.0

    rng = random.Random(5)
    for vocab in (3, 8, 50):
        for _ in range(60):
            history = [rng.randrange(vocab) for _ in range(rng.randrange(2, 80))]
            assert NGram().hint(history) == full(history), history


def test_an_appended_history_drafts_as_a_fresh_index_would():
    """The index follows one list the loop appends to without re-reading it, and starts over
    for another request's list (or the same list rewritten): each proposal equals a fresh
    drafter's on the same history."""
    import random

    rng = random.Random(3)
    d = NGram()
    history = [rng.randrange(12) for _ in range(30)]
    for _ in range(40):
        history.extend(rng.randrange(12) for _ in range(rng.randrange(1, 4)))
        assert d.propose(history, 4, 8) == NGram().propose(history, 4, 8)
        assert d.hint(history) == NGram().hint(list(history))
    other = [rng.randrange(12) for _ in range(50)]  # a new request: another list
    assert d.propose(other, 4, 8) == NGram().propose(other, 4, 8)
    other[-1] = (other[-1] + 1) % 12  # the same list with its last token rewritten
    assert d.propose(other, 4, 8) == NGram().propose(other, 4, 8)
    del other[-5:]  # and shortened
    assert d.propose(other, 4, 8) == NGram().propose(other, 4, 8)
