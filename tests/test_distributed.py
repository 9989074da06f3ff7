"""DistributedDataParallel on the CPU: 2 processes under torchrun (gloo) train the same
weights as 1 process with the same global batch."""
import json
import os
import subprocess
import sys

import torch

from coupled_mamba_ext import train as training
from coupled_mamba_ext.cli import main
from coupled_mamba_ext.data import write_synthetic

# Global batch 16 divides the 64 training samples, so both runs see the same 4 batches per
# epoch; no dropout, whose random masks would differ between the runs.
ARGS = ["--epochs", "2", "--batch-size", "16", "--dropout", "0", "--d-model", "8",
        "--n-layers", "1", "--d-state", "4", "--seq-len", "8", "--device", "cpu"]


def test_two_gloo_processes_match_one_process(tmp_path):
    data = tmp_path / "synthetic.pkl"
    write_synthetic(data, seed=0, sizes={"train": 64, "valid": 16, "test": 16})
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(["train", "--data", str(data), "--out", str(single), *ARGS]) == 0

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "coupled_mamba_ext", "train", "--data", str(data), "--out", str(ddp), *ARGS],
        env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    saved = training.load_checkpoint(str(single / "checkpoint.pt"))
    expected = saved["model"]
    got = training.load_checkpoint(str(ddp / "checkpoint.pt"))["model"]
    for name, weight in expected.items():
        assert torch.allclose(got[name], weight, rtol=1e-4, atol=1e-5), name

    # ... and training moved the weights far more than that tolerance
    torch.manual_seed(0)
    initial = training.build_model(training.TrainConfig(**saved["config"]), saved["input_dims"],
                                   saved["num_classes"]).state_dict()
    assert max((expected[k] - initial[k]).abs().max().item() for k in initial) > 1e-2
    # rank 0 alone logs and writes: one log line per epoch, not one per process
    log = (ddp / "train.log").read_text()
    assert log.count("epoch 1/2") == 1 and "2 process(es)" in log
    assert json.loads((ddp / "results.json").read_text())["config"]["batch_size"] == 16
