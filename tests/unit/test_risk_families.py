"""The broad question bank (offline/risk/families.py): hand-made grading cases per family (right, wrong and,
where the family has invented entities, refusals and confabulations), the bank's shape, and the fields and
question kinds kept out of it for an outside check."""

from __future__ import annotations

import inspect
import random
import re

import pytest
from featurelens.server.offline.risk import data as rd
from featurelens.server.offline.risk import families as fam
from featurelens.server.offline.risk import grading


@pytest.fixture(scope="module")
def facts():
    return fam.Facts.load()


@pytest.fixture(scope="module")
def every(facts):
    """Each family built with room for every entity it can have, keyed (family, entity) → questions."""
    out: dict[tuple[str, str], list[rd.Question]] = {}
    for name, build in fam.FAMILIES.items():
        for q in build(random.Random(0), facts, 10_000 if name not in ("prime", "leap_year") else 400, 30):
            out.setdefault((q.domain, q.entity), []).append(q)
    return out


def pick(every, family: str, entity: str | None = None, prompt: str | None = None) -> rd.Question:
    for (f, e), qs in every.items():
        if f != family:
            continue
        for q in qs:
            if (entity is None or e == entity) and (prompt is None or re.search(prompt, q.prompt)):
                return q
    raise LookupError(f"{family} {entity} {prompt}")


def fake(every, family: str) -> rd.Question:
    return next(q for (f, _), qs in every.items() if f == family for q in qs if q.fictional)


R, W = 0, 1  # label: right (or honest refusal) / hallucinated

CASES = [  # family, entity, prompt regex, response, label
    ("capital", "country:FRA", None, "The capital of France is Paris.", R),
    ("capital", "country:FRA", None, "The capital of France is Lyon.", W),
    ("currency", "country:JPN", None, "The official currency of Japan is the Japanese yen.", R),
    ("currency", "country:JPN", None, "Japan uses the euro.", W),
    ("language", "country:DEU", None, "German.", R),
    ("language", "country:DEU", None, "The official language of Germany is French.", W),
    ("country_tld", "country:FRA", None, "The top-level domain of France is .fr", R),
    ("country_tld", "country:FRA", None, "France uses .de", W),
    ("country_tld", "country:ITA", None, "Italy uses .it", R),
    ("country_tld", "country:ITA", None, "It is .fr", W),  # "it" the word is not the domain
    ("country_code", "country:DEU", None, "The ISO 3166 code of Germany is DE.", R),
    ("country_code", "country:DEU", None, "The code is GE.", W),
    ("country_code", "country:DEU", None, "de", W),  # codes are upper case
    ("neighbor", "country:FRA", None, "Spain borders France.", R),
    ("neighbor", "country:FRA", None, "Poland.", W),
    ("element_symbol", "element:Fe", None, "The chemical symbol of iron is Fe.", R),
    ("element_symbol", "element:Fe", None, "The symbol is FE", W),
    ("element_number", "element:Fe", None, "The atomic number of iron is 26.", R),
    ("element_number", "element:Fe", None, "The atomic number of iron is 56.", W),
    ("element_from_symbol", "element:Fe", None, "Fe stands for iron.", R),
    ("element_from_symbol", "element:Fe", None, "Fluorine.", W),
    ("element_from_symbol", "element:Al", None, "Aluminium", R),
    ("element_from_number", "element:Fe", None, "Iron has atomic number 26.", R),
    ("element_from_number", "element:Fe", None, "Cobalt.", W),
    ("element_mass", "element:C", None, "The atomic mass of carbon is 12.011 u.", R),
    ("element_mass", "element:C", None, "About 12 amu", R),
    ("element_mass", "element:C", None, "The atomic mass of carbon is 14.", W),
    ("language_code", "language:sw", None, "The ISO 639-1 code of Swahili is sw.", R),
    ("language_code", "language:sw", None, "The code is 'sv'.", W),
    ("currency_code", "currency:JPY", None, "JPY", R),
    ("currency_code", "currency:JPY", None, "The code is JPN.", W),
    ("leap_year", "year:1900", None, "No, 1900 was not a leap year.", R),
    ("leap_year", "year:1900", None, "Yes.", W),
    ("leap_year", "year:1900", None, "1900 was a leap year because it is divisible by 4.", W),
    ("leap_year", "year:2024", None, "Yes, 2024 is a leap year.", R),
    ("prime", "int:91", None, "No, 91 is not a prime number (7 × 13).", R),
    ("prime", "int:91", None, "91 is a prime number.", W),
    ("prime", "int:97", None, "Yes, 97 is prime.", R),
    ("prime", "int:97", None, "No.", W),
    ("word_length", "word:volcano", None, "The word 'volcano' has 7 letters.", R),
    ("word_length", "word:volcano", None, "Seven.", R),
    ("word_length", "word:volcano", None, "The word volcano has 8 letters.", W),
    ("word_reverse", "word:garden", None, "nedrag", R),
    ("word_reverse", "word:garden", None, "'garden' spelled backwards is N-E-D-R-A-G.", R),
    ("word_reverse", "word:garden", None, "nedarg", W),
]


