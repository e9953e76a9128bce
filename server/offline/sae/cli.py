"""`featurelens sae ...`: build the corpus, harvest activations, train and evaluate SAEs.

    featurelens sae corpus  --out WORK/corpus
    featurelens sae harvest --corpus WORK/corpus/train.jsonl --layers 12 24 --out WORK/shards
    featurelens sae train   --shards WORK/shards --layer 12 --d-sae 4096 --k 32 --out WORK/sae_L12
    featurelens sae eval    --sae WORK/sae_L12 --texts WORK/corpus/heldout.jsonl --out WORK/eval
    featurelens sae explain --sae WORK/sae_L12 --shards WORK/shards

Every step runs offline. vLLM spawns worker processes, so callers keep `main()` behind a __main__ guard.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _model_path(name: str) -> str:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if Path(name).is_dir():
        return name
    from featurelens.server.model_assets import resolve_model

    return str(resolve_model(name))


def _model_name(model: str | None, shards: str) -> str:
    """The name an SAE records as its model (cfg.json `model_name`): the default model's, or the folder name of
    the model given, else of the one the harvest in `shards` ran (its progress.json)."""
    from featurelens.server.model_assets import MODEL_NAME

    if model is None:
        progress = Path(shards) / "progress.json"
        settings = json.loads(progress.read_text()).get("settings", {}) if progress.is_file() else {}
        model = settings.get("model") or "default"
        if Path(model).resolve() == Path(_model_path("default")).resolve():
            model = "default"
    if model.lower() in ("default", "smollm2", ""):
        return MODEL_NAME
    return Path(model).name or model


def _cmd_corpus(args: argparse.Namespace) -> int:
    from featurelens.server.offline.sae.corpus import build_corpus

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    manifest = build_corpus(args.out, _model_path(args.model), seed=args.seed, doc_chars=args.doc_chars,
                            n_chats=args.chats, chat_max_tokens=args.chat_max_tokens,
                            n_fact_chats=args.fact_chats)
    print(json.dumps(manifest, indent=2))
    return 0


def _cmd_harvest(args: argparse.Namespace) -> int:
    from featurelens.server.offline.sae.harvest import harvest

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    progress = harvest(args.corpus, _model_path(args.model), args.out, args.layers, max_len=args.max_len,
                       chunk_tokens=args.chunk_tokens, max_tokens=args.max_tokens)
    print(json.dumps({"rows": progress["rows"], "shards": progress["shards"]}))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import torch
    from featurelens.server.offline.sae.train import TrainConfig, load_rows, save_trainer_sae, train

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(layer=args.layer, d_sae=args.d_sae, k=args.k, architecture=args.architecture,
                      batch_size=args.batch_size, max_tokens=args.max_tokens, lr=args.lr,
                      dead_tokens=args.dead_tokens, seed=args.seed, save_dtype=args.dtype,
                      model_name=_model_name(args.model, args.shards))
    rows = load_rows(args.shards, args.layer, max_rows=args.max_rows)
    val = load_rows(args.val_shards, args.layer) if args.val_shards else None
    print(f"training on {len(rows):,} rows of layer {args.layer} from {args.shards}", file=sys.stderr)
    sae, scale, metrics = train(rows, cfg, val_rows=val)
    argv = args.argv if args.argv is not None else sys.argv[1:]
    metrics["command"] = "featurelens sae " + " ".join(argv[argv.index("train"):])
    save_trainer_sae(sae, scale, cfg, args.out, metrics)
    print(json.dumps({k: v for k, v in metrics.items() if k != "config"}, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from featurelens.server.offline.sae.corpus import read_corpus
    from featurelens.server.offline.sae.evaluate import eval_windows, evaluate, load_hf_model, plot, summary

    model, tok = load_hf_model(_model_path(args.model))
    texts = [r["text"] for r in read_corpus(args.texts)]
    windows = eval_windows(tok, texts, args.max_len, args.max_tokens)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reports = [evaluate(path, model, windows, shards=args.shards) for path in args.sae]
    (out / "eval_full.json").write_text(json.dumps(reports))
    summaries = [summary(r) for r in reports]
    (out / "eval.json").write_text(json.dumps(summaries, indent=2))
    plot(reports, out / "eval.png")
    print(json.dumps(summaries, indent=2))
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from featurelens.server.offline.sae.explain import explain_from_harvest

    for sae_dir in args.sae:
        path = explain_from_harvest(sae_dir, args.shards, _model_path(args.model), max_rows=args.max_rows,
                                    n_examples=args.examples)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featurelens sae", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("corpus", help="build the offline training corpus (train/heldout jsonl)")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--doc-chars", type=int, default=6_000_000, help="characters of package documentation")
    p.add_argument("--chats", type=int, default=1500, help="instructions answered by the model itself")
    p.add_argument("--chat-max-tokens", type=int, default=200)
    p.add_argument("--fact-chats", type=int, default=1500, help="entity Q&A chats with true answers")
    p.set_defaults(func=_cmd_corpus)

    p = sub.add_parser("harvest", help="prefill the corpus through vLLM and write residual shards")
    p.add_argument("--corpus", required=True, help="a jsonl file written by `sae corpus`")
    p.add_argument("--out", required=True)
    p.add_argument("--layers", type=int, nargs="+", required=True)
    p.add_argument("--model", default="default")
    p.add_argument("--max-len", type=int, default=512, help="tokens per prompt window")
    p.add_argument("--chunk-tokens", type=int, default=65536, help="tokens per resumable chunk (= one shard)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many corpus tokens")
    p.set_defaults(func=_cmd_harvest)

    p = sub.add_parser("train", help="train a TopK SAE on harvested shards")
    p.add_argument("--shards", required=True)
    p.add_argument("--layer", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--architecture", choices=("topk", "abstopk"), default="topk")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--max-tokens", type=int, default=None, help="training tokens (default: one epoch)")
    p.add_argument("--max-rows", type=int, default=None, help="load at most this many rows")
    p.add_argument("--lr", type=float, default=None, help="default 2e-4 / sqrt(d_sae / 2^14)")
    p.add_argument("--dead-tokens", type=int, default=500_000)
    p.add_argument("--val-shards", default=None, help="held-out shards for metrics.json")
    p.add_argument("--model", default=None, help="the model the SAE is recorded for (cfg.json model_name); "
                   "default: the one the harvest in --shards ran")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="EV / L0 / dead latents / CE-loss recovered; JSON + PNG")
    p.add_argument("--sae", required=True, nargs="+", help="one or more SAE folders")
    p.add_argument("--texts", required=True, help="held-out jsonl (e.g. corpus/heldout.jsonl)")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default="default")
    p.add_argument("--shards", default=None, help="held-out shards for activation metrics too")
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=16384)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("explain", help="top contexts, density, logit lens and a machine label for every latent")
    p.add_argument("--sae", required=True, nargs="+", help="one or more SAE folders (explanations.json.gz goes there)")
    p.add_argument("--shards", required=True, help="the harvest folder the SAE was trained on")
    p.add_argument("--model", default="default")
    p.add_argument("--max-rows", type=int, default=300_000, help="harvested rows scanned (from the start)")
    p.add_argument("--examples", type=int, default=6, help="top activating contexts kept per latent")
    p.set_defaults(func=_cmd_explain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
