"""DistributedDataParallel on the CPU: 2 processes under torchrun (gloo) train the same
weights as 1 process with the same global batch."""
import json
import os
import subprocess
import sys

import torch

import coupled_mamba_ext
from coupled_mamba_ext import train as training
from coupled_mamba_ext.data import write_synthetic

# Global batch 16 divides the 64 training samples, so both runs see the same 4 batches per
# epoch; no dropout, whose random masks would differ between the runs. Cross-entropy, not
# L1: the L1 gradient of a bias is a sum of signs that often cancels exactly, leaving
# rounding noise that Adam's normalisation blows up to a full step of either sign.
ARGS = ["--task", "classification", "--epochs", "2", "--batch-size", "16", "--dropout", "0",
        "--d-model", "8", "--n-layers", "1", "--d-state", "4", "--seq-len", "8", "--device", "cpu"]


def test_two_gloo_processes_match_one_process(tmp_path):
    data = tmp_path / "synthetic.pkl"
    write_synthetic(data, seed=0, sizes={"train": 64, "valid": 16, "test": 16})
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    # One thread everywhere, so that reductions inside each process add in the same order.
    # The children import the package this test imported (the installed wheel under
    # `make test`, the source tree with PYTHONPATH=.), and run outside the source tree,
    # which `python -m` would otherwise put first on sys.path.
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(coupled_mamba_ext.__file__)))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")])}
    launchers = {single: [sys.executable],
                 ddp: [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc_per_node", "2"]}
    for out, launcher in launchers.items():
        run = subprocess.run([*launcher, "-m", "coupled_mamba_ext", "train", "--data", str(data),
                              "--out", str(out), *ARGS],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    saved = training.load_checkpoint(str(single / "checkpoint.pt"))
    expected = saved["model"]
    got = training.load_checkpoint(str(ddp / "checkpoint.pt"))["model"]
    for name, weight in expected.items():
        assert torch.allclose(got[name], weight, rtol=1e-4, atol=1e-6), name

    # ... and training moved the weights far more than that tolerance
    torch.manual_seed(0)
    initial = training.build_model(training.TrainConfig(**saved["config"]), saved["input_dims"],
                                   saved["num_classes"]).state_dict()
    assert max((expected[k] - initial[k]).abs().max().item() for k in initial) > 1e-3
    # rank 0 alone logs and writes: one log line per epoch, not one per process
    log = (ddp / "train.log").read_text()
    assert log.count("epoch 1/2") == 1 and "2 process(es)" in log
    assert json.loads((ddp / "results.json").read_text())["config"]["batch_size"] == 16
