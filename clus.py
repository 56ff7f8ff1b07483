"""K-means on PCA features and on the pretrained representation, scored against the cell types.

    python clus.py                                   # all labelled datasets, UMAP of the first
    python clus.py --umap_dataset Quake_10x_Kidney   # the original's UMAP dataset

For every labelled dataset, K-means with k = the number of cell types runs on PCA of the log1p
expression and on the pretrained representation, once per seed (``--seed`` + 0..n_seeds-1);
adjusted Rand index and normalised mutual information against the cell types, and the
silhouette of the clustering on the features clustered, go to ``--save_result``. A UMAP of one
dataset, raw (PCA) vs scPretrain coloured by cell type, is written as
``umap_<dataset>.csv`` (the coordinates) and ``umap_<dataset>.png`` (drawn from that CSV)
beside the results. Importing does nothing.
"""
from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

import cli
import data
import files
import results
import runtime
from checkpoints import Feeding, check_feeding
from features import features as feature_matrix, pca_features as fit_pca, pretrained_representation
from settings import ClusterSettings, identity
from splits import encode_labels

log = logging.getLogger("scpretrain.clus")

FEATURE_SETS = ("PCA", "scPretrain")
SILHOUETTE_CELLS = 5000  # silhouette is O(n^2): scored on a seeded sample of this many cells at most
CLUSTER_METRICS = ("ari", "nmi", "silhouette")
RESULT_COLUMNS = ["dataset", "seed", "features", results.RUN_ID, *CLUSTER_METRICS]
DONE_KEY = ["dataset", results.DATA_ID, "seed", "features", results.RUN_ID]
UMAP_MIN_CELLS = 10  # UMAP's neighbour graph and spectral layout need more cells than this


def build_parser() -> argparse.ArgumentParser:
    """The command line (its --help states every default)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model", default=str(cli.DEFAULT_MODEL),
                        help="encoder checkpoint giving the scPretrain features (default: %(default)s)")
    parser.add_argument("--save_result", default=str(cli.RESULTS_DIR / "clustering.csv"),
                        help="CSV the rows are appended to; the UMAP files go beside it (default: %(default)s)")
    parser.add_argument("--pca_dim", type=cli.positive_int, default=50, help="PCA components of the raw features (default: %(default)s)")
    parser.add_argument("--pca_fit_cells", type=cli.at_least_two, default=10000,
                        help="the PCA is fitted on a seeded sample of at most this many cells (default: %(default)s)")
    parser.add_argument("--n_seeds", type=cli.positive_int, default=10, help="K-means runs per feature set, seeds --seed+0.. "
                                                                "(default: %(default)s)")
    parser.add_argument("--umap_dataset", default=None,
                        help="dataset drawn as a UMAP (default: the first labelled dataset loaded; "
                             "the original drew Quake_10x_Kidney)")
    parser.add_argument("--no_umap", action="store_true", help="skip the UMAP figure")
    cli.add_common_args(parser)
    cli.add_recipe_args(parser)
    cli.add_feeding_arg(parser)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = cli.resolve_recipe(parser.parse_args(argv))
    cli.check_derived_seeds(parser, args.seed + args.n_seeds)
    return args


def pca_features(d: data.CellData, n_components: int, fit_cells: int, seed: int, normalize: str = "none") -> np.ndarray:
    """PCA of the log1p expression, fitted on all cells or a seeded sample of ``fit_cells``."""
    fit_rows = np.arange(d.n_cells)
    if d.n_cells > fit_cells:
        fit_rows = np.sort(np.random.default_rng(seed).choice(d.n_cells, fit_cells, replace=False))
    pca, _, _ = fit_pca(feature_matrix(d, normalize), fit_rows, n_components, seed)
    return pca


def score_clustering(features: np.ndarray, codes: np.ndarray, k: int, seed: int) -> dict:
    """One K-means run (n_init=1) and its ARI, NMI and silhouette."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

    predicted = KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(features)
    n_found = len(np.unique(predicted))
    silhouette = float("nan")
    if 2 <= n_found < len(predicted):
        sample = SILHOUETTE_CELLS if len(predicted) > SILHOUETTE_CELLS else None
        silhouette = float(silhouette_score(features, predicted, sample_size=sample, random_state=seed))
    return {"ari": float(adjusted_rand_score(codes, predicted)),
            "nmi": float(normalized_mutual_info_score(codes, predicted)),
            "silhouette": silhouette}