def _word_case(every, family, word):
    q = pick(every, family, f"word:{word}")
    return q


@pytest.mark.parametrize(("family", "entity", "prompt", "response", "label"), CASES)
def test_grading_cases_per_family(every, family, entity, prompt, response, label):
    q = pick(every, family, entity, prompt)
    assert rd.grade(q, response)["label"] == label, (q.prompt, q.answers, response)


def _q(family: str, answers: list[str], grader: str = "alias", **kw) -> rd.Question:
    return rd.Question(qid="q", domain=family, entity="e", prompt="?", answers=answers, grader=grader, **kw)


@pytest.mark.parametrize(("response", "label"), [
    ("China.", R), ("China has more people.", R), ("Iceland", W), ("Iceland has fewer people than China.", R),
    ("China has fewer people than Iceland.", W), ("China has a larger population than Iceland.", R),
    ("Both are large.", W),
])
def test_population_compare_reads_which_option_is_picked(response, label):
    q = _q("population_compare", ["China", "People's Republic of China"], "choice", wrong=["Iceland"])
    assert rd.grade(q, response)["label"] == label


def test_population_compare_questions_name_both_options(every):
    q = pick(every, "population_compare")
    assert q.grader == "choice" and q.answers and q.wrong
    assert any(a in q.prompt for a in q.answers) and any(w in q.prompt for w in q.wrong)


@pytest.mark.parametrize(("family", "prompt_re", "right", "wrong"), [
    ("addition", r"^What is (\d+) \+ (\d+)\?$|^Compute (\d+) \+ (\d+)\.$", "{v}", "{w}"),
    ("multiplication", r"(\d+) × (\d+)", "The answer is {v}.", "{w}"),
    ("unit_conversion", r"meters to centimeters|centimeters are in \d+ meters", "That is {v} centimeters.", "{w}"),
])
def test_number_families_accept_the_value_only(every, family, prompt_re, right, wrong):
    q = pick(every, family, prompt=prompt_re)
    value = int(q.answers[0])
    assert rd.grade(q, right.format(v=value))["label"] == R
    assert rd.grade(q, wrong.format(w=value + 1))["label"] == W


@pytest.mark.parametrize(("family", "response_of", "label"), [
    ("word_problem", lambda v: f"There are {v} left.", R), ("word_problem", lambda v: f"{v + 2}", W),
    ("powers_roots", lambda v: f"It is {v}.", R), ("powers_roots", lambda v: f"It is {v * 2}.", W),
    ("days_in_month", lambda v: f"It has {v} days.", R), ("days_in_month", lambda v: f"It has {v - 1} days.", W),
])
def test_more_number_families(every, family, response_of, label):
    q = next(q for (f, _), qs in every.items() if f == family for q in qs if not q.fictional)
    assert rd.grade(q, response_of(int(q.answers[0])))["label"] == label


def test_roman_numerals_both_ways():
    to_roman = _q("roman_numeral", [fam.to_roman(47)], case_sensitive=True)
    assert fam.to_roman(47) == "XLVII" and fam.to_roman(399) == "CCCXCIX" and fam.to_roman(4) == "IV"
    assert rd.grade(to_roman, "47 in Roman numerals is XLVII.")["label"] == R
    assert rd.grade(to_roman, "XLVIII")["label"] == W
    to_arabic = _q("roman_numeral", ["47"])
    assert rd.grade(to_arabic, "XLVII is 47.")["label"] == R
    assert rd.grade(to_arabic, "XLVII is 57.")["label"] == W


def test_weekday_and_calendar_offset(every):
    q = pick(every, "weekday")
    day = q.answers[0]
    other = fam.WEEKDAYS[(fam.WEEKDAYS.index(day) + 1) % 7]
    assert rd.grade(q, f"It was a {day}.")["label"] == R
    assert rd.grade(q, f"It was a {other}.")["label"] == W
    q = pick(every, "calendar_offset", prompt=r"days after Monday")
    assert rd.grade(q, "It is Thursday.")["label"] == (R if q.answers == ["Thursday"] else W)
    q = pick(every, "calendar_offset", prompt=r"5th month")
    assert rd.grade(q, "The 5th month of the year is May.")["label"] == R
    assert rd.grade(q, "June")["label"] == W


@pytest.mark.parametrize(("letter", "response", "label"), [
    ("t", "The last letter of 'planet' is 't'.", R), ("t", "The last letter is T.", R), ("t", "t", R),
    ("t", "The last letter of the word planet is t.", R), ("t", "The last letter is 'e'.", W),
    ("t", "It ends with the letter e.", W), ("t", "The word planet doesn't end in a vowel.", W),
    ("g", "The 7th letter of the English alphabet is G.", R), ("g", "H", W), ("a", "A", R),
    ("a", "A letter.", W),
])
def test_single_letter_answers(letter, response, label):
    assert rd.grade(_q("word_letter", [letter], "letter"), response)["label"] == label


