"""Small helpers shared by test modules (conftest fixtures live in conftest.py)."""

from __future__ import annotations

import socket
import subprocess
import time

import redis
from featurelens.v1 import featurelens_pb2 as pb


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisProcess:
    """A private redis-server (no persistence) we can stop and start again on the same port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


def prometheus_query(port: int, promql: str) -> list[dict]:
    import json
    import urllib.parse
    import urllib.request

    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


class PrometheusProcess:
    """A real Prometheus server (Debian `prometheus`) scraping one target every second."""

    def __init__(self, binary: str, target_port: int, workdir) -> None:
        config = workdir / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: featurelens\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n")
        self.port = free_port()
        self.proc = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait_for(self, promql: str, timeout_s: float = 60) -> list[dict]:
        """Polls until the query returns a non-empty result (or fails the test)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            time.sleep(0.5)
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                result = prometheus_query(self.port, promql)
            except OSError:
                continue  # not listening yet
            if result:
                return result
        raise AssertionError(f"prometheus never returned a result for {promql}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def pair_in_one_batch(stub, first, second, nonce: int, engine=None, blocker_words: int = 400,
                            blocker_extra_tokens: int = 8) -> tuple[list, int]:
    """Run two Generate requests in the same engine steps from start to end; returns (replies, peak running).

    vLLM's CPU GEMMs are not batch-invariant (a row's result may change with the number of rows in the step),
    so a bit-identity comparison needs the same rows in every step of both runs: a dense blocker with a long,
    fresh prompt holds the engine in its prefill while both arrive (so they are admitted in the same step), and
    it generates longer than the pair, so the pair never runs a step without it. Tiny models (short context,
    millisecond steps) pass a shorter prompt (`blocker_words` × 3 words) and more tokens to generate
    (`blocker_extra_tokens` beyond the pair's) so the blocker is still running when the pair arrives."""
    import asyncio

    from featurelens.v1 import featurelens_pb2 as pb

    peak = 0

    async def watch() -> None:
        nonlocal peak
        while engine is not None:
            peak = max(peak, engine.num_unfinished_requests())
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    blocker = asyncio.ensure_future(stub.Generate(pb.GenerateRequest(
        text=f"{nonce} " + "river stone cloud " * blocker_words, sampling=pb.SamplingOptions(temperature=0.0),
        stopping=pb.StoppingOptions(max_new_tokens=max(first.stopping.max_new_tokens, second.stopping.max_new_tokens)
                                    + blocker_extra_tokens, ignore_eos=True))))
    await asyncio.sleep(0.3)
    try:
        pair = await asyncio.gather(stub.Generate(first), stub.Generate(second))
        await blocker
    finally:
        watcher.cancel()
    return list(pair), peak


def serve_process(workdir, port: int, *flags: str, env: dict[str, str] | None = None, metrics_port: int = 0):
    """`featurelens serve` as a child process on `port` (metrics on `metrics_port`, else a free one), its output in
    workdir/serve.log. Returns (process, log path)."""
    import os
    import shutil
    import sys

    log_path = workdir / "serve.log"
    exe = shutil.which("featurelens") or os.path.join(os.path.dirname(sys.executable), "featurelens")
    with open(log_path, "w") as log:
        proc = subprocess.Popen([exe, "serve", "--port", str(port), "--metrics-port", str(metrics_port or free_port()),
                                 *flags],
                                stdout=log, stderr=subprocess.STDOUT, cwd=workdir, env=env)
    return proc, log_path


def wait_serving(channel, proc: subprocess.Popen, timeout_s: float) -> None:
    """Waits until the server's health check says SERVING (fails if the process exits first)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    stub = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "server exited during start-up"
        try:
            if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise AssertionError("server never became SERVING")


# Requests of the mode tests (sparse, quantized) against the shared engine.
PROMPT = [pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="What is the capital of France?")]


def gen(n=12, mode=pb.INFERENCE_MODE_UNSPECIFIED, sparsity=0, request_id="", text=None, stream=False):
    cls = pb.GenerateStreamRequest if stream else pb.GenerateRequest
    prompt = {"text": text} if text else {"chat": pb.ChatMessages(messages=PROMPT)}
    return cls(**prompt, sampling=pb.SamplingOptions(temperature=0.0),
               stopping=pb.StoppingOptions(max_new_tokens=n, ignore_eos=True),
               logprobs=pb.LogprobOptions(token_logprobs=True, top_logprobs=3), mode=mode,
               sparsity_percent=sparsity, request_id=request_id)


def logprobs_of(reply) -> list[tuple[int, float, list]]:
    return [(t.token_id, t.logprob, [(a.token_id, a.logprob) for a in t.top_logprobs]) for t in reply.tokens]
