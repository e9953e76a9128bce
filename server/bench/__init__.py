"""`featurelens bench NAME [flags]`: one module per benchmark, each with its own parser (`--help` lists only
its flags). Every benchmark prints ratios measured side by side in one run, never absolute goals."""

from __future__ import annotations

import importlib
import sys

BENCHES: dict[str, str] = {
    "generate": "our gRPC server vs vLLM's own LLM.generate, same model and settings",
    "interp": "what features, steering and risk scoring cost, side by side",
    "cache": "feature cache: recompute vs Redis / in-process hits",
    "soak": "many clients for a while, Redis outages included: errors, TTFT, memory growth",
    "modes": "dense vs sparse (WINA) vs int8: engine agreement and decode speed",
    "kv": "KV-cache element types: capacity, quality and speed",
    "kernels": "the native kernels against torch and oneDNN, per shape",
}


def usage() -> str:
    width = max(map(len, BENCHES))
    rows = "\n".join(f"  {name:<{width}}  {text}" for name, text in BENCHES.items())
    return f"usage: featurelens bench NAME [flags]   (featurelens bench NAME --help)\n\nbenchmarks:\n{rows}\n"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in BENCHES:
        print(f"featurelens bench: unknown benchmark {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"featurelens.server.bench.{name}")
    return int(module.main(rest) or 0)
