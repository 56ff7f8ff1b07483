"""Off-the-shelf classifiers on PCA features and on the pretrained representation.

    python rf_svm_lr.py --clf svm                    # the original's usage
    python rf_svm_lr.py --clf rf --pretrained_model models/pretrained.pt

For every labelled dataset and repeat, one seeded split (the fine-tuning sweep's split) serves
two feature sets: PCA of the log1p expression, fitted on the first 500 training cells, and the
pretrained representation ``sigmoid(encoder(log1p x))``. The chosen classifier is trained on the
training cells and scored on the test cells from its probabilities or decision scores.
One row per dataset, repeat and feature set is appended to ``--save_result``.
Importing does nothing.
"""
from __future__ import annotations

import argparse
import logging
import time

import numpy as np

import cli
import data
import metrics
import results
import runtime
from checkpoints import Feeding, check_feeding
from features import features as feature_matrix, pca_features, pretrained_representation
from settings import OffshelfSettings, identity
from splits import encode_labels, repeat_seeds, split_of

log = logging.getLogger("scpretrain.offshelf")

CLASSIFIERS = ("rf", "svm", "lr")
FEATURE_SETS = ("PCA", "scPretrain")
PCA_FIT_CELLS = 500  # scPretrain: the PCA is fitted on the first 500 (training) cells
RESULT_COLUMNS = ["dataset", "seed", "classifier", "features", results.RUN_ID, *metrics.METRIC_NAMES]
DONE_KEY = ["dataset", results.DATA_ID, "seed", "classifier", "features", results.RUN_ID]


def build_parser() -> argparse.ArgumentParser:
    """The command line (its --help states every default)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clf", choices=CLASSIFIERS, default="svm",
                        help="rf = random forest (10 trees, depth 5), svm = linear SVM, "
                             "lr = logistic regression (default: %(default)s)")
    parser.add_argument("--pretrained_model", default=str(cli.DEFAULT_MODEL),
                        help="encoder checkpoint giving the scPretrain features (default: %(default)s)")
    parser.add_argument("--save_result", default=str(cli.RESULTS_DIR / "offshelf.csv"),
                        help="CSV the rows are appended to (default: %(default)s)")
    parser.add_argument("--pca_dim", type=cli.positive_int, default=200,
                        help="PCA components, fewer when the cells or genes allow fewer (default: %(default)s)")
    parser.add_argument("--run_id", default=None,
                        help="summarise the rows of this run identity (default: the newest in --save_result)")
    cli.add_common_args(parser)
    cli.add_recipe_args(parser)
    cli.add_feeding_arg(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = cli.resolve_recipe(parser.parse_args(argv))
    cli.check_split_fractions(parser, args)
    cli.check_derived_seeds(parser, args.seed * 1000 + args.fold1 * args.fold2)
    return args


# --------------------------------------------------------------------------- classifiers


def make_classifier(name: str, seed: int):
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.svm import LinearSVC

    if name == "rf":
        return RandomForestClassifier(n_estimators=10, max_depth=5, random_state=seed)
    if name == "svm":
        return LinearSVC(random_state=seed)
    if name == "lr":
        return LogisticRegression(max_iter=10000, random_state=seed)
    raise ValueError(f"unknown classifier '{name}'; choose one of {CLASSIFIERS}")


def class_scores(clf, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Cells x all classes: probabilities (rf, lr) or decision scores (svm).

    Classes the classifier never saw in training get a column below every other score.
    """
    if hasattr(clf, "predict_proba"):
        seen = clf.predict_proba(X)
    else:
        seen = clf.decision_function(X)
        if seen.ndim == 1:  # two classes: the score of classes_[1]
            seen = np.stack([-seen, seen], axis=1)
    scores = np.full((X.shape[0], n_classes), float(seen.min()) - 1.0)
    scores[:, clf.classes_] = seen
    return scores


def evaluate(clf_name: str, features: np.ndarray, codes: np.ndarray, split, n_classes: int, seed: int) -> dict:
    """Train on the training cells, score the test cells."""
    train_idx, _, test_idx = split
    clf = make_classifier(clf_name, seed).fit(features[train_idx], codes[train_idx])
    return metrics.classification_metrics(codes[test_idx], class_scores(clf, features[test_idx], n_classes))


