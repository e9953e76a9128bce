"""Hallucination-risk data: factual questions with offline-known answers, questions about invented entities,
a grader, entity/domain splits and the runner that asks the served model through the real gRPC path.

Every question has an `entity` (the thing asked about; one country is the entity of its capital, currency and
language questions, so a split by entity never shows the model's answers about France on both sides) and a
`domain` (question family; held out whole for the domain evaluation). Labels: 1 = hallucinated (a wrong answer,
or any confident answer about an invented entity), 0 = correct or an honest refusal.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import unicodedata
from dataclasses import asdict, dataclass, field

# Question families. Each has real questions and, where it makes sense, invented ones: a probe that only
# learned "this name is unfamiliar" or "this family is hard" would fail the held-out-domain evaluation.
DOMAINS = ("capital", "currency", "language", "element", "subdivision", "arithmetic")

TEMPLATES: dict[str, list[str]] = {
    "capital": ["What is the capital of {e}?", "Name the capital city of {e}.", "Which city is the capital of {e}?"],
    "currency": ["What is the official currency of {e}?", "Which currency is used in {e}?",
                 "Name the currency of {e}."],
    "language": ["What is the official language of {e}?", "Which language is officially spoken in {e}?",
                 "Name the official language of {e}."],
    "element_symbol": ["What is the chemical symbol of {e}?", "Which chemical symbol does the element {e} have?"],
    "element_number": ["What is the atomic number of {e}?", "Which atomic number does the element {e} have?"],
    "subdivision": ["In which country is the {t} of {e}?", "The {t} of {e} belongs to which country?"],
    "arithmetic": ["What is {e}?", "Compute {e}.", "Calculate {e}. Answer with the number."],
}

REFUSAL_PATTERNS = [
    r"\bi (?:do not|don t|dont) know\b", r"\bnot sure\b", r"\bthere is no\b", r"\bthere isn t\b", r"\bno such\b",
    r"\b(?:doesn t|does not|don t|do not) (?:exist|have)\b", r"\bfictional\b", r"\bfictitious\b", r"\bimaginary\b",
    r"\bnot (?:a )?real\b", r"\bisn t (?:a )?real\b", r"\bmade up\b", r"\bhypothetical\b", r"\bnot aware\b",
    r"\bnot familiar\b", r"\bunable to (?:find|provide|determine|answer)\b", r"\bcan(?:not| t|t) (?:find|provide|determine)\b",
    r"\bcouldn t find\b", r"\bno (?:information|record|data|known)\b", r"\bnot recogni[sz]ed\b", r"\bunknown\b",
    r"\bnot (?:an? )?(?:recognized|existing|actual)\b",
    # Impossible dates, undiscovered elements, unassigned codes (offline/risk/families.py's invented entities).
    r"\bnot (?:an? )?valid\b", r"\bisn t (?:an? )?valid\b", r"\binvalid\b",
    r"\bnot (?:yet )?(?:been )?(?:discovered|named|assigned|synthesi[sz]ed)\b", r"\bno (?:such )?element\b",
    r"\bsorry\b", r"\bi (?:cannot|can t)\b", r"\bas an ai\b",
]
_REFUSAL_RE = re.compile("|".join(REFUSAL_PATTERNS))
_ARTICLES_RE = re.compile(r"\b(?:the|a|an)\b")


@dataclass
class Question:
    qid: str
    domain: str
    entity: str
    prompt: str
    answers: list[str] = field(default_factory=list)  # accepted aliases; empty for invented entities
    fictional: bool = False
    case_sensitive: bool = False  # element symbols: "Fe" must not match the word "fe"...
    # How `grade` reads the answer (offline/risk/families.py): "alias" (whole-word match of any answer),
    # "number" (a number within `tolerance` of answers[0]), "yesno" (answers = ["yes"] or ["no"]), "choice"
    # (answers = the right option's aliases, `wrong` = the other option's), "letter" (one letter),
    # "letters" (a spelled-out word, e.g. reversed: its letters in order), "tld" (".fr").
    grader: str = "alias"
    wrong: list[str] = field(default_factory=list)
    tolerance: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def normalize(text: str) -> str:
    """Lower case, no diacritics, punctuation → spaces, no articles, digit groups joined ("1,024" → "1024")."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    text = re.sub(r"(?<=\d)[,_](?=\d{3})", "", text.lower())
    text = re.sub(r"[^\w\s]|_", " ", text)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def is_refusal(response: str) -> bool:
    return bool(_REFUSAL_RE.search(normalize(response).replace(" t ", " t ")))


