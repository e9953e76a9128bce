"""Answer readers for the question families whose answers are not a name: numbers with a tolerance, yes/no,
one of two options, a single letter, a spelled-out word and a top-level domain. Each takes the question and
the response and says whether the response gives the right answer; `data.grade` calls them for questions
whose `grader` is not "alias" (refusals and invented entities are handled there, the same for every family).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from featurelens.server.offline.risk.data import Question

_NUMBER_RE = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?")
NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
                "sixteen seventeen eighteen nineteen twenty").split()


ORDINAL_WORDS = ("zeroth first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth "
                 "thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth").split()


def numbers(text: str) -> list[float]:
    """Every number written in the text, in order ("1,234" is one number, "11th" is 11; "twelve" and
    "twelfth" count, up to twenty)."""
    found = [(m.start(), float(m.group().replace(",", ""))) for m in _NUMBER_RE.finditer(text)]
    for words in (NUMBER_WORDS, ORDINAL_WORDS):
        for i, word in enumerate(words):
            found += [(m.start(), float(i)) for m in re.finditer(rf"\b{word}\b", text.lower())]
    return [value for _, value in sorted(found)]


def _number(question: Question, response: str) -> bool:
    target = float(question.answers[0])
    return any(abs(value - target) <= question.tolerance + 1e-9 for value in numbers(response))


def _plain(text: str) -> str:
    from featurelens.server.offline.risk.data import normalize

    return normalize(text)


_NEGATED = re.compile(r"\b(?:not|isn t|wasn t|aren t|neither)\b")


def yes_no(response: str) -> str | None:
    """'yes', 'no' or None: the first word when it is yes/no, else whether the claim is negated
    ("91 is not a prime number" → no, "2024 is a leap year" → yes)."""
    text = _plain(response)
    words = text.split()
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0]
    if _NEGATED.search(text):
        return "no"
    return "yes" if re.search(r"\b(?:is|was|are|were)\b", text) else None


def _yesno(question: Question, response: str) -> bool:
    return yes_no(response) == question.answers[0]


_LESS = re.compile(r"\b(?:fewer|less|smaller|lower)\b")


def _first_position(text: str, aliases: list[str]) -> int | None:
    positions = [f" {text} ".find(f" {_plain(a)} ") for a in aliases if _plain(a)]
    hits = [p for p in positions if p >= 0]
    return min(hits) if hits else None


def chosen(response: str, right: list[str], wrong: list[str]) -> bool | None:
    """Which of two options the response picks: True (right), False (wrong), None (neither named). When
    both are named, the first one is the pick, unless the sentence says "fewer/less/smaller" (then the
    other one: "B has fewer people than A" picks A)."""
    text = _plain(response)
    r, w = _first_position(text, right), _first_position(text, wrong)
    if r is None and w is None:
        return None
    if r is None or w is None:
        return r is not None
    first_is_right = r < w
    return not first_is_right if _LESS.search(text) else first_is_right


def _choice(question: Question, response: str) -> bool:
    return chosen(response, question.answers, question.wrong) is True


_QUOTED = re.compile(r"[\"'‘’“”`*]([A-Za-z])[\"'‘’“”`*]")
_LETTER_WORD = re.compile(r"\bletter\s+[\"'‘“`*]?([A-Za-z])\b")
_CAPITAL = re.compile(r"(?<![\w'’])([B-HJ-Z])(?![\w'’])")  # standalone capitals but the words "I" and "A"
_LAST = re.compile(r"(?:^|\bis\s+|:\s*)([A-Za-z])\W*$")


def letters_named(response: str) -> list[str]:
    """The single letters a response names, in order (lower case): quoted ('t'), after "letter" (letter G),
    standalone capitals other than the words I and A, or a bare letter ending the answer ("... is t.")."""
    text = unicodedata.normalize("NFKC", response.strip())
    found: list[tuple[int, str]] = []
    for pattern in (_QUOTED, _LETTER_WORD, _CAPITAL, _LAST):
        found += [(m.start(1), m.group(1).lower()) for m in pattern.finditer(text)]
    return [letter for _, letter in sorted(set(found))]


def _letter(question: Question, response: str) -> bool:
    named = letters_named(response)
    return bool(named) and named[0] == question.answers[0].lower()


def _letters(question: Question, response: str) -> bool:
    """A word spelled out (e.g. reversed): its letters in order anywhere in the response, separators ignored
    ("n-e-d-r-a-g", "N E D R A G", "nedrag")."""
    squashed = re.sub(r"[^a-z]", "", unicodedata.normalize("NFKD", response).lower())
    return question.answers[0].lower() in squashed


# Two-letter codes that are also English words: matched only in their ".xx" form.
COMMON_TWO_LETTER = frozenset("am an as at be by do go he hi if in is it me my no of oh ok on or so to up us we".split())


def _tld(question: Question, response: str) -> bool:
    lowered = response.lower()
    for tld in question.answers:
        code = tld.lower().lstrip(".")
        if re.search(rf"(?<![\w.])\.{re.escape(code)}\b", lowered):
            return True
        if code not in COMMON_TWO_LETTER and re.search(rf"\b{re.escape(code)}\b", _plain(response)):
            return True
    return False


GRADERS: dict[str, Callable[[Question, str], bool]] = {
    "number": _number, "yesno": _yesno, "choice": _choice, "letter": _letter, "letters": _letters, "tld": _tld,
}
