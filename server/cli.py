"""The `featurelens` command of the server distribution.

    featurelens serve [settings]        run the gRPC server (every setting: featurelens serve --help)
    featurelens prepare-model           convert/cache the default model and print its folder
    featurelens bench NAME [flags]      benchmarks (featurelens bench --help lists them)
    featurelens sae | risk | sparsity   offline pipelines that write server/assets
    featurelens generate | info | tokenize   the client's commands (also `featurelens-client`)

Each tool owns its parser, so `featurelens TOOL --help` shows only that tool's flags. Tools import their
modules only when run: `featurelens info` does not import vLLM.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from featurelens.client import cli as client_cli

# name -> (module whose main(argv) runs it, help). Everything after the name goes to the tool's own parser.
TOOLS: dict[str, tuple[str, str]] = {
    "bench": ("featurelens.server.bench", "benchmarks that print side-by-side ratios"),
    "sae": ("featurelens.server.offline.sae.cli", "build corpus, harvest, train, evaluate and explain SAEs"),
    "risk": ("featurelens.server.offline.risk.cli", "build risk data, train and evaluate the probe"),
    "sparsity": ("featurelens.server.offline.sparsity.calibrate", "calibrate WINA sparsity tables and bases"),
}


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
    from featurelens.server.model_assets import main as prepare

    return prepare([args.model])


def build_parser() -> argparse.ArgumentParser:
    from featurelens.server.config import add_settings_arguments

    parser = argparse.ArgumentParser(prog="featurelens", description="featurelens: LLM serving you can see inside")
    sub = parser.add_subparsers(dest="command", required=True)
    client_cli.add_client_commands(sub)

    serve = sub.add_parser("serve", help="run the gRPC server")
    add_settings_arguments(serve)
    serve.set_defaults(func=_cmd_serve)

    prep = sub.add_parser("prepare-model", help="convert/cache the default model and print its folder")
    prep.add_argument("--model", default="default")
    prep.set_defaults(func=_cmd_prepare_model)

    for name, (_, text) in TOOLS.items():
        sub.add_parser(name, help=f"{text} (featurelens {name} --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TOOLS:  # everything after the name, --help included, goes to the tool's own parser
        module = importlib.import_module(TOOLS[argv[0]][0])
        return int(module.main(argv[1:]) or 0)
    return client_cli.run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