def cluster_dataset(d: data.CellData, feature_sets: dict, seeds: list[int], run_id: str = results.NO_MODEL,
                    data_id: str = "") -> list[dict]:
    codes, classes = encode_labels(d.labels)
    k = len(classes)
    if k < 2:
        log.warning("%s: one cell type only; nothing to cluster", d.name)
        return []
    rows = []
    for name, features in feature_sets.items():
        for seed in seeds:
            rows.append({"dataset": d.name, results.DATA_ID: data_id, "species": d.species, "n_cells": d.n_cells, "n_classes": k,
                         "features": name, "seed": seed, results.RUN_ID: run_id,
                         **score_clustering(features, codes, k, seed)})
        mean = pd.DataFrame(rows[-len(seeds):])[["ari", "nmi", "silhouette"]].mean()
        log.info("%s on %s, k=%d, %d seeds: ARI %.4f NMI %.4f silhouette %.4f", d.name, name, k, len(seeds),
                 mean["ari"], mean["nmi"], mean["silhouette"])
    return rows


def umap_coordinates(d: data.CellData, feature_sets: dict, seed: int) -> pd.DataFrame:
    """Two UMAP embeddings of one dataset, one row per cell and feature set."""
    import umap

    frames = []
    for name, features in feature_sets.items():
        with warnings.catch_warnings():  # a fixed random_state makes umap-learn single-threaded, and says so
            warnings.filterwarnings("ignore", message=".*n_jobs.*", category=UserWarning)
            n_neighbors = max(2, min(15, d.n_cells - 1))
            xy = umap.UMAP(n_neighbors=n_neighbors, random_state=seed).fit_transform(features)
        frames.append(pd.DataFrame({"dataset": d.name, "cell": d.cells, "cell_type": d.labels, "features": name,
                                    "umap1": xy[:, 0], "umap2": xy[:, 1]}))
    return pd.concat(frames, ignore_index=True)


