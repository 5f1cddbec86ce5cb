"""`scripts/gpu_check.sh`: what it does where no GPU is lent (here and in CI), and that it selects the CUDA tests."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible: the script would run the full check")
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_without_a_gpu_it_stops_at_once_and_says_why(tmp_path):
    result = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "results")], capture_output=True, text=True,
                            timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert result.returncode == 2, result.stdout + result.stderr
    summary = (tmp_path / "results" / "summary.txt").read_text()
    assert "no CUDA device visible" in summary and "nothing was checked" in summary
    assert not (tmp_path / "results" / "cuda_tests.txt").exists()  # no step ran


def test_the_cuda_marker_selects_every_cuda_test():
    """`pytest -m cuda` (what the script runs) collects the CUDA tests of the files that have them."""
    files = ["tests/test_cuda.py", "tests/test_backends.py", "tests/test_bench.py"]
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p",
                             "no:cacheprovider", *files], cwd=REPO, capture_output=True, text=True, timeout=300)
    collected = {line.split("::")[0] for line in result.stdout.splitlines() if "::" in line}
    assert collected == set(files), result.stdout[-2000:]
    assert sum("tests/test_cuda.py::" in line for line in result.stdout.splitlines()) >= 20
