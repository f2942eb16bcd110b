"""Metrics, calibration and statistics of lungtf.evaluate against small hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from lungtf.constants import CLASS_NAMES
from lungtf.evaluate import calibration, metrics

ACA, N, SCC = (CLASS_NAMES.index(c) for c in ("lung_aca", "lung_n", "lung_scc"))


def one_hot_probs(pred: list[int], top: float = 0.8) -> np.ndarray:
    """Probabilities whose argmax is ``pred``: ``top`` on it, the rest shared equally."""
    p = np.full((len(pred), 3), (1 - top) / 2)
    p[np.arange(len(pred)), pred] = top
    return p


def test_never_predicted_class_keeps_its_row_with_zero_precision():
    # Truth: 2 aca, 2 benign, 2 scc. Predictions never say scc: both scc tiles called aca.
    y_true = [ACA, ACA, N, N, SCC, SCC]
    y_pred = [ACA, ACA, N, ACA, ACA, ACA]
    m = metrics.classification_metrics(np.array(y_true), one_hot_probs(y_pred))
    assert m["accuracy"] == pytest.approx(3 / 6)
    aca, benign, scc = (m["per_class"][c] for c in ("lung_aca", "lung_n", "lung_scc"))
    # aca: 5 predicted, 2 right -> precision 2/5, recall 2/2, F1 = 2*0.4*1/1.4.
    assert aca["precision"] == pytest.approx(2 / 5)
    assert aca["recall"] == pytest.approx(1.0)
    assert aca["f1"] == pytest.approx(0.8 / 1.4)
    # benign: 1 predicted (right) of 2 -> precision 1, recall 1/2, F1 2/3.
    assert (benign["precision"], benign["recall"]) == pytest.approx((1.0, 0.5))
    assert benign["f1"] == pytest.approx(2 / 3)
    # scc never predicted: precision undefined -> 0, recall 0, F1 0, support 2.
    assert (scc["precision"], scc["recall"], scc["f1"], scc["support"]) == (0.0, 0.0, 0.0, 2)
    assert m["confusion_matrix"] == [[2, 0, 0], [1, 1, 0], [2, 0, 0]]
    # Cancer view: 4 cancer tiles, none called benign; 2 benign, one called cancer.
    cv = m["cancer_vs_benign"]
    assert (cv["missed_cancers"], cv["benign_called_cancer"]) == (0, 1)
    assert (cv["sensitivity"], cv["specificity"]) == (1.0, 0.5)


def test_missed_cancers_count_cancer_predicted_benign_only():
    # aca->scc is a wrong class but still cancer; scc->benign and aca->benign are missed cancers.
    y_true = np.array([ACA, ACA, SCC, SCC, N])
    y_pred = [SCC, N, N, SCC, N]
    cv = metrics.cancer_view(y_true, np.array(y_pred))
    assert cv == {
        "sensitivity": 2 / 4,
        "specificity": 1.0,
        "missed_cancers": 2,
        "benign_called_cancer": 0,
        "n_cancer": 4,
        "n_benign": 1,
    }


def test_roc_auc_hand_case_and_absent_class_note():
    # Perfect ranking for every class -> 1.0; a class missing from y_true is named in the note.
    y_true = np.array([ACA, N, SCC, ACA])
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.5, 0.3, 0.2]])
    macro, per_class, note = metrics.roc_auc_ovr(y_true, probs)
    assert macro == 1.0 and note == ""
    # Without benign tiles: aca scores (0.7 & 0.5 vs 0.1) = 1; scc: pos 0.4 vs negs 0.5, 0.1 = 1/2.
    y_true = np.array([ACA, SCC, ACA])
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.5, 0.4], [0.5, 0.0, 0.5]])
    macro, per_class, note = metrics.roc_auc_ovr(y_true, probs)
    assert per_class == {"lung_aca": 1.0, "lung_n": None, "lung_scc": 0.5}
    assert macro == pytest.approx(0.75)
    assert "lung_n" in note and "2 of 3" in note


def test_group_bootstrap_moves_whole_groups():
    # 4 groups x 5 tiles; every tile of group g3 is wrong. Resampling groups, the number of bad
    # groups drawn is Binomial(4, 1/4): P(>=3) = 0.051 and P(4) = 0.004, so the 2.5th
    # percentile of accuracy is 1/4 and the 97.5th is 1 (P(no bad group) = 0.316).
    groups = np.repeat(["g0", "g1", "g2", "g3"], 5)
    y_true = np.full(20, ACA)
    y_pred = y_true.copy()
    y_pred[groups == "g3"] = N
    ci = metrics.group_bootstrap(y_true, y_pred, groups, n_resamples=2000, seed=1)
    assert ci["accuracy"] == pytest.approx((0.25, 1.0))
    assert ci["sensitivity"] == pytest.approx((0.25, 1.0))
    assert ci["specificity"] is None  # no benign tile anywhere
    # Treating every tile as its own group gives the much narrower (wrong) tile bootstrap.
    tiles = metrics.group_bootstrap(y_true, y_pred, np.arange(20), n_resamples=2000, seed=1)
    low, high = tiles["accuracy"]
    assert 0.5 <= low < 0.75 < high < 1.0
    # Same seed, same interval.
    assert metrics.group_bootstrap(y_true, y_pred, groups, n_resamples=2000, seed=1) == ci


def test_mcnemar_exact_binomial_on_few_discordant_pairs():
    # b = 1 (A right, B wrong), c = 9: p = 2 * P(X <= 1 | n=10, 1/2) = 2 * 11 / 1024.
    y_true = np.zeros(30, int)
    pred_a = np.zeros(30, int)
    pred_b = np.zeros(30, int)
    pred_a[:9] = 1  # A wrong on 9 tiles that B gets right
    pred_b[9] = 1  # B wrong on 1 tile that A gets right
    pred_a[10:12] = pred_b[10:12] = 2  # both wrong on 2 tiles: not discordant
    r = metrics.mcnemar(y_true, pred_a, pred_b)
    assert (r["b"], r["c"], r["both_wrong"], r["both_right"]) == (1, 9, 2, 18)
    assert r["method"] == "exact binomial"
    assert r["p_value"] == pytest.approx(22 / 1024)


def test_mcnemar_chi_square_with_continuity_correction_on_known_table():
    # b = 121, c = 59: chi2 = (|121 - 59| - 1)^2 / 180 = 3721 / 180 = 20.672, p = 5.45e-6.
    y_true = np.zeros(200, int)
    pred_a = np.zeros(200, int)
    pred_b = np.zeros(200, int)
    pred_b[:121] = 1
    pred_a[121:180] = 1
    r = metrics.mcnemar(y_true, pred_a, pred_b)
    assert (r["b"], r["c"]) == (121, 59)
    assert r["method"].startswith("chi-square")
    assert r["statistic"] == pytest.approx(3721 / 180)
    assert r["p_value"] == pytest.approx(5.4505e-6, rel=1e-3)
    assert metrics.mcnemar(y_true, pred_a, pred_a)["p_value"] == 1.0


def test_ece_hand_case():
    # Two tiles at confidence 0.9 (one right) in bin (13/15, 14/15]: gap |0.5 - 0.9| = 0.4.
    # Two at 0.62 (both right) in bin (9/15, 10/15]: gap |1 - 0.62| = 0.38. ECE = 0.39.
    probs = np.array([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.62, 0.2, 0.18], [0.2, 0.62, 0.18]])
    y_true = np.array([ACA, N, ACA, N])
    assert calibration.expected_calibration_error(probs, y_true) == pytest.approx(0.39)
    bins = calibration.reliability_bins(probs, y_true)
    assert bins.count.tolist() == [0] * 9 + [2, 0, 0, 0, 2, 0]
    assert bins.accuracy[13] == 0.5 and bins.confidence[9] == pytest.approx(0.62)
    # A perfectly calibrated case: confidence 1, always right.
    assert calibration.expected_calibration_error(np.eye(3), np.arange(3)) == 0.0


def test_temperature_scaling_recovers_overconfidence():
    # Labels drawn from softmax(z); the model reports softmax(3 z): T should come out near 3,
    # lowering NLL and ECE and leaving every prediction unchanged.
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, (6000, 3))
    p_true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=p) for p in p_true])
    over = np.exp(3 * z) / np.exp(3 * z).sum(1, keepdims=True)
    t = calibration.fit_temperature(over, y)
    assert t == pytest.approx(3.0, rel=0.1)
    scaled = calibration.apply_temperature(over, t)
    assert (scaled.argmax(1) == over.argmax(1)).all()
    assert calibration.nll(scaled, y) < calibration.nll(over, y)
    assert calibration.expected_calibration_error(scaled, y) < 0.5 * (
        calibration.expected_calibration_error(over, y)
    )
    with pytest.raises(ValueError, match="temperature must be > 0; got 0"):
        calibration.apply_temperature(over, 0)


def test_bad_inputs_name_what_was_received():
    with pytest.raises(ValueError, match=r"class ids in 0..2; got \[0, 5\]"):
        metrics.classification_metrics(np.array([0, 5]), one_hot_probs([0, 1]))
    with pytest.raises(ValueError, match="got 3, 3, 2"):
        metrics.group_bootstrap(np.zeros(3), np.zeros(3), ["a", "b"])