def test_alphabet_positions(every):
    q = pick(every, "alphabet", "letter:K", prompt="position|number")
    assert rd.grade(q, "K is the 11th letter of the alphabet.")["label"] == R
    assert rd.grade(q, "K is the 12th letter.")["label"] == W


@pytest.mark.parametrize("family", sorted({"capital", "currency", "language", "country_tld", "country_code",
                                           "neighbor", "element_symbol", "element_number", "element_from_symbol",
                                           "element_from_number", "element_mass", "language_code", "currency_code",
                                           "subdivision", "weekday", "days_in_month"}))
def test_invented_entities_refusal_and_confabulation(every, family):
    q = fake(every, family)
    assert rd.grade(q, "I'm not familiar with that; it does not exist.")["label"] == R
    assert rd.grade(q, "There is no such thing.")["label"] == R
    assert rd.grade(q, "It is 42, in Paris, called Fe.")["label"] == W


@pytest.mark.parametrize("response", ["Element 150 has not been discovered yet.", "That is not a valid date.",
                                      "I'm sorry, I can't help with that.", "There is no element with atomic number 150."])
def test_refusal_forms_of_the_new_families(response):
    assert rd.is_refusal(response)


def test_numbers_are_read_in_their_written_forms():
    assert grading.numbers("1,234 and 12.5, then twelve") == [1234.0, 12.5, 12.0]
    assert grading.yes_no("Yes, it is.") == "yes" and grading.yes_no("It isn't.") == "no"
    assert grading.yes_no("") is None


# ---------------------------------------------------------------------------------------- the bank

@pytest.fixture(scope="module")
def bank():
    return fam.build_bank(seed=0)


def test_bank_is_broad_deterministic_and_mixed(bank):
    assert len(fam.FAMILIES) >= 20
    assert [q.qid for q in fam.build_bank(seed=0)] == [q.qid for q in bank]
    assert len({q.qid for q in bank}) == len(bank)
    by = {}
    for q in bank:
        by.setdefault(q.domain, []).append(q)
    assert set(by) == set(fam.FAMILIES)
    assert all(len(qs) >= 50 for qs in by.values())
    assert sum(any(q.fictional for q in qs) for qs in by.values()) >= 15  # invented entities in most families
    assert all(q.answers for q in bank if not q.fictional)
    for qs in by.values():  # several phrasings per family
        assert len({re.sub(r"\d+", "#", q.prompt.split()[0] + " " + q.prompt.split()[1]) for q in qs}) >= 2


def test_graders_are_known(bank):
    assert {q.grader for q in bank} <= {"alias", *grading.GRADERS}


def test_reserved_fields_and_invented_people_are_kept_out(facts, bank):
    # The countryinfo fields an outside check uses are never read by a family.
    assert all(not (fam.RESERVED_FIELDS & c.keys()) for c in facts.countries)
    source = inspect.getsource(fam) + inspect.getsource(grading)
    for key in ("subregion", "demonym", "callingCodes"):
        assert f'"{key}"' not in source.replace("RESERVED_FIELDS = frozenset({\"region\", \"subregion\", "
                                                "\"demonym\", \"callingCodes\"})", "")
    assert '["region"]' not in source and "get(\"region\")" not in source
    # No question is about a person, real or invented.
    kinds = {q.entity.split(":")[0] for q in bank if q.fictional}
    assert kinds <= {"fake-country", "fake-element", "fake-symbol", "fake-number", "fake-language", "fake-currency",
                     "fake-region", "fake-date", "fake-month"}
    person = re.compile(r"\b(?:[Ww]ho|[Ww]hom|[Ww]hose|born|died|he|she|his|her|person|named)\b|"
                        r"\b(?:Mr|Mrs|Ms|Dr)\.? [A-Z]")
    assert not [q.prompt for q in bank if person.search(q.prompt)]


def test_entities_share_one_split_across_families(bank):
    rows = rd.assign_splits([q.to_dict() for q in bank])
    seen: dict[str, set[str]] = {}
    for r in rows:
        seen.setdefault(r["entity"], set()).add(r["split"])
    assert all(len(s) == 1 for s in seen.values())
    families_of_fra = {r["domain"] for r in rows if r["entity"] == "country:FRA"}
    assert len(families_of_fra) >= 1


def test_subdivision_real_questions(every):
    q = next(q for (f, _), qs in every.items() if f == "subdivision" for q in qs if not q.fictional)
    assert rd.grade(q, f"It is in {q.answers[0]}.")["label"] == R
    assert rd.grade(q, "It is in Atlantis.")["label"] == W


def test_every_family_has_hand_made_cases():
    """Each family appears in a grading test above (names listed here so a new family needs cases)."""
    covered = {c[0] for c in CASES} | {"population_compare", "addition", "multiplication", "unit_conversion",
                                       "word_problem", "powers_roots", "days_in_month", "roman_numeral", "weekday",
                                       "calendar_offset", "word_letter", "alphabet", "subdivision"}
    assert set(fam.FAMILIES) <= covered, set(fam.FAMILIES) - covered
