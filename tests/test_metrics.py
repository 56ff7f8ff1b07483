"""metrics.py against scikit-learn: ties, a class absent from the test cells, binary scores, perfect predictions."""
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, auc, cohen_kappa_score, precision_recall_curve, roc_auc_score

import metrics


def sk_auprc(y_bin, score):
    precision, recall, _ = precision_recall_curve(y_bin, score)
    return auc(recall, precision)


def sk_macro(y_true, scores, classes):
    """Macro AUPRC / AUROC over ``classes`` (the ones with positives and negatives), by sklearn."""
    pr = [sk_auprc((y_true == c).astype(int), scores[:, c]) for c in classes]
    roc = [roc_auc_score((y_true == c).astype(int), scores[:, c]) for c in classes]
    return np.mean(pr), np.mean(roc)


def tied_scores(rng, n, k, levels=5):
    """Scores on a coarse grid so that many cells tie within every class's ranking."""
    return rng.integers(0, levels, size=(n, k)).astype(np.float64) / levels


@pytest.mark.parametrize("seed", range(5))
def test_binary_auroc_and_auprc_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    score = np.round(rng.normal(size=200) + y, 1)  # rounding makes ties
    assert len(np.unique(score)) < len(score)
    assert metrics.binary_auroc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert metrics.binary_auprc(y, score) == pytest.approx(sk_auprc(y, score), abs=1e-12)


def test_binary_metrics_with_few_distinct_scores():
    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 60)
    score = rng.integers(0, 3, 60).astype(float)  # three thresholds only
    assert metrics.binary_auroc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert metrics.binary_auprc(y, score) == pytest.approx(sk_auprc(y, score), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_cohen_kappa_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 5, 300)
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 6, 300))  # a class the truth lacks
    assert metrics.cohen_kappa(y_true, y_pred) == pytest.approx(cohen_kappa_score(y_true, y_pred), abs=1e-12)


def test_cohen_kappa_on_string_labels():
    y_true = np.array(["b", "a", "c", "a", "b", "b"])
    y_pred = np.array(["b", "a", "a", "a", "c", "b"])
    assert metrics.cohen_kappa(y_true, y_pred) == pytest.approx(cohen_kappa_score(y_true, y_pred), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    n, k = 250, 4
    y = rng.integers(0, k, n)
    scores = tied_scores(rng, n, k)
    scores[np.arange(n), y] += rng.random(n) < 0.5  # informative but imperfect
    out = metrics.classification_metrics(y, scores)
    pred = scores.argmax(1)  # argmax breaks ties to the lowest class, as numpy does
    auprc, auroc = sk_macro(y, scores, range(k))
    assert out["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert out["kappa"] == pytest.approx(cohen_kappa_score(y, pred), abs=1e-12)
    assert out["auprc"] == pytest.approx(auprc, abs=1e-12)
    assert out["auroc"] == pytest.approx(auroc, abs=1e-12)
    assert out["n_scored_classes"] == k and out["n_classes"] == k


def test_class_missing_from_test_cells_is_left_out_of_macro_averages():
    rng = np.random.default_rng(3)
    n, k = 200, 5
    y = rng.choice([0, 1, 3, 4], size=n)  # class 2 has no test cell
    scores = tied_scores(rng, n, k)
    scores[np.arange(n), y] += 0.3
    out = metrics.classification_metrics(y, scores)
    auprc, auroc = sk_macro(y, scores, [0, 1, 3, 4])
    assert out["n_scored_classes"] == 4 and out["n_classes"] == 5
    assert out["auprc"] == pytest.approx(auprc, abs=1e-12)
    assert out["auroc"] == pytest.approx(auroc, abs=1e-12)
    pred = scores.argmax(1)
    assert out["kappa"] == pytest.approx(cohen_kappa_score(y, pred), abs=1e-12)


def test_only_one_class_in_test_cells_scores_no_class():
    out = metrics.classification_metrics(np.zeros(10, dtype=int), np.random.default_rng(0).random((10, 3)))
    assert out["n_scored_classes"] == 0
    assert np.isnan(out["auprc"]) and np.isnan(out["auroc"])


def test_binary_one_dimensional_decision_scores():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 150)
    score = np.round(rng.normal(size=150) + 1.5 * y - 0.75, 1)
    out = metrics.classification_metrics(y, score)
    pred = (score > 0).astype(int)  # class 1 wins only on a strictly positive score
    assert out["n_classes"] == 2 and out["n_scored_classes"] == 2
    assert out["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert out["kappa"] == pytest.approx(cohen_kappa_score(y, pred), abs=1e-12)
    # class 0 is scored by -score, class 1 by score: AUROC is the same, AUPRC averages both
    assert out["auroc"] == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert out["auprc"] == pytest.approx((sk_auprc(y, score) + sk_auprc(1 - y, -score)) / 2, abs=1e-12)


def test_perfect_predictions_score_one():
    rng = np.random.default_rng(5)
    y = np.repeat(np.arange(4), 10)
    rng.shuffle(y)
    scores = np.eye(4)[y] * 0.9 + 0.025
    out = metrics.classification_metrics(y, scores)
    for name in metrics.METRIC_NAMES:
        assert out[name] == pytest.approx(1.0, abs=1e-12), name
    assert cohen_kappa_score(y, scores.argmax(1)) == pytest.approx(1.0)
