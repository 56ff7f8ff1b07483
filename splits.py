"""Labels as integer codes, seeded splits of cells, mini-batches and repeat seeds. Importing does
nothing.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

from errors import DataError

if TYPE_CHECKING:
    from settings import SplitSettings


def encode_labels(labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes for labels, classes in sorted order (deterministic across runs)."""
    classes, codes = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    return codes.astype(np.int64), classes.astype(object)


def validation_split(n_cells: int, seed: int, per_val: float = 0.1, max_val: int = 1000,
                     what: str = "the dataset") -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, validation) of all cells: validation = min(int(per_val n), max_val), at least
    one cell; every other cell trains (a reference for annotation has no test cells). Too few
    cells is a DataError naming ``what``."""
    order = np.random.default_rng(seed).permutation(n_cells)
    n_val = max(1, min(int(per_val * n_cells), max_val))
    if n_cells - n_val < 2:
        raise DataError(f"{what}: {n_cells} cells are too few for a training and a validation set")
    return order[n_val:], order[:n_val]


def split_cells(n_cells: int, seed: int, per_train: float = 0.6, per_val: float = 0.1,
                max_train: int = 1000, max_val: int = 1000,
                what: str = "the dataset") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded shuffle split: train = min(int(per_train n), max_train), val likewise, test = rest.

    scPretrain: the split sizes (0.6 n up to 1000 train, 0.1 n up to 1000 validation, the rest test);
    seeded and shared by both methods (the original's were neither).
    """
    order = np.random.default_rng(seed).permutation(n_cells)
    n_train = min(int(per_train * n_cells), max_train)
    n_val = min(int(per_val * n_cells), max_val)
    if n_train < 1 or n_val < 1 or n_cells - n_train - n_val < 1:
        raise DataError(f"{what}: {n_cells} cells are too few for a train/validation/test split "
                        f"({n_train} train, {n_val} validation)")
    return order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]


def iter_batches(n_cells: int, batch_size: int, rng: np.random.Generator | None = None) -> Iterator[np.ndarray]:
    """Row indices of successive mini-batches; shuffled when ``rng`` is given."""
    order = rng.permutation(n_cells) if rng is not None else np.arange(n_cells)
    for start in range(0, n_cells, batch_size):
        yield order[start:start + batch_size]


def split_of(n_cells: int, seed: int, split: "SplitSettings", what: str = "the dataset"):
    """:func:`split_cells` with the sizes of ``split`` (``settings.SplitSettings``)."""
    return split_cells(n_cells, seed, split.per_train, split.per_val, split.max_tr_num, split.max_val, what)


def repeat_seeds(seed: int, fold1: int, fold2: int) -> list[int]:
    """One seed per repeat of the fold1 x fold2 grid, derived from ``--seed``."""
    return [seed * 1000 + i * fold2 + j for i in range(fold1) for j in range(fold2)]
