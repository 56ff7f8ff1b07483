"""What a matrix read from a file holds, and whether it is well formed. Every reader (Cell BLAST
``.h5``, h5ad, numpy folders, streamed h5ad chunks) checks its matrix here, so that values are
never logged twice and a malformed file is one message naming it. Importing does nothing.

Values are ``raw`` (counts, TPM, CPM: the encoder's input is log1p of them) or ``log1p``
(already log-normalised by the user: fed as they are). When the evidence cannot tell which, the
run stops and names the evidence and the flag that settles it (``--values raw|log1p``).
"""
from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp

from errors import DataError

log = logging.getLogger("scpretrain.data")

RAW_VALUES, LOG1P_VALUES = "raw", "log1p"
SCALED_VALUES, BAD_VALUES, AMBIGUOUS_VALUES = "scaled", "bad", "ambiguous"
VALUE_CHOICES = ("auto", RAW_VALUES, LOG1P_VALUES)  # --values
# log1p of counts per 10,000 stays below ~10, of counts per million below ~14, log2(CPM + 1)
# below 20; counts, TPM and CPM exceed it (a TPM row sums to 1e6 over ~20k genes: mean 50).
LOG_MAX = 20.0
# TPM-like data have many values above LOG_MAX (the demo's oligodendroglioma: 25 %); log data with
# a few outliers above it do not: between none and this share the values are ambiguous
TPM_SHARE_ABOVE = 0.01
# the evidence is computed on at most this many rows, spread evenly over the matrix
EVIDENCE_ROWS = 20000
SETTLE = ("pass --values raw if they are raw values (counts, TPM), or --values log1p (the same as "
          "--log_transformed) if they are already log-normalised")


# --------------------------------------------------------------------------- raw or log-normalised


def evidence_rows(n_rows: int, limit: int = EVIDENCE_ROWS) -> np.ndarray:
    """The rows the evidence is computed on: all, or ``limit`` spread evenly (deterministic)."""
    if n_rows <= limit:
        return np.arange(n_rows)
    return np.unique(np.linspace(0, n_rows - 1, limit).astype(np.int64))


def value_kind(X) -> tuple[str, str]:
    """What a matrix holds, and why we think so: ``(kind, why)`` with kind ``RAW_VALUES``,
    ``LOG1P_VALUES``, ``SCALED_VALUES`` (negative: scaled or centred), ``BAD_VALUES`` (NaN or
    infinity) or ``AMBIGUOUS_VALUES`` (could be raw or log-normalised).

    The evidence, in order (on at most ``EVIDENCE_ROWS`` rows):

    1. NaN or infinity: bad; any negative value: scaled.
    2. whole numbers: counts when some exceed ``LOG_MAX`` (log data never get there); all at most
       ``LOG_MAX``: ambiguous (shallow counts, or log values rounded to integers).
    3. rows of ``expm1`` summing to one constant: log1p of normalised counts (whatever outliers).
    4. at least ``TPM_SHARE_ABOVE`` of the values above ``LOG_MAX``: TPM-like (raw); rows summing
       to one constant: normalised, not logged (raw).
    5. ``expm1`` of the values whole numbers: log1p of counts; no value above ``LOG_MAX``:
       log-normalised; a few above it: ambiguous.
    """
    if X.shape[0] == 0 or X.shape[1] == 0:
        return RAW_VALUES, "no stored values"
    sample = X[evidence_rows(X.shape[0])] if X.shape[0] > EVIDENCE_ROWS else X
    sample = sp.csr_matrix(sample) if sp.issparse(sample) else np.asarray(sample)
    if sample.dtype.kind != "f":  # integers, booleans: as floats (the first checks are exact in any float)
        sample = sample.astype(np.float64)
    values = sample.data if sp.issparse(sample) else sample.ravel()
    if values.size == 0:
        return RAW_VALUES, "no stored values"
    if not np.all(np.isfinite(values)):
        return BAD_VALUES, "NaN or infinite values"
    low, high = float(values.min()), float(values.max())
    if low < 0:
        return SCALED_VALUES, f"scaled or centred values, down to {low:.3g}"
    nonzero = values if values.all() else values[values != 0]  # no copy where no zero is stored
    if nonzero.size == 0:
        return RAW_VALUES, "only zeros"
    if np.array_equal(np.trunc(nonzero), nonzero):  # whole numbers (finite here; 5x faster than np.mod)
        if high > LOG_MAX:
            return RAW_VALUES, "raw counts"
        return AMBIGUOUS_VALUES, (f"whole numbers up to {high:.3g}: the counts of a very shallow dataset, or "
                                  "log-normalised values rounded to integers")
    # the sums of the rest in float64 (a float32 row of expm1 sums would round away the evidence)
    sample, nonzero = sample.astype(np.float64), nonzero.astype(np.float64)
    if _rows_sum_to_constant(_expm1(sample)):
        total = float(np.median(np.asarray(_expm1(sample).sum(axis=1)).ravel()))
        return LOG1P_VALUES, f"log-normalised values, rows of expm1 summing to {total:.3g}"
    above = float(np.mean(nonzero > LOG_MAX))
    if above >= TPM_SHARE_ABOVE:
        return RAW_VALUES, f"TPM-like values, non-integer, {100 * above:.1f}% above {LOG_MAX:g} (up to {high:.3g})"
    if _rows_sum_to_constant(sample):
        return RAW_VALUES, "normalised values whose rows sum to one constant, not logged"
    with np.errstate(over="ignore", invalid="ignore"):
        expm1 = np.expm1(nonzero)
        counts_logged = bool(np.all(np.abs(expm1 - np.round(expm1)) < 1e-3 * np.maximum(1, expm1)))
    if counts_logged:
        return LOG1P_VALUES, "log1p of whole numbers (counts)"
    if above == 0:
        return LOG1P_VALUES, f"log-normalised values, non-integer and at most {high:.3g}"
    return AMBIGUOUS_VALUES, (f"non-integer values, {int(np.sum(nonzero > LOG_MAX))} of {nonzero.size:,} above "
                              f"{LOG_MAX:g} (up to {high:.3g}): log-normalised values with outliers, or unlogged values")


