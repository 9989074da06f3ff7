"""Draws the figures of the measurement reports from what those runs recorded: the JSON files
under bench/results/ where the run wrote one, else the numbers of the report's own tables
(copied here, each block naming its report).

    python reports/figures/make_report_figures.py      # writes reports/figures/*.png
"""
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "..", "..", "bench", "results")
plt.rcParams.update({"font.size": 13, "axes.titlesize": 14, "figure.dpi": 110})


def load(name: str) -> dict:
    with open(os.path.join(RESULTS, name)) as f:
        return json.load(f)


def save(fig, name: str) -> None:
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, name))
    plt.close(fig)
    print("wrote", name)


def target_line(ax, value: float, label: str) -> None:
    ax.axhline(value, color="black", linestyle="--", linewidth=1)
    ax.text(ax.get_xlim()[1], value, " " + label, va="center", ha="left", fontsize=11)


def cpu_scan_epyc() -> None:
    """reports/2026-12-07-cpu-scan-epyc.md: speed-up over the reference loop, three runs."""
    labels = [("fwd", (3, 32, 256, 50, 64), "L50 N64\nforward"),
              ("fwdbwd", (3, 32, 256, 50, 64), "L50 N64\nfwd + bwd"),
              ("fwd", (3, 4, 256, 2000, 16), "L2000 N16\nforward")]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.25
    for run in (1, 2, 3):
        cases = {(c["mode"], tuple(c["shape"])): c for c in
                 load(f"bench_scan_cpu_epyc_run{run}.json")["cases"]}
        ax.bar([i + (run - 2) * width for i in range(len(labels))],
               [cases[(mode, shape)]["speedup"] for mode, shape, _ in labels], width,
               label=f"run {run}")
    ax.set_xticks(range(len(labels)), [label for _, _, label in labels])
    ax.set_ylabel("speed-up over the reference loop")
    ax.set_title("CPU scan, 2-core AMD EPYC (AVX2), fp32, 2 threads")
    target_line(ax, 10, "target 10×")
    ax.legend(loc="upper right")
    save(fig, "2026-12-07-cpu-scan-epyc.png")


def cpu_scan_epyc_avx512() -> None:
    """reports/2026-12-08-cpu-scan-epyc-avx512.md: the operator's time at M3 b32 d256 L50 N64,
    the kernels of fff6cf7 and of 5022485, three runs each."""
    shape = (3, 32, 256, 50, 64)
    builds = [("fff6cf7", "bench_scan_cpu_epyc_avx512_fff6cf7_run{}.json"),
              ("5022485", "bench_scan_cpu_epyc_avx512_run{}.json")]
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    for ax, (mode, title) in zip(axes, (("fwd", "forward"), ("fwdbwd", "forward + backward"))):
        for i, (build, pattern) in enumerate(builds):
            times = []
            for run in (1, 2, 3):
                cases = {(c["mode"], tuple(c["shape"])): c for c in load(pattern.format(run))["cases"]}
                times.append(cases[(mode, shape)]["op_s"] * 1e3)
            ax.scatter([i] * 3, times, s=50, label=build)
        ax.set_xticks([0, 1], [build for build, _ in builds])
        ax.set_xlim(-0.6, 1.6)
        ax.set_ylim(bottom=0)
        ax.set_ylabel("operator time, ms")
        ax.set_title(title)
    fig.suptitle("CPU scan, 2-core AMD EPYC (AVX-512), M3 b32 d256 L50 N64, fp32, 2 threads")
    save(fig, "2026-12-08-cpu-scan-epyc-avx512.png")


# reports/2026-11-27-cpu-scan-xeon.md, speed-ups at M3 b32 d256 L50 N64 per kernel version.
XEON_L50 = {
    "ec84c65\n(5 runs)": {"forward": [12.7, 10.6, 9.0, 9.0, 10.2],
                          "fwd + bwd": [8.5, 11.3, 9.7, 9.3, 9.8]},
    "1ceb7e3\n(5 runs)": {"forward": [15.4, 9.6, 11.1, 11.6, 12.0],
                          "fwd + bwd": [12.2, 11.5, 12.1, 12.4, 12.9]},
    "1c40adf\n(2 runs)": {"forward": [10.8, 16.1], "fwd + bwd": [10.2, 10.6]},
    "f62fd5b\n(1 run)": {"forward": [16.6], "fwd + bwd": [11.3]},
}