def mentions(response: str, alias: str, case_sensitive: bool = False) -> bool:
    """Whole-word match of an alias inside a response after normalisation."""
    if case_sensitive:
        words = re.sub(r"[^\w]", " ", unicodedata.normalize("NFKD", response)).split()
        return alias in words
    a = normalize(alias)
    return bool(a) and f" {a} " in f" {normalize(response)} "


def grade(question: Question, response: str) -> dict:
    """Returns {"label": 0|1, "verdict": correct|refusal|wrong|confabulated}; label 1 = hallucinated."""
    if not question.fictional and _answered_right(question, response):
        return {"label": 0, "verdict": "correct"}
    if is_refusal(response) or not response.strip():
        return {"label": 0, "verdict": "refusal"}
    return {"label": 1, "verdict": "confabulated" if question.fictional else "wrong"}


def _answered_right(question: Question, response: str) -> bool:
    from featurelens.server.offline.risk import grading

    kind = getattr(question, "grader", "alias")
    if kind == "alias":
        return any(mentions(response, a, question.case_sensitive) for a in question.answers)
    return grading.GRADERS[kind](question, response)


# ------------------------------------------------------------------------------------------------ splits

def _unit(key: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) from a string: splits do not depend on data order."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def entity_split(entity: str, seed: int = 0, val: float = 0.2, test: float = 0.2) -> str:
    u = _unit(entity, seed)
    return "test" if u < test else "val" if u < test + val else "train"


def assign_splits(rows: list[dict], seed: int = 0) -> list[dict]:
    for row in rows:
        row["split"] = entity_split(row["entity"], seed)
    return rows


# ------------------------------------------------------------------------------------------ invented names

_ONSETS = ["b", "br", "c", "d", "dr", "f", "g", "gl", "k", "kh", "l", "m", "n", "p", "qu", "r", "s", "st", "t",
           "th", "v", "vr", "z", "zh", "x"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou", "y"]
_CODAS = ["", "", "l", "n", "r", "s", "th", "v", "sk", "nd", "lt"]
_SUFFIXES = {
    "country": ["ania", "istan", "land", "ora", "via", "ea", "onia", "aria", "uth", "eni"],
    "element": ["ium", "ium", "on", "ine", "ogen"],
    "region": ["shire", "berg", "ova", "ia", "ey", "wald", "mark", "oso"],
}


def invented_names(kind: str, n: int, rng: random.Random, taken: set[str]) -> list[str]:
    """Plausible names that are not real: two syllables + a kind-typical suffix, checked against `taken`
    (every real country, region and element name, normalised)."""
    names: list[str] = []
    while len(names) < n:
        stem = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(rng.choice((1, 2))))
        name = (stem + rng.choice(_SUFFIXES[kind])).capitalize()
        key = normalize(name)
        if 5 <= len(name) <= 14 and key not in taken:
            taken.add(key)
            names.append(name)
    return names


# ------------------------------------------------------------------------------------------ question bank

# Accepted alternatives the packages lack: multi-capital countries and common English short forms.
EXTRA_CAPITALS = {
    "ZAF": ["Cape Town", "Bloemfontein"], "BOL": ["La Paz"], "CIV": ["Abidjan"], "LKA": ["Colombo", "Kotte"],
    "USA": ["Washington", "Washington D.C."], "MYS": ["Putrajaya"], "BEN": ["Cotonou"], "NLD": ["The Hague"],
    "SWZ": ["Mbabane", "Lobamba"], "MMR": ["Naypyidaw", "Nay Pyi Taw"], "KOR": ["Seoul"], "YEM": ["Sana'a", "Sanaa"],
    "TZA": ["Dodoma", "Dar es Salaam"], "BDI": ["Gitega", "Bujumbura"], "PSE": ["Ramallah", "East Jerusalem"],
    "MHL": ["Majuro"], "NRU": ["Yaren"], "KAZ": ["Astana", "Nur-Sultan"], "IND": ["New Delhi", "Delhi"],
}
EXTRA_LANGUAGES = {"el": ["Greek"], "nb": ["Norwegian"], "nn": ["Norwegian"], "no": ["Norwegian"],
                   "sw": ["Swahili", "Kiswahili"], "ms": ["Malay"], "fa": ["Persian", "Farsi"],
                   "zh": ["Chinese", "Mandarin"], "ar": ["Arabic"], "ne": ["Nepali", "Nepalese"]}
