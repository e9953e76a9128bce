"""`featurelens serve` as a real process: health comes up after warm-up; SIGTERM turns health NOT_SERVING,
refuses new RPCs with UNAVAILABLE and lets the in-flight stream finish within the grace period."""

from __future__ import annotations

import signal
import time

import grpc
import pytest
from featurelens.v1 import featurelens_pb2 as pb
from featurelens.v1 import featurelens_pb2_grpc as pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tests_support import free_port, serve_process, wait_serving


def test_sigterm_drains_gracefully(tmp_path):
    port = free_port()
    proc, log_path = serve_process(tmp_path, port, "--grace-period-s", "60", "--max-num-seqs", "8")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_serving(channel, proc, 300)
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            stub = pb_grpc.FeatureLensServiceStub(channel)
            stream = stub.GenerateStream(pb.GenerateStreamRequest(
                text="Tell me about the ocean.", sampling=pb.SamplingOptions(temperature=0),
                stopping=pb.StoppingOptions(max_new_tokens=48, ignore_eos=True)))
            chunks = [next(stream)]
            proc.send_signal(signal.SIGTERM)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as refused:
                for _ in range(50):  # the listener closes right after NOT_SERVING
                    stub.Generate(pb.GenerateRequest(text="hi"), timeout=5)
                    time.sleep(0.1)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            chunks += list(stream)
            assert sum(len(c.tokens) for c in chunks) == 48
            assert chunks[-1].finish_reason == pb.FINISH_REASON_LENGTH
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log_path.read_text()
    assert "featurelens settings:" in text and "max_new_tokens" in text
    assert "zero-config mode: plaintext gRPC on localhost only" in text


def test_engine_death_exits_non_zero(tmp_path):
    """If vLLM's engine process dies, the server stops serving and exits non-zero for its supervisor."""
    import psutil

    port = free_port()
    proc, log_path = serve_process(tmp_path, port, "--grace-period-s", "60", "--max-num-seqs", "8")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_serving(channel, proc, 300)
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            engines = [p for p in psutil.Process(proc.pid).children(recursive=True)
                       if "EngineCore" in " ".join(p.cmdline()) or "EngineCore" in p.name()]
            assert engines, "no engine-core child process found"
            for engine in engines:
                engine.kill()
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert proc.wait(timeout=60) == 3
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "the vLLM engine died" in log_path.read_text()
