"""The CUDA kernels' division-free index split (include/coupled_mamba/small_divisor.h) is a
host/device header: compile its C++ test with the host compiler and run it, so that it is
checked on every machine, GPU or not (the kernels that use it run only on a GPU)."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_small_divisor_gives_exact_quotients_and_remainders(tmp_path):
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler found (set CXX, or put c++ / g++ on PATH)")
    binary = tmp_path / "test_small_divisor"
    subprocess.run([compiler, "-O2", "-std=c++17", f"-I{ROOT / 'include'}",
                    str(ROOT / "tests" / "cpp" / "test_small_divisor.cpp"), "-o", str(binary)],
                   check=True, capture_output=True, text=True)
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.startswith("ok: "), run.stdout