def _expm1(X):
    """``expm1`` of the values (infinite where they are too large: such rows sum to no constant)."""
    with np.errstate(over="ignore"):
        if sp.issparse(X):
            out = X.copy()
            out.data = np.expm1(out.data)
            return out
        return np.expm1(X)


def _rows_sum_to_constant(X, tolerance: float = 0.02) -> bool:
    """At least 95 % of the non-empty rows (two or more) sum to within ``tolerance`` of their median."""
    with np.errstate(over="ignore", invalid="ignore"):  # expm1 of large values: such rows sum to inf
        sums = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    sums = sums[sums > 0]
    if len(sums) < 2:
        return False
    median = float(np.median(sums))
    if not np.isfinite(median):
        return False
    with np.errstate(invalid="ignore"):
        return float(np.mean(np.abs(sums - median) <= tolerance * median)) >= 0.95


def settle_values(kind: str, why: str, wanted: str, where: str, path) -> str:
    """The values a matrix is read as: ``wanted`` (``--values``) when given, else raw values when the
    evidence says so. Bad and scaled values, and without ``wanted`` log-normalised or ambiguous
    ones, stop the run naming ``path``, the evidence and the flag that settles it."""
    if kind == BAD_VALUES:
        raise DataError(f"{path}: {where} holds {why}; fix or drop those entries")
    if kind == SCALED_VALUES:
        raise DataError(f"{path}: {where} holds {why}: neither counts nor log-normalised values; "
                        "give the file's raw counts (or choose another matrix with --layer)")
    if wanted in (RAW_VALUES, LOG1P_VALUES):
        if kind in (RAW_VALUES, LOG1P_VALUES) and kind != wanted:
            log.warning("%s: %s looks like %s values (%s), but --values %s reads them as %s values", path, where,
                        kind, why, wanted, wanted)
        return wanted
    if kind == AMBIGUOUS_VALUES:
        raise DataError(f"{path}: {where} holds {why}; {SETTLE}")
    if kind == LOG1P_VALUES:
        raise DataError(f"{path}: {where} holds {why}; pass --values log1p (--log_transformed) to use them as "
                        "they are, or give the raw counts (--layer chooses another matrix of an h5ad)")
    return kind


# --------------------------------------------------------------------------- well-formed matrices


