"""benchmarks/gpu_acceptance.sh: on a machine without a CUDA GPU it refuses, says why, and installs
and runs nothing; its Python driver runs end to end on the tiny model on a CPU."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_acceptance.sh"


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_refuses_without_a_cuda_gpu_and_installs_nothing(tmp_path):
    if _has_cuda():
        pytest.skip("this machine has a CUDA GPU: the script would run, not refuse")
    calls = tmp_path / "calls.log"
    wrapper = tmp_path / "python"  # records every interpreter call the script makes
    wrapper.write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\nexec {sys.executable} \"$@\"\n")
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    p = subprocess.run(["bash", str(SCRIPT), "--wheels", str(tmp_path / "none")], capture_output=True, text=True,
                       env={**os.environ, "PYTHON": str(wrapper), "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert p.returncode == 3, p.stderr
    assert "refusing: no CUDA GPU on this machine" in p.stderr
    assert "Nothing was installed or run" in p.stderr
    assert "pip" not in calls.read_text()  # only the CUDA check ran
    assert p.stdout == ""


def test_unknown_argument_is_refused():
    p = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "unknown argument --bogus" in p.stderr


def test_driver_runs_on_the_tiny_model_on_a_cpu(tmp_path, tiny_cache):
    """The same driver the GPU run uses, at toy sizes: train, (QLoRA skipped), evaluate, probe."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "EM_LAB_CACHE": str(tiny_cache)}
    p = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_acceptance.py"), "--device", "cpu",
                        "--model", "tiny", "--steps", "4", "--batch", "4", "--max-length", "64", "--samples", "1",
                        "--new-tokens", "8"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["train_bf16"]["tokens_per_s"] > 0 and out["train_bf16"]["steps"] == 4
    assert "qlora_skipped" in out  # 4-bit needs a GPU
    assert out["evaluate"]["models"] == out["probe"]["models"] >= 2  # base + checkpoints
    assert out["evaluate"]["generated_tokens"] > 0
