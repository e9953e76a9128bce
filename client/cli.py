"""The `featurelens` command.

Client commands (`generate`, `info`, `tokenize`) need only the client install; `serve`, `prepare-model` and
`bench` need `featurelens[server]` and import it lazily so the client stays light.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import grpc
from featurelens.client._client import DEFAULT_TARGET, Client
from featurelens.v1 import featurelens_pb2 as pb


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default=DEFAULT_TARGET, help="server address host:port")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="deadline of the call in seconds")
    parser.add_argument("--token", default=None, help="bearer token, if the server requires one")


def _cmd_generate(args: argparse.Namespace) -> int:
    prompt: str | list[dict[str, str]] = args.prompt
    if args.chat:
        prompt = ([{"role": "system", "content": args.system}] if args.system else []) + \
                 [{"role": "user", "content": args.prompt}]
    options: dict[str, Any] = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                               "seed": args.seed, "stop": args.stop or ()}
    if args.risk:
        options["interpretability"] = pb.InterpretabilityOptions(score_risk=True)
    with Client(args.target, timeout_s=args.timeout_s, token=args.token) as client:
        if args.no_stream:
            result = client.generate(prompt, **options)
            print(result.text)
            print(f"[finish: {result.finish_reason}, {result.completion_tokens} tokens]", file=sys.stderr)
            return 0
        finish, risk = None, None
        for chunk in client.generate_stream(prompt, **options):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            finish = chunk.finish_reason or finish
            risk = chunk.risk or risk
        sys.stdout.write("\n")
        print(f"[finish: {finish}]", file=sys.stderr)
        if risk is not None:
            drivers = ", ".join(f"L{f.layer}/{f.feature_id}{' ' + f.explanation if f.explanation else ''}"
                                for f in risk.top_features[:3])
            print(f"[hallucination risk: {risk.score:.2f} {risk.label.upper()}; drivers: {drivers}]", file=sys.stderr)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    with Client(args.target, timeout_s=args.timeout_s, token=args.token) as client:
        print(json.dumps(MessageToDict(client.model_info().raw), indent=2))
    return 0


def _cmd_tokenize(args: argparse.Namespace) -> int:
    with Client(args.target, timeout_s=args.timeout_s, token=args.token) as client:
        print(json.dumps(client.tokenize(args.text)))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from featurelens.server.app import serve
    from featurelens.server.config import SettingsError, settings_from_args
    from pydantic import ValidationError

    try:
        return asyncio.run(serve(settings_from_args(args)))
    except (ValidationError, SettingsError) as error:  # a bad setting: one clear message, not a traceback
        print(f"featurelens serve: invalid settings: {error}", file=sys.stderr)
        return 2


def _cmd_prepare_model(args: argparse.Namespace) -> int:
    from featurelens.server.model_assets import resolve_model

    print(resolve_model(args.model))
    return 0


TOOLS = {"sae": "featurelens.server.interp.sae_cli", "risk": "featurelens.server.interp.risk_cli"}


def _cmd_tool(module: str) -> Any:
    """`featurelens sae ...` / `featurelens risk ...`: offline tooling that lives with the server."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        return int(importlib.import_module(module).main(args.rest) or 0)

    return run


def _cmd_bench(args: argparse.Namespace) -> int:
    from featurelens.server import bench

    return bench.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="featurelens", description="featurelens: LLM serving you can see inside")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text, streaming tokens to the terminal")
    gen.add_argument("prompt")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                     help="send as a chat user message (default) or as raw text (--no-chat)")
    gen.add_argument("--system", default=None, help="system message (with --chat)")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop sequence (repeatable)")
    gen.add_argument("--no-stream", action="store_true", help="unary call, print at the end")
    gen.add_argument("--risk", action="store_true", help="score hallucination risk and print it at the end")
    _add_target(gen)
    gen.set_defaults(func=_cmd_generate)

    info = sub.add_parser("info", help="print GetModelInfo")
    _add_target(info)
    info.set_defaults(func=_cmd_info)

    tok = sub.add_parser("tokenize", help="print token ids of a text")
    tok.add_argument("text")
    _add_target(tok)
    tok.set_defaults(func=_cmd_tokenize)

    serve = sub.add_parser("serve", help="run the gRPC server (needs featurelens[server])")
    try:
        from featurelens.server.config import add_settings_arguments
    except ImportError:
        serve.set_defaults(func=lambda _args: _missing_server())
    else:
        add_settings_arguments(serve)
        serve.set_defaults(func=_cmd_serve)

    prep = sub.add_parser("prepare-model", help="convert/cache the default model and print its folder")
    prep.add_argument("--model", default="default")
    prep.set_defaults(func=_cmd_prepare_model)

    sub.add_parser("sae", help="build corpus, harvest, train and evaluate SAEs (see: featurelens sae --help)")
    sub.add_parser("risk", help="build risk data, train and evaluate the probe (see: featurelens risk --help)")

    bench = sub.add_parser("bench", help="benchmarks that print side-by-side ratios")
    bench.add_argument("which", choices=["generate", "interp", "cache", "soak", "modes", "kv"])
    bench.add_argument("--duration-s", type=float, default=60.0, help="bench soak: how long to run")
    bench.add_argument("--redis-url", default=None, help="bench cache: Redis to use (default 127.0.0.1:6379/15)")
    bench.add_argument("--model", default="default")
    bench.add_argument("--num-prompts", type=int, default=64)
    bench.add_argument("--max-new-tokens", type=int, default=64)
    bench.add_argument("--concurrency", type=int, action="append",
                       help="levels to measure (default 1 and 32)")
    bench.add_argument("--rounds", type=int, default=2, help="bench modes, interp: timed rounds (median)")
    bench.add_argument("--modes", nargs="+", default=None,
                       help="bench modes: a subset of dense sparse-25 sparse-40 sparse-50 int8 (dense is always run)")
    bench.add_argument("--quality-prompts", type=int, default=200,
                       help="bench modes: chat prompts (x 32 tokens) for the offline teacher-forced agreement")
    bench.add_argument("--profile", action="store_true",
                       help="bench modes: time the worker's steps (forward, projections, sparse kernels, x T, "
                            "wrappers) and print them; sets FEATURELENS_SPARSE_PROFILE=1 for the engine")
    bench.add_argument("--compare-thresholds", metavar="PATH", default=None,
                       help="bench modes: instead of the full report, batch-1 decode of dense and the sparse "
                            "--modes on two servers up together, this run's table and the thresholds file PATH, "
                            "requests alternating between them (a side-by-side speed comparison of two tables)")
    bench.add_argument("--context-tokens", type=int, default=1536,
                       help="bench kv: tokens per held-out sequence and in the long prompt")
    bench.add_argument("--sequences", type=int, default=8, help="bench kv: held-out sequences scored")
    bench.set_defaults(func=_cmd_bench)
    return parser


def _missing_server() -> int:
    print("`featurelens serve` needs the server extra: pip install 'featurelens[server]'", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:  # pass everything, --help included, to the tool's own parser
        return int(_cmd_tool(TOOLS[argv[0]])(argparse.Namespace(rest=argv[1:])))
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except grpc.RpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
