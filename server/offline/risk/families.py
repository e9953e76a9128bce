"""The broad question bank: question families whose answers are known offline, for training and evaluating
the risk probe on kinds of questions it has never seen (leave-one-family-out).

Facts come from packages that carry them (`countryinfo`: capitals, currencies, languages, borders, top-level
domains, populations; `pycountry`: ISO codes, currency and language names, subdivisions; `periodictable`:
symbols, atomic numbers and masses) or are computed with the standard library (dates, arithmetic, units,
Roman numerals, letters of words). Every family has several phrasings, and where it makes sense questions
about invented *entities* too (countries, elements, element symbols, atomic numbers past 118, languages,
currencies, regions, impossible dates): any confident answer about those is a hallucination.

Kept out on purpose (an outside check uses them): countryinfo's region, subregion, demonym and calling-code
fields, and any question about invented people. `tests/unit/test_risk_families.py` checks both.

Each `Question` names its family (`domain`), its `entity` (shared across families about the same thing, so
an entity split never shows one country on both sides) and how its answer is read (`grader`, see grading.py).
"""

from __future__ import annotations

import calendar
import datetime
import hashlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from featurelens.server.offline.risk.data import (
    EXTRA_CAPITALS,
    Question,
    _clean,
    _countries,
    _language_aliases,
    _subdivision_questions,
    invented_names,
    normalize,
)
from featurelens.server.offline.risk.grading import COMMON_TWO_LETTER

# Common English words (4-9 letters) for the word families; no names of people.
WORDS = """apple banana garden window river mountain candle pencil basket bottle button carpet castle
cherry circle cloud coffee cookie copper corner cotton desert dinner doctor dragon engine farmer finger
flower forest friend global guitar hammer harbor helmet island jacket jungle kettle kitchen ladder lemon
letter little market meadow mirror monkey morning needle number orange oxygen paper parrot pepper picnic
pillow planet pocket potato puzzle rabbit rocket saddle salmon school silver singer spider spring stable
station summer sunset table teacher ticket tiger tomato tunnel turtle valley velvet wagon walnut winter wizard
yellow zebra anchor badger beacon blanket bridge cactus camera canvas cereal chimney compass crystal dolphin
feather fossil galaxy giraffe glacier hunger insect lantern magnet marble museum napkin ocean oyster
painter pirate pumpkin quarter record saucer shadow sponge squirrel thunder trumpet violin volcano whistle""".split()

WEEKDAYS = list(calendar.day_name)
MONTHS = list(calendar.month_name)[1:]


def ordinal(n: int) -> str:
    if 11 <= n % 100 <= 13:
        return f"{n}th"
    return f"{n}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def _qid(domain: str, entity: str, prompt: str) -> str:
    return hashlib.sha1(f"{domain}|{entity}|{prompt}".encode()).hexdigest()[:12]


def make(domain: str, entity: str, templates: list[str], rng: random.Random, answers: list[str] | None = None,
         fictional: bool = False, **kw: Any) -> Question:
    """One question: a phrasing picked from `templates`, formatted with `kw`'s `fmt` values; other keywords
    are Question fields (grader, wrong, tolerance, case_sensitive)."""
    fmt = kw.pop("fmt", {})
    prompt = rng.choice(templates).format(**fmt)
    return Question(qid=_qid(domain, entity, prompt), domain=domain, entity=entity, prompt=prompt,
                    answers=list(answers or []), fictional=fictional, **kw)




