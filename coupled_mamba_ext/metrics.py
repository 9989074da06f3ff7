"""Multimodal sentiment analysis metrics, computed the way the MMSA framework computes them
(docs/contract.md), so that numbers are comparable with the paper's tables.

Everything is computed in float64 and returned unrounded; accuracies are fractions in [0, 1].
This module needs only numpy (it imports nothing from the compiled operator).
"""
from typing import Dict

import numpy as np

MSA_DATASETS = ("mosi", "mosei", "sims", "simsv2")

# CH-SIMS class boundaries: class i holds the values in (edges[i], edges[i + 1]].
SIMS_CLASS_EDGES = {
    2: (-1.01, 0.0, 1.01),
    3: (-1.01, -0.1, 0.1, 1.01),
    5: (-1.01, -0.7, -0.1, 0.1, 0.7, 1.01),
}


def _flat_numpy(x, dtype=None) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, possibly on an accelerator or requiring grad
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(-1)


def accuracy(pred, truth) -> float:
    """Fraction of positions where pred == truth; pred, truth (N,). NaN when N = 0."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    return float(np.mean(pred == truth)) if truth.size else float("nan")


def weighted_f1(pred, truth) -> float:
    """F1 per class, averaged with weights = number of true samples of the class.

    pred, truth (N,) of class labels. Same value as scikit-learn's
    ``f1_score(truth, pred, average="weighted")``: a class that appears only in ``pred`` has
    weight 0, and a class never predicted has F1 = 0. NaN when N = 0.
    """
    pred, truth = np.asarray(pred), np.asarray(truth)
    if truth.size == 0:
        return float("nan")
    total = 0.0
    for cls in np.unique(truth):
        true_positives = np.sum((pred == cls) & (truth == cls))
        support = np.sum(truth == cls)
        # F1 = 2·TP / (2·TP + FP + FN) = 2·TP / (#predicted as cls + #truly cls)
        f1 = 2.0 * true_positives / (np.sum(pred == cls) + support)
        total += support * f1
    return float(total / truth.size)


def pearson_corr(pred, truth) -> float:
    """Pearson correlation of pred and truth (N,). NaN when either is constant (undefined)."""
    pred, truth = _flat_numpy(pred, np.float64), _flat_numpy(truth, np.float64)
    dp, dt = pred - pred.mean(), truth - truth.mean()
    denom = np.sqrt(np.sum(dp * dp) * np.sum(dt * dt))
    return float(np.sum(dp * dt) / denom) if denom > 0 else float("nan")


def sims_classes(values: np.ndarray, n_classes: int) -> np.ndarray:
    """Class index of each value under the CH-SIMS n-class intervals (lo, hi]; values (N,)
    already clipped to [-1, 1]. Returns int64 (N,)."""
    edges = np.asarray(SIMS_CLASS_EDGES[n_classes])
    # searchsorted(side="left") returns i with edges[i-1] < v <= edges[i]: the (lo, hi] rule.
    return np.searchsorted(edges, values, side="left") - 1


def _mosi_metrics(pred: np.ndarray, truth: np.ndarray) -> Dict[str, float]:
    non_zero = truth != 0
    return {
        "Has0_acc_2": accuracy(pred >= 0, truth >= 0),
        "Has0_F1_score": weighted_f1(pred >= 0, truth >= 0),
        "Non0_acc_2": accuracy(pred[non_zero] > 0, truth[non_zero] > 0),
        "Non0_F1_score": weighted_f1(pred[non_zero] > 0, truth[non_zero] > 0),
        # np.round rounds half to even, as MMSA does: 2.5 -> 2, -0.5 -> -0.
        "Mult_acc_5": accuracy(np.round(np.clip(pred, -2, 2)), np.round(np.clip(truth, -2, 2))),
        "Mult_acc_7": accuracy(np.round(np.clip(pred, -3, 3)), np.round(np.clip(truth, -3, 3))),
        "MAE": float(np.mean(np.abs(pred - truth))),
        "Corr": pearson_corr(pred, truth),
    }


def _sims_metrics(pred: np.ndarray, truth: np.ndarray) -> Dict[str, float]:
    # MMSA clips first, so MAE and Corr of SIMS are those of the clipped values.
    pred, truth = np.clip(pred, -1, 1), np.clip(truth, -1, 1)
    pred2, truth2 = sims_classes(pred, 2), sims_classes(truth, 2)
    return {
        "Mult_acc_2": accuracy(pred2, truth2),
        "Mult_acc_3": accuracy(sims_classes(pred, 3), sims_classes(truth, 3)),
        "Mult_acc_5": accuracy(sims_classes(pred, 5), sims_classes(truth, 5)),
        "F1_score": weighted_f1(pred2, truth2),
        "MAE": float(np.mean(np.abs(pred - truth))),
        "Corr": pearson_corr(pred, truth),
    }


def msa_metrics(pred, truth, dataset: str) -> Dict[str, float]:
    """MMSA's regression metrics for one dataset.

    pred, truth: (N,) real-valued sentiment scores (numpy arrays, lists or torch tensors).
    dataset: "mosi" / "mosei" (labels in [-3, 3]) -> Has0_acc_2, Has0_F1_score, Non0_acc_2,
    Non0_F1_score, Mult_acc_5, Mult_acc_7, MAE, Corr; "sims" / "simsv2" (labels in [-1, 1])
    -> Mult_acc_2, Mult_acc_3, Mult_acc_5, F1_score, MAE, Corr.
    Returns unrounded Python floats; accuracies are fractions. A metric that is undefined for
    the input (Non0_* when every truth is 0, Corr of a constant) is NaN.
    """
    dataset = dataset.lower()
    if dataset not in MSA_DATASETS:
        raise ValueError(f"msa_metrics: dataset must be one of {MSA_DATASETS}, got {dataset!r}")
    pred, truth = _flat_numpy(pred, np.float64), _flat_numpy(truth, np.float64)
    if pred.shape != truth.shape or pred.size == 0:
        raise ValueError(f"msa_metrics: pred and truth must hold the same non-zero number of "
                         f"values, got {pred.size} and {truth.size}")
    # A NaN would count as a negative prediction in the accuracies (every comparison with it
    # is false) while MAE and Corr came out NaN: refuse it rather than report half of it.
    for name, values in (("pred", pred), ("truth", truth)):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise ValueError(f"msa_metrics: {name} must be finite, got {bad} non-finite "
                             f"value(s) of {values.size}")
    return _mosi_metrics(pred, truth) if dataset in ("mosi", "mosei") else _sims_metrics(pred, truth)


def classification_metrics(pred_labels, truth_labels) -> Dict[str, float]:
    """Metrics of a classifier: pred_labels, truth_labels (N,) integer classes.

    Returns {"Acc": accuracy, "F1_score": weighted F1} as unrounded fractions.
    """
    pred, truth = _flat_numpy(pred_labels), _flat_numpy(truth_labels)
    if pred.shape != truth.shape or pred.size == 0:
        raise ValueError(f"classification_metrics: pred_labels and truth_labels must hold the "
                         f"same non-zero number of values, got {pred.size} and {truth.size}")
    return {"Acc": accuracy(pred, truth), "F1_score": weighted_f1(pred, truth)}