# Names the packages spell so that a correct answer would not match ("CFA Franc BCEAO" vs "CFA franc").
EXTRA_CURRENCIES = {"XOF": ["CFA franc", "West African CFA franc"], "XAF": ["CFA franc", "Central African CFA franc"],
                    "GBP": ["pound", "British pound", "pound sterling"], "USD": ["US dollar", "American dollar"],
                    "XCD": ["East Caribbean dollar"], "XPF": ["CFP franc"], "CHF": ["Swiss franc"]}
SYMBOL_WORDS = {"I", "He", "As", "At", "In", "Be", "No", "Am", "Os", "Es", "Ga", "Pa", "Po", "Ho", "Mo", "Re"}


def _countries() -> list[dict]:
    import countryinfo

    rows = []
    for c in countryinfo.all_countries():
        info = c.info()
        name = info.get("name") or ""
        iso = (info.get("ISO") or {}).get("alpha3")
        if not iso or not name or any(ch in name for ch in "(),"):
            continue
        capital = info.get("capital") or ""
        capitals = capital if isinstance(capital, list) else [capital]
        rows.append({"iso3": iso, "name": name, "capital": capitals[0] if capitals else "", "capitals": capitals,
                     "currencies": info.get("currencies") or [], "languages": info.get("languages") or [],
                     "alt": [a for a in info.get("altSpellings") or [] if len(a) > 3],
                     "demonym": info.get("demonym") or ""})
    return rows


def _clean(name: str) -> str:
    return re.sub(r"\s*\(.*?\)", "", name).strip()


def _currency_aliases(codes: list[str], country: dict) -> list[str]:
    import pycountry

    aliases: list[str] = []
    for code in codes:
        cur = pycountry.currencies.get(alpha_3=code)
        if cur is None:
            continue
        name = _clean(cur.name)
        # The bare head noun counts ("the dollar" for Australia is not made up); codes like BCEAO do not.
        head = name.split()[-1]
        aliases += [name, code, *EXTRA_CURRENCIES.get(code, [])]
        if head.lower() not in ("bceao", "beac", "sterling", "cfp"):
            aliases += [head, f"{country['demonym']} {head}", f"{country['name']} {head}"]
    return aliases


def _language_aliases(codes: list[str]) -> list[str]:
    import pycountry

    aliases: list[str] = []
    for code in codes:
        lang = pycountry.languages.get(alpha_2=code)
        if lang is not None:
            aliases.append(_clean(lang.name))
        aliases += EXTRA_LANGUAGES.get(code, [])
    return aliases


def _q(domain: str, entity: str, template: str, rng: random.Random, **kw) -> Question:
    prompt = rng.choice(TEMPLATES[template]).format(**kw)
    qid = hashlib.sha1(f"{domain}|{entity}|{prompt}".encode()).hexdigest()[:12]
    return Question(qid=qid, domain=domain, entity=entity, prompt=prompt)