def cpu_scan_xeon() -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for offset, (mode, marker) in zip((-0.12, 0.12), (("forward", "o"), ("fwd + bwd", "s"))):
        for i, runs in enumerate(XEON_L50.values()):
            ax.scatter([i + offset] * len(runs[mode]), runs[mode], marker=marker, s=50,
                       color="tab:blue" if mode == "forward" else "tab:orange",
                       label=mode if i == 0 else None)
    ax.set_xticks(range(len(XEON_L50)), list(XEON_L50))
    ax.set_ylabel("speed-up over the reference loop")
    ax.set_title("CPU scan, 2-core Xeon (AVX-512), M3 b32 d256 L50 N64")
    ax.set_ylim(0, 18)
    target_line(ax, 10, "target 10×")
    ax.legend(loc="lower right")
    save(fig, "2026-11-27-cpu-scan-xeon.png")


def gpu_state_lanes() -> None:
    """reports/2026-11-28-gpu-scan-h200-state-lanes.md: both mappings, bf16."""
    cases = [c for c in load("bench_scan_cuda_h200_state_lanes.json")["cases"]
             if c["dtype"] == "bfloat16"]
    labels = [f"({c['case']}) {'fwd' if c['mode'] == 'fwd' else 'fwd + bwd'}" for c in cases]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.27
    xs = range(len(cases))
    ax.bar([x - width for x in xs], [c["state_lanes_s"] * 1e3 for c in cases], width,
           label="state lanes")
    ax.bar(list(xs), [c["time_lanes_s"] * 1e3 for c in cases], width, label="time lanes")
    ax.bar([x + width for x in xs], [c["ref_s"] * 1e3 for c in cases], width,
           label="reference loop", color="grey")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("ms (log scale)")
    ax.set_title("CUDA scan on an H200, bf16")
    ax.legend()
    save(fig, "2026-11-28-gpu-scan-h200-state-lanes.png")


# reports/2026-11-27-gpu-scan-h200.md, bf16 forward + backward ms of the first version's run;
# the time-parallel kernels' come from bench_scan_cuda_h200.json.
FIRST_VERSION_FWDBWD_MS = {"a": 178.99, "b": 62.85, "c": 190.43}


def gpu_first_kernels() -> None:
    cases = {c["case"]: c for c in load("bench_scan_cuda_h200.json")["cases"]
             if c["dtype"] == "bfloat16" and c["mode"] == "fwdbwd"}
    names = sorted(cases)
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.27
    xs = range(len(names))
    ax.bar([x - width for x in xs], [FIRST_VERSION_FWDBWD_MS[n] for n in names], width,
           label="first version")
    ax.bar(list(xs), [cases[n]["op_s"] * 1e3 for n in names], width, label="time-parallel")
    ax.bar([x + width for x in xs], [cases[n]["ref_s"] * 1e3 for n in names], width,
           label="reference loop", color="grey")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), [f"case ({n})" for n in names])
    ax.set_ylabel("forward + backward ms (log scale)")
    ax.set_title("First CUDA kernels on an H200, bf16")
    ax.legend()
    save(fig, "2026-11-27-gpu-scan-h200.png")


# reports/2026-11-27-demo-time.md: the six fresh-clone runs, minutes and seconds.
DEMO_RUNS = {"4d1304f": (4, 49), "292d9d7": (4, 50), "93746e7": (4, 15), "99179e7": (5, 10),
             "848c19d": (3, 32), "44b72ff": (2, 47)}


def demo_time() -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.bar(list(DEMO_RUNS), [m + s / 60 for m, s in DEMO_RUNS.values()], color="tab:blue")
    ax.set_ylabel("minutes, fresh clone")
    ax.set_title("make demo on a shared 2-core VM")
    target_line(ax, 5, "5 min")
    save(fig, "2026-11-27-demo-time.png")


# reports/2026-11-28-loader-memory.md: peak memory over the file's size.
LOADER = {"0.99 GiB file": {"load_mmsa": 1.05 / 0.99, "copy=True": 2.00 / 0.99},
          "3.96 GiB file": {"load_mmsa": 1.02, "copy=True": 2.01}}


def loader_memory() -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = 0.35
    for i, reader in enumerate(("load_mmsa", "copy=True")):
        ax.bar([x + (i - 0.5) * width for x in range(len(LOADER))],
               [sizes[reader] for sizes in LOADER.values()], width, label=reader)
    ax.set_xticks(range(len(LOADER)), list(LOADER))
    ax.set_ylabel("peak memory / file size")
    ax.set_title("Reading an MMSA pickle")
    ax.legend()
    save(fig, "2026-11-28-loader-memory.png")


if __name__ == "__main__":
    cpu_scan_epyc()
    cpu_scan_epyc_avx512()
    cpu_scan_xeon()
    gpu_state_lanes()
    gpu_first_kernels()
    demo_time()
    loader_memory()
