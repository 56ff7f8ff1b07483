"""Predicted labels against a query's own labels: label maps (model label -> query label),
accuracy, macro-F1 and kappa on the mapped cells, per group, and contingency tables. Importing
does nothing.
"""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd

import metrics
from errors import DataError

log = logging.getLogger("scpretrain.annotate")


def read_label_map(path, model_classes=None, query_labels=None) -> dict:
    """Model label -> query label from a two-column CSV; an empty target has no counterpart.

    A model label mapped two different ways, or a header-only file, is refused; labels that match
    no class of the model (``model_classes``) or no label of the query (``query_labels``) are
    said, and a map that matches nothing on either side is refused (every score would be empty).
    """
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as a two-column CSV ({exc})") from None
    if frame.shape[1] != 2:
        raise DataError(f"{path}: needs two columns (model label, query label), found {list(frame.columns)}")
    source, target = (frame[c].astype(str).str.strip() for c in frame.columns)
    conflicting = sorted(s for s, n in pd.DataFrame({"s": source, "t": target}).drop_duplicates()
                         .groupby("s")["t"].nunique().items() if n > 1)
    if conflicting:
        raise DataError(f"{path}: maps the model labels {conflicting[:5]} to more than one query label; give each "
                        "model label one row")
    mapping = {s: t for s, t in zip(source, target) if t}
    if not mapping:
        raise DataError(f"{path}: maps no model label to a query label (every target is empty)")
    _check_matches(path, mapping, model_classes, query_labels)
    return mapping


def _check_matches(path, mapping: dict, model_classes, query_labels) -> None:
    if model_classes is not None:
        unknown = sorted(set(mapping) - set(map(str, model_classes)))
        if len(unknown) == len(mapping):
            raise DataError(f"{path}: none of its model labels is a class of the model (e.g. {unknown[:3]}; the "
                            f"model's: {list(model_classes)[:5]}); is it the map of another reference?")
        if unknown:
            log.warning("%s: %d model labels of the map are not classes of the model: %s", path, len(unknown),
                        unknown[:5])
    if query_labels is not None:
        present = set(map(str, query_labels))
        unknown = sorted(set(mapping.values()) - present)
        if len(unknown) == len(set(mapping.values())):
            raise DataError(f"{path}: none of its query labels occurs in the query's labels (e.g. {unknown[:3]}; the "
                            f"query's: {sorted(present)[:5]}); check --query_label_key")
        if unknown:
            log.warning("%s: %d query labels of the map do not occur in the query: %s", path, len(unknown),
                        unknown[:5])


def mapped_scores(predicted: np.ndarray, given: np.ndarray, label_map: dict) -> dict:
    """Accuracy, macro-F1 and kappa on the cells whose given label some model label maps to;
    a prediction that maps to nothing (or Unassigned) counts as wrong."""
    from sklearn.metrics import f1_score

    predicted, given = np.asarray(predicted, dtype=object), np.asarray(given, dtype=object)
    targets = set(label_map.values())
    scored = np.isin(given, list(targets))
    mapped = np.array([label_map.get(p, f"(no counterpart: {p})") for p in predicted[scored]], dtype=object)
    truth = given[scored].astype(object)
    if not len(truth):
        return {"n_scored": 0, "accuracy": float("nan"), "macro_f1": float("nan"), "kappa": float("nan")}
    return {"n_scored": int(scored.sum()), "accuracy": metrics.accuracy(truth, mapped),
            "macro_f1": float(f1_score(truth, mapped, labels=sorted(set(truth)), average="macro", zero_division=0)),
            "kappa": metrics.cohen_kappa(truth.astype(str), mapped.astype(str))}


def contingency(given: np.ndarray, predicted: np.ndarray, given_name: str, predicted_name: str) -> pd.DataFrame:
    """Cells of each given label (rows) over the predicted labels (columns)."""
    return pd.crosstab(pd.Series(np.asarray(given, dtype=object), name=given_name),
                       pd.Series(np.asarray(predicted, dtype=object), name=predicted_name))


def scores_table(table: pd.DataFrame, columns, given: np.ndarray, label_map: dict,
                 groups: np.ndarray | None = None) -> pd.DataFrame:
    """One row per label column and group ("all", then each group in order) of mapped scores."""
    parts = [("all", np.ones(len(given), bool))]
    if groups is not None:
        parts += [(g, groups == g) for g in sorted(set(groups))]
    rows = []
    for column in columns:
        for name, mask in parts:
            scores = mapped_scores(table[column].to_numpy()[mask], given[mask], label_map)
            rows.append({"labels": column, "group": name, **scores})
            log.info("%s (%s): accuracy %.4f macro-F1 %.4f kappa %.4f on %d mapped cells", column, name,
                     scores["accuracy"], scores["macro_f1"], scores["kappa"], scores["n_scored"])
    return pd.DataFrame(rows)
