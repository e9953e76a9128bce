"""The client against a real gRPC server on a free localhost port. The servicer is a stand-in (the engine
cannot be restarted per test): it fails on purpose so retry behaviour is observable."""

from __future__ import annotations

import subprocess
import sys
import threading
from concurrent import futures

import grpc
import pytest
from featurelens.client import Client, pb
from featurelens.v1 import featurelens_pb2_grpc as pb_grpc
from tests_support import free_port


class FlakyService(pb_grpc.FeatureLensServiceServicer):
    def __init__(self, failures: int, code: grpc.StatusCode) -> None:
        self.failures, self.code, self.calls = failures, code, 0
        self.lock = threading.Lock()

    def Tokenize(self, request, context):
        with self.lock:
            self.calls += 1
            if self.calls <= self.failures:
                context.abort(self.code, "on purpose")
        return pb.TokenizeResponse(token_ids=[1, 2, 3])


@pytest.fixture
def flaky():
    def start(failures: int, code: grpc.StatusCode):
        service = FlakyService(failures, code)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_FeatureLensServiceServicer_to_server(service, server)
        port = free_port()
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        started.append(server)
        return service, f"127.0.0.1:{port}"

    started: list[grpc.Server] = []
    yield start
    for server in started:
        server.stop(0)


def test_unavailable_is_retried(flaky):
    service, target = flaky(2, grpc.StatusCode.UNAVAILABLE)
    with Client(target, timeout_s=10) as client:
        assert client.tokenize("hi") == [1, 2, 3]
    assert service.calls == 3


@pytest.mark.parametrize("code", [grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  grpc.StatusCode.INTERNAL])
def test_other_errors_are_not_retried(flaky, code):
    service, target = flaky(1, code)
    with Client(target, timeout_s=10) as client, pytest.raises(grpc.RpcError) as info:
        client.tokenize("hi")
    assert info.value.code() == code and service.calls == 1


def test_deadline_is_sent():
    class Slow(pb_grpc.FeatureLensServiceServicer):
        def Tokenize(self, request, context):
            remaining = context.time_remaining()
            return pb.TokenizeResponse(token_ids=[int(remaining * 1000)])

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_FeatureLensServiceServicer_to_server(Slow(), server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout_s=3.0) as client:
            # The server sees the client's 3 s deadline; gRPC's timeout header is rounded to its unit, so the
            # server's remaining time may read a little over 3 s (3009 ms seen in CI); without a deadline
            # time_remaining() is None and the handler fails.
            assert 0 < client.tokenize("x")[0] <= 3250
    finally:
        server.stop(0)


def test_client_cli_reports_errors_clearly():
    port = free_port()  # nothing listens here
    out = subprocess.run([sys.executable, "-m", "featurelens.client.cli", "info", "--target", f"127.0.0.1:{port}",
                          "--timeout-s", "3"], capture_output=True, text=True, cwd="/")
    assert out.returncode == 1
    assert out.stderr.startswith(("error: UNAVAILABLE:", "error: DEADLINE_EXCEEDED:")), out.stderr


def test_client_distribution_installs_alone_without_torch(tmp_path):
    """Build the `featurelens-client` wheel from client/, install it into a fresh venv with only its own
    dependencies, and use it: it carries the client and the generated contract, and nothing of the server."""
    import pathlib
    import zipfile

    root = pathlib.Path(__file__).resolve().parents[2]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "-q"]
    subprocess.run([sys.executable, "-m", "pip", "-q", "wheel", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "dist"), str(root / "client")], check=True, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("featurelens_client-*.whl"))
    packages = {n.rsplit("/", 1)[0] for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    assert packages == {"featurelens/client", "featurelens/v1"}
    subprocess.run(pip + ["install", str(wheel)], check=True, cwd=tmp_path)
    code = ("import sys, importlib.util as u; from featurelens.client import Client, pb; "
            "import featurelens.v1.featurelens_pb2_grpc; "
            "print([m for m in ('torch', 'vllm', 'featurelens.server') if u.find_spec(m)])")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    help_text = subprocess.run([str(venv / "bin" / "featurelens-client"), "--help"], capture_output=True, text=True)
    assert help_text.returncode == 0 and "{generate,info,tokenize}" in help_text.stdout