def build_questions(seed: int = 0, n_fake_countries: int = 200, n_fake_elements: int = 80,
                    n_subdivisions: int = 700, n_fake_regions: int = 250, n_arithmetic: int = 400) -> list[Question]:
    """The whole question bank, deterministic for a seed."""
    import periodictable
    import pycountry

    rng = random.Random(seed)
    countries = _countries()
    taken = {normalize(c["name"]) for c in countries} | {normalize(s.name) for s in pycountry.subdivisions}
    taken |= {normalize(e.name) for e in periodictable.elements}
    qs: list[Question] = []

    for c in countries:
        ent = f"country:{c['iso3']}"
        cap = normalize(c["capital"])
        # A capital named like its country ("Mexico City", "Singapore") would be "found" in any echo of the
        # question, so those cannot be graded by matching and are left out.
        if cap and cap not in normalize(c["name"]) and normalize(c["name"]) not in cap:
            q = _q("capital", ent, "capital", rng, e=c["name"])
            q.answers = [*c["capitals"], *EXTRA_CAPITALS.get(c["iso3"], [])]
            qs.append(q)
        if cur := _currency_aliases(c["currencies"], c):
            q = _q("currency", ent, "currency", rng, e=c["name"])
            q.answers = cur
            qs.append(q)
        if lang := _language_aliases(c["languages"]):
            q = _q("language", ent, "language", rng, e=c["name"])
            q.answers = lang
            qs.append(q)
    for name in invented_names("country", n_fake_countries, rng, taken):
        for domain in ("capital", "currency", "language"):
            q = _q(domain, f"fake-country:{name}", domain, rng, e=name)
            q.fictional = True
            qs.append(q)

    for el in periodictable.elements:
        if el.number == 0:
            continue
        ent = f"element:{el.symbol}"
        if el.symbol not in SYMBOL_WORDS:
            q = _q("element", ent, "element_symbol", rng, e=el.name)
            q.answers, q.case_sensitive = [el.symbol], True
            qs.append(q)
        q = _q("element", ent, "element_number", rng, e=el.name)
        q.answers = [str(el.number)]
        qs.append(q)
    for name in invented_names("element", n_fake_elements, rng, taken):
        for template in ("element_symbol", "element_number"):
            q = _q("element", f"fake-element:{name.lower()}", template, rng, e=name.lower())
            q.fictional = True
            qs.append(q)

    qs += _subdivision_questions(rng, n_subdivisions, countries)
    for name in invented_names("region", n_fake_regions, rng, taken):
        q = _q("subdivision", f"fake-region:{name}", "subdivision", rng, e=name,
               t=rng.choice(["province", "state", "region", "county"]))
        q.fictional = True
        qs.append(q)

    seen: set[str] = set()
    while len(seen) < n_arithmetic:
        op = rng.choice("+-*")
        # Small operands: a 135M model gets some right, so arithmetic has both labels.
        a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(2, 99), rng.randint(2, 99))
        expr = f"{a} {op} {b}"
        value = eval(expr)  # noqa: S307 - two integers and an operator we just generated
        if expr in seen or value in (a, b):
            continue
        seen.add(expr)
        q = _q("arithmetic", f"arith:{expr}", "arithmetic", rng, e=expr.replace("*", "×"))
        q.answers = [str(value)]
        qs.append(q)
    rng.shuffle(qs)  # any prefix of the run is a fair sample of the whole bank
    return qs


def _subdivision_questions(rng: random.Random, n: int, countries: list[dict]) -> list[Question]:
    """'In which country is the province of X?' for well-known kinds of first-level subdivisions whose name is
    unique worldwide and does not contain the country's name (that would give the answer away)."""
    import pycountry

    by_iso2 = {}
    for c in pycountry.countries:
        by_iso2[c.alpha_2] = [c.name, getattr(c, "common_name", c.name), getattr(c, "official_name", c.name)]
    extra = {c["iso3"]: [c["name"], *c["alt"]] for c in countries}
    kinds = {"Province": "province", "State": "state", "Region": "region", "County": "county"}
    counts: dict[str, int] = {}
    for s in pycountry.subdivisions:
        counts[normalize(s.name)] = counts.get(normalize(s.name), 0) + 1
    pool = []
    for s in pycountry.subdivisions:
        names = by_iso2.get(s.country_code)
        if s.type not in kinds or s.parent_code or not names or counts[normalize(s.name)] > 1:
            continue
        if any(normalize(x) in normalize(s.name) for x in names) or not re.fullmatch(r"[\w' .-]+", s.name):
            continue
        pool.append(s)
    pool.sort(key=lambda s: s.code)
    out = []
    for s in rng.sample(pool, min(n, len(pool))):
        q = _q("subdivision", f"subdivision:{s.code}", "subdivision", rng, e=s.name, t=kinds[s.type])
        country = pycountry.countries.get(alpha_2=s.country_code)
        assert country is not None  # every subdivision's country is in pycountry
        iso3 = country.alpha_3
        q.answers = list(dict.fromkeys(by_iso2[s.country_code] + extra.get(iso3, [])))
        out.append(q)
    return out


