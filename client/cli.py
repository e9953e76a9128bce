"""The `featurelens-client` command: `generate`, `info` and `tokenize` against a running server.

It needs only the client distribution (grpcio + protobuf). The server's `featurelens` command offers the same
three commands beside `serve`, `bench` and the offline tools.
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
                               "seed": args.seed, "stop": args.stop or (), "json_schema": _text_arg(args.json_schema),
                               "regex": args.regex, "choice": args.choice, "grammar": _text_arg(args.grammar),
                               "priority": args.priority, "adapter": args.adapter}
    if args.risk:
        options["interpretability"] = pb.InterpretabilityOptions(score_risk=True)
    if args.samples > 1:
        options["n"] = args.samples
    with Client(args.target, timeout_s=args.timeout_s, token=args.token) as client:
        if args.no_stream or args.samples > 1:  # several samples' tokens would interleave on a terminal
            result = client.generate(prompt, **options)
            for sample in result.samples:
                if len(result.samples) > 1:
                    print(f"[sample {sample.sample_index}]", file=sys.stderr)
                print(sample.text)
                risk_note = f", risk {sample.risk.score:.2f} {sample.risk.label.upper()}" if sample.risk else ""
                print(f"[finish: {sample.finish_reason}, {sample.completion_tokens} tokens{risk_note}]", file=sys.stderr)
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


def _text_arg(value: str | None) -> str | None:
    """A constraint given inline, or as @PATH to read it from a file."""
    if value is not None and value.startswith("@"):
        with open(value[1:], encoding="utf-8") as f:
            return f.read()
    return value


def _cmd_info(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    with Client(args.target, timeout_s=args.timeout_s, token=args.token) as client:
        print(json.dumps(MessageToDict(client.model_info().raw), indent=2))
    return 0


def _cmd_tokenize(args: argparse.Namespace) -> int:
    with Client(args.target, timeout_s=args.timeout_s, token=args.token) as client:
        print(json.dumps(client.tokenize(args.text)))
    return 0


def add_client_commands(sub: Any) -> None:
    """`generate`, `info`, `tokenize` on a subparsers object: the client's commands, shared with the server's
    `featurelens` command."""
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
    gen.add_argument("--adapter", default="", help="a LoRA adapter the server loaded (info lists them)")
    gen.add_argument("--priority", type=int, default=0, help="scheduling priority, lower first (servers started "
                                                              "with --scheduling-policy priority)")
    gen.add_argument("--samples", type=int, default=1, help="independent samples (sample i seeded --seed + i); "
                                                            "more than 1 prints each at the end")
    gen.add_argument("--risk", action="store_true", help="score hallucination risk and print it at the end")
    fmt = gen.add_mutually_exclusive_group()
    fmt.add_argument("--json-schema", default=None, help="constrain the answer to this JSON Schema (JSON text, or "
                                                         "@FILE)")
    fmt.add_argument("--regex", default=None, help="constrain the answer to this regular expression")
    fmt.add_argument("--choice", action="append", default=None, help="the answer is one of these (repeatable)")
    fmt.add_argument("--grammar", default=None, help="constrain the answer to this grammar: EBNF with a root rule "
                                                     "or Lark (text, or @FILE)")
    _add_target(gen)
    gen.set_defaults(func=_cmd_generate)

    info = sub.add_parser("info", help="print GetModelInfo")
    _add_target(info)
    info.set_defaults(func=_cmd_info)

    tok = sub.add_parser("tokenize", help="print token ids of a text")
    tok.add_argument("text")
    _add_target(tok)
    tok.set_defaults(func=_cmd_tokenize)


def build_parser(prog: str = "featurelens-client") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="featurelens client: call a featurelens server")
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run a parsed client command; gRPC errors become one line and exit status 1."""
    try:
        return int(args.func(args) or 0)
    except grpc.RpcError as error:
        print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
