"""Features: the one place raw values become a network's input (log1p of raw values, or of counts
per 10,000), PCA features, and the pretrained representation of a dataset as a feature set. A
matrix named ``features`` holds transformed values, one named ``X`` (of a ``CellData``) raw ones.
Importing does nothing.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from settings import NORMALIZATIONS
from splits import iter_batches
from values import LOG1P_VALUES


def log1p_features(X: sp.csr_matrix) -> sp.csr_matrix:
    """``log1p`` of raw values, sharing the index arrays (only the values are copied).

    scPretrain: log1p of the raw values, no library-size normalisation.
    """
    X = sp.csr_matrix(X)
    return sp.csr_matrix((np.log1p(X.data), X.indices, X.indptr), shape=X.shape)


def features(data: CellData, normalize: str = "none", counted=None) -> sp.csr_matrix:
    """The encoder's input for a dataset, the one place raw values are transformed: ``log1p`` of
    the raw values (``normalize="none"``, the paper's) or of counts per 10,000 (``"cp10k"``: each
    cell scaled to the same total first, so that cells sequenced to different depths look alike);
    already-transformed values are used as they are. ``counted`` (a boolean mask of the columns)
    says which genes a cell's total counts: a model's genes, when its input lacks others."""
    if data.values == LOG1P_VALUES:
        return sp.csr_matrix(data.X)
    if normalize == "cp10k":
        return log1p_features(per_10k(data.X, counted))
    if normalize != "none":
        raise ValueError(f"unknown normalisation '{normalize}'; choose one of {NORMALIZATIONS}")
    return log1p_features(data.X)


def per_10k(X: sp.csr_matrix, counted=None) -> sp.csr_matrix:
    """Each row scaled so that its ``counted`` columns (all by default) sum to 10,000 (empty rows
    stay empty); shares the index arrays."""
    X = sp.csr_matrix(X)
    if counted is None:
        totals = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    else:
        totals = np.asarray(X @ np.asarray(counted, dtype=np.float64), dtype=np.float64).ravel()
    scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
    values = (X.data * np.repeat(scale, np.diff(X.indptr))).astype(np.float32)
    return sp.csr_matrix((values, X.indices, X.indptr), shape=X.shape)


def pca_features(features: sp.csr_matrix, fit_rows: np.ndarray, n_components: int, seed: int):
    """PCA of feature rows, fitted on ``fit_rows`` only; returns (all cells' components, components, mean)."""
    from sklearn.decomposition import PCA

    fit = features[fit_rows].toarray()
    n_components = int(min(n_components, fit.shape[0] - 1, fit.shape[1]))
    pca = PCA(n_components=n_components, random_state=seed).fit(fit)
    transformed = np.vstack([pca.transform(features[rows].toarray()) for rows in iter_batches(features.shape[0], 4096)])
    return transformed.astype(np.float32), pca.components_.astype(np.float32), pca.mean_.astype(np.float32)


def pretrained_representation(encoder, gene_universe, normalize: str, dataset, device="cpu") -> np.ndarray:
    """The pretrained representation ``sigmoid(encoder(x))`` of every cell of a dataset whose genes
    are mapped: aligned to the encoder's gene universe (which logs the coverage) and fed the
    features it was trained on (``normalize``)."""
    from genes import align_to_universe
    from model import represent

    aligned = align_to_universe(dataset, gene_universe)
    return represent(encoder, features(aligned, normalize), device=device)
