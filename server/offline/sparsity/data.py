"""The token sequences WINA calibration and its quality checks run on: corpus documents and chat continuations.

A sequence is (token ids [1, L], first position that counts). A sparse request masks its *generated* tokens (its
prompt runs dense by default), so the served thresholds are calibrated on what the model generates: its greedy
continuations of chat prompts, scored at the generated positions only. Thresholds calibrated on documents
instead undershoot on that traffic: a document-calibrated "40%" table zeroed about 34% of the projection weight
bytes on chat continuations (docs/measurements/). Documents stay for held-out perplexity and a second held-out sparsity report.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from featurelens.server.offline.sae import corpus

MAX_TOKENS = 128  # per document: positional variety at a cost a shared 2-core box can pay (~1 s/forward)
Sequence = tuple[torch.Tensor, int]  # (token ids [1, L], first position that counts)


def corpus_texts(seed: int, n_texts: int, heldout_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """(calibration, held-out) documents, ~70% docs prose/code and ~30% entity facts, disjoint by document."""
    rng = random.Random(seed)
    n_facts = n_texts * 3 // 10
    docs = corpus.pack_texts(corpus.iter_doc_texts(rng, max_files=1500), 1200, 1200 * (n_texts - n_facts))
    facts = corpus.fact_paragraphs(rng)
    rng.shuffle(facts)
    texts = docs[: n_texts - n_facts] + facts[:n_facts]
    rng.shuffle(texts)
    n_held = int(len(texts) * heldout_fraction)
    return texts[n_held:], texts[:n_held]


def document_ids(tok: Any, text: str) -> torch.Tensor:
    return tok(text, return_tensors="pt", truncation=True, max_length=MAX_TOKENS).input_ids


def documents(tok: Any, texts: list[str]) -> list[Sequence]:
    """Every position of every document counts."""
    return [(document_ids(tok, text), 0) for text in texts]


def chat_prompts(tok: Any, n: int, seed: int) -> list[torch.Tensor]:
    pairs = corpus.make_instructions(random.Random(seed), n)
    return [tok.apply_chat_template(corpus.chat_messages(s, u), add_generation_prompt=True, return_tensors="pt",
                                    return_dict=True)["input_ids"] for s, u in pairs]


def fresh_chat_prompts(tok: Any, n: int, seed: int, seen: set[tuple[int, ...]]) -> list[torch.Tensor]:
    """`n` chat prompts drawn with `seed`, none equal to a prompt in `seen` (which then holds them too): keeps
    calibration, held-out and evaluation prompts apart (the instruction templates repeat across seeds)."""
    out: list[torch.Tensor] = []
    for draw in (2, 4, 8):
        for prompt in chat_prompts(tok, draw * n, seed):
            key = tuple(prompt[0].tolist())
            if len(out) < n and key not in seen:
                seen.add(key)
                out.append(prompt)
        if len(out) == n:
            return out
    raise ValueError(f"only {len(out)} distinct chat prompts for seed {seed}, {n} asked")


@torch.inference_mode()
def dense_continuations(model: Any, prompts: list[torch.Tensor], new_tokens: int) -> list[torch.Tensor]:
    """Greedy continuations one prompt at a time: the references quality is measured against."""
    return [model.generate(p, max_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(p))
            for p in prompts]


@torch.inference_mode()
def chat_continuations(model: Any, tok: Any, prompts: list[torch.Tensor], new_tokens: int,
                       batch: int = 16) -> list[Sequence]:
    """(prompt + greedy continuation cut after its first EOS, prompt length) per prompt, generated in left-padded
    batches: ~9x faster than one at a time on a CPU. Batched rounding may break a near-tie differently from
    `dense_continuations`; as calibration text that does not matter, so the references stay unbatched."""
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    out: list[Sequence] = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        width = max(p.shape[1] for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, prompt in enumerate(chunk):
            ids[row, width - prompt.shape[1]:] = prompt[0]
            mask[row, width - prompt.shape[1]:] = 1
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=pad)
        for row, prompt in enumerate(chunk):
            tail = generated[row, width:].tolist()
            if eos in tail:
                tail = tail[:tail.index(eos) + 1]
            out.append((torch.cat([prompt[0], torch.tensor(tail, dtype=torch.long)])[None], prompt.shape[1]))
    return out
