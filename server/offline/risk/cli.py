"""`featurelens risk ...`: build the labelled data, train the probe, evaluate it.

    featurelens risk build-data --out WORK/risk/answers.jsonl                 # default: the shipped SAEs
    featurelens risk featurize  --data WORK/risk/answers.jsonl --out WORK/risk/answers-new.jsonl --sae 12=DIR
    featurelens risk train      --data WORK/risk/answers.jsonl --probe-id smollm2-risk-v2
    featurelens risk eval       --data WORK/risk/answers.jsonl --probe server/assets/probes/smollm2-risk-v2.json \
                                --out WORK/risk/eval

build-data asks the served model (a real in-process featurelens server, so features come through the serving
path); featurize re-captures features for existing answers by teacher forcing (for new SAEs without paying
for generation again). vLLM spawns worker processes, so callers keep `main()` behind a __main__ guard.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from featurelens.server.paths import ASSETS_DIR

if TYPE_CHECKING:
    from featurelens.server.interp.risk_probe import Probe

ASSETS = ASSETS_DIR


def shipped_saes() -> list[str]:
    """'LAYER=PATH' for every SAE folder under server/assets/saes (the layer comes from its cfg.json)."""
    from featurelens.server.interp.registry import parse_sae_arg

    root = ASSETS / "saes"
    folders = sorted(p for p in root.iterdir() if (p / "cfg.json").is_file()) if root.is_dir() else []
    return [f"{parse_sae_arg(str(p)).layer}={p}" for p in folders]


def _read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _cmd_build(args: argparse.Namespace) -> int:
    from featurelens.server.offline.risk.data import build_questions, run_questions

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.model != "default" and not args.sae:
        print("--model needs --sae LAYER=PATH: the shipped SAEs are the default model's", file=sys.stderr)
        return 2
    saes = args.sae or shipped_saes()
    if not saes:
        print("no SAEs: pass --sae LAYER=PATH or ship some under server/assets/saes/", file=sys.stderr)
        return 2
    from featurelens.server.offline.risk.data import entity_split

    if args.bank == "families":
        from featurelens.server.offline.risk.families import build_bank

        questions = build_bank(seed=args.seed, n_real=args.n_real, n_fake=args.n_fake, families=args.families)
    else:  # the six-domain bank the v2 probe was trained on
        questions = build_questions(seed=args.seed)
    if args.split != "all":
        questions = [q for q in questions if entity_split(q.entity) == args.split]
    print(f"{len(questions)} questions ({args.split}); mode {args.mode}; SAEs {saes}", file=sys.stderr)
    asyncio.run(run_questions(questions, args.out, saes, top_k=args.top_k, max_new_tokens=args.max_new_tokens,
                              concurrency=args.concurrency, limit=args.limit, mode=args.mode,
                              model=args.model))
    _summary(_read(args.out))
    return 0


def _cmd_featurize(args: argparse.Namespace) -> int:
    from featurelens.server.offline.risk.data import featurize

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.model != "default" and not args.sae:
        print("--model needs --sae LAYER=PATH: the shipped SAEs are the default model's", file=sys.stderr)
        return 2
    saes = args.sae or shipped_saes()
    n = asyncio.run(featurize(_read(args.data), args.out, saes, top_k=args.top_k, concurrency=args.concurrency,
                              model=args.model))
    print(json.dumps({"featurized": n, "out": args.out}))
    return 0


def _summary(records: list[dict]) -> None:
    from collections import Counter

    by = Counter((r["domain"], r["fictional"], r["verdict"]) for r in records)
    print(json.dumps({"n": len(records), "positive_rate": round(sum(r["label"] for r in records) / max(1, len(records)), 3),
                      "by_domain": {" ".join(map(str, k)): v for k, v in sorted(by.items())}}, indent=1))


def _cmd_train(args: argparse.Namespace) -> int:
    from featurelens.server.interp.risk_probe import save_probe
    from featurelens.server.offline.risk.train import train_probe, usable

    records = usable(_read(args.data))
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    print(f"train {len(train)}, val {len(val)} (test held out for eval)", file=sys.stderr)
    probe, table = train_probe(train, val, args.probe_id, penalty=args.penalty, selection=args.selection,
                               log=lambda m: print(m, file=sys.stderr))
    probe.metrics["selection"] = table
    _record_model(probe, records)
    probe.metrics["feature_top_k"] = len(train[0]["features"][next(iter(train[0]["features"]))]["idx"][0])
    out = Path(args.out or ASSETS / "probes" / f"{args.probe_id}.json")
    save_probe(probe, out)
    print(json.dumps({"probe": str(out), "features": len(probe.features), "pooling": probe.pooling,
                      "input_transform": probe.input_transform, "layers": sorted({f.layer for f in probe.features}),
                      "val_auroc": probe.metrics["val_auroc"], "calibration": probe.calibration,
                      "thresholds": probe.thresholds}, indent=1))
    return 0


def _record_model(probe: Probe, records: list[dict]) -> None:
    """The probe names the model its records were answered by (build-data writes it; older records: SmolLM2)."""
    names = {str(r["model"]) for r in records if r.get("model")}
    if len(names) > 1:
        raise SystemExit(f"the records come from several models: {sorted(names)}")
    if names:
        probe.model = names.pop()


def _sae_dirs(specs: list[str] | None) -> dict[int, str]:
    return {int(spec.split("=", 1)[0]): spec.split("=", 1)[1] for spec in specs or shipped_saes()}


def _d_sae(saes: dict[int, str]) -> dict[int, int]:
    return {layer: int(json.loads((Path(path) / "cfg.json").read_text())["d_sae"]) for layer, path in saes.items()}


def _load_residual_bases(saes: dict[int, str]) -> None:
    """generalize.RESIDUAL_BASES from the SAE files, for "residual" probes."""
    import numpy as np
    from featurelens.server.offline.risk import generalize
    from safetensors.numpy import load_file

    for layer, path in saes.items():
        generalize.RESIDUAL_BASES[layer] = load_file(str(Path(path) / "sae_weights.safetensors"))["W_dec"].astype(
            np.float64)


def _cmd_select(args: argparse.Namespace) -> int:
    """LOFO model selection over a grid; writes the table and the chosen configuration."""
    from featurelens.server.offline.risk.generalize import choose, config_from_row, grid, ood_lofo, select
    from featurelens.server.offline.risk.train import usable

    if args.rechoose:  # the rule again over a saved table: no refitting
        saved = json.loads(Path(args.rechoose).read_text())
        configs = [config_from_row(row) for row in saved["table"]]
        i = choose(saved["table"], configs, lambda m: print(m, file=sys.stderr), args.selection == "one-se",
                   args.min_entity_auroc, None if args.keep_within < 0 else args.keep_within)
        saved["chosen"] = configs[i].row()
        saved["rule"] = {"selection": args.selection, "min_entity_auroc": args.min_entity_auroc,
                         "keep_within": args.keep_within}
        Path(args.out).write_text(json.dumps(saved, indent=1, default=list) + "\n")
        print(json.dumps({"chosen": configs[i].name(), **{k: saved["table"][i][k] for k in (
            "lofo_mean_auroc", "lofo_pooled_auroc", "entity_val_auroc")}}, indent=1))
        return 0

    if not args.data:
        print("--data is required (unless --rechoose)", file=sys.stderr)
        return 2
    _load_residual_bases(_sae_dirs(args.sae))

    records = usable(_read(args.data))
    from featurelens.server.offline.risk.generalize import check_centering

    for centering in args.centerings:
        try:
            check_centering(centering)
        except ValueError as error:
            print(f"--centerings: {error}", file=sys.stderr)
            return 2
    if any(not scale > 0 for scale in args.term_scales):
        print(f"--term-scales: expected positive numbers, got {args.term_scales}", file=sys.stderr)
        return 2
    layer_sets = [tuple(int(x) for x in s.split("+")) for s in args.layer_sets]
    term_sets = [tuple(t for t in s.split("+") if t) if s != "none" else () for s in args.term_sets]
    penalties = [(p.split(":")[0], int(p.split(":")[1]) if ":" in p else 0) for p in args.penalties]
    configs = grid(layer_sets, args.poolings, args.transforms, term_sets, args.Cs,
                   [{"family": True, "plain": False}[w] for w in args.weights], penalties, args.centerings,
                   args.term_scales)
    chosen, table = select(records, configs, log=lambda m: print(m, file=sys.stderr),
                           one_se_fewer_layers=args.selection == "one-se", min_entity_auroc=args.min_entity_auroc,
                           keep_within=None if args.keep_within < 0 else args.keep_within)
    saes = _sae_dirs(args.sae)
    k = len(records[0]["features"][next(iter(records[0]["features"]))]["idx"][0])
    # The OOD threshold is chosen without the test split: the val split plays the held-out entities.
    train_val = [r | {"split": "test" if r["split"] == "val" else r["split"]} for r in records if r["split"] != "test"]
    ood = ood_lofo(train_val, list(chosen.layers), _d_sae(saes), k, args.ood_min_counts)
    ood |= ood_lofo(train_val, list(chosen.layers), _d_sae(saes), k, method="nearest_cosine")
    best_m = max(ood, key=lambda m: ood[m]["mean_auroc"])
    out = {"chosen": chosen.row(), "table": table, "ood": {m: {x: v[x] for x in ("mean_auroc", "min_auroc",
                                                                                   "pooled_auroc")}
                                                             for m, v in ood.items()},
           "ood_method": "nearest_cosine" if best_m == "nearest_cosine" else "unseen_share",
           "ood_min_count": int(best_m) if best_m.isdigit() else 0, "feature_top_k": k,
           "rule": {"selection": args.selection, "min_entity_auroc": args.min_entity_auroc,
                    "keep_within": args.keep_within}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1, default=list) + "\n")
    print(json.dumps({"chosen": chosen.name(), "ood": out["ood"], "ood_method": out["ood_method"],
                      "ood_min_count": out["ood_min_count"]}, indent=1))
    return 0


def _cmd_train_general(args: argparse.Namespace) -> int:
    from featurelens.server.interp.risk_probe import save_probe
    from featurelens.server.offline.risk.generalize import config_from_row, train_final
    from featurelens.server.offline.risk.train import usable

    records = usable(_read(args.data))
    _load_residual_bases(_sae_dirs(args.sae))
    sel = json.loads(Path(args.selection).read_text())
    config = config_from_row(sel["chosen"])
    best = max(sel["table"], key=lambda row: row["lofo_mean_auroc"])
    row = next(r for r in sel["table"] if r["config"] == config.name())
    probe = train_final(records, config, args.probe_id, _d_sae(_sae_dirs(args.sae)), int(sel["feature_top_k"]),
                        int(args.ood_min_count or sel.get("ood_min_count") or 20),
                        ood_method=args.ood_method or sel.get("ood_method", "unseen_share"),
                        metrics={"selection_rule": "leave-one-family-out mean AUROC (train+val splits)",
                                 "selection_lofo_mean_auroc": row["lofo_mean_auroc"],
                                 "selection_best_lofo_mean_auroc": best["lofo_mean_auroc"],
                                 "selection_configs": len(sel["table"])})
    _record_model(probe, records)
    out = Path(args.out or ASSETS / "probes" / f"{args.probe_id}.json")
    save_probe(probe, out)
    print(json.dumps({"probe": str(out), "features": len(probe.features), "terms": [t.name for t in probe.terms],
                      "config": config.name(), "val_auroc": probe.metrics["val_auroc"],
                      "calibration": probe.calibration, "thresholds": probe.thresholds,
                      "ood": {k: v for k, v in probe.ood.items() if k != "unseen"}}, indent=1))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from featurelens.server.interp.risk_probe import load_probe, save_probe
    from featurelens.server.offline.risk.evaluate import evaluate, evaluate_generalization

    probe = load_probe(args.probe)
    records = _read(args.data)
    report = evaluate(records, probe, args.out, domains=args.legacy_domains,
                      log=lambda m: print(m, file=sys.stderr))
    if not args.no_domains:
        compare = [load_probe(p) for p in args.compare or ()]
        _load_residual_bases(_sae_dirs(args.sae))
        consistency = {r["qid"]: float(r["consistency"]) for r in _read(args.consistency)} \
            if args.consistency else None
        general = evaluate_generalization(records, probe, args.out, saes=_sae_dirs(args.sae), compare=compare,
                                          consistency=consistency, log=print)
        report["generalization"] = general["summary"]
    if args.record:
        # Keep the headline figures with the probe, so the server can report what it ships.
        probe.metrics["heldout_entities"] = report["heldout_entities"]
        if "heldout_domains" in report:
            probe.metrics["heldout_domains_auroc"] = {
                d: {row["method"]: row["auroc"] for row in v["results"]} for d, v in report["heldout_domains"].items()}
        if "generalization" in report:
            probe.metrics["generalization"] = report["generalization"]
        save_probe(probe, args.probe)
    print(json.dumps({k: report[k] for k in ("n", "positive_rate", "heldout_entities", "plots")}, indent=1),
          file=sys.stderr)
    return 0


def _cmd_consistency(args: argparse.Namespace) -> int:
    """The sampling-consistency reference: k sampled answers per question, agreement with the greedy one."""
    from featurelens.server.offline.risk.consistency import pick, run_consistency
    from featurelens.server.offline.risk.train import usable

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    records = pick(usable(_read(args.data)), args.per_family)
    print(f"{len(records)} answers ({args.per_family} per family at most), {args.k} samples each", file=sys.stderr)
    asyncio.run(run_consistency(records, args.out, k=args.k, temperature=args.temperature, seed=args.seed,
                                max_new_tokens=args.max_new_tokens, concurrency=args.concurrency, model=args.model))
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    """The shipped probe as it is (no refit) on the usable records of each file: AUROC/AUPRC/ECE beside the
    mean-logprob baseline — e.g. the same questions answered in dense and in quantized mode."""
    import numpy as np
    from featurelens.server.interp.risk_probe import load_probe
    from featurelens.server.offline.risk.evaluate import baseline_scores, evaluate_scores
    from featurelens.server.offline.risk.train import calibrated, probe_logits, usable

    probe = load_probe(args.probe)
    report = {}
    for path in args.data:
        records = [r for r in usable(_read(path)) if args.split == "all" or r["split"] == args.split]
        y = np.asarray([r["label"] for r in records])
        logits = probe_logits(probe, records)
        row = evaluate_scores("sae_sparse_probe", logits, y, calibrated(probe, logits))
        base = evaluate_scores("neg_mean_logprob", baseline_scores(records)["neg_mean_logprob"], y, None)
        report[path] = {"n": len(records), "positive_rate": round(float(y.mean()), 4) if len(y) else None,
                        "correct_answers": int(sum(r["verdict"] == "correct" for r in records)),
                        "probe": row, "neg_mean_logprob": base}
    print(json.dumps(report, indent=1))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featurelens risk", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("build-data", help="ask the served model the question bank; grade; store features (JSONL)")
    p.add_argument("--out", required=True, help="JSONL to append to (resumable)")
    p.add_argument("--sae", action="append", default=None, help="LAYER=PATH (repeatable); default: shipped SAEs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=None, help="stop after this many answers in the file")
    p.add_argument("--top-k", type=int, default=32, help="SAE features kept per token and layer")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--model", default="default", help="the model to serve: 'default' or a model folder "
                   "(then --sae is required)")
    p.add_argument("--mode", default="dense", choices=("dense", "quantized"), help="inference mode to ask in")
    p.add_argument("--split", default="all", choices=("all", "train", "val", "test"),
                   help="only questions whose entity falls in this split")
    p.add_argument("--bank", default="families", choices=("families", "v2"),
                   help="families: the broad bank (offline/risk/families.py); v2: the six domains of probe v2")
    p.add_argument("--families", nargs="*", default=None, help="only these families (--bank families)")
    p.add_argument("--n-real", type=int, default=110, help="real questions per family (--bank families)")
    p.add_argument("--n-fake", type=int, default=40, help="questions about invented entities per family")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("featurize", help="re-capture features of existing answers with (new) SAEs, teacher-forced")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--sae", action="append", default=None)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--model", default="default", help="the model to serve: 'default' or a model folder "
                   "(then --sae is required)")
    p.add_argument("--concurrency", type=int, default=32)
    p.set_defaults(func=_cmd_featurize)

    p = sub.add_parser("train", help="choose layers/pooling/C on validation AUROC; Platt-calibrate; write the probe")
    p.add_argument("--data", required=True)
    p.add_argument("--probe-id", default="smollm2-risk-v2")
    p.add_argument("--out", default=None, help="default server/assets/probes/<probe-id>.json")
    p.add_argument("--penalty", default="l1", choices=("l1", "l2"))
    p.add_argument("--selection", default="one-se", choices=("one-se", "best"),
                   help="one-se: fewest layers within one standard error of the best validation AUROC "
                        "(each layer costs an SAE encode per served token); best: the highest AUROC")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("select", help="choose layers/pooling/terms/C by leave-one-family-out AUROC")
    p.add_argument("--data", required=False, help="JSONL from build-data (not needed with --rechoose)")
    p.add_argument("--out", required=True, help="JSON: the grid's table, the chosen configuration, OOD choice")
    p.add_argument("--rechoose", default=None, help="a JSON this command wrote: apply the selection rule "
                   "(--selection, --min-entity-auroc, --keep-within) to its table again, without refitting")
    p.add_argument("--layer-sets", nargs="+", default=["22", "12", "12+22"])
    p.add_argument("--poolings", nargs="+", default=["mean", "max"])
    p.add_argument("--transforms", nargs="+", default=["identity"])
    p.add_argument("--term-sets", nargs="+", default=["none", "neg_mean_logprob+neg_min_logprob+neg_first_logprob"])
    p.add_argument("--Cs", nargs="+", type=float, default=[0.01, 0.03, 0.1])
    p.add_argument("--weights", nargs="+", default=["family"], choices=("family", "plain"))
    p.add_argument("--penalties", nargs="+", default=["l1", "l2", "residual"],
                   help="l1, l2, l2:N (l2, then the N strongest features refit), or residual (l2 on the "
                        "residual rebuilt from the codes, folded back into feature weights)")
    p.add_argument("--centerings", nargs="+", default=["none", "family", "mix0.5"],
                   help="none; family: fit on inputs centred within each training family (learns what separates "
                        "right from wrong inside a family, not which families are hard); mixB (e.g. mix0.5): "
                        "the plain fit plus B times the centred one")
    p.add_argument("--term-scales", nargs="+", type=float, default=[1.0],
                   help="the uncertainty terms' standardized columns times this before the fit: their penalty "
                        "is its square weaker than a residual direction's (configurations with terms only)")
    p.add_argument("--selection", default="one-se", choices=("one-se", "best"))
    p.add_argument("--min-entity-auroc", type=float, default=0.0,
                   help="only configurations whose held-out-entity AUROC (fit on train, scored on val) reaches "
                        "this compete (0: no floor)")
    p.add_argument("--keep-within", type=float, default=0.02,
                   help="only configurations whose pooled LOFO AUROC and held-out-entity AUROC are each within "
                        "this of the best in the grid compete: the per-family mean is not bought with them "
                        "(negative: off)")
    p.add_argument("--ood-min-counts", nargs="+", type=int, default=[1, 2, 5, 10])
    p.add_argument("--sae", action="append", default=None)
    p.set_defaults(func=_cmd_select)

    p = sub.add_parser("train-general", help="train the probe of a `risk select` choice, with its OOD reference")
    p.add_argument("--data", required=True)
    p.add_argument("--selection", required=True, help="JSON written by `risk select`")
    p.add_argument("--probe-id", default="smollm2-risk-v5")
    p.add_argument("--out", default=None, help="default server/assets/probes/<probe-id>.json")
    p.add_argument("--ood-min-count", type=int, default=None)
    p.add_argument("--ood-method", default=None, choices=("nearest_cosine", "unseen_share"),
                   help="default: the one `risk select` measured best")
    p.add_argument("--sae", action="append", default=None)
    p.set_defaults(func=_cmd_train_general)

    p = sub.add_parser("eval", help="LOFO per family vs baselines, held-out entities, ECE, OOD; JSON + PNG")
    p.add_argument("--data", required=True)
    p.add_argument("--probe", required=True)
    p.add_argument("--out", required=True, help="folder for risk_eval.json, risk_generalization.json, plots")
    p.add_argument("--no-domains", action="store_true", help="skip the leave-one-family-out retraining")
    p.add_argument("--legacy-domains", action="store_true", help="also the v2 report's leave-one-domain-out")
    p.add_argument("--compare", action="append", default=None,
                   help="other probe files whose configuration gets the same LOFO protocol (repeatable)")
    p.add_argument("--sae", action="append", default=None)
    p.add_argument("--record", action="store_true", help="write the headline figures into the probe's metrics")
    p.add_argument("--consistency", default=None, help="JSONL from `risk consistency`: the sampling-consistency "
                   "reference beside the probe on the answers it covers")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("consistency", help="offline reference: k sampled answers per question, agreement with "
                                           "the greedy answer (JSONL, resumable)")
    p.add_argument("--data", required=True, help="JSONL from build-data (the greedy answers)")
    p.add_argument("--out", required=True)
    p.add_argument("--k", type=int, default=5, help="samples per question")
    p.add_argument("--per-family", type=int, default=40, help="answers per family at most")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--model", default="default")
    p.set_defaults(func=_cmd_consistency)

    p = sub.add_parser("score", help="the probe as shipped on one or more data files (e.g. dense vs quantized)")
    p.add_argument("--data", required=True, action="append", help="JSONL from build-data (repeatable)")
    p.add_argument("--probe", required=True)
    p.add_argument("--split", default="test", choices=("all", "train", "val", "test"))
    p.set_defaults(func=_cmd_score)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
