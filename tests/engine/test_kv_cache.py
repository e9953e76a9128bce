"""The KV cache element type (--kv-cache-dtype): settings, the start-up check, and a real server whose KV cache
is fp8 answering in every inference mode, reporting its dtype and capacity in GetModelInfo and the metrics."""

from __future__ import annotations

import os
import subprocess
import urllib.request

import grpc
import torch
from featurelens.v1 import featurelens_pb2 as pb
from featurelens.v1 import featurelens_pb2_grpc as pb_grpc
from tests_support import free_port, serve_process, wait_serving

# SmolLM2-135M: K and V for 30 layers of 3 KV heads x 64 dims per token.
KV_VALUES_PER_TOKEN = 2 * 30 * 3 * 64
BLOCK_TOKENS = 128  # vLLM's CPU block size
FP8_ON_THIS_CPU = torch.cpu._is_avx512_supported() or torch.cpu._is_amx_tile_supported()


def assert_capacity(tokens: int, space_bytes: int, bytes_per_value: int) -> None:
    """The KV cache holds every whole block that fits into its space, no more."""
    per_block = BLOCK_TOKENS * KV_VALUES_PER_TOKEN * bytes_per_value
    assert tokens % BLOCK_TOKENS == 0 and tokens // BLOCK_TOKENS == space_bytes // per_block, (tokens, space_bytes)


async def test_served_engine_reports_its_kv_cache(stub):
    info = await stub.GetModelInfo(pb.GetModelInfoRequest())
    assert info.kv_cache_dtype == "auto"
    assert_capacity(info.kv_cache_tokens, int(os.environ["VLLM_CPU_KVCACHE_SPACE"]) << 30, 2)  # bf16


def _ask(stub, mode: int, level: int = 0) -> str:
    request = pb.GenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER,
                                                      content="What is the capital of France?")]),
        sampling=pb.SamplingOptions(temperature=0), stopping=pb.StoppingOptions(max_new_tokens=24),
        mode=mode, sparsity_percent=level)
    return stub.Generate(request, timeout=120).text


def test_fp8_kv_cache_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}  # --kv-cache-gib decides
    port, metrics_port = free_port(), free_port()
    proc, log_path = serve_process(tmp_path, port, "--kv-cache-dtype", "fp8", "--kv-cache-gib", "1",
                                   "--max-num-seqs", "8", env=env, metrics_port=metrics_port)
    try:
        if not FP8_ON_THIS_CPU:  # the start-up check refuses it with one line and exit code 2
            assert proc.wait(timeout=300) == 2
            assert "kv_cache_dtype: fp8 needs a GPU or a CPU with AVX-512 or AMX" in log_path.read_text()
            return
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_serving(channel, proc, 300)
            stub = pb_grpc.FeatureLensServiceStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
            assert info.kv_cache_dtype == "fp8"
            assert_capacity(info.kv_cache_tokens, 1 << 30, 1)  # one byte per value: twice bf16's tokens
            # Every inference mode reads the same fp8 KV cache and still answers.
            for mode, level in ((pb.INFERENCE_MODE_DENSE, 0), (pb.INFERENCE_MODE_QUANTIZED, 0),
                                (pb.INFERENCE_MODE_SPARSE, 25)):
                text = _ask(stub, mode, level)
                assert "Paris" in text, (pb.InferenceMode.Name(mode), text)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            scraped = response.read().decode()
        assert 'kv_cache_dtype="fp8"' in next(line for line in scraped.splitlines()
                                              if line.startswith("featurelens_engine_info{"))
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert "KV cache fp8" in log_path.read_text()