@dataclass
class Facts:
    """The offline facts every family draws from, loaded once."""

    countries: list[dict]
    taken: set[str]  # every real name (normalised): invented names must not be one
    iso2: dict[str, str]  # ISO3 → ISO2
    names: dict[str, list[str]]  # ISO3 → accepted names of the country
    population: dict[str, int]
    borders: dict[str, list[str]]
    tlds: dict[str, list[str]]

    @classmethod
    def load(cls) -> Facts:
        import countryinfo
        import periodictable
        import pycountry

        # Fields an outside check uses stay out of the bank: drop them at the source.
        countries = [{k: v for k, v in c.items() if k not in RESERVED_FIELDS} for c in _countries()]
        names: dict[str, list[str]] = {c["iso3"]: [c["name"], *c["alt"]] for c in countries}
        iso2: dict[str, str] = {}
        for pc in pycountry.countries:
            iso2[pc.alpha_3] = pc.alpha_2
            names.setdefault(pc.alpha_3, []).extend(
                _clean(n) for n in {pc.name, getattr(pc, "common_name", pc.name)})
        population, borders, tlds = {}, {}, {}
        for c in countryinfo.all_countries():
            info = c.info()
            iso = (info.get("ISO") or {}).get("alpha3")
            if not iso:
                continue
            population[iso] = int(info.get("population") or 0)
            borders[iso] = list(info.get("borders") or [])
            tlds[iso] = [t for t in info.get("tld") or [] if re.fullmatch(r"\.[a-z]{2}", t)]
        taken = {normalize(n) for ns in names.values() for n in ns}
        taken |= {normalize(s.name) for s in pycountry.subdivisions}
        taken |= {normalize(e.name) for e in periodictable.elements}
        taken |= {normalize(lang.name) for lang in pycountry.languages}
        taken |= {normalize(cur.name) for cur in pycountry.currencies}
        return cls(countries, taken, iso2, {k: list(dict.fromkeys(v)) for k, v in names.items()}, population,
                   borders, tlds)


# countryinfo fields reserved for an outside check (issue 29): never read by any family.
RESERVED_FIELDS = frozenset({"region", "subregion", "demonym", "callingCodes"})

Builder = Callable[[random.Random, Facts, int, int], list[Question]]
FAMILIES: dict[str, Builder] = {}


def family(name: str) -> Callable[[Builder], Builder]:
    def register(fn: Builder) -> Builder:
        FAMILIES[name] = fn
        return fn
    return register


def _sample(rng: random.Random, items: list[Any], n: int) -> list[Any]:
    return rng.sample(items, min(n, len(items)))


def _fake_countries(rng: random.Random, facts: Facts, n: int) -> list[str]:
    return invented_names("country", n, rng, set(facts.taken))


# ------------------------------------------------------------------------------------------- countries

