"""The risk-probe pipeline for a model other than the default: `risk build-data --model PATH --sae L=DIR` on a tiny
random-weight Qwen3 checkpoint (tests/tiny_models.py) asks a few bank questions through a real in-process
featurelens server serving it (one engine start: no shared fixture serves this model), then `risk train` fits a
probe that server/interp/risk_probe loads and scores.

A random-weight model knows nothing, so the graded labels carry no signal; the test replaces them with one its SAE
features can show (whether the answer's mean activation of the most frequent feature is above the median), so the
probe's fit, selection and calibration run on real served features. ~1 min on the 2-core dev box, most of it the
engine start."""

from __future__ import annotations

import json
import statistics
from collections import Counter

import tiny_models
from conftest import build_toy_sae

LAYER = 1
N = 40


async def test_risk_build_data_and_train_on_a_non_default_model(tmp_path):
    from featurelens.server.interp.risk_probe import load_probe, running_risks
    from featurelens.server.offline.risk import cli
    from featurelens.server.offline.risk.data import run_questions
    from featurelens.server.offline.risk.families import build_bank

    path = tiny_models.build("qwen3", tmp_path / "tiny-qwen3", seed=3)
    sae = tmp_path / "tiny-qwen3-sae"
    build_toy_sae(sae, LAYER, seed=7, d_in=tiny_models.HIDDEN)
    data = tmp_path / "answers.jsonl"
    questions = build_bank(seed=0)[:N]  # shuffled: any prefix mixes families
    await run_questions(questions, str(data), [f"{LAYER}={sae}"], top_k=8, max_new_tokens=6, concurrency=8,
                        model=str(path))

    records = [json.loads(line) for line in data.read_text().splitlines()]
    assert len(records) == N
    for r in records:
        assert r["model"] == "tiny-qwen3" and 1 <= len(r["token_ids"]) <= 6
        entry = r["features"][str(LAYER)]
        assert entry["sae_id"] == sae.name and len(entry["idx"]) == len(r["token_ids"])
        assert all(len(row) == 8 and max(row) < 512 for row in entry["idx"])

    top = Counter(f for r in records for row in r["features"][str(LAYER)]["idx"] for f in row).most_common(1)[0][0]

    def signal(r: dict) -> float:
        entry = r["features"][str(LAYER)]
        return sum(v for idx, val in zip(entry["idx"], entry["val"], strict=True)
                   for f, v in zip(idx, val, strict=True) if f == top) / len(entry["idx"])

    cut = statistics.median(signal(r) for r in records)
    for i, r in enumerate(records):
        r.update(label=int(signal(r) > cut), fictional=True, verdict="graded in the test",
                 split="train" if i % 3 else "val")
    data.write_text("".join(json.dumps(r) + "\n" for r in records))

    out = tmp_path / "probe.json"
    assert cli.main(["train", "--data", str(data), "--probe-id", "tiny-risk", "--out", str(out)]) == 0
    probe = load_probe(out)
    assert probe.model == "tiny-qwen3" and probe.features
    assert {(f.layer, f.sae_id) for f in probe.features} == {(LAYER, sae.name)}
    assert probe.metrics["val_auroc"] > 0.7
    # the server's streaming score of each answer's served codes agrees with the offline fit's logits
    from featurelens.server.offline.risk.train import calibrated, probe_logits

    offline = calibrated(probe, probe_logits(probe, records))
    for r, expected in zip(records, offline, strict=True):
        entry = r["features"][str(LAYER)]
        tokens = [{LAYER: list(zip(idx, val, strict=True))} for idx, val in zip(entry["idx"], entry["val"],
                                                                              strict=True)]
        assert abs(running_risks(probe, tokens)[-1] - float(expected)) < 1e-6
