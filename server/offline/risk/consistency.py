"""The sampling-consistency reference (issue 29, item 5): ask the same question k more times with sampling and
measure how often the samples agree with the greedy answer. A model that knows the answer tends to repeat
it; one that makes it up tends to say something different each time. Offline only: it costs k extra
generations per answer, which is why it is a reference for the probe, not a serving signal.

Agreement is measured without the right answer (that would leak the label): two first lines agree when they
state the same number (when the greedy one states one), else by the overlap (Jaccard) of their content words
after `data.normalize`, leaving out the question's own words (an answer that repeats the question does not
agree more for it). A refusal agrees only with a refusal. The score is 1 − the mean agreement over the
samples, so higher means "more likely made up", as every other score here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

# Words that carry no claim: left out before the overlap, so "The capital of France is Paris." and
# "Paris is the capital." agree.
_STOP = frozenset("""a an the is are was were be been being of in on at to for from by with and or as it its this
that these those there here which who what when where how i you he she they we me my your his her their our
do does did has have had not no yes so than then also called known named answer""".split())


def content_words(text: str) -> frozenset[str]:
    from featurelens.server.offline.risk.data import normalize

    return frozenset(w for w in normalize(text).split() if w not in _STOP)


def agreement(greedy: str, sample: str, question: str = "") -> float:
    """How far a sampled first line agrees with the greedy one, in [0, 1]."""
    from featurelens.server.offline.risk.data import is_refusal
    from featurelens.server.offline.risk.grading import numbers

    refused = is_refusal(greedy), is_refusal(sample)
    if any(refused):
        return 1.0 if all(refused) else 0.0
    first = numbers(greedy)
    if first:
        other = numbers(sample)
        return 1.0 if other and abs(other[0] - first[0]) < 1e-9 else 0.0
    asked = content_words(question)
    a, b = content_words(greedy) - asked, content_words(sample) - asked
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def consistency_score(greedy: str, samples: Sequence[str], question: str = "") -> float:
    """1 − mean agreement of the samples with the greedy answer (0: all agree; 1: none does)."""
    if not samples:
        raise ValueError("consistency needs at least one sample")
    return 1.0 - sum(agreement(greedy, s, question) for s in samples) / len(samples)


def first_line(text: str) -> str:
    return re.split(r"\n", text, maxsplit=1)[0]


def pick(records: Sequence[dict], per_family: int) -> list[dict]:
    """Up to `per_family` records of each family, in a fixed order (by question id), for a reference that
    covers every family at a bounded cost."""
    by: dict[str, list[dict]] = {}
    for r in sorted(records, key=lambda r: r["qid"]):
        by.setdefault(r["domain"], []).append(r)
    return [r for rows in by.values() for r in rows[:per_family]]


async def run_consistency(records: Sequence[dict], out_path: str, *, k: int = 5, temperature: float = 1.0,
                          seed: int = 0, max_new_tokens: int = 32, concurrency: int = 32,
                          model: str = "default") -> int:
    """Asks each record's question again with `k` samples (one request, num_samples = k, the server seeds
    sample i with seed + i) through a real in-process server, and appends {"qid", "samples", "consistency"}
    per record to `out_path` (resumable)."""
    from featurelens.client import pb
    from featurelens.server.offline.risk.data import _done_ids, _serve_map

    done = _done_ids(out_path)

    async def ask(client: Any, running: Any, rec: dict) -> dict:
        req = pb.GenerateRequest(
            chat=pb.ChatMessages(messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content=rec["prompt"])]),
            sampling=pb.SamplingOptions(temperature=temperature, seed=seed, num_samples=k),
            stopping=pb.StoppingOptions(max_new_tokens=max_new_tokens, stop_sequences=["\n"]))
        reply = await client.stub.Generate(req)
        samples = [first_line(s.text) for s in reply.samples] if len(reply.samples) else [first_line(reply.text)]
        return {"qid": rec["qid"], "domain": rec["domain"], "k": k, "temperature": temperature,
                "samples": samples, "consistency": round(consistency_score(rec["response"], samples, rec["prompt"]), 4)}

    todo = [r for r in records if r["qid"] not in done]
    return await _serve_map(todo, out_path, [], concurrency, "consistency", ask, model=model)
