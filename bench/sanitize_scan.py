"""Forward + backward of the CUDA scan kernels on a few small shapes, both thread mappings,
for NVIDIA's compute-sanitizer to watch (out-of-bounds and misaligned accesses with
`--tool memcheck`, shared-memory races between threads with `--tool racecheck`):

    compute-sanitizer --tool racecheck --error-exitcode 1 python3 bench/sanitize_scan.py

The shapes reach the kernels' edge cases (lanes per row 1 to 32, padding states, idle rows,
chunks and tiles cut mid-way, more than 4 modalities, the backward's deterministic sums)
while staying small enough to run under the sanitizer in seconds. `bash bench/gpu_check.sh`
runs it when compute-sanitizer is on the machine.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_scan import forward_backward, leaves, make_inputs, with_kernels  # noqa: E402
from coupled_mamba_ext import coupled_selective_scan  # noqa: E402
from coupled_mamba_ext.train import deterministic_algorithms  # noqa: E402

# (M, batch, dim, L, N)
SHAPES = [(3, 2, 40, 70, 16), (2, 1, 9, 130, 64), (4, 1, 5, 37, 136), (2, 1, 35, 12, 1),
          (5, 1, 20, 66, 16), (3, 2, 16, 50, 64)]


def main():
    if not torch.cuda.is_available():
        sys.exit("sanitize_scan: no CUDA device is visible")
    def run(shape):
        inputs = leaves(make_inputs(shape, torch.bfloat16, "cuda"))
        dy = torch.randn(shape[:4], device="cuda").to(torch.bfloat16)
        forward_backward(coupled_selective_scan, inputs, dy)
        torch.cuda.synchronize()

    for mapping in ("state_lanes", "time_lanes"):
        for shape in SHAPES:
            with_kernels(mapping, lambda: run(shape))
    # The state-lanes backward's deterministic sums (per-block slots; M <= 4 only).
    deterministic_shapes = [shape for shape in SHAPES if shape[0] <= 4]
    with deterministic_algorithms():
        for shape in deterministic_shapes:
            run(shape)
    print(f"sanitize_scan: {len(SHAPES)} shapes x 2 mappings, forward + backward, bf16; "
          f"{len(deterministic_shapes)} shapes with deterministic sums")


if __name__ == "__main__":
    main()