# ------------------------------------------------------------------------------------------------ runner

def token_entropy(top_logprobs: list[float]) -> float:
    """Entropy (nats) of the next-token distribution from its top-k log-probabilities; the mass outside the
    top k is lumped into one bucket, so this is a lower bound that is tight when the top k hold most mass."""
    probs = [min(1.0, math.exp(lp)) for lp in top_logprobs]
    rest = max(0.0, 1.0 - sum(probs))
    return -sum(p * lp for p, lp in zip(probs, top_logprobs, strict=True) if p > 0) - (
        rest * math.log(rest) if rest > 0 else 0.0)


def reply_to_record(question: Question, reply, eos_ids: set[int]) -> dict:
    """One JSONL record from a GenerateResponse. Per response token: id, logprob, top-20 entropy and the
    top-k SAE codes per layer (codes of the position that predicted the token). Token 0's codes are those of
    the last prompt position, which is what "last_prompt" pooling reads."""
    tokens = [t for t in reply.tokens if t.token_id not in eos_ids]  # the server scores the text's tokens only
    features: dict[str, dict] = {}
    for t in tokens:
        for lf in t.features:
            entry = features.setdefault(str(lf.layer), {"sae_id": lf.sae_id, "idx": [], "val": []})
            entry["idx"].append([a.feature_id for a in lf.activations])
            entry["val"].append([round(a.activation, 4) for a in lf.activations])
    response = reply.text
    record = question.to_dict() | grade(question, response)
    record |= {
        "response": response, "split": entity_split(question.entity),
        "prompt_tokens": reply.usage.prompt_tokens, "token_ids": [t.token_id for t in tokens],
        "logprobs": [round(t.logprob, 5) for t in tokens],
        "entropies": [round(token_entropy([a.logprob for a in t.top_logprobs]), 5) for t in tokens],
        "features": features,
    }
    return record


async def _serve_map(items: list, out_path: str, sae_specs: list[str], concurrency: int, desc: str,
                     ask, model: str = "default") -> int:
    """Starts a real in-process featurelens server with the SAEs, runs `ask(client, running, item) -> record`
    over the items `concurrency` at a time and appends each record to `out_path` as it comes."""
    import asyncio
    import json
    from pathlib import Path

    from featurelens.client import AsyncClient
    from featurelens.server.app import start_server
    from featurelens.server.config import Settings
    from tqdm import tqdm

    if not items:
        return 0
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    settings = Settings(port=0, metrics_port=-1, max_num_seqs=concurrency, max_in_flight=10000, sae=sae_specs,
                        model=model)
    config = Path(model) / "config.json"
    if config.is_file():  # a model folder: no longer a context than the model has (GPT-2: 1024)
        hf = json.loads(config.read_text())
        positions = hf.get("max_position_embeddings") or hf.get("n_positions")
        if positions and int(positions) < settings.max_model_len:
            settings = settings.model_copy(update={"max_model_len": int(positions)})
    running = await start_server(settings)
    queue: asyncio.Queue = asyncio.Queue()
    for item in items:
        queue.put_nowait(item)
    bar = tqdm(total=len(items), desc=desc, unit="q")
    try:
        with open(out_path, "a") as sink:
            async with AsyncClient(f"127.0.0.1:{running.port}", timeout_s=900) as client:
                async def worker() -> None:
                    while not queue.empty():
                        record = await ask(client, running, queue.get_nowait())
                        if record is not None:
                            sink.write(json.dumps(record) + "\n")
                            sink.flush()
                        bar.update(1)

                await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        bar.close()
        await running.stop(grace_s=1)
    return len(items)


def _done_ids(out_path: str) -> set[str]:
    import json
    from pathlib import Path

    path = Path(out_path)
    if not path.exists():
        return set()
    return {json.loads(line)["qid"] for line in path.read_text().splitlines() if line.strip()}


