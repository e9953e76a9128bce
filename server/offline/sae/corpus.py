"""Offline, seeded corpus for SAE training: package documentation, fact sentences and chat transcripts.

Nothing here touches the network. Three sources, mixed because the SAEs must see what the server sees:
- docs:  docstrings and README/METADATA text shipped in the installed Python packages (prose + code);
- facts: template sentences over `pycountry` and `periodictable` (entities, codes, numbers: the material
         hallucination-risk probes care about);
- chat:  instructions rendered with the model's own chat template, answered by the model itself (vLLM),
         so the chat-structure tokens and the model's own style are in the training distribution.

Output: `<out>/train.jsonl` and `<out>/heldout.jsonl` (one `{"source", "text"}` per line; chat text already
has the template applied) plus `<out>/manifest.json` with document/character/token counts per source.
The same seed, packages and model give the same corpus.
"""

from __future__ import annotations

import ast
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HELDOUT_FRACTION = 0.02
DOC_CHUNK_CHARS = 2400  # ~600 tokens: packed so that contexts reach the lengths the server sees


# ---------------------------------------------------------------------------------------------------------
# Documentation text from site-packages


def _site_packages() -> list[Path]:
    return sorted({Path(p) for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()})


def _docstrings(source: str) -> Iterator[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 120:  # one-liners are mostly noise like "Return x."
                yield doc


def _metadata_description(text: str) -> str:
    # METADATA is RFC-822 headers, a blank line, then the package's long description (usually its README).
    _, _, body = text.partition("\n\n")
    return body


def iter_doc_texts(rng: random.Random, max_files: int = 6000) -> Iterator[str]:
    """Docstrings of a seeded sample of .py files plus every README-like file, in a seeded order."""
    py_files: list[Path] = []
    prose: list[Path] = []
    for root in _site_packages():
        for path in sorted(root.rglob("*")):
            name = path.name
            if "test" in path.parts[-2].lower() or not path.is_file():
                continue
            if name.endswith(".py"):
                py_files.append(path)
            elif name.endswith((".md", ".rst")) or name == "METADATA":
                prose.append(path)
    rng.shuffle(py_files)
    files = prose + py_files[:max_files]
    rng.shuffle(files)
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if path.name.endswith(".py"):
            yield from _docstrings(text)
        else:
            body = _metadata_description(text) if path.name == "METADATA" else text
            if len(body) >= 200:
                yield body


def pack_texts(texts: Iterator[str], chunk_chars: int, budget_chars: int) -> list[str]:
    """Concatenate short texts (blank-line separated) into ~chunk_chars documents; split long ones."""
    docs: list[str] = []
    current: list[str] = []
    size = total = 0
    for text in texts:
        text = text.strip()
        for start in range(0, len(text), chunk_chars):
            piece = text[start:start + chunk_chars]
            current.append(piece)
            size += len(piece) + 2
            if size >= chunk_chars:
                docs.append("\n\n".join(current))
                total += size
                current, size = [], 0
        if total >= budget_chars:
            break
    if current:
        docs.append("\n\n".join(current))
    return docs


# ---------------------------------------------------------------------------------------------------------
# Fact sentences


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def fact_sentences(rng: random.Random) -> list[str]:
    import periodictable
    import pycountry

    facts: list[str] = []
    for c in pycountry.countries:
        official = getattr(c, "official_name", None)
        facts.append(rng.choice([
            f"{c.name} has the ISO 3166 two-letter code {c.alpha_2} and the three-letter code {c.alpha_3}.",
            f"The ISO country code of {c.name} is {c.alpha_2}.",
            f"{c.alpha_3} is the three-letter ISO code for {c.name}.",
        ]))
        facts.append(f"The numeric ISO 3166 code of {c.name} is {c.numeric}.")
        if official:
            facts.append(rng.choice([f"The official name of {c.name} is the {official}.",
                                     f"{c.name}, officially the {official}, is a country."]))
    countries = {c.alpha_2: c.name for c in pycountry.countries}
    for s in pycountry.subdivisions:
        country = countries.get(s.country_code)
        if country:
            facts.append(rng.choice([f"{s.name} is {_article(s.type)} {s.type.lower()} of {country}.",
                                     f"The {s.type.lower()} of {s.name} lies in {country}.",
                                     f"{s.name} ({s.code}) is one of the subdivisions of {country}."]))
    for cur in pycountry.currencies:
        facts.append(f"The currency code of the {cur.name} is {cur.alpha_3}, and its numeric code is "
                     f"{cur.numeric}.")
    languages = [lang for lang in pycountry.languages if hasattr(lang, "alpha_2")]  # the widely used ones
    for lang in languages:
        facts.append(f"The ISO 639 code of the {lang.name} language is {lang.alpha_2} ({lang.alpha_3}).")
    for el in periodictable.elements:
        if el.number == 0:
            continue
        facts.append(rng.choice([
            f"{el.name.capitalize()} is a chemical element with the symbol {el.symbol} and atomic number "
            f"{el.number}.",
            f"The element with atomic number {el.number} is {el.name}, symbol {el.symbol}.",
            f"The chemical symbol of {el.name} is {el.symbol}.",
        ]))
        facts.append(f"The standard atomic mass of {el.name} is about {el.mass:.3f}.")
        if el.density:
            facts.append(f"{el.name.capitalize()} has a density of {el.density} grams per cubic centimetre.")
    rng.shuffle(facts)
    return facts


def fact_paragraphs(rng: random.Random) -> list[str]:
    facts = fact_sentences(rng)
    paragraphs, i = [], 0
    while i < len(facts):
        n = rng.randint(6, 14)
        paragraphs.append(" ".join(facts[i:i + n]))
        i += n
    return paragraphs


# ---------------------------------------------------------------------------------------------------------
# Instructions for chat transcripts

_TOPICS = (
    "photosynthesis", "the French Revolution", "black holes", "machine learning", "the water cycle",
    "climate change", "the Roman Empire", "vaccines", "the stock market", "volcanoes", "democracy",
    "the human heart", "electric cars", "the Internet", "gravity", "coffee", "the Moon", "honeybees",
    "the printing press", "recycling", "the Great Wall of China", "DNA", "renewable energy", "chess",
    "the Olympic Games", "sleep", "inflation", "the Amazon rainforest", "jazz music", "earthquakes",
    "the immune system", "solar panels", "ancient Egypt", "quantum computing", "the piano", "bread baking",
    "the Renaissance", "tides", "antibiotics", "friendship", "time management", "the color blue",
    "Python programming", "databases", "encryption", "rainbows", "the Silk Road", "dinosaurs", "tea",
    "the Eiffel Tower", "glaciers", "Shakespeare", "bicycles", "the periodic table", "rockets",
)
_TASKS = (
    "Explain {t} in two sentences.", "Give me three facts about {t}.", "Write a short poem about {t}.",
    "What is the most important thing to know about {t}?", "Summarize the history of {t} briefly.",
    "Explain {t} to a ten-year-old.", "List some common misconceptions about {t}.",
    "Write a haiku about {t}.", "Why is {t} important?", "Tell me a fun fact about {t}.",
)
_CODE_TASKS = (
    "Write a Python function that reverses a string.", "How do I read a file line by line in Python?",
    "Write a Python function that checks whether a number is prime.", "What is a list comprehension?",
    "Explain the difference between a list and a tuple in Python.", "Write a SQL query that counts rows.",
    "How do I sort a dictionary by value in Python?", "What does the `yield` keyword do in Python?",
    "Write a JavaScript function that adds two numbers.", "What is recursion? Give a short example.",
)
_SYSTEMS = (None, None, "You are a helpful assistant.", "You are a concise assistant. Answer briefly.",
            "You are a friendly tutor.")


def make_instructions(rng: random.Random, n: int) -> list[tuple[str | None, str]]:
    """(system prompt or None, user message) pairs: general topics, code, arithmetic and entity facts."""
    import periodictable
    import pycountry

    countries = [c.name for c in pycountry.countries]
    elements = [el.name for el in periodictable.elements if el.number > 0]
    out: list[tuple[str | None, str]] = []
    for _ in range(n):
        r = rng.random()
        if r < 0.45:
            msg = rng.choice(_TASKS).format(t=rng.choice(_TOPICS))
        elif r < 0.55:
            msg = rng.choice(_CODE_TASKS)
        elif r < 0.65:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            msg = rng.choice([f"What is {a} times {b}?", f"What is {a} plus {b}?", f"Is {a * b + 1} prime?"])
        elif r < 0.85:
            c = rng.choice(countries)
            msg = rng.choice([f"What is the capital of {c}?", f"What language is spoken in {c}?",
                              f"Tell me about {c}.", f"What is the population of {c}?",
                              f"Which continent is {c} in?", f"What currency does {c} use?"])
        else:
            e = rng.choice(elements)
            msg = rng.choice([f"What is the atomic number of {e}?", f"What is {e} used for?",
                              f"What is the chemical symbol for {e}?", f"Is {e} a metal?"])
        out.append((rng.choice(_SYSTEMS), msg))
    return out


def fact_chats(rng: random.Random, n: int) -> list[tuple[str | None, str, str]]:
    """Entity questions with their true answers (chat structure at no generation cost)."""
    import periodictable
    import pycountry

    countries = list(pycountry.countries)
    elements = [el for el in periodictable.elements if el.number > 0]
    out: list[tuple[str | None, str, str]] = []
    for _ in range(n):
        if rng.random() < 0.5:
            c = rng.choice(countries)
            q, a = rng.choice([
                (f"What is the ISO country code of {c.name}?", f"The ISO 3166 alpha-2 code of {c.name} is {c.alpha_2}."),
                (f"Which country has the ISO code {c.alpha_3}?", f"{c.alpha_3} is the ISO code of {c.name}."),
                (f"What is the numeric ISO code of {c.name}?", f"The numeric code of {c.name} is {c.numeric}."),
            ])
        else:
            e = rng.choice(elements)
            q, a = rng.choice([
                (f"What is the atomic number of {e.name}?", f"{e.name.capitalize()} has atomic number {e.number}."),
                (f"Which element has the symbol {e.symbol}?", f"{e.symbol} is the symbol of {e.name}."),
                (f"What is the atomic mass of {e.name}?", f"The atomic mass of {e.name} is about {e.mass:.2f}."),
            ])
        out.append((rng.choice(_SYSTEMS), q, a))
    return out


def chat_messages(system: str | None, user: str, answer: str | None = None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": user})
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def templated(tok: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """The chat as text in the model's template (transformers types the result as str or token ids)."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert isinstance(text, str)  # tokenize=False
    return text


def generate_chats(model_path: str, instructions: list[tuple[str | None, str]], max_tokens: int,
                   seed: int) -> list[str]:
    """Answer each instruction with the model itself; return the full templated transcripts."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    tok = AutoTokenizer.from_pretrained(model_path)
    prompts = [templated(tok, chat_messages(s, u), add_generation_prompt=True) for s, u in instructions]
    llm = LLM(model=model_path, enforce_eager=True, dtype="bfloat16", max_model_len=2048, seed=seed)
    # No per-request seed: vLLM-CPU cannot offset its generator; LLM(seed=) seeds the whole run instead.
    params = SamplingParams(temperature=0.7, top_p=0.9, max_tokens=max_tokens)
    outputs = llm.generate(prompts, params)
    chats = []
    for (system, user), out in zip(instructions, outputs, strict=True):
        answer = out.outputs[0].text.strip()
        chats.append(templated(tok, chat_messages(system, user, answer)))
    return chats


# ---------------------------------------------------------------------------------------------------------
# Assembly


def build_corpus(out_dir: str | Path, model_path: str, seed: int = 0, doc_chars: int = 6_000_000,
                 n_chats: int = 1500, chat_max_tokens: int = 200, n_fact_chats: int = 1500) -> dict[str, Any]:
    from transformers import AutoTokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records: list[dict[str, str]] = []
    records += [{"source": "docs", "text": t}
                for t in pack_texts(iter_doc_texts(random.Random(seed + 1)), DOC_CHUNK_CHARS, doc_chars)]
    records += [{"source": "facts", "text": t} for t in fact_paragraphs(random.Random(seed + 2))]
    chats = generate_chats(model_path, make_instructions(random.Random(seed + 3), n_chats), chat_max_tokens,
                           seed) if n_chats else []
    records += [{"source": "chat", "text": t} for t in chats]
    tok = AutoTokenizer.from_pretrained(model_path)
    records += [{"source": "fact_chat", "text": templated(tok, chat_messages(s, q, a))}
                for s, q, a in fact_chats(random.Random(seed + 4), n_fact_chats)]
    rng.shuffle(records)
    n_held = max(1, int(len(records) * HELDOUT_FRACTION))
    splits = {"heldout": records[:n_held], "train": records[n_held:]}
    manifest: dict[str, Any] = {"seed": seed, "model": model_path, "splits": {}}
    for name, recs in splits.items():
        with open(out / f"{name}.jsonl", "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
        stats: dict[str, dict[str, int]] = {}
        for r in recs:
            s = stats.setdefault(r["source"], {"documents": 0, "chars": 0, "tokens": 0})
            s["documents"] += 1
            s["chars"] += len(r["text"])
            s["tokens"] += len(tok(r["text"], add_special_tokens=False)["input_ids"])
        manifest["splits"][name] = stats
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def read_corpus(path: str | Path) -> list[dict[str, str]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
