"""One forward and one backward launch of the CUDA scan kernels on a benchmark case, for a
profiler to capture (the inputs of bench/bench_scan.py). A warm-up forward + backward runs
first, so under Nsight Compute skip the first two kernel launches:

    ncu -k regex:coupled_scan --launch-skip 2 --launch-count 2 --clock-control none \\
        --section SpeedOfLight --section Occupancy --section WarpStateStats \\
        python3 bench/profile_scan.py --case a

(`bash bench/gpu_check.sh` runs this when `ncu` is on the machine.)
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_scan import CUDA_SHAPES, DTYPES, forward_backward, leaves, make_inputs  # noqa: E402
from coupled_mamba_ext import coupled_selective_scan  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=sorted(CUDA_SHAPES), default="a")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_scan: no CUDA device is visible")
    shape = CUDA_SHAPES[args.case]
    inputs = make_inputs(shape, DTYPES[args.dtype], "cuda")
    dy = torch.randn(shape[:4], device="cuda").to(DTYPES[args.dtype])
    for _ in range(2):  # warm-up, then the launches to profile
        forward_backward(coupled_selective_scan, leaves(inputs), dy)
        torch.cuda.synchronize()
    print(f"profile_scan: case ({args.case}) {shape} {args.dtype}: one warm-up and one "
          "profiled forward + backward")


if __name__ == "__main__":
    main()
