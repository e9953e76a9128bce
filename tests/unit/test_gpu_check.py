"""tools/gpu_check.py runs here too (--device cpu, Triton in its interpreter), so the script a lent GPU
machine gets is known to work before it is spent on one; a failing part is reported, not hidden."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_on_the_cpu_without_an_install():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "typings")}
    out = subprocess.run([sys.executable, "tools/gpu_check.py", "--device", "cpu", "--skip", "engine tier"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = [line for line in out.stdout.splitlines() if line[:4] in ("PASS", "FAIL", "SKIP")]
    assert out.returncode == 0, out.stdout + out.stderr
    assert [line.split(":")[0].split(None, 1) for line in lines] == [
        ["PASS", "triton sparse GEMV"], ["PASS", "row top-k"], ["PASS", "SAE top-k encode"],
        ["PASS", "tap op (compile + CUDA graphs)"], ["SKIP", "engine tier"]]


def test_a_failing_part_fails_the_check(monkeypatch, capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(ROOT / "tools"))

    def broken(device: str):
        raise RuntimeError("kernel mismatch")

    monkeypatch.setitem(gpu_check.PARTS, "row top-k", broken)
    assert gpu_check.main(["--device", "cpu", "--skip", "engine tier", "triton sparse GEMV", "SAE top-k encode"]) == 1
    assert "FAIL  row top-k: RuntimeError: kernel mismatch" in capsys.readouterr().out
