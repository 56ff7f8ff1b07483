"""The fine-tuning sweep on the two labelled demo datasets: time per dataset, and quality.

1. Pre-train a small encoder for one epoch on the demo collection (``main.py --is_pretrain``)
   into ``bench/out/`` (reused when present; ``--repretrain`` redoes it).
2. Run the sweep (``main.py --kmeans``) on each labelled demo dataset with ``--fold2`` repeats,
   timing each dataset's sweep; scPretrain and "Without pretraining" rows come from its CSV.
3. A plain scikit-learn ``LogisticRegression(max_iter=1000)`` on log1p(counts per 10k) of the
   same cells with the same seeded splits (``splits.split_of`` with ``splits.repeat_seeds``, the
   sweep's command line resolved by ``main.parse_args``),
   fitted on the training cells only, scored on the test cells with ``metrics``.

Prints mean +- sd over the repeats of accuracy, Cohen's kappa, macro AUPRC and macro AUROC.

    python bench/bench_finetune.py                    # 5 repeats
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]

import synth  # noqa: E402  (measuring helpers only; imports no torch)

# the labelled demo datasets by path, as main.py's ``demo`` names them
LABELLED_DEMO = tuple(str(BENCH_DIR.parent / "dataset" / f"{name}.h5")
                      for name in ("pbmc68k_reduced", "oligodendroglioma"))
METRICS = ("accuracy", "kappa", "auprc", "auroc")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(LABELLED_DEMO),
                   help="main.py --datasets of the sweeps, one at a time (default: the labelled demo .h5 files)")
    p.add_argument("--fold2", type=int, default=5, help="repeats (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--pt_epoch", type=int, default=1, help="pre-training epochs (default: %(default)s)")
    p.add_argument("--out", default=str(BENCH_DIR / "out" / "finetune"), help="(default: %(default)s)")
    p.add_argument("--repretrain", action="store_true", help="pre-train again even if the model exists")
    p.add_argument("--pretrained_model", default=None,
                   help="use this encoder checkpoint (e.g. the README recipe's models/pretrained_phase2.pt) "
                        "instead of pre-training one for --pt_epoch epochs")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further main.py flags for the sweep, e.g. --extra --ft_epoch 100")
    p.add_argument("--omp_wait_policy", default="",
                   help="OMP_WAIT_POLICY of the measured runs; unset ('') is what users run with; PASSIVE "
                        "stops idle OpenMP threads spin-waiting when other work shares the cores, at a cost "
                        "to short parallel regions (default: unset)")
    return p.parse_args(argv)


def pretrain_model(out: Path, args) -> Path:
    import main

    model = out / "pretrained_demo.pt"
    if model.exists() and not args.repretrain:
        print(f"reusing {model}")
        return model
    t0 = time.perf_counter()
    main.main(main.parse_args(["--is_pretrain", "--kmeans", "--datasets", "demo", "--save_model", str(model),
                               "--pt_epoch", str(args.pt_epoch), "--seed", str(args.seed), "--log_level", "WARNING"]))
    print(f"pre-trained {model} ({args.pt_epoch} epoch(s) on the demo collection) in {time.perf_counter() - t0:.1f} s")
    return model


def sweep_command(dataset: str, model: Path, csv: Path, args) -> list[str]:
    """main.py's command line of one dataset's sweep."""
    return ["--kmeans", "--datasets", dataset, "--pretrained_model", str(model), "--fold2", str(args.fold2),
            "--seed", str(args.seed), "--save_result", str(csv), "--log_level", "WARNING", *args.extra]


def sweep(dataset: str, model: Path, out: Path, args):
    """One dataset's sweep through main.main; returns (its rows, wall seconds)."""
    import main
    import pandas as pd

    csv = out / f"sweep_{Path(dataset).stem}.csv"
    csv.unlink(missing_ok=True)  # the sweep resumes from an existing CSV; start clean
    t0 = time.perf_counter()
    main.main(main.parse_args(sweep_command(dataset, model, csv, args)))
    return pd.read_csv(csv), time.perf_counter() - t0


