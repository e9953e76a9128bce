"""The layout's import rules (docs/architecture.md), read from the source with `ast`: every import counts,
the ones inside functions too, so a lazy import cannot slip past a rule."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# folder -> module prefix, as pyproject.toml and client/pyproject.toml map them
PACKAGES = {"protos/featurelens/v1": "featurelens.v1", "client": "featurelens.client",
            "kernels": "featurelens.kernels", "server": "featurelens.server"}
FRONTEND_ONLY = tuple(f"featurelens.server.{m}" for m in
                      ("api", "app", "cli", "engine", "cache", "metrics", "security", "interp_plan", "state"))
OFFLINE_AND_BENCH = ("featurelens.server.offline", "featurelens.server.bench")


def _modules() -> dict[str, Path]:
    out = {}
    for folder, prefix in PACKAGES.items():
        base = ROOT / folder
        for path in base.rglob("*.py"):
            rel = path.relative_to(base)
            if "build" in rel.parts or path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
                continue
            parts = [*rel.parent.parts, path.stem] if path.stem != "__init__" else list(rel.parent.parts)
            out[".".join([prefix, *parts])] = path
    return out


def _imports(module: str, path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            # The code base imports absolutely (test below), so a relative import is reported as such.
            name = f"featurelens.RELATIVE.{module}" if node.level else (node.module or "")
            found.add(name)
            found |= {f"{name}.{a.name}" for a in node.names}  # `from featurelens.server import api`
    return {name for name in found if name.startswith("featurelens")}


MODULES = _modules()
IMPORTS = {module: _imports(module, path) for module, path in MODULES.items()}


def _starts(name: str, prefixes: tuple[str, ...] | str) -> bool:
    prefixes = (prefixes,) if isinstance(prefixes, str) else prefixes
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _violations(owners: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{module} imports {name}" for module, names in IMPORTS.items() if _starts(module, owners)
                  for name in names if _starts(name, forbidden) and name in MODULES)


def test_the_rules_see_the_whole_tree():
    assert len(MODULES) > 60 and "featurelens.server.worker.extension" in MODULES
    assert "featurelens.server.cache" in IMPORTS["featurelens.server.api"]  # the reader finds imports


def test_the_contract_imports_nothing_of_ours():
    assert _violations(("featurelens.v1",), ("featurelens.client", "featurelens.server", "featurelens.kernels")) == []


def test_the_client_never_imports_the_server_or_kernels():
    assert _violations(("featurelens.client",), ("featurelens.server", "featurelens.kernels")) == []


def test_kernels_import_only_kernels():
    assert _violations(("featurelens.kernels",), ("featurelens.server", "featurelens.client", "featurelens.v1")) == []


def test_worker_code_never_imports_the_frontend():
    assert _violations(("featurelens.server.worker",), FRONTEND_ONLY) == []


def test_shared_libraries_import_neither_frontend_nor_worker():
    shared = ("featurelens.server.interp", "featurelens.server.modes")
    assert _violations(shared, (*FRONTEND_ONLY, "featurelens.server.worker")) == []


@pytest.mark.parametrize("owner", ["featurelens.server.worker", "featurelens.server.interp",
                                   "featurelens.server.modes", *FRONTEND_ONLY,
                                   "featurelens.server.config", "featurelens.server.validation",
                                   "featurelens.server.model_assets"])
def test_serving_code_never_imports_offline_or_bench(owner):
    assert _violations((owner,), OFFLINE_AND_BENCH) == []


def test_imports_are_absolute():
    assert sorted(m for m, names in IMPORTS.items() if any(".RELATIVE." in n for n in names)) == []


def test_a_violation_is_seen(tmp_path):
    """The reader is not blind: a lazy import inside a function is found."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from featurelens.server import api\n")
    assert "featurelens.server.api" in _imports("featurelens.server.worker.m", path)