def check_csr_layout(path, shape, data, indices, indptr, member: str = "exprs") -> None:
    """The CSR arrays' (shape, dtype) agree with each other and with the matrix shape.

    Checked on what a file declares, before its arrays are read, and again by :func:`build_csr`.
    ``data``, ``indices``, ``indptr``: (shape, dtype) of each array.
    """
    if len(shape) != 2:
        raise DataError(f"{path}: '{member}' shape must have 2 entries, got {shape}")
    if min(shape) < 0:
        raise DataError(f"{path}: '{member}' shape holds a negative size {shape}")
    for name, (arr_shape, dtype) in (("indices", indices), ("indptr", indptr)):
        if np.dtype(dtype).kind not in "iu":
            raise DataError(f"{path}: CSR '{member}/{name}' holds {dtype} values; index arrays must be integers "
                            "(write them as int32 or int64)")
        if len(arr_shape) != 1:
            raise DataError(f"{path}: CSR '{member}/{name}' must be 1-D, got shape {tuple(arr_shape)}")
    if np.dtype(data[1]).kind not in "biuf":
        raise DataError(f"{path}: CSR '{member}/data' holds {np.dtype(data[1])} values, expected numbers")
    n_rows, data_shape, n_indices, n_indptr = shape[0], tuple(data[0]), indices[0][0], indptr[0][0]
    if n_indptr != n_rows + 1:
        raise DataError(f"{path}: '{member}' indptr has {n_indptr} entries but its shape says {n_rows} cells "
                        "(+1 expected)")
    if data_shape != (n_indices,):
        raise DataError(f"{path}: '{member}' data {data_shape} and indices ({n_indices}) differ in length")


def check_csr_arrays(data, indices, indptr, n_cols: int, path, member: str = "exprs") -> None:
    """Row pointers from 0 to the number of values, never decreasing; column indices in range."""
    if len(indptr) and (indptr[0] != 0 or indptr[-1] != len(data) or np.any(np.diff(indptr) < 0)):
        raise DataError(f"{path}: '{member}' indptr is not a non-decreasing 0..{len(data)} sequence; "
                        "the file is damaged; write it again")
    if len(indices) and (indices.min() < 0 or indices.max() >= n_cols):
        raise DataError(f"{path}: '{member}' gene indices fall outside 0..{n_cols - 1}; the file is damaged; "
                        "write it again")


def build_csr(data, indices, indptr, shape, path, member: str = "exprs") -> sp.csr_matrix:
    """A canonical float32 CSR matrix from its arrays, after checking they agree with each other
    and hold numbers; entries stored twice in a row are summed (as scipy does), and said."""
    indices, indptr, data = np.asarray(indices), np.asarray(indptr), np.asarray(data)
    check_csr_layout(path, shape, *((a.shape, a.dtype) for a in (data, indices, indptr)), member=member)
    check_csr_arrays(data, indices, indptr, shape[1], path, member)
    idx_dtype = np.int32 if max(shape[1], len(data)) < 2**31 else np.int64
    X = sp.csr_matrix((np.asarray(data, dtype=np.float32), indices.astype(idx_dtype, copy=False),
                       indptr.astype(idx_dtype, copy=False)), shape=tuple(int(s) for s in shape))
    return canonical_csr(X, path, member)


def canonical_csr(X: sp.csr_matrix, path, member: str = "X") -> sp.csr_matrix:
    """Column indices sorted within each row and no entry stored twice: duplicates are summed
    with a warning naming the file (each cell's value of a gene is the sum of its entries)."""
    if X.has_canonical_format:
        return X
    if not X.has_sorted_indices:
        X.sort_indices()
    n_before = X.nnz
    X.sum_duplicates()
    if X.nnz != n_before:
        log.warning("%s: '%s' stores %d entries twice or more in the same row and gene; they are summed",
                    path, member, n_before - X.nnz)
    return X


def check_finite_non_negative(values: np.ndarray, path, where: str) -> None:
    """Raw or log-normalised values are finite and never negative."""
    if values.size and not np.all(np.isfinite(values)):
        raise DataError(f"{path}: {where} holds NaN or infinite values; fix or drop those entries")
    if values.size and values.min() < 0:
        raise DataError(f"{path}: {where} holds negative values (down to {values.min():.3g}); raw counts, TPM or "
                        "log-normalised values are expected, not scaled ones")