def pca_on_training_cells(features, train_idx: np.ndarray, n_components: int, seed: int) -> np.ndarray:
    fit_rows = train_idx[:PCA_FIT_CELLS]  # train_idx is already shuffled by the seeded split
    pca, components, _ = pca_features(features, fit_rows, n_components, seed)
    if components.shape[0] < n_components:
        log.info("PCA: %d components (fitted on %d cells x %d genes allow no more than that)",
                 components.shape[0], len(fit_rows), features.shape[1])
    return pca


def run_dataset(d: data.CellData, representation: np.ndarray, seeds: list[int], settings: OffshelfSettings, split,
                run_id: str, finished: set = frozenset()) -> list[dict]:
    """All repeats of one dataset not yet in the results: both feature sets on each repeat's split."""
    codes, classes = encode_labels(d.labels)
    features = feature_matrix(d, settings.normalize)
    data_id = data.dataset_digest(d)
    rows = []
    for repeat, seed in enumerate(seeds):
        if all((d.name, data_id, str(seed), settings.clf, name, run_id) in finished for name in FEATURE_SETS):
            continue
        try:
            cells = split_of(d.n_cells, seed, split, what=d.name)
        except data.DataError as exc:
            log.warning("%s; skipped", exc)
            continue
        if len(np.unique(codes[cells[0]])) < 2:
            log.warning("%s seed %d: the training cells hold one cell type only; skipped", d.name, seed)
            continue
        base = {"dataset": d.name, results.DATA_ID: data_id, "species": d.species, "n_cells": d.n_cells,
                "n_genes": d.n_genes, "n_classes": len(classes), "n_train": len(cells[0]), "n_val": len(cells[1]),
                "n_test": len(cells[2]), "seed": seed, "repeat": repeat, "classifier": settings.clf,
                results.RUN_ID: run_id}
        t0 = time.time()
        feature_sets = {"PCA": pca_on_training_cells(features, cells[0], settings.pca_dim, seed),
                        "scPretrain": representation}
        pca_seconds = time.time() - t0
        for name in FEATURE_SETS:
            t0 = time.time()
            result = evaluate(settings.clf, feature_sets[name], codes, cells, len(classes), seed)
            seconds = time.time() - t0 + (pca_seconds if name == "PCA" else 0.0)
            rows.append({**base, "features": name, **{m: result[m] for m in metrics.METRIC_NAMES},
                         "n_scored_classes": result["n_scored_classes"], "seconds": round(seconds, 3)})
            log.info("%s seed %d %s on %s: accuracy %.4f kappa %.4f auprc %.4f auroc %.4f", d.name, seed,
                     settings.clf, name, result["accuracy"], result["kappa"], result["auprc"], result["auroc"])
    return rows


def run(args):
    out, device, pretrained, datasets = cli.analysis_inputs(args, RESULT_COLUMNS)
    settings, read, split = OffshelfSettings.from_args(args), cli.read_settings(args), cli.split_settings(args)
    seeds = repeat_seeds(args.seed, args.fold1, args.fold2)
    run_id, finished = results.start_run(out, identity(read, split, settings), pretrained.digest, cli.args_dict(args),
                                         RESULT_COLUMNS, DONE_KEY)
    for d in runtime.progress(datasets, desc=f"{args.clf} datasets"):
        check_feeding(pretrained.fed, Feeding(d.values, pretrained.fed.normalize), pretrained.path,
                      args.allow_feature_mismatch)
        representation = pretrained_representation(pretrained.encoder, pretrained.gene_universe,
                                                   pretrained.fed.normalize, d, device=device)
        rows = run_dataset(d, representation, seeds, settings, split, run_id, finished)
        if rows:
            results.append_results(out, rows, RESULT_COLUMNS)
    frame = results.read_results(out, RESULT_COLUMNS)
    mine = frame[frame["classifier"] == args.clf] if not frame.empty else frame
    if not mine.empty:
        mine, chosen = results.choose_identity(mine, args.run_id or run_id, out)
        summary = mine.groupby("features")[list(metrics.METRIC_NAMES)].mean()
        log.info("results in %s; mean over datasets and repeats (%s, run identity %s):\n%s", out, args.clf, chosen,
                 summary.to_string(float_format=lambda v: f"{v:.4f}"))
    return frame


def main(args):
    runtime.set_up_process(args.log_level, args.seed)  # logging, seeds, float mode, allocator
    return cli.exit_on_error(run, args)


if __name__ == "__main__":
    main(parse_args())
