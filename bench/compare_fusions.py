"""Compare finished `coupled-mamba train` runs of two fusions over seeds: a table of the test
metrics per run, the paired differences (same seed, same data) with their standard error,
and a figure of the validation accuracy per epoch and the test accuracy per seed.

    python bench/compare_fusions.py runs/coupled_s* runs/average_s* --png comparison.png

Each argument is a run's --out directory (its results.json is read); runs are grouped by
their configured fusion and paired by seed. The fusion studies in reports/ were made with
it.
"""
import argparse
import json
import math
import os
import statistics
import sys
from typing import Dict, List, Tuple

# (metric key in results.json, column name, digits)
METRICS = (("Has0_acc_2", "test Acc-2", 4), ("Has0_F1_score", "F1", 4), ("MAE", "MAE", 3),
           ("Corr", "Corr", 3))
LEARNED_AT = 0.8  # "first epoch with valid Acc-2 >= 0.8": when a run has learned the rule


def load_runs(paths: List[str]) -> Dict[str, Dict[int, dict]]:
    """{fusion: {seed: results}} from the runs' results.json files."""
    runs: Dict[str, Dict[int, dict]] = {}
    for path in paths:
        file = os.path.join(path, "results.json")
        if not os.path.exists(file):
            sys.exit(f"compare_fusions: {file} does not exist (is {path} a finished run?)")
        with open(file) as f:
            results = json.load(f)
        fusion, seed = results["config"]["fusion"], results["config"]["seed"]
        if seed in runs.setdefault(fusion, {}):
            sys.exit(f"compare_fusions: two {fusion} runs with seed {seed} ({path})")
        runs[fusion][seed] = results
    return runs


def first_epoch_reaching(results: dict, level: float):
    return next((h["epoch"] for h in results["history"]
                 if h["valid"]["Has0_acc_2"] >= level), None)


def print_table(runs: Dict[str, Dict[int, dict]]) -> None:
    header = ["fusion", "seed"] + [name for _, name, _ in METRICS] + [
        "selected epoch", f"first epoch with valid Acc-2 ≥ {LEARNED_AT}", "train s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for fusion, by_seed in runs.items():
        for seed, r in sorted(by_seed.items()):
            cells = [fusion, str(seed)] + [f"{r['test'][key]:.{digits}f}"
                                           for key, _, digits in METRICS]
            learned = first_epoch_reaching(r, LEARNED_AT)
            cells += [str(r["best_epoch"]), "never" if learned is None else str(learned),
                      f"{r['train_seconds']:.0f}"]
            print("| " + " | ".join(cells) + " |")


def paired_differences(runs: Dict[str, Dict[int, dict]], first: str, second: str) -> None:
    seeds = sorted(set(runs[first]) & set(runs[second]))
    print(f"\n{first} − {second}, paired by seed ({len(seeds)} seeds: {seeds}):")
    for key, name, digits in METRICS:
        a = [runs[first][s]["test"][key] for s in seeds]
        b = [runs[second][s]["test"][key] for s in seeds]
        d = [x - y for x, y in zip(a, b)]
        se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
        print(f"  {name:10s} {first} {statistics.mean(a):.{digits}f}, {second} "
              f"{statistics.mean(b):.{digits}f}; difference {statistics.mean(d):+.{digits}f} "
              f"± {se:.{digits}f} (standard error); {first} higher for "
              f"{sum(x > 0 for x in d)}, lower for {sum(x < 0 for x in d)}, equal for "
              f"{sum(x == 0 for x in d)} seeds")


def plot(runs: Dict[str, Dict[int, dict]], path: str) -> None:
    """Validation Acc-2 per epoch (one line per seed) and test Acc-2 per seed, each fusion
    in its colour of coupled_mamba_ext.plots, chance marked, the dataset and seeds named."""
    from coupled_mamba_ext import plots
    plt = plots.pyplot()
    key = "Has0_acc_2"
    name = plots.metric_name(key)
    some_run = next(iter(next(iter(runs.values())).values()))
    seeds = sorted({s for by_seed in runs.values() for s in by_seed})
    with plt.rc_context(plots.SLIDE_STYLE):
        fig, (curves, tests) = plt.subplots(1, 2, figsize=(14, 5.5),
                                            gridspec_kw={"width_ratios": [3, 2]})
        for fusion, by_seed in runs.items():
            colour = plots.FUSION_COLOURS.get(fusion, "black")
            for i, (seed, r) in enumerate(sorted(by_seed.items())):
                epochs = [h["epoch"] for h in r["history"]]
                accuracy = [h["valid"][key] for h in r["history"]]
                curves.plot(epochs, accuracy, color=colour, alpha=0.6, lw=1.5,
                            label=fusion if i == 0 else None)
            tests.plot(sorted(by_seed), [by_seed[s]["test"][key] for s in sorted(by_seed)], "o",
                       markersize=9, color=colour, label=fusion)
        tests.set_xticks(seeds)
        curves.set(xlabel="epoch", ylabel=f"validation {name}",
                   title="validation, one line per seed")
        tests.set(xlabel="seed", ylabel=f"test {name} (selected model)", title="test, per seed")
        for ax in (curves, tests):
            plots.mark_chance(ax, plots.chance_level(key))
            ax.legend()
        plots.whole_epochs(curves)
        fig.suptitle(f"{' vs '.join(runs)} fusion on {some_run['config']['dataset']}, "
                     f"{len(seeds)} seeds")
        fig.tight_layout()
    plots.save_figure(fig, path)
    print(f"\nwrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (--out of `train`)")
    parser.add_argument("--pair", nargs=2, metavar=("FIRST", "SECOND"),
                        default=("coupled", "average"), help="the two fusions to pair")
    parser.add_argument("--png", help="also draw the figure into this file")
    args = parser.parse_args()
    runs = load_runs(args.runs)
    print_table(runs)
    missing = [f for f in args.pair if f not in runs]
    if missing:
        sys.exit(f"compare_fusions: no runs of {', '.join(missing)} among the arguments")
    paired_differences(runs, *args.pair)
    if args.png:
        plot(runs, args.png)


if __name__ == "__main__":
    main()
