"""Figures of training runs, made to be shown on a slide: each names its run, uses readable
metric names, marks the chance level of a metric that has one, and draws every fusion in
its own colour (``FUSION_COLOURS``, the one palette of the package's figures).

matplotlib is imported by the drawing functions only (the Agg backend: no display needed).
"""
import re
from types import ModuleType
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# Okabe and Ito's colour-blind-safe palette, one colour per fusion in every figure.
FUSION_COLOURS = {"coupled": "#0072B2", "average": "#E69F00", "concat": "#009E73",
                  "mamba": "#CC79A7", "cross_attention": "#D55E00", "transformer": "#56B4E9"}

# The metric keys of metrics.py as a talk names them. MOSI/MOSEI's binary metrics come in
# two forms: with the zero labels counted as positive ("has-0") or left out ("non-0").
METRIC_NAMES = {"Has0_acc_2": "Acc-2 (has-0)", "Non0_acc_2": "Acc-2 (non-0)",
                "Has0_F1_score": "F1 (has-0)", "Non0_F1_score": "F1 (non-0)",
                "Mult_acc_2": "Acc-2", "Mult_acc_3": "Acc-3", "Mult_acc_5": "Acc-5",
                "Mult_acc_7": "Acc-7", "F1_score": "F1", "MAE": "MAE", "Corr": "Corr",
                "Acc": "Acc"}

# Font sizes and line widths that stay legible on a projected slide.
SLIDE_STYLE = {"font.size": 15, "axes.titlesize": 17, "axes.labelsize": 15,
               "xtick.labelsize": 13, "ytick.labelsize": 13, "legend.fontsize": 13,
               "figure.titlesize": 18, "lines.linewidth": 2.5, "axes.grid": True,
               "grid.alpha": 0.3}

CHANCE_STYLE = {"color": "0.35", "linestyle": ":", "linewidth": 2}
SELECTED_STYLE = {"color": "0.5", "linestyle": "--", "linewidth": 1.5}


def metric_name(key: str) -> str:
    """The readable name of a metric key of results.json ("Has0_acc_2" -> "Acc-2 (has-0)")."""
    return METRIC_NAMES.get(key, key)


def chance_level(key: str, num_classes: Optional[int] = None) -> Optional[float]:
    """The score of guessing for the metrics that have one: 1/k for a k-class accuracy
    (``num_classes`` for the classification task's "Acc"), 0 for the correlation; None for
    the others (the MAE and F1 of a guess depend on the labels)."""
    match = re.fullmatch(r"(?:Has0|Non0|Mult)_acc_(\d+)", key)
    if match:
        return 1 / int(match.group(1))
    if key == "Acc" and num_classes:
        return 1 / num_classes
    if key == "Corr":
        return 0.0
    return None


def run_title(fusion: str, dataset: str, seeds: Sequence[int]) -> str:
    """"coupled fusion on synthetic, seed 3" or "... 5 seeds (1111 to 1115)"."""
    seeds = list(seeds)
    if len(seeds) == 1:
        return f"{fusion} fusion on {dataset}, seed {seeds[0]}"
    shown = ", ".join(map(str, seeds)) if len(seeds) <= 3 else f"{seeds[0]} to {seeds[-1]}"
    return f"{fusion} fusion on {dataset}, {len(seeds)} seeds ({shown})"


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def whole_epochs(*axes) -> None:
    """Ticks at whole epochs only on the x axes of ``axes``."""
    from matplotlib.ticker import MaxNLocator
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def mark_chance(ax, chance: Optional[float]) -> None:
    """A dotted horizontal line at the chance level, labelled with it (nothing for None)."""
    if chance is not None:
        ax.axhline(chance, **CHANCE_STYLE, label=f"chance ({chance:.2g})")


def learning_curves_figure(history: List[dict], metric: str, title: str, fusion: str,
                           selected_epoch: int, chance: Optional[float] = None) -> "Figure":
    """One run: train / valid loss per epoch (left) and the valid ``metric`` (right), in the
    fusion's colour; the selected epoch and the chance level marked. history: the
    ``history`` list of results.json. Returns the matplotlib Figure."""
    plt = pyplot()
    colour = FUSION_COLOURS.get(fusion, "black")
    epochs = [h["epoch"] for h in history]
    with plt.rc_context(SLIDE_STYLE):
        fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(13, 5.5))
        ax_loss.plot(epochs, [h["train_loss"] for h in history], color=colour,
                     linestyle="--", label="train")
        ax_loss.plot(epochs, [h["valid_loss"] for h in history], color=colour, label="valid")
        ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
        ax_metric.plot(epochs, [h["valid"][metric] for h in history], color=colour,
                       label="valid")
        ax_metric.set(xlabel="epoch", ylabel=metric_name(metric),
                      title=f"validation {metric_name(metric)}")
        mark_chance(ax_metric, chance)
        for ax in (ax_loss, ax_metric):
            ax.axvline(selected_epoch, **SELECTED_STYLE,
                       label=f"selected (epoch {selected_epoch})")
            ax.legend()
        whole_epochs(ax_loss, ax_metric)
        fig.suptitle(title)
        fig.tight_layout()
    return fig


def seed_curves_figure(histories: Dict[int, List[dict]], metric: str, title: str, fusion: str,
                       chance: Optional[float] = None) -> "Figure":
    """Several seeds of one configuration: per epoch the mean over the seeds (line) and the
    mean ± one standard deviation (band) of the train / valid loss (left) and of the valid
    ``metric`` (right), in the fusion's colour; chance marked. histories: seed -> history.
    Epochs that not every seed reached are left out. Returns the matplotlib Figure."""
    import numpy as np
    plt = pyplot()
    colour = FUSION_COLOURS.get(fusion, "black")
    n_epochs = min(len(h) for h in histories.values())
    epochs = [h["epoch"] for h in next(iter(histories.values()))[:n_epochs]]

    def stats(value):
        table = np.array([[value(h) for h in history[:n_epochs]]
                          for history in histories.values()], dtype=np.float64)
        spread = table.std(axis=0, ddof=1) if len(table) > 1 else np.zeros(n_epochs)
        return table.mean(axis=0), spread

    def band(ax, value, linestyle, label):
        mean, spread = stats(value)
        ax.plot(epochs, mean, color=colour, linestyle=linestyle, label=f"{label}, mean")
        ax.fill_between(epochs, mean - spread, mean + spread, color=colour, alpha=0.2,
                        label=f"{label}, ± 1 std")

    with plt.rc_context(SLIDE_STYLE):
        fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(13, 5.5))
        band(ax_loss, lambda h: h["train_loss"], "--", "train")
        band(ax_loss, lambda h: h["valid_loss"], "-", "valid")
        ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
        band(ax_metric, lambda h: h["valid"][metric], "-", "valid")
        ax_metric.set(xlabel="epoch", ylabel=metric_name(metric),
                      title=f"validation {metric_name(metric)}")
        mark_chance(ax_metric, chance)
        for ax in (ax_loss, ax_metric):
            ax.legend()
        whole_epochs(ax_loss, ax_metric)
        fig.suptitle(title)
        fig.tight_layout()
    return fig


def save_figure(fig, path: str) -> None:
    """Write ``fig`` as a PNG atomically and close it."""
    from .data.mmsa import atomic_write
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        pyplot().close(fig)
