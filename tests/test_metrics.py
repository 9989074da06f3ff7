"""msa_metrics and its parts on hand-computed cases (docs/contract.md)."""
import math

import pytest
import torch

from coupled_mamba_ext.metrics import (accuracy, classification_metrics, msa_metrics,
                                       pearson_corr, sims_classes, weighted_f1)


def test_weighted_f1_by_hand():
    # class 0: TP 2, predicted 2, true 3 -> F1 4/5; class 1: TP 1, predicted 2, true 1 -> 2/3
    assert weighted_f1([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx((3 * 0.8 + 1 * 2 / 3) / 4)
    # a class never predicted has F1 0; one that is only predicted has weight 0
    assert weighted_f1([0, 0], [0, 1]) == pytest.approx((1 * 2 / 3 + 1 * 0.0) / 2)
    assert weighted_f1([0, 1], [0, 0]) == pytest.approx(2 / 3)
    assert weighted_f1([True, False], [True, False]) == 1.0
    assert math.isnan(weighted_f1([], []))


def test_accuracy_and_corr_by_hand():
    assert accuracy([1, 2, 3, 4], [1, 0, 3, 0]) == 0.5
    assert math.isnan(accuracy([], []))
    # centred: (-1, 0, 1) and (-1, 1, 0): covariance 1, norms sqrt(2) each
    assert pearson_corr([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]) == pytest.approx(0.5)
    assert math.isnan(pearson_corr([2.0, 2.0, 2.0], [1.0, 3.0, 2.0]))


# Ties on half values (2.5, -0.5, 1.5), zeros in truth and in pred, values beyond the clip range.
MOSI_PRED = [2.5, -0.5, 0.0, 1.4, -3.7, 0.2]
MOSI_TRUTH = [2.0, 0.0, -1.0, 1.5, -2.6, 0.0]


def test_mosi_metrics_by_hand():
    m = msa_metrics(MOSI_PRED, MOSI_TRUTH, "mosi")
    assert set(m) == {"Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score",
                      "Mult_acc_5", "Mult_acc_7", "MAE", "Corr"}
    assert m["MAE"] == pytest.approx((0.5 + 0.5 + 1.0 + 0.1 + 1.1 + 0.2) / 6)
    # >= 0: pred T F T T F T, truth T T F T F T -> 4 of 6 agree
    assert m["Has0_acc_2"] == pytest.approx(4 / 6)
    # class True: TP 3, predicted 4, true 4 -> 3/4; class False: TP 1, predicted 2, true 2 -> 1/2
    assert m["Has0_F1_score"] == pytest.approx((4 * 0.75 + 2 * 0.5) / 6)
    # truth != 0 keeps 2.0, -1.0, 1.5, -2.6; pred 0.0 is not > 0, so all four agree
    assert m["Non0_acc_2"] == 1.0 and m["Non0_F1_score"] == 1.0
    # round half to even: 2.5 -> 2 (= truth 2), -0.5 -> -0 (= truth 0), truth 1.5 -> 2 (!= 1);
    # -3.7 clips to -3 and -2.6 rounds to -3
    assert m["Mult_acc_7"] == pytest.approx(4 / 6)
    # clipped to +-2: 2.5 -> 2, -3.7 -> -2, -2.6 -> -2
    assert m["Mult_acc_5"] == pytest.approx(4 / 6)
    assert msa_metrics(MOSI_PRED, MOSI_TRUTH, "MOSEI") == m  # MOSEI: the same definitions
    assert all(type(v) is float for v in m.values())


def test_mosi_metrics_accept_tensors_and_rounding_is_half_to_even():
    m = msa_metrics(torch.tensor(MOSI_PRED), torch.tensor(MOSI_TRUTH), "mosi")
    assert m["Mult_acc_7"] == pytest.approx(4 / 6)
    # half-up rounding would map 0.5 -> 1 and 1.5 -> 2 alike; half to even keeps 0.5 -> 0
    assert msa_metrics([0.5, 1.5], [0.0, 2.0], "mosi")["Mult_acc_7"] == 1.0
    assert msa_metrics([0.5, 2.5], [1.0, 3.0], "mosi")["Mult_acc_7"] == 0.0


def test_non0_is_nan_when_every_truth_is_zero():
    m = msa_metrics([0.3, -0.2], [0.0, 0.0], "mosi")
    assert math.isnan(m["Non0_acc_2"]) and math.isnan(m["Non0_F1_score"])
    assert m["Has0_acc_2"] == 0.5


def test_sims_classes_use_left_open_intervals():
    values = [-1.0, -0.7, -0.69, -0.1, 0.0, 0.1, 0.11, 0.7, 1.0]
    assert sims_classes(values, 2).tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert sims_classes(values, 3).tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 2]
    assert sims_classes(values, 5).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4]


def test_sims_metrics_by_hand():
    pred = [1.3, 0.1, -0.1, 0.05, -0.75, 0.0]
    truth = [0.8, 0.2, -0.2, 0.0, -1.0, -0.6]
    m = msa_metrics(pred, truth, "sims")
    assert set(m) == {"Mult_acc_2", "Mult_acc_3", "Mult_acc_5", "F1_score", "MAE", "Corr"}
    # 2 classes: pred 1 1 0 1 0 0, truth 1 1 0 0 0 0
    assert m["Mult_acc_2"] == pytest.approx(5 / 6)
    # 3 classes: pred 2 1 0 1 0 1, truth 2 2 0 1 0 0
    assert m["Mult_acc_3"] == pytest.approx(4 / 6)
    # 5 classes: pred 4 2 1 2 0 2, truth 4 3 1 2 0 1
    assert m["Mult_acc_5"] == pytest.approx(4 / 6)
    # class 0: TP 3, predicted 3, true 4 -> 6/7; class 1: TP 2, predicted 3, true 2 -> 4/5
    assert m["F1_score"] == pytest.approx((4 * 6 / 7 + 2 * 0.8) / 6)
    # MAE of the clipped predictions: 1.3 counts as 1.0
    assert m["MAE"] == pytest.approx((0.2 + 0.1 + 0.1 + 0.05 + 0.25 + 0.6) / 6)
    clipped = [1.0, 0.1, -0.1, 0.05, -0.75, 0.0]
    assert m["Corr"] == pytest.approx(pearson_corr(clipped, truth))
    assert msa_metrics(pred, truth, "simsv2") == m


def test_classification_metrics():
    m = classification_metrics(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 0, 1]))
    assert m == {"Acc": 0.75, "F1_score": pytest.approx((3 * 0.8 + 2 / 3) / 4)}


def test_bad_arguments():
    with pytest.raises(ValueError, match="dataset must be one of"):
        msa_metrics([0.0], [0.0], "iemocap")
    with pytest.raises(ValueError, match="same non-zero number"):
        msa_metrics([0.0, 1.0], [0.0], "mosi")
    with pytest.raises(ValueError, match="same non-zero number"):
        msa_metrics([], [], "sims")
    # A NaN prediction would count as negative in the accuracies while MAE came out NaN.
    with pytest.raises(ValueError, match=r"pred must be finite, got 1 non-finite value\(s\) of 2"):
        msa_metrics([float("nan"), 1.0], [1.0, 2.0], "mosi")
    with pytest.raises(ValueError, match="truth must be finite"):
        msa_metrics([0.5, 1.0], [1.0, float("inf")], "simsv2")
