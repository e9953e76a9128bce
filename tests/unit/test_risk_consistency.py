"""The sampling-consistency reference (offline/risk/consistency.py): agreement of sampled answers with the
greedy one, read without the right answer."""

from __future__ import annotations

import pytest
from featurelens.server.offline.risk.consistency import agreement, consistency_score, content_words, pick

Q = "What is the capital of France?"


def test_same_claim_in_other_words_agrees():
    assert agreement("The capital of France is Paris.", "Paris is the capital.", Q) == 1.0
    assert content_words("The capital of France is Paris.") == {"capital", "france", "paris"}


def test_repeating_the_question_does_not_count_as_agreeing():
    assert agreement("The capital of France is Paris.", "The capital of France is Lyon.", Q) == 0.0
    # Without the question, the shared words count: {capital, france, paris} vs {capital, france, lyon}.
    assert agreement("The capital of France is Paris.", "The capital of France is Lyon.") == pytest.approx(0.5)
    assert agreement("It is Paris, a big city.", "Paris.", Q) == pytest.approx(1 / 3)  # {paris, big, city}


def test_numbers_compare_by_the_first_one_stated():
    assert agreement("It has 26 protons.", "26") == 1.0
    assert agreement("12 times 12 is 144.", "12 x 12 = 144") == 1.0
    assert agreement("The atomic number is 26.", "The atomic number is 27.") == 0.0
    assert agreement("It is 1,024.", "1024") == 1.0
    assert agreement("It is 5.", "I am not sure.") == 0.0


def test_refusals_agree_only_with_refusals():
    assert agreement("I don't know.", "I'm not sure, there is no such country.") == 1.0
    assert agreement("I don't know.", "It is Vrilopolis.") == 0.0
    assert agreement("It is Vrilopolis.", "I don't know.") == 0.0


def test_score_is_one_minus_mean_agreement():
    greedy = "The capital of France is Paris."
    assert consistency_score(greedy, ["Paris.", "Paris", "Lyon"], Q) == pytest.approx(1 - (1 + 1 + 0) / 3)
    assert consistency_score("42", ["42", "42"]) == 0.0
    with pytest.raises(ValueError):
        consistency_score("42", [])


def test_pick_takes_a_fixed_number_per_family():
    records = [{"qid": f"q{i}", "domain": "a" if i % 3 else "b"} for i in range(12)]
    chosen = pick(records, 2)
    assert [r["domain"] for r in chosen].count("a") == 2 and [r["domain"] for r in chosen].count("b") == 2
    assert pick(records, 2) == chosen  # the same every time