@family("capital")
def _capital(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    t = ["What is the capital of {e}?", "Name the capital city of {e}.", "Which city is the capital of {e}?"]
    out = []
    for c in _sample(rng, facts.countries, n):
        cap = normalize(c["capital"])
        if cap and cap not in normalize(c["name"]) and normalize(c["name"]) not in cap:
            out.append(make("capital", f"country:{c['iso3']}", t, rng,
                            [*c["capitals"], *EXTRA_CAPITALS.get(c["iso3"], [])], fmt={"e": c["name"]}))
    out += [make("capital", f"fake-country:{e}", t, rng, fictional=True, fmt={"e": e})
            for e in _fake_countries(rng, facts, n_fake)]
    return out


@family("currency")
def _currency(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    import pycountry
    from featurelens.server.offline.risk.data import EXTRA_CURRENCIES

    t = ["What is the official currency of {e}?", "Which currency is used in {e}?", "Name the currency of {e}."]
    out = []
    for c in _sample(rng, facts.countries, n):
        aliases: list[str] = []
        for code in c["currencies"]:
            cur = pycountry.currencies.get(alpha_3=code)
            if cur is None:
                continue
            name = _clean(cur.name)
            head = name.split()[-1]
            aliases += [name, code, *EXTRA_CURRENCIES.get(code, [])]
            if head.lower() not in ("bceao", "beac", "sterling", "cfp"):
                aliases += [head, f"{c['name']} {head}"]
        if aliases:
            out.append(make("currency", f"country:{c['iso3']}", t, rng, aliases, fmt={"e": c["name"]}))
    out += [make("currency", f"fake-country:{e}", t, rng, fictional=True, fmt={"e": e})
            for e in _fake_countries(rng, facts, n_fake)]
    return out


@family("language")
def _language(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    t = ["What is the official language of {e}?", "Which language is officially spoken in {e}?",
         "Name the official language of {e}."]
    out = []
    for c in _sample(rng, facts.countries, n):
        if aliases := _language_aliases(c["languages"]):
            out.append(make("language", f"country:{c['iso3']}", t, rng, aliases, fmt={"e": c["name"]}))
    out += [make("language", f"fake-country:{e}", t, rng, fictional=True, fmt={"e": e})
            for e in _fake_countries(rng, facts, n_fake)]
    return out


@family("country_tld")
def _country_tld(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    t = ["What is the internet country code top-level domain of {e}?", "Which top-level domain does {e} use?",
         "Websites from {e} end in which country code domain?"]
    out = [make("country_tld", f"country:{c['iso3']}", t, rng, facts.tlds[c["iso3"]], grader="tld",
                fmt={"e": c["name"]})
           for c in _sample(rng, facts.countries, n) if facts.tlds.get(c["iso3"])]
    out += [make("country_tld", f"fake-country:{e}", t, rng, fictional=True, grader="tld", fmt={"e": e})
            for e in _fake_countries(rng, facts, n_fake)]
    return out


@family("country_code")
def _country_code(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    t = ["What is the two-letter ISO 3166 country code of {e}?", "Which ISO alpha-2 code stands for {e}?",
         "Give the ISO 3166-1 alpha-2 code for {e}."]
    out = [make("country_code", f"country:{c['iso3']}", t, rng, [facts.iso2[c["iso3"]]], case_sensitive=True,
                fmt={"e": c["name"]})
           for c in _sample(rng, facts.countries, n) if c["iso3"] in facts.iso2]
    out += [make("country_code", f"fake-country:{e}", t, rng, fictional=True, fmt={"e": e})
            for e in _fake_countries(rng, facts, n_fake)]
    return out


@family("neighbor")
def _neighbor(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    t = ["Name a country that borders {e}.", "Which country shares a land border with {e}?",
         "Name one neighbouring country of {e}."]
    out = []
    for c in _sample(rng, [c for c in facts.countries if facts.borders.get(c["iso3"])], n):
        aliases = [a for iso in facts.borders[c["iso3"]] for a in facts.names.get(iso, [])]
        own = normalize(c["name"])
        # "South Sudan borders Sudan": an echo of the question would match a neighbour named inside it.
        if not aliases or any(normalize(a) in own or own in normalize(a) for a in aliases):
            continue
        out.append(make("neighbor", f"country:{c['iso3']}", t, rng, aliases, fmt={"e": c["name"]}))
    out += [make("neighbor", f"fake-country:{e}", t, rng, fictional=True, fmt={"e": e})
            for e in _fake_countries(rng, facts, n_fake)]
    return out


@family("population_compare")
def _population_compare(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    t = ["Which country has more people, {a} or {b}? Answer with the country name.",
         "Which has the larger population: {a} or {b}?", "Does {a} or {b} have more inhabitants?"]
    pool = [c for c in facts.countries if facts.population.get(c["iso3"], 0) > 0]
    out: list[Question] = []
    for _ in range(50 * n):
        if len(out) >= n:
            break
        a, b = rng.sample(pool, 2)
        pa, pb = facts.population[a["iso3"]], facts.population[b["iso3"]]
        if max(pa, pb) < 4 * min(pa, pb):  # clear differences only: figures of any year agree on them
            continue
        if normalize(a["name"]) in normalize(b["name"]) or normalize(b["name"]) in normalize(a["name"]):
            continue
        big, small = (a, b) if pa > pb else (b, a)
        out.append(make("population_compare", f"country:{big['iso3']}", t, rng, facts.names[big["iso3"]],
                        grader="choice", wrong=facts.names[small["iso3"]], fmt={"a": a["name"], "b": b["name"]}))
    return out


# -------------------------------------------------------------------------------------------- elements

def _elements() -> list[Any]:
    import periodictable

    return [e for e in periodictable.elements if e.number > 0]


ELEMENT_ALIASES = {"aluminum": ["aluminium"], "sulfur": ["sulphur"], "cesium": ["caesium"]}


def _element_names(el: Any) -> list[str]:
    return [el.name, *ELEMENT_ALIASES.get(el.name, [])]


def _fake_elements(rng: random.Random, facts: Facts, n: int) -> list[str]:
    return [name.lower() for name in invented_names("element", n, rng, set(facts.taken))]


@family("element_symbol")
def _element_symbol(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    from featurelens.server.offline.risk.data import SYMBOL_WORDS

    t = ["What is the chemical symbol of {e}?", "Which chemical symbol does the element {e} have?",
         "Write the element symbol for {e}."]
    out = [make("element_symbol", f"element:{el.symbol}", t, rng, [el.symbol], case_sensitive=True,
                fmt={"e": el.name}) for el in _sample(rng, _elements(), n) if el.symbol not in SYMBOL_WORDS]
    out += [make("element_symbol", f"fake-element:{e}", t, rng, fictional=True, fmt={"e": e})
            for e in _fake_elements(rng, facts, n_fake)]
    return out


@family("element_number")
def _element_number(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    t = ["What is the atomic number of {e}?", "Which atomic number does the element {e} have?",
         "How many protons does an atom of {e} have?"]
    out = [make("element_number", f"element:{el.symbol}", t, rng, [str(el.number)], grader="number",
                fmt={"e": el.name})
           for el in _sample(rng, _elements(), n)]
    out += [make("element_number", f"fake-element:{e}", t, rng, fictional=True, fmt={"e": e})
            for e in _fake_elements(rng, facts, n_fake)]
    return out


@family("element_from_symbol")
def _element_from_symbol(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    t = ["Which chemical element has the symbol {s}?", "What element does the chemical symbol {s} stand for?",
         "Name the element with the symbol {s}."]
    out = [make("element_from_symbol", f"element:{el.symbol}", t, rng, _element_names(el), fmt={"s": el.symbol})
           for el in _sample(rng, _elements(), n)]
    used = {el.symbol for el in _elements()}
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    unused = sorted({a + b.lower() for a in letters for b in letters} - used - {"Ok", "Hi", "Oh", "Ex", "Ma", "Pi", "Mr", "Ms", "Dr"})
    out += [make("element_from_symbol", f"fake-symbol:{s}", t, rng, fictional=True, fmt={"s": s})
            for s in _sample(rng, unused, n_fake)]
    return out


@family("element_from_number")
def _element_from_number(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    t = ["Which chemical element has atomic number {z}?", "What is the element with atomic number {z}?",
         "Name the element that has {z} protons."]
    out = [make("element_from_number", f"element:{el.symbol}", t, rng, _element_names(el), fmt={"z": el.number})
           for el in _sample(rng, _elements(), n)]
    # No element past 118 has been made: any element named for these is made up.
    out += [make("element_from_number", f"fake-number:{z}", t, rng, fictional=True, fmt={"z": z})
            for z in _sample(rng, list(range(125, 400)), n_fake)]
    return out


@family("element_mass")
def _element_mass(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    t = ["What is the atomic mass of {e}, to the nearest whole number?", "Roughly what is the atomic weight of {e}?",
         "What is the approximate atomic mass of {e} in atomic mass units?"]
    stable = [el for el in _elements() if el.number <= 94]  # measured standard weights, not isotope guesses
    out = [make("element_mass", f"element:{el.symbol}", t, rng, [str(el.mass)], grader="number", tolerance=0.6,
                fmt={"e": el.name}) for el in _sample(rng, stable, n)]
    out += [make("element_mass", f"fake-element:{e}", t, rng, fictional=True, grader="number", fmt={"e": e})
            for e in _fake_elements(rng, facts, n_fake)]
    return out


# ----------------------------------------------------------------------------- languages and currencies

@family("language_code")
def _language_code(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    import pycountry

    t = ["What is the ISO 639-1 code of the {e} language?", "Which two-letter ISO code stands for {e}?",
         "Give the two-letter language code for {e}."]
    pool = sorted((lang for lang in pycountry.languages if hasattr(lang, "alpha_2")
                   and lang.alpha_2 not in COMMON_TWO_LETTER and ";" not in lang.name),
                  key=lambda lang: lang.alpha_2)
    out = [make("language_code", f"language:{lang.alpha_2}", t, rng, [lang.alpha_2], fmt={"e": _clean(lang.name)})
           for lang in _sample(rng, pool, n)]
    fakes = [name.replace("ania", "anian") for name in invented_names("country", n_fake, rng, set(facts.taken))]
    out += [make("language_code", f"fake-language:{e}", t, rng, fictional=True, fmt={"e": e + "ic"}) for e in fakes]
    return out


CURRENCY_SKIP = re.compile(r"fund|unit|mvdol|unidad|sucre|code|wir|bond|gold|silver|platinum|palladium|drawing|"
                           r"transactions|testing|settlement|adb|valor", re.I)
FAKE_UNITS = ["krell", "dolmar", "zent", "florin", "markel", "druva", "quill", "tessar", "rondo", "sovar"]


@family("currency_code")
def _currency_code(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    import pycountry

    t = ["What is the ISO 4217 code of the {e}?", "Which three-letter currency code stands for the {e}?",
         "Give the currency code of the {e}."]
    pool = sorted((c for c in pycountry.currencies if not CURRENCY_SKIP.search(c.name)
                   and (not c.alpha_3.startswith("X") or c.alpha_3 in ("XOF", "XAF", "XCD", "XPF"))),
                  key=lambda c: c.alpha_3)
    out = [make("currency_code", f"currency:{c.alpha_3}", t, rng, [c.alpha_3], case_sensitive=True,
                fmt={"e": _clean(c.name)}) for c in _sample(rng, pool, n)]
    stems = invented_names("country", n_fake, rng, set(facts.taken))
    out += [make("currency_code", f"fake-currency:{s}", t, rng, fictional=True,
                 fmt={"e": f"{s[:-1] + 'n' if s.endswith('a') else s} {rng.choice(FAKE_UNITS)}"}) for s in stems]
    return out


@family("subdivision")
def _subdivision(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    out = _subdivision_questions(rng, n, facts.countries)
    t = ["In which country is the {t} of {e}?", "The {t} of {e} belongs to which country?"]
    out += [make("subdivision", f"fake-region:{e}", t, rng, fictional=True,
                 fmt={"e": e, "t": rng.choice(["province", "state", "region", "county"])})
            for e in invented_names("region", n_fake, rng, set(facts.taken))]
    return out


# ------------------------------------------------------------------------------------- numbers and units

def _exprs(rng: random.Random, n: int, draw: Callable[[], tuple[str, int]]) -> list[tuple[str, int]]:
    seen: dict[str, int] = {}
    for _ in range(50 * n):
        if len(seen) >= n:
            break
        expr, value = draw()
        seen.setdefault(expr, value)
    return list(seen.items())


@family("addition")
def _addition(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    t = ["What is {e}?", "Compute {e}.", "Calculate {e}. Answer with the number."]

    def draw() -> tuple[str, int]:
        a, b = rng.randint(11, 99), rng.randint(11, 99)
        return (f"{a} + {b}", a + b) if rng.random() < 0.5 else (f"{max(a, b)} - {min(a, b)}", abs(a - b))

    return [make("addition", f"expr:{e}", t, rng, [str(v)], grader="number", fmt={"e": e})
            for e, v in _exprs(rng, n, draw) if str(v) not in e.split()]


@family("multiplication")
def _multiplication(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    t = ["What is {e}?", "Compute {e}.", "What do you get when you multiply {a} by {b}?"]

    def draw() -> tuple[str, int]:
        a, b = rng.randint(3, 25), rng.randint(3, 12)
        return f"{a} × {b}", a * b

    out = []
    for e, v in _exprs(rng, n, draw):
        a, b = e.split(" × ")
        out.append(make("multiplication", f"expr:{e}", t, rng, [str(v)], grader="number", fmt={"e": e, "a": a, "b": b}))
    return out


WORD_PROBLEMS = [
    ("A basket holds {a} apples. {b} more apples are added. How many apples are in the basket now?", "+"),
    ("A shelf has {a} books and {b} of them are taken away. How many books are left on the shelf?", "-"),
    ("A box contains {a} packs of pencils with {b} pencils in each pack. How many pencils are there in total?", "*"),
    ("A train has {a} carriages and each carriage has {b} seats. How many seats does the train have?", "*"),
    ("A farm has {a} cows and buys {b} more. How many cows does the farm have now?", "+"),
    ("A jar holds {a} marbles. {b} marbles fall out. How many marbles are still in the jar?", "-"),
    ("{a} cookies are shared equally among {b} plates. How many cookies are on each plate?", "/"),
    ("A garden has {a} rows of tulips with {b} tulips in each row. How many tulips are there?", "*"),
]


@family("word_problem")
def _word_problem(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    out: list[Question] = []
    seen = set()
    for _ in range(50 * n):
        if len(out) >= n:
            break
        text, op = rng.choice(WORD_PROBLEMS)
        if op == "*":
            a, b = rng.randint(3, 12), rng.randint(3, 12)
            value = a * b
        elif op == "/":
            b = rng.randint(2, 9)
            value = rng.randint(2, 12)
            a = b * value
        else:
            a, b = rng.randint(12, 80), rng.randint(3, 11)
            value = a + b if op == "+" else a - b
        prompt = text.format(a=a, b=b)
        if prompt in seen or value in (a, b):
            continue
        seen.add(prompt)
        out.append(Question(qid=_qid("word_problem", prompt, prompt), domain="word_problem",
                            entity=f"wordproblem:{prompt}", prompt=prompt, answers=[str(value)], grader="number"))
    return out


UNITS = [  # (from, to, factor, entity group)
    ("meters", "centimeters", 100, "length"), ("kilometers", "meters", 1000, "length"),
    ("feet", "inches", 12, "length"), ("yards", "feet", 3, "length"), ("hours", "minutes", 60, "time"),
    ("minutes", "seconds", 60, "time"), ("days", "hours", 24, "time"), ("weeks", "days", 7, "time"),
    ("kilograms", "grams", 1000, "mass"), ("liters", "milliliters", 1000, "volume"),
    ("dozen", "items", 12, "count"), ("centuries", "years", 100, "time"), ("decades", "years", 10, "time"),
]


@family("unit_conversion")
def _unit_conversion(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    t = ["How many {to} are in {q} {frm}?", "Convert {q} {frm} to {to}.", "{q} {frm} is how many {to}?"]
    out: list[Question] = []
    seen = set()
    for _ in range(50 * n):
        if len(out) >= n:
            break
        frm, to, factor, _ = rng.choice(UNITS)
        q = rng.choice([2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 15, 25])
        if (frm, q) in seen:
            continue
        seen.add((frm, q))
        label = "dozen" if frm == "dozen" else frm
        out.append(make("unit_conversion", f"units:{q} {frm}", t, rng, [str(q * factor)], grader="number",
                        fmt={"to": to, "q": q, "frm": label}))
    return out


@family("powers_roots")
def _powers_roots(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    kinds = [
        (["What is the square of {a}?", "What is {a} squared?"], lambda a: a * a, (4, 40)),
        (["What is the square root of {s}?", "Compute the square root of {s}."], lambda a: a, (4, 40)),
        (["What is 2 to the power of {a}?", "Compute 2 raised to the power {a}."], lambda a: 2**a, (3, 16)),
        (["What is {a} cubed?", "What is the cube of {a}?"], lambda a: a**3, (2, 12)),
        (["What is 10 to the power of {a}?", "Compute 10 raised to the power {a}."], lambda a: 10**a, (2, 6)),
    ]
    out: list[Question] = []
    seen = set()
    for _ in range(50 * n):
        if len(out) >= n:
            break
        k = rng.randrange(len(kinds))
        templates, fn, (lo, hi) = kinds[k]
        a = rng.randint(lo, hi)
        if (k, a) in seen:
            continue
        seen.add((k, a))
        out.append(make("powers_roots", f"power:{k}:{a}", templates, rng, [str(fn(a))], grader="number",
                        fmt={"a": a, "s": a * a}))
    return out


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))


@family("prime")
def _prime(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    t = ["Is {a} a prime number?", "Is the number {a} prime?", "Answer yes or no: is {a} prime?"]
    primes = [p for p in range(11, 400) if _is_prime(p)]
    odd_composites = [c for c in range(15, 400, 2) if not _is_prime(c) and c % 5]
    picks = _sample(rng, primes, n // 2) + _sample(rng, odd_composites, n - n // 2)
    return [make("prime", f"int:{a}", t, rng, ["yes" if _is_prime(a) else "no"], grader="yesno", fmt={"a": a})
            for a in picks]


ROMAN = [(1000, "M"), (900, "CM"), (500, "D"), (400, "CD"), (100, "C"), (90, "XC"), (50, "L"), (40, "XL"),
         (10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]


def to_roman(n: int) -> str:
    out = ""
    for value, letters in ROMAN:
        while n >= value:
            out += letters
            n -= value
    return out


@family("roman_numeral")
def _roman_numeral(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    to_arabic = ["What number is the Roman numeral {r}?", "Convert the Roman numeral {r} to an ordinary number."]
    to_rom = ["How is {a} written in Roman numerals?", "Write {a} as a Roman numeral."]
    out = []
    for a in _sample(rng, list(range(4, 400)), n):
        if rng.random() < 0.5:
            out.append(make("roman_numeral", f"int:{a}", to_arabic, rng, [str(a)], grader="number",
                            fmt={"r": to_roman(a)}))
        else:
            out.append(make("roman_numeral", f"int:{a}", to_rom, rng, [to_roman(a)], case_sensitive=True,
                            fmt={"a": a}))
    return out


# ------------------------------------------------------------------------------------------ calendar

@family("weekday")
def _weekday(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    t = ["What day of the week was {d}?", "On which day of the week did {d} fall?", "{d} was which weekday?"]
    out = []
    start = datetime.date(1950, 1, 1).toordinal()
    for _ in range(n):
        day = datetime.date.fromordinal(start + rng.randrange(27000))
        text = f"{day.day} {MONTHS[day.month - 1]} {day.year}"
        out.append(make("weekday", f"date:{day.isoformat()}", t, rng, [WEEKDAYS[day.weekday()]], fmt={"d": text}))
    for _ in range(n_fake):  # dates that never were: 30 February, 31 April...
        month = rng.choice([2, 4, 6, 9, 11])
        year = rng.randint(1950, 2023)
        day_n = rng.choice(range(calendar.monthrange(year, month)[1] + 1, 32))
        text = f"{day_n} {MONTHS[month - 1]} {year}"
        out.append(make("weekday", f"fake-date:{text}", t, rng, fictional=True, fmt={"d": text}))
    return out


@family("calendar_offset")
def _calendar_offset(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    kinds = [
        ("day", ["What day of the week comes {k} days after {x}?", "If today is {x}, what day will it be in {k} days?"]),
        ("month", ["Which month comes {k} months after {x}?", "What month is {k} months after {x}?"]),
        ("nth_month", ["What is the {o} month of the year?", "Which month is the {o} month of the year?"]),
    ]
    out: list[Question] = []
    seen = set()
    for _ in range(50 * n):
        if len(out) >= n:
            break
        kind, templates = rng.choice(kinds)
        if kind == "day":
            x, k = rng.randrange(7), rng.randint(2, 6)
            key, answer, fmt = (kind, x, k), WEEKDAYS[(x + k) % 7], {"x": WEEKDAYS[x], "k": k}
        elif kind == "month":
            x, k = rng.randrange(12), rng.randint(2, 11)
            key, answer, fmt = (kind, x, k), MONTHS[(x + k) % 12], {"x": MONTHS[x], "k": k}
        else:
            x = rng.randint(1, 12)
            key, answer, fmt = (kind, x, 0), MONTHS[x - 1], {"o": ordinal(x)}
        if key in seen:
            continue
        seen.add(key)
        out.append(make("calendar_offset", f"caloffset:{key}", templates, rng, [answer], fmt=fmt))
    return out


@family("leap_year")
def _leap_year(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    t = ["Was {y} a leap year?", "Is {y} a leap year?", "Answer yes or no: was {y} a leap year?"]
    years = list(range(1600, 2100))
    leap = [y for y in years if calendar.isleap(y)]
    # Centuries and plain non-leap years, so "divisible by 4" alone is not enough.
    other = [y for y in years if not calendar.isleap(y)]
    picks = _sample(rng, leap, n // 2) + _sample(rng, [y for y in other if y % 100 == 0], 3) + \
        _sample(rng, [y for y in other if y % 100], n - n // 2 - 3)
    return [make("leap_year", f"year:{y}", t, rng, ["yes" if calendar.isleap(y) else "no"], grader="yesno",
                 fmt={"y": y}) for y in picks]


INVENTED_MONTHS = ["Quintober", "Brumaril", "Festember", "Jovanuary", "Marchuary", "Sollistice", "Noctober",
                   "Thawril", "Augember", "Decuary", "Frimaire-Nova", "Vendril", "Juluary", "Septober",
                   "Harvember", "Glaciary", "Aprune", "Mayvember", "Frostuary", "Lunember"]


@family("days_in_month")
def _days_in_month(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    t = ["How many days are there in {m} {y}?", "How many days does {m} {y} have?",
         "What is the number of days in {m} {y}?"]
    out = []
    for _ in range(n):
        month, year = rng.randint(1, 12), rng.randint(1900, 2030)
        if month != 2 and rng.random() < 0.5:
            month = 2  # February carries the leap-year facts
        days = calendar.monthrange(year, month)[1]
        out.append(make("days_in_month", f"month:{year}-{month}", t, rng, [str(days)], grader="number",
                        fmt={"m": MONTHS[month - 1], "y": year}))
    out += [make("days_in_month", f"fake-month:{m}", t, rng, fictional=True, fmt={"m": m, "y": rng.randint(1950, 2030)})
            for m in _sample(rng, INVENTED_MONTHS, n_fake)]
    return out


# --------------------------------------------------------------------------------------------- words

@family("word_length")
def _word_length(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    t = ["How many letters are in the word '{w}'?", "How many letters does the word \"{w}\" have?",
         "Count the letters in the word '{w}'."]
    return [make("word_length", f"word:{w}", t, rng, [str(len(w))], grader="number", fmt={"w": w})
            for w in _sample(rng, WORDS, n)]


@family("word_letter")
def _word_letter(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    first = ["What is the first letter of the word '{w}'?", "Which letter does the word \"{w}\" start with?"]
    last = ["What is the last letter of the word '{w}'?", "Which letter does the word \"{w}\" end with?"]
    third = ["What is the third letter of the word '{w}'?", "Which letter comes third in the word \"{w}\"?"]
    out = []
    for w in _sample(rng, WORDS, n):
        templates, letter = rng.choice([(first, w[0]), (last, w[-1]), (third, w[2])])
        out.append(make("word_letter", f"word:{w}", templates, rng, [letter], grader="letter", fmt={"w": w}))
    return out


@family("word_reverse")
def _word_reverse(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    t = ["Spell the word '{w}' backwards.", "What is \"{w}\" written in reverse?", "Reverse the letters of '{w}'."]
    return [make("word_reverse", f"word:{w}", t, rng, [w[::-1]], grader="letters", fmt={"w": w})
            for w in _sample(rng, [w for w in WORDS if w != w[::-1]], n)]


@family("alphabet")
def _alphabet(rng: random.Random, facts: Facts, n: int, n_fake: int) -> list[Question]:
    nth = ["What is the {o} letter of the English alphabet?", "Which letter is {o} in the alphabet?"]
    pos = ["What position does the letter {c} have in the English alphabet?",
           "The letter {c} is which number in the alphabet?"]
    out = []
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    for i in _sample(rng, list(range(26)), 26):
        out.append(make("alphabet", f"letter:{letters[i]}", nth, rng, [letters[i]], grader="letter",
                        fmt={"o": ordinal(i + 1)}))
        out.append(make("alphabet", f"letter:{letters[i]}", pos, rng, [str(i + 1)], grader="number",
                        fmt={"c": letters[i]}))
    return out[:n]


# -------------------------------------------------------------------------------------------- the bank

# Questions per family: real ones, and invented ones where the family has them.
DEFAULT_SIZES = (110, 40)


def build_bank(seed: int = 0, n_real: int = DEFAULT_SIZES[0], n_fake: int = DEFAULT_SIZES[1],
               families: list[str] | None = None) -> list[Question]:
    """Every family's questions, deterministic for a seed, shuffled (any prefix is a fair sample), one
    question per (family, prompt)."""
    facts = Facts.load()
    out: list[Question] = []
    for name in families or list(FAMILIES):
        rng = random.Random(f"{seed}:{name}")
        out += FAMILIES[name](rng, facts, n_real, n_fake)
    unique = list({(q.domain, q.prompt): q for q in out}.values())
    random.Random(seed).shuffle(unique)
    return unique
