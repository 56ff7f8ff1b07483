"""Classification metrics of the paper: accuracy, Cohen's kappa, macro AUPRC, macro AUROC.

Written with numpy (tested against scikit-learn). Classes absent from the evaluated cells have
no positive example, so they are left out of the macro averages; ``n_scored_classes`` says how
many classes were averaged.
"""
from __future__ import annotations

import numpy as np

METRIC_NAMES = ("accuracy", "kappa", "auprc", "auroc")


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(np.asarray(y_true) == np.asarray(y_pred)))


def cohen_kappa(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """(p_o - p_e) / (1 - p_e) over the labels seen in either array."""
    _, codes = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    t, p = codes[: len(y_true)], codes[len(y_true):]
    k = codes.max() + 1
    confusion = np.bincount(t * k + p, minlength=k * k).reshape(k, k).astype(np.float64)
    n = confusion.sum()
    p_o = np.trace(confusion) / n
    p_e = (confusion.sum(0) @ confusion.sum(1)) / n**2
    return float((p_o - p_e) / (1 - p_e)) if p_e < 1 else 0.0


def _ranked_counts(y_bin: np.ndarray, score: np.ndarray):
    """Cumulative true/false positives at each distinct score threshold, highest first."""
    order = np.argsort(-score, kind="mergesort")
    score, y_bin = score[order], y_bin[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]
    tps = np.cumsum(y_bin)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return tps.astype(np.float64), fps.astype(np.float64)


def binary_auroc(y_bin: np.ndarray, score: np.ndarray) -> float:
    tps, fps = _ranked_counts(y_bin, score)
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.trapezoid(tpr, fpr))


def binary_auprc(y_bin: np.ndarray, score: np.ndarray) -> float:
    """Trapezoidal area under the precision-recall curve (as sklearn's ``auc(recall, precision)``)."""
    tps, fps = _ranked_counts(y_bin, score)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    # sklearn's curve stops at full recall and starts at (recall 0, precision 1)
    stop = np.searchsorted(tps, tps[-1]) + 1
    precision = np.r_[precision[:stop][::-1], 1.0]
    recall = np.r_[recall[:stop][::-1], 0.0]
    return float(-np.trapezoid(precision, recall))


def macro_scores(y_true: np.ndarray, scores: np.ndarray) -> tuple[float, float, int]:
    """Macro AUPRC and AUROC, one-vs-rest, over classes that have positives and negatives.

    ``scores`` is cells x classes (probabilities or decision values), column c for class c.
    """
    auprc, auroc = [], []
    for c in range(scores.shape[1]):
        y_bin = (y_true == c).astype(np.int64)
        if 0 < y_bin.sum() < len(y_bin):
            auprc.append(binary_auprc(y_bin, scores[:, c]))
            auroc.append(binary_auroc(y_bin, scores[:, c]))
    if not auprc:
        return float("nan"), float("nan"), 0
    return float(np.mean(auprc)), float(np.mean(auroc)), len(auprc)


def classification_metrics(y_true: np.ndarray, scores: np.ndarray) -> dict:
    """All four metrics from integer labels and a cells x classes score matrix."""
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim == 1:  # a binary decision function: score of class 1
        scores = np.stack([-scores, scores], axis=1)
    y_pred = scores.argmax(1)
    auprc, auroc, n_scored = macro_scores(y_true, scores)
    return {
        "accuracy": accuracy(y_true, y_pred),
        "kappa": cohen_kappa(y_true, y_pred),
        "auprc": auprc,
        "auroc": auroc,
        "n_scored_classes": n_scored,
        "n_classes": scores.shape[1],
    }