def cp10k_log1p(X):
    """log1p of counts scaled to 10,000 per cell, staying sparse."""
    import scipy.sparse as sp

    totals = np.asarray(X.sum(1)).ravel()
    scale = np.divide(1e4, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
    out = sp.csr_matrix(sp.diags(scale) @ X, dtype=np.float64)
    np.log1p(out.data, out=out.data)
    return out


def logistic_regression_rows(dataset: str, model: Path, out: Path, args) -> list[dict]:
    """The sklearn baseline on the sweep's splits; no tuning, test cells used only for scoring.

    The sweep's own command line (``sweep_command``, ``--extra`` included) is resolved by
    ``main.parse_args`` here on purpose: its reading, split sizes and repeat seeds are the
    sweep's, so that the baseline sees the same cells and splits whatever ``--extra`` holds."""
    from sklearn.linear_model import LogisticRegression

    import cli
    import data
    import main
    import metrics
    import splits
    from settings import SweepSettings

    sweep_args = main.parse_args(sweep_command(dataset, model, out / f"sweep_{Path(dataset).stem}.csv", args))
    read, split_sizes = cli.read_settings(sweep_args), cli.split_settings(sweep_args)
    repeats = SweepSettings.from_args(sweep_args)
    d = data.labelled_cells(data.load_collection(sweep_args.datasets, read)[0])
    codes, classes = splits.encode_labels(d.labels)
    features = cp10k_log1p(d.X)
    rows = []
    for seed in splits.repeat_seeds(repeats.seed, repeats.fold1, repeats.fold2):
        train_idx, _, test_idx = splits.split_of(d.n_cells, seed, split_sizes, what=d.name)
        t0 = time.perf_counter()
        clf = LogisticRegression(max_iter=1000).fit(features[train_idx], codes[train_idx])
        scores = np.zeros((len(test_idx), len(classes)))
        scores[:, clf.classes_] = clf.predict_proba(features[test_idx])  # classes absent from training stay 0
        result = metrics.classification_metrics(codes[test_idx], scores)
        rows.append({"dataset": d.name, "seed": seed, "method": "LogisticRegression", **result,
                     "seconds": time.perf_counter() - t0})
    return rows


def summary(frame) -> str:
    lines = [f"{'dataset':<18} {'method':<20} " + " ".join(f"{m:>15}" for m in METRICS)]
    for (dataset, method), group in frame.groupby(["dataset", "method"], sort=False):
        cells = " ".join(f"{group[m].mean():.3f} +- {group[m].std(ddof=1) if len(group) > 1 else 0:.3f}".rjust(15)
                         for m in METRICS)
        lines.append(f"{dataset:<18} {method:<20} {cells}")
    return "\n".join(lines)


def main(args):
    if args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # before torch loads OpenMP
    import pandas as pd

    print(f"code: {synth.code_version()}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(args.pretrained_model) if args.pretrained_model else pretrain_model(out, args)
    print(f"encoder: {model}")
    frames, timing = [], []
    for dataset in args.datasets:
        rows, seconds = sweep(dataset, model, out, args)
        lr = pd.DataFrame(logistic_regression_rows(dataset, model, out, args))
        frames += [rows, lr]
        per_method = rows.groupby("method")["seconds"].sum()
        timing.append(f"{Path(dataset).stem:<18} {int(rows['n_cells'].iloc[0]):>6} cells x {int(rows['n_genes'].iloc[0]):>6} genes, "
                      f"{int(rows['n_classes'].iloc[0]):>2} types: sweep {seconds:6.1f} s for {args.fold2} repeats "
                      f"({seconds / args.fold2:.1f} s per repeat; training + scoring in all: "
                      + ", ".join(f"{m} {s:.1f} s" for m, s in per_method.items())
                      + f"; epochs run {rows['epochs'].mean():.0f} on average); "
                      f"LogisticRegression {lr['seconds'].sum():.1f} s")
    frame = pd.concat(frames, ignore_index=True)
    frame.to_csv(out / "quality.csv", index=False)
    print()
    print("time of the fine-tuning sweep per dataset (main.main, loading included):")
    print("\n".join(timing))
    print()
    print(f"quality over {args.fold2} repeats (mean +- sd; same seeded splits for all methods; test cells only):")
    print(summary(frame))
    return frame


if __name__ == "__main__":
    main(parse_args())
