"""Figures of an annotated query: a UMAP of the representation coloured by the predicted labels,
the majority vote and the confidence, and the contingency of the query's own labels against the
predictions. Each is written as PNG and PDF, atomically. Importing does nothing.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from files import save_figure

log = logging.getLogger("scpretrain.annotate")

UMAP_MAX_CELLS = 200_000  # above this many cells the UMAP is drawn on a seeded subsample
UMAP_MIN_CELLS = 10


def with_extension(stem: Path, extension: str) -> Path:
    """``stem`` + ``extension`` (``Path.with_suffix`` would replace a dotted part of the stem)."""
    stem = Path(stem)
    return stem.with_name(stem.name + extension)


def figure_paths(stem) -> list[Path]:
    return [with_extension(stem, ".png"), with_extension(stem, ".pdf")]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, stem) -> list[Path]:
    plt = _pyplot()
    paths = figure_paths(stem)
    try:
        for path in paths:
            save_figure(fig, path, dpi=150, bbox_inches="tight")
    finally:
        plt.close(fig)
    return paths


def draw_contingency(table: pd.DataFrame, stem, title: str) -> list[Path]:
    """Row-normalised heatmap: each given label's cells spread over the predicted labels."""
    plt = _pyplot()
    shares = table.div(table.sum(axis=1), axis=0)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * shares.shape[1], 1.5 + 0.4 * shares.shape[0]))
    image = ax.imshow(shares.to_numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(shares.shape[1]), [str(c) for c in shares.columns], rotation=60, ha="right")
    ax.set_yticks(range(shares.shape[0]), [f"{r} ({int(n)})" for r, n in zip(shares.index, table.sum(axis=1))])
    ax.set_xlabel(table.columns.name)
    ax.set_ylabel(f"{table.index.name} (cells)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of the row's cells")
    return _save(fig, stem)


def umap_sample(n_cells: int, seed: int, limit: int) -> np.ndarray:
    """The cells a UMAP is drawn on: all, or a seeded sample of ``limit``, in order."""
    if n_cells <= limit:
        return np.arange(n_cells)
    return np.sort(np.random.default_rng(seed).choice(n_cells, limit, replace=False))


def umap_embedding(representation: np.ndarray, seed: int) -> np.ndarray:
    """2-D UMAP coordinates of the rows of ``representation`` (seeded)."""
    import umap

    with warnings.catch_warnings():  # a fixed random_state makes umap-learn single-threaded, and says so
        warnings.filterwarnings("ignore", message=".*n_jobs.*", category=UserWarning)
        n_neighbors = max(2, min(15, len(representation) - 1))
        return umap.UMAP(n_neighbors=n_neighbors, random_state=seed).fit_transform(representation)


def draw_annotation_umap(representation: np.ndarray, table: pd.DataFrame, stem, title: str,
                         seed: int = 0, limit: int | None = None) -> list[Path]:
    """Panels of one UMAP of the representation, coloured by ``predicted_labels``, by
    ``majority_voting`` (when the table has it) and by ``conf_score``. Above ``limit`` cells a
    seeded subsample is drawn, and the figure says so. None (with a line) for too few cells."""
    n, limit = len(representation), limit or UMAP_MAX_CELLS
    if n < UMAP_MIN_CELLS:
        log.warning("%d cells are too few for a UMAP (at least %d); no figure", n, UMAP_MIN_CELLS)
        return []
    rows = umap_sample(n, seed, limit)
    xy = umap_embedding(representation[rows], seed)
    part = table.iloc[rows]
    columns = [c for c in ("predicted_labels", "majority_voting") if c in part.columns] + ["conf_score"]
    palette = label_palette(part[[c for c in columns if c != "conf_score"]])
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(columns), figsize=(6.2 * len(columns), 5.6), squeeze=False)
    for ax, column in zip(axes[0], columns):
        if column == "conf_score":
            image = ax.scatter(xy[:, 0], xy[:, 1], c=part[column].to_numpy(float), s=3, cmap="viridis", vmin=0,
                               vmax=1, rasterized=True)
            fig.colorbar(image, ax=ax, label="conf_score")
        else:
            _categorical_scatter(ax, xy, part[column].astype(str).to_numpy(), palette)
        ax.set_title(column)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel("UMAP 1")
        ax.set_ylabel("UMAP 2")
    shown = f"all {n:,} cells" if len(rows) == n else f"a seeded sample of {len(rows):,} of {n:,} cells"
    fig.suptitle(f"{title}: UMAP of the scPretrain representation ({shown})")
    fig.tight_layout()
    return _save(fig, stem)


NO_LABEL_COLOUR = (0.75, 0.75, 0.75, 1.0)  # Unassigned, Heterogeneous


def label_palette(columns: pd.DataFrame) -> dict:
    """One colour per label over every label column, so a label has the same colour in each panel
    (Unassigned and Heterogeneous grey)."""
    from checkpoints import RESERVED_LABELS

    plt = _pyplot()
    kinds = sorted({str(v) for c in columns.columns for v in columns[c].astype(str)} - set(RESERVED_LABELS))
    cmap = plt.get_cmap("tab20" if len(kinds) > 10 else "tab10")
    palette = {kind: cmap(i % cmap.N) for i, kind in enumerate(kinds)}
    return {**palette, **{r: NO_LABEL_COLOUR for r in RESERVED_LABELS}}


def _categorical_scatter(ax, xy: np.ndarray, labels: np.ndarray, palette: dict) -> None:
    kinds = sorted(set(labels))
    for kind in kinds:
        cells = labels == kind
        ax.scatter(xy[cells, 0], xy[cells, 1], s=3, color=palette.get(kind, NO_LABEL_COLOUR),
                   label=f"{kind} ({int(cells.sum()):,})", rasterized=True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), markerscale=4, fontsize="x-small", frameon=False,
              ncol=1 if len(kinds) <= 20 else 2)
