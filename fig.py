"""Figures from the result CSVs: scPretrain against its baselines, one point per dataset.

    python fig.py                       # reads results/finetune.csv, offshelf.csv, clustering.csv

For each metric a scatter of the baseline (x) against scPretrain (y), one point per dataset
(the mean over repeats), with the diagonal and the number of datasets where scPretrain scores
higher in the title: the fine-tuning sweep (without pretraining vs scPretrain), the
off-the-shelf classifiers (PCA vs scPretrain features, per classifier) and K-means clustering
(ARI and NMI, PCA vs scPretrain). A summary bar chart gives the mean +- sd over datasets of
every method and metric. Each figure is written as PNG and PDF. Only the CSVs are read; a
missing CSV is noted and skipped. Importing does nothing.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import cli
import files
import results
import runtime
from errors import DataError
from metrics import METRIC_NAMES

log = logging.getLogger("scpretrain.fig")

CLUSTER_METRICS = ("ari", "nmi")
METRIC_LABELS = {"accuracy": "accuracy", "kappa": "Cohen's kappa", "auprc": "macro AUPRC", "auroc": "macro AUROC",
                 "ari": "adjusted Rand index", "nmi": "normalised mutual information"}


@dataclass(frozen=True)
class Source:
    """One result CSV: its columns, the column that names the compared methods, and the pair."""

    name: str
    filename: str
    made_by: str
    method_col: str
    baseline: str
    metrics: tuple
    extra_cols: tuple = ()

    @property
    def required(self) -> list[str]:
        return ["dataset", *self.extra_cols, self.method_col, *self.metrics]


FINETUNE = Source("finetune", "finetune.csv", "python main.py --kmeans", "method", "Without pretraining", METRIC_NAMES)
OFFSHELF = Source("offshelf", "offshelf.csv", "python rf_svm_lr.py --clf svm", "features", "PCA", METRIC_NAMES,
                  ("classifier",))
CLUSTERING = Source("clustering", "clustering.csv", "python clus.py", "features", "PCA", CLUSTER_METRICS)
SOURCES = (FINETUNE, OFFSHELF, CLUSTERING)
CLASSIFIER_NAMES = {"rf": "random forest", "svm": "linear SVM", "lr": "logistic regression"}


def build_parser() -> argparse.ArgumentParser:
    """The command line (its --help states every default)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results_dir", default=str(cli.RESULTS_DIR),
                        help="where the CSVs are read from and the figures written to (default: %(default)s)")
    for s in SOURCES:
        parser.add_argument(f"--{s.name}_csv", default=None,
                            help=f"the {s.name} results (default: RESULTS_DIR/{s.filename}, written by `{s.made_by}`)")
    parser.add_argument("--run_id", default=None,
                        help="plot the rows of this run identity (default: each file's newest; rows of "
                             "different identities are never averaged together)")
    cli.add_log_level_arg(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    return parser.parse_args(argv)


# --------------------------------------------------------------------------- reading


def read_result_csv(path, source: Source) -> pd.DataFrame:
    """A result CSV, checked: the required columns are there and the metrics are numbers."""
    return results.read_checked(path, source.required, source.metrics, f"a {source.name} result written by "
                                f"`{source.made_by}`", ["dataset", *source.extra_cols, source.method_col])


def paired_means(frame: pd.DataFrame, method_col: str, baseline: str, metric: str,
                 challenger: str = "scPretrain") -> pd.DataFrame:
    """Per dataset, the mean over repeats of ``metric`` for the baseline (x) and scPretrain (y).

    Datasets lacking either method, or with no finite value for one, are left out.
    """
    means = frame.groupby(["dataset", method_col])[metric].mean().unstack(method_col)
    if baseline not in means.columns or challenger not in means.columns:
        return pd.DataFrame(columns=["dataset", "x", "y"])
    paired = pd.DataFrame({"x": means[baseline], "y": means[challenger]}).dropna()
    return paired.rename_axis("dataset").reset_index()


def count_wins(paired: pd.DataFrame) -> tuple[int, int]:
    """(datasets where scPretrain scores strictly higher, datasets compared)."""
    return int((paired["y"] > paired["x"]).sum()), len(paired)


# --------------------------------------------------------------------------- drawing


def save(fig, stem: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    paths = [stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".pdf")]
    try:
        for path in paths:
            files.save_figure(fig, path, dpi=150, bbox_inches="tight")
    finally:
        plt.close(fig)
    return paths


def axis_limits(paired: pd.DataFrame) -> tuple[float, float]:
    """One range for both axes, covering every point with a margin, so the diagonal is y = x."""
    lo = float(min(paired["x"].min(), paired["y"].min()))
    hi = float(max(paired["x"].max(), paired["y"].max()))
    pad = 0.05 * (hi - lo) if hi > lo else max(0.05, 0.05 * abs(hi))
    return lo - pad, hi + pad


def scatter(paired: pd.DataFrame, x_label: str, y_label: str, title: str, stem: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    wins, n = count_wins(paired)
    lo, hi = axis_limits(paired)
    fig, ax = plt.subplots(figsize=(4.8, 4.8))
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle="--", linewidth=1, zorder=1)
    won = paired["y"] > paired["x"]
    ax.scatter(paired.loc[won, "x"], paired.loc[won, "y"], color="tab:red", s=22, label="scPretrain higher", zorder=2)
    ax.scatter(paired.loc[~won, "x"], paired.loc[~won, "y"], color="tab:blue", s=22, label="not higher", zorder=2)
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_aspect("equal")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(f"{title}\nscPretrain wins {wins} of {n}")
    # outside the axes: a legend on the data would hide points (a loss at high x, low y, say)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    return save(fig, stem)


def comparison_figures(frame: pd.DataFrame, source: Source, metrics, label: str, baseline_label: str,
                       stem_prefix: str, out_dir: Path) -> list[Path]:
    """One scatter per metric of ``source.baseline`` (x) vs scPretrain (y)."""
    written = []
    for metric in metrics:
        paired = paired_means(frame, source.method_col, source.baseline, metric)
        if paired.empty:
            log.info("%s: no dataset has both '%s' and 'scPretrain' %s values; no %s figure", label,
                     source.baseline, metric, metric)
            continue
        wins, n = count_wins(paired)
        log.info("%s %s: scPretrain wins %d of %d datasets", label, metric, wins, n)
        written += scatter(paired, f"{METRIC_LABELS[metric]}, {baseline_label}",
                           f"{METRIC_LABELS[metric]}, scPretrain", f"{label}: {METRIC_LABELS[metric]}",
                           out_dir / f"{stem_prefix}_{metric}")
    return written


def summary_table(frame: pd.DataFrame, method_col: str, metrics) -> pd.DataFrame:
    """Mean and sd over datasets (each the mean over its repeats), per method and metric."""
    per_dataset = frame.groupby([method_col, "dataset"])[list(metrics)].mean()
    return per_dataset.groupby(level=0).agg(["mean", "std"])


def summary_figure(panels: list[tuple[str, pd.DataFrame, tuple]], stem: Path) -> list[Path]:
    """Grouped bars: one panel per result CSV, one group per metric, one bar per method."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (title, table, metrics) in zip(axes[0], panels):
        methods = list(table.index)
        width = 0.8 / len(methods)
        x = np.arange(len(metrics))
        for i, method in enumerate(methods):
            means = [table.loc[method, (m, "mean")] for m in metrics]
            sds = np.nan_to_num([table.loc[method, (m, "std")] for m in metrics])
            ax.bar(x + (i - (len(methods) - 1) / 2) * width, means, width, yerr=sds, capsize=2, label=method)
        ax.set_xticks(x)
        ax.set_xticklabels(list(metrics))
        ax.set_ylabel("mean over datasets (+- sd)")
        ax.set_title(title)
        ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    fig.tight_layout()
    return save(fig, stem)


# --------------------------------------------------------------------------- the run


def csv_path(args, source: Source) -> Path:
    given = getattr(args, f"{source.name}_csv")
    return Path(given) if given else Path(args.results_dir) / source.filename


def load_sources(args) -> dict:
    frames = {}
    for source in SOURCES:
        path = csv_path(args, source)
        if not path.exists():
            log.info("note: %s not found; run `%s` to make it. No %s figures.", path, source.made_by, source.name)
            continue
        frame, _ = results.choose_identity(read_result_csv(path, source), args.run_id, path)
        if frame.empty:
            log.info("note: %s holds no rows; no %s figures", path, source.name)
            continue
        frames[source.name] = frame
    return frames


def make_figures(frames: dict, out_dir: Path) -> list[Path]:
    written, panels = [], []
    if "finetune" in frames:
        frame = frames["finetune"]
        written += comparison_figures(frame, FINETUNE, METRIC_NAMES, "fine-tuning", "without pretraining",
                                      "finetune", out_dir)
        panels.append(("fine-tuning", summary_table(frame, "method", METRIC_NAMES), METRIC_NAMES))
    if "offshelf" in frames:
        frame = frames["offshelf"]
        for clf in sorted(frame["classifier"].unique()):
            label = CLASSIFIER_NAMES.get(clf, clf)
            written += comparison_figures(frame[frame["classifier"] == clf], OFFSHELF, METRIC_NAMES, label,
                                          "PCA features", f"offshelf_{clf}", out_dir)
        by_method = frame.assign(method=frame["classifier"] + " on " + frame["features"])
        panels.append(("off-the-shelf classifiers", summary_table(by_method, "method", METRIC_NAMES), METRIC_NAMES))
    if "clustering" in frames:
        frame = frames["clustering"]
        written += comparison_figures(frame, CLUSTERING, CLUSTER_METRICS, "K-means clustering", "PCA features",
                                      "clustering", out_dir)
        panels.append(("K-means clustering", summary_table(frame, "features", CLUSTER_METRICS), CLUSTER_METRICS))
    if panels:
        written += summary_figure(panels, out_dir / "summary")
    return written


def planned_figures(frames: dict, out_dir: Path) -> list[Path]:
    """Every figure file ``make_figures`` may write for these frames (PNG and PDF of each stem)."""
    stems = []
    if "finetune" in frames:
        stems += [f"finetune_{m}" for m in METRIC_NAMES]
    if "offshelf" in frames:
        stems += [f"offshelf_{clf}_{m}" for clf in sorted(frames["offshelf"]["classifier"].unique()) for m in METRIC_NAMES]
    if "clustering" in frames:
        stems += [f"clustering_{m}" for m in CLUSTER_METRICS]
    stems += ["summary"] if frames else []
    return [out_dir / f"{stem}{ext}" for stem in stems for ext in (".png", ".pdf")]


def run(args) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    if not Path(args.results_dir).is_dir():
        raise DataError(f"--results_dir {args.results_dir}: no such folder; run the scripts that write results "
                        "first (python main.py --kmeans, rf_svm_lr.py, clus.py), or pass the folder they wrote to")
    frames = load_sources(args)
    if not frames:
        log.info("note: no result CSV found in %s; nothing to plot", args.results_dir)
        return []
    out_dir = files.check_output_dir(args.results_dir, "--results_dir")
    files.refuse_clashes({"--results_dir (a figure)": planned_figures(frames, out_dir)},
                         {f"--{s.name}_csv": csv_path(args, s) for s in SOURCES})
    written = make_figures(frames, out_dir)
    log.info("%d figure files written to %s", len(written), out_dir)
    return written


def main(args) -> list[Path]:
    runtime.setup_logging(args.log_level)
    return cli.exit_on_error(run, args)


if __name__ == "__main__":
    main(parse_args())