def _selections(sae_specs: list[str], top_k: int):
    from featurelens.client import pb

    layers = sorted(int(spec.split("=", 1)[0]) for spec in sae_specs)
    return [pb.FeatureSelection(layer=layer, top_k=top_k) for layer in layers]


MODES = ("dense", "quantized")


async def run_questions(questions: list[Question], out_path: str, sae_specs: list[str], *, top_k: int = 32,
                        max_new_tokens: int = 24, concurrency: int = 32, limit: int | None = None,
                        mode: str = "dense", model: str = "default") -> int:
    """Asks every question not yet in `out_path` through a real in-process featurelens server and appends one
    record per answer (resumable: rerun after an interruption and it picks up where it stopped). `mode`
    "quantized" asks the int8 model (INFERENCE_MODE_QUANTIZED): its answers, logprobs and SAE features."""
    from featurelens.client import pb

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    request_mode = pb.INFERENCE_MODE_QUANTIZED if mode == "quantized" else pb.INFERENCE_MODE_DENSE

    done = _done_ids(out_path)
    todo = [q for q in questions if q.qid not in done][: None if limit is None else max(0, limit - len(done))]
    interp = pb.InterpretabilityOptions(features=_selections(sae_specs, top_k))

    async def ask(client, running, q: Question) -> dict:
        req = pb.GenerateRequest(
            chat=pb.ChatMessages(messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content=q.prompt)]),
            sampling=pb.SamplingOptions(temperature=0),
            # One line holds the answer; the rambling after it costs CPU and adds label noise.
            stopping=pb.StoppingOptions(max_new_tokens=max_new_tokens, stop_sequences=["\n"]),
            logprobs=pb.LogprobOptions(token_logprobs=True, top_logprobs=20), interpretability=interp,
            mode=request_mode)
        reply = await client.stub.Generate(req)
        record = reply_to_record(q, reply, set(running.engine.shape.eos_token_ids))
        record["max_new_tokens"] = max_new_tokens  # a response this long was cut off: see label_is_certain
        record["mode"] = mode
        record["model"] = model_name(model)
        return record

    return await _serve_map(todo, out_path, sae_specs, concurrency, "risk data", ask, model=model)


async def featurize(records: list[dict], out_path: str, sae_specs: list[str], *, top_k: int = 32,
                    concurrency: int = 32, model: str = "default") -> int:
    """Re-captures the features of existing answers with other SAEs by teacher forcing (GetFeatureActivations
    over prompt + response, as ScoreHallucination does): a causal model's residual at a position depends only
    on the tokens before it, so this equals the generation-time capture without paying for generation."""
    from featurelens.client import pb

    done = _done_ids(out_path)
    selections = _selections(sae_specs, top_k)

    async def ask(client, running, rec: dict) -> dict | None:
        engine = running.engine
        messages = [{"role": "user", "content": rec["prompt"]}]
        prompt_ids = engine.encode_chat(messages)
        prompt_text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not rec["response"].strip():
            return None
        reply = await client.stub.GetFeatureActivations(
            pb.GetFeatureActivationsRequest(text=prompt_text + rec["response"], features=selections))
        ids = [t.token_id for t in reply.tokens]
        n = len(prompt_ids)
        if ids[:n] != prompt_ids or len(ids) <= n:
            return None  # the joined text tokenised differently at the seam; rare, skipped and counted
        features: dict[str, dict] = {}
        for t in reply.tokens[n - 1:-1]:  # positions that predicted the response tokens
            for lf in t.features:
                entry = features.setdefault(str(lf.layer), {"sae_id": lf.sae_id, "idx": [], "val": []})
                entry["idx"].append([a.feature_id for a in lf.activations])
                entry["val"].append([round(a.activation, 4) for a in lf.activations])
        return rec | {"features": features, "teacher_forced_ids": ids[n:]}

    return await _serve_map([r for r in records if r["qid"] not in done], out_path, sae_specs, concurrency,
                            "featurize", ask, model=model)


def model_name(model: str) -> str:
    """The name records and probes carry for `--model`: the default model's, or the model folder's name."""
    from pathlib import Path

    from featurelens.server.model_assets import MODEL_NAME

    return MODEL_NAME if model.lower() in ("default", "smollm2", "") else Path(model).name or model
