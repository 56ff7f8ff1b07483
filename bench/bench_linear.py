"""The linear base's fit at scale (prints figures; not a test): ``classifier.fit_linear_base`` on
a large synthetic reference, by its torch solver (full-batch L-BFGS on the sparse features, what
annotate.py runs) and by scikit-learn's lbfgs on the same features and the same objective.

    python bench/bench_linear.py                              # 100,000 cells x 17,000 genes, 30 types, C = 0.3
    python bench/bench_linear.py --cells 20000 --grid         # the whole C grid chosen on validation
    python bench/bench_linear.py --solvers torch --device cuda

The reference is ``synth.py``'s count model in memory (``synth_counts``), fed as annotation feeds
it (log1p CP10k, ``features.features``), split as annotation splits it
(``splits.validation_split``: a seeded 10 % of at most 1,000 cells for validation). Reported per
solver: wall time of the fit (every C of the grid and its validation), the C chosen, validation
accuracy, and the process's peak resident memory after it. Both solvers stop by the same rule
(``classifier.LINEAR_TOL``, scikit-learn's default), so they should agree to a fraction of a
point; the figure to read is the time.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import synth  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=100_000)
    p.add_argument("--genes", type=int, default=17_000)
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--classes", type=int, default=30)
    p.add_argument("--C", type=float, default=0.3, help="the one C fitted (annotate's default recipe fixes it)")
    p.add_argument("--grid", action="store_true", help="fit classifier.LINEAR_C_GRID and choose on validation")
    p.add_argument("--solvers", nargs="+", default=["torch", "sklearn"], choices=["torch", "sklearn"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def reference(args):
    """The synthetic reference's features, labels and split, as annotation builds them."""
    import data
    import features
    import splits

    counts, types = synth.synth_counts(args.cells, args.genes, args.classes, args.density, args.seed)
    genes = np.array([str(g) for g in synth.gene_pool(args.genes)], dtype=object)
    cells = np.array([f"c{i}" for i in range(args.cells)], dtype=object)
    labels = np.array([f"type_{t}" for t in types], dtype=object)
    d = data.CellData("synthetic reference", counts, genes, cells, labels, "human", values="raw")
    X = features.features(d, "cp10k")
    codes, classes = splits.encode_labels(labels)
    train, val = splits.validation_split(args.cells, args.seed, 0.1, what=d.name)
    return X, codes, len(classes), (train, val, None)


def main(args) -> list[dict]:
    import torch

    import classifier
    import runtime

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    device = runtime.resolve_device(args.device)
    t0 = time.perf_counter()
    X, codes, n_classes, split = reference(args)
    print(f"reference: {args.cells:,} cells x {args.genes:,} genes, {X.nnz:,} non-zeros, {n_classes} types; "
          f"{len(split[0]):,} train, {len(split[1]):,} validate; drawn in {time.perf_counter() - t0:.0f}s; "
          f"torch threads {torch.get_num_threads()}")
    grid = classifier.LINEAR_C_GRID if args.grid else (args.C,)
    rows = []
    for solver in args.solvers:
        t1 = time.perf_counter()
        base = classifier.fit_linear_base(X, codes, split, n_classes, device if solver == "torch" else "cpu",
                                          solver=solver, c_grid=grid)
        seconds = time.perf_counter() - t1
        row = {"solver": solver, "C grid": ",".join(f"{c:g}" for c in grid), "C": base.C,
               "validation accuracy": round(base.val_accuracy, 4), "seconds": round(seconds, 1),
               "train cells/s": round(len(split[0]) / seconds), "peak MiB": round(synth.memory_mib()["peak"])}
        rows.append(row)
        print(row, flush=True)
    return rows


if __name__ == "__main__":
    main(parse_args())