def plot_umap(csv_path: Path, png_path: Path) -> Path:
    """Raw (PCA) vs scPretrain panels, coloured by cell type, drawn from the coordinates CSV."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pd.read_csv(csv_path, dtype={"cell_type": str})
    types = sorted(frame["cell_type"].unique())
    cmap = plt.get_cmap("tab20" if len(types) > 10 else "tab10")
    colours = {t: cmap(i % cmap.N) for i, t in enumerate(types)}
    titles = {"PCA": "raw (PCA of log1p expression)", "scPretrain": "scPretrain representation"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5))
    for ax, name in zip(axes, FEATURE_SETS):
        part = frame[frame["features"] == name]
        for t in types:
            cells = part[part["cell_type"] == t]
            ax.scatter(cells["umap1"], cells["umap2"], s=4, color=colours[t], label=t, rasterized=True)
        ax.set_title(titles[name])
        ax.set_xlabel("UMAP 1")
        ax.set_ylabel("UMAP 2")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{frame['dataset'].iloc[0]}: cells coloured by cell type")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", markerscale=3, fontsize="small", frameon=False,
               ncol=1 if len(types) <= 25 else 2)
    fig.tight_layout(rect=(0, 0, 0.8 if len(types) <= 25 else 0.7, 1))
    files.save_figure(fig, png_path, dpi=150)
    plt.close(fig)
    return png_path


def umap_paths(out_dir: Path, name: str) -> tuple[Path, Path]:
    """The UMAP coordinates CSV and figure of dataset ``name`` beside the results (a name holding
    folders, ``a/data``, is written with ``__``)."""
    stem = f"umap_{name.replace('/', '__')}"
    return Path(out_dir) / f"{stem}.csv", Path(out_dir) / f"{stem}.png"


def write_umap(d: data.CellData, feature_sets: dict, seed: int, out_dir: Path) -> Path | None:
    """The UMAP CSV and figure of one dataset; a dataset too small for UMAP is skipped with a line."""
    if d.n_cells < UMAP_MIN_CELLS:
        log.warning("%s: %d cells are too few for a UMAP (at least %d); no UMAP figure", d.name, d.n_cells,
                    UMAP_MIN_CELLS)
        return None
    try:
        coords = umap_coordinates(d, feature_sets, seed)
    except (ValueError, TypeError) as exc:  # umap-learn's own refusal of a degenerate dataset
        log.warning("%s: UMAP failed (%s); no UMAP figure", d.name, exc)
        return None
    csv_path, png_path = umap_paths(out_dir, d.name)
    files.atomic_write(csv_path, lambda fh: coords.to_csv(fh, index=False))
    plot_umap(csv_path, png_path)
    log.info("UMAP of %s in %s", d.name, png_path)
    return png_path


def planned_umaps(args, out: Path) -> dict:
    """The UMAP files this run may write (one dataset's; every dataset's name is a candidate)."""
    if args.no_umap:
        return {}
    names = [args.umap_dataset] if args.umap_dataset else [Path(n).stem for n in data.expand_dataset_names(args.datasets)]
    return {"--save_result (a UMAP beside it)": [p for n in names for p in umap_paths(out.parent, n)]}


def run(args):
    out = Path(args.save_result)
    out, device, pretrained, datasets = cli.analysis_inputs(args, RESULT_COLUMNS, planned_umaps(args, out))
    settings, read = ClusterSettings.from_args(args), cli.read_settings(args)
    umap_name = None if args.no_umap else (args.umap_dataset or datasets[0].name)
    if umap_name is not None and umap_name not in [d.name for d in datasets]:
        raise data.DataError(f"--umap_dataset {umap_name} is not among the labelled datasets loaded: "
                             f"{[d.name for d in datasets]}")
    run_id, finished = results.start_run(out, identity(read, settings), pretrained.digest, cli.args_dict(args),
                                         RESULT_COLUMNS, DONE_KEY)
    seeds = list(range(args.seed, args.seed + settings.n_seeds))
    for d in runtime.progress(datasets, desc="clustering datasets"):
        data_id = data.dataset_digest(d)
        done = all((d.name, data_id, str(s), f, run_id) in finished for s in seeds for f in FEATURE_SETS)
        if done and d.name != umap_name:
            log.info("%s: already in %s under run identity %s; not redone", d.name, out, run_id)
            continue
        check_feeding(pretrained.fed, Feeding(d.values, pretrained.fed.normalize), pretrained.path,
                      args.allow_feature_mismatch)
        feature_sets = {"PCA": pca_features(d, settings.pca_dim, settings.pca_fit_cells, args.seed, settings.normalize),
                        "scPretrain": pretrained_representation(pretrained.encoder, pretrained.gene_universe,
                                                                pretrained.fed.normalize, d, device=device)}
        rows = [] if done else cluster_dataset(d, feature_sets, seeds, run_id, data_id)
        if rows:
            results.append_results(out, rows, RESULT_COLUMNS)
        if d.name == umap_name:
            write_umap(d, feature_sets, args.seed, out.parent)
    return results.read_results(out, RESULT_COLUMNS)


def main(args):
    runtime.set_up_process(args.log_level, args.seed)  # logging, seeds, float mode, allocator
    return cli.exit_on_error(run, args)


if __name__ == "__main__":
    main(parse_args())
