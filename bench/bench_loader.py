"""Peak memory and time of reading an MMSA pickle shaped like unaligned CMU-MOSEI.

    python bench/bench_loader.py --scale 0.125     # 1/8 of MOSEI's 22 856 clips: a 1.0 GB file

Writes a pickle of random features with MOSEI's shapes (text 50 x 768, audio 500 x 74, vision
500 x 35, BERT ids, true lengths, -inf in the audio) to a temporary folder, then reads it in
fresh interpreters, side by side: `load_mmsa` (which cleans the unpickled float32 features in
place) and the same parse with `copy=True` (every split's features converted into new arrays,
as `load_mmsa` once did). Prints the file's size and, for each, the seconds and
the peak resident memory above that of an interpreter that has imported the package.
"""
import argparse
import os
import pickle
import subprocess
import sys
import tempfile

import numpy as np

MOSEI_CLIPS = {"train": 16326, "valid": 1871, "test": 4659}

MEASURE = """
import resource, sys, time
from coupled_mamba_ext.data import mmsa
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
if sys.argv[2] == "load_mmsa":
    data = mmsa.load_mmsa(sys.argv[1])
else:
    data = mmsa.parse_mmsa(mmsa.read_pickle(sys.argv[1]), source=sys.argv[1], copy=True)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(seconds, (peak - before) * 1024)
"""


def write_mosei_like(path: str, scale: float, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    raw = {}
    for split, clips in MOSEI_CLIPS.items():
        n = max(1, int(clips * scale))
        audio = rng.standard_normal((n, 500, 74), dtype=np.float32)
        audio[:, ::50, 0] = -np.inf  # MOSEI's silent frames
        raw[split] = {
            "text": rng.standard_normal((n, 50, 768), dtype=np.float32),
            "audio": audio,
            "vision": rng.standard_normal((n, 500, 35), dtype=np.float32),
            "text_bert": np.ones((n, 3, 50), dtype=np.float32),
            "audio_lengths": rng.integers(1, 501, n),
            "vision_lengths": rng.integers(1, 501, n),
            "regression_labels": rng.uniform(-3, 3, n).astype(np.float32),
        }
    with open(path, "wb") as f:
        pickle.dump(raw, f, protocol=4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=0.125,
                        help="fraction of MOSEI's clips (default 0.125: a 1.0 GB file)")
    parser.add_argument("--write-only", metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_only:
        write_mosei_like(args.write_only, args.scale)
        return
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "mosei_like.pkl")
        # Written by another interpreter: a process started from one that held the arrays
        # would inherit its peak resident memory.
        subprocess.run([sys.executable, __file__, "--scale", str(args.scale), "--write-only", path],
                       check=True)
        size = os.path.getsize(path)
        print(f"file: {size / 2**30:.2f} GiB ({args.scale:g} of MOSEI's clips)")
        print(f"{'reader':<22} {'seconds':>8} {'peak GiB':>9} {'peak / file':>12}")
        for reader in ("load_mmsa", "parse_mmsa(copy=True)"):
            out = subprocess.run([sys.executable, "-c", MEASURE, path, reader], env=env,
                                 check=True, capture_output=True, text=True).stdout.split()
            seconds, peak = float(out[0]), float(out[1])
            print(f"{reader:<22} {seconds:8.2f} {peak / 2**30:9.2f} {peak / size:12.2f}")


if __name__ == "__main__":
    main()
