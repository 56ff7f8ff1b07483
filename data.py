"""Data layer of scPretrain: reading, gene mapping, alignment, splits and batches.

Every reader returns a :class:`CellData`: a cell x gene ``scipy.sparse.csr_matrix`` of float32
raw values plus gene symbols, cell names, labels and species. Matrices stay sparse until a
mini-batch is densified (:func:`dense_rows`). Raw values become the encoder's input in one place,
:func:`features`; a matrix named ``features`` holds transformed values, one named ``X`` (of a
``CellData``) raw ones. Importing this module does nothing.
"""
from __future__ import annotations

import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass, replace
from glob import escape as glob_escape
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

log = logging.getLogger("scpretrain.data")

REPO_DIR = Path(__file__).resolve().parent
DATASET_DIR = REPO_DIR / "dataset"
ORTHOLOG_TABLE = DATASET_DIR / "ncbi_mgi_ensembl__mouse-lemur_human_mouse__orthologs__gene_names__one2one.csv"
COLLECTION_TABLE = DATASET_DIR / "cellblast_collection.csv"
DEMO_DATASETS = ("pbmc68k_reduced", "oligodendroglioma", "pbmc3k", "celltypist_sample")
DEFAULT_URL_TEMPLATE = "https://cblast.gao-lab.org/{name}/{name}.h5"
DEFAULT_LABEL_KEY = "cell_ontology_class"
MISSING_LABELS = {"", "na", "nan", "none", "unknown"}
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
RAW_VALUES, LOG1P_VALUES = "raw", "log1p"


class DataError(ValueError):
    """Bad input data: the message names the file and what is wrong with it."""


@dataclass
class CellData:
    """One dataset in memory: ``X`` is cells x genes, its ``values`` say what it holds:
    ``"raw"`` (counts or TPM, the default) or ``"log1p"`` (already transformed by the user, fed to
    the encoder as it is)."""

    name: str
    X: sp.csr_matrix
    genes: np.ndarray  # gene symbols as given (str)
    cells: np.ndarray  # cell names (str)
    labels: np.ndarray | None  # str per cell; "" where missing; None if unlabelled
    species: str  # "human" or "mouse"
    source: str = ""
    values: str = "raw"  # RAW_VALUES or LOG1P_VALUES

    @property
    def n_cells(self) -> int:
        return self.X.shape[0]

    @property
    def n_genes(self) -> int:
        return self.X.shape[1]

    @property
    def is_labelled(self) -> bool:
        return self.labels is not None


# --------------------------------------------------------------------------- readers


def _decode(values, path, what: str) -> np.ndarray:
    """Byte strings (as Cell BLAST stores them) to a 1-D numpy array of str; other shapes refused."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{path}: {what} must be 1-D (one entry per cell or gene), got shape {arr.shape}; "
                        "write it as a flat array")
    if arr.dtype.kind == "S" or arr.dtype == object:
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr], dtype=object)
    return arr.astype(str).astype(object)


# h5py reports a damaged file, a dangling soft or external link, a missing member or a member of
# the wrong kind with any of these; each becomes one DataError naming the file and the member.
H5PY_ERRORS = (KeyError, OSError, TypeError, ValueError, RuntimeError, AttributeError)
# A filtered (compressed) dataset may declare more bytes than it stores, but deflate cannot do
# better than ~1032:1; a dataset declaring more than this is a header that lies about its size.
MAX_COMPRESSION_RATIO = 1100


@contextmanager
def _reading(path, member: str):
    """Turn h5py's exceptions while reading ``member`` into one DataError naming the file."""
    try:
        yield
    except DataError:
        raise
    except H5PY_ERRORS as exc:
        raise DataError(f"{path}: cannot read '{member}' ({type(exc).__name__}: {exc}); the file is damaged or "
                        "not in the expected layout; download or write it again") from None


def _open_h5(path: Path, kind: str = "a Cell BLAST .h5"):
    import h5py

    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not {kind} file")
    with open(path, "rb") as fh:
        if fh.read(8) != HDF5_SIGNATURE:
            raise DataError(f"{path}: not an HDF5 file (expected {kind})")
    try:
        return h5py.File(path, "r")
    except H5PY_ERRORS as exc:
        raise DataError(f"{path}: cannot be opened as HDF5 ({exc})") from exc


def check_stored_size(dataset, path, member: str) -> None:
    """Refuse an HDF5 dataset that declares more bytes than its file can hold, before reading it.

    Unfiltered storage must hold every declared byte; filtered storage at most
    ``MAX_COMPRESSION_RATIO`` times what it stores (plus 1 MiB of slack for tiny datasets). A
    header asking for terabytes from a small file is refused instead of allocated. Virtual
    datasets (their storage lives in other files) are left to h5py.
    """
    import h5py

    if dataset.id.get_create_plist().get_layout() == h5py.h5d.VIRTUAL:
        return
    declared = int(np.prod([int(s) for s in dataset.shape], dtype=object)) * dataset.dtype.itemsize
    stored = dataset.id.get_storage_size()
    filtered = dataset.id.get_create_plist().get_nfilters() > 0
    limit = MAX_COMPRESSION_RATIO * stored + (1 << 20) if filtered else stored
    if declared > limit:
        raise DataError(f"{path}: '{member}' declares shape {tuple(dataset.shape)} ({declared:,} bytes) but the file "
                        f"stores {stored:,} bytes for it; the file is truncated or damaged; download or write it again")


def check_all_stored_sizes(h5, path) -> None:
    """:func:`check_stored_size` of every dataset in an open HDF5 file (reached by hard links)."""
    import h5py

    def visit(name, node):
        if isinstance(node, h5py.Dataset):
            check_stored_size(node, path, name)

    with _reading(path, "the file's members"):
        h5.visititems(visit)


def _h5_dataset(h5, member: str, path):
    """``h5[member]`` as a dataset whose declared size the file can hold."""
    import h5py

    with _reading(path, member):
        node = h5[member]
        if not isinstance(node, h5py.Dataset):
            raise DataError(f"{path}: '{member}' is a group, expected an array; write it as one dataset")
        check_stored_size(node, path, member)
    return node


def _read_h5_array(h5, member: str, path) -> np.ndarray:
    node = _h5_dataset(h5, member, path)
    with _reading(path, member):
        return node[()]


def _read_h5_matrix(h5, path: Path) -> sp.csr_matrix:
    import h5py

    if "exprs" not in h5:
        raise DataError(f"{path}: no 'exprs' matrix (found: {sorted(h5.keys())})")
    with _reading(path, "exprs"):
        node = h5["exprs"]
    if isinstance(node, h5py.Dataset):
        return _read_dense_exprs(node, path)
    missing = [k for k in ("data", "indices", "indptr", "shape") if k not in node]
    if missing:
        raise DataError(f"{path}: 'exprs' group lacks {missing}")
    shape_node = _h5_dataset(h5, "exprs/shape", path)
    if shape_node.dtype.kind not in "iu":
        raise DataError(f"{path}: 'exprs/shape' must be 2 integers, got {shape_node.size} of dtype {shape_node.dtype}")
    with _reading(path, "exprs/shape"):
        shape = tuple(int(s) for s in np.ravel(shape_node[()]))
    parts = {k: _h5_dataset(h5, f"exprs/{k}", path) for k in ("data", "indices", "indptr")}
    check_csr_layout(path, shape, **{k: (v.shape, v.dtype) for k, v in parts.items()})
    if parts["data"].dtype.kind not in "biuf":
        raise DataError(f"{path}: 'exprs/data' holds {parts['data'].dtype} values, expected numbers")
    with _reading(path, "exprs"):
        data = np.asarray(parts["data"][()], dtype=np.float32)
        indices, indptr = parts["indices"][()], parts["indptr"][()]
    return build_csr(data, indices, indptr, shape, path)


def _read_dense_exprs(node, path) -> sp.csr_matrix:
    if node.ndim != 2:
        raise DataError(f"{path}: dense 'exprs' must be 2-D, got shape {node.shape}")
    if node.dtype.kind not in "biuf":
        raise DataError(f"{path}: dense 'exprs' is not numeric (dtype {node.dtype})")
    with _reading(path, "exprs"):
        check_stored_size(node, path, "exprs")
        dense = np.asarray(node[()], dtype=np.float32)
    return sp.csr_matrix(dense)


def check_csr_layout(path, shape, data, indices, indptr) -> None:
    """The CSR arrays' (shape, dtype) agree with each other and with the matrix shape.

    Checked on what a file declares, before its arrays are read, and again by :func:`build_csr`.
    """
    if len(shape) != 2:
        raise DataError(f"{path}: 'exprs/shape' must have 2 entries, got {shape}")
    if min(shape) < 0:
        raise DataError(f"{path}: 'exprs/shape' holds a negative size {shape}")
    for member, (arr_shape, dtype) in (("indices", indices), ("indptr", indptr)):
        if np.dtype(dtype).kind not in "iu":
            raise DataError(f"{path}: CSR '{member}' holds {dtype} values; index arrays must be integers "
                            "(write them as int32 or int64)")
        if len(arr_shape) != 1:
            raise DataError(f"{path}: CSR '{member}' must be 1-D, got shape {tuple(arr_shape)}")
    n_rows, data_shape, n_indices, n_indptr = shape[0], tuple(data[0]), indices[0][0], indptr[0][0]
    if n_indptr != n_rows + 1:
        raise DataError(f"{path}: indptr has {n_indptr} entries but shape says {n_rows} cells (+1 expected)")
    if data_shape != (n_indices,):
        raise DataError(f"{path}: data {data_shape} and indices ({n_indices}) differ in length")


def build_csr(data, indices, indptr, shape, path) -> sp.csr_matrix:
    """A CSR matrix from its arrays, after checking they agree with each other."""
    indices, indptr, data = np.asarray(indices), np.asarray(indptr), np.asarray(data)
    check_csr_layout(path, shape, *((a.shape, a.dtype) for a in (data, indices, indptr)))
    n_rows, n_cols = shape
    if indptr[0] != 0 or indptr[-1] != len(data) or np.any(np.diff(indptr) < 0):
        raise DataError(f"{path}: indptr is not a non-decreasing 0..{len(data)} sequence")
    if len(indices) and (indices.min() < 0 or indices.max() >= n_cols):
        raise DataError(f"{path}: gene indices fall outside 0..{n_cols - 1}")
    idx_dtype = np.int32 if max(n_cols, len(data)) < 2**31 else np.int64
    return sp.csr_matrix(
        (data, indices.astype(idx_dtype, copy=False), indptr.astype(idx_dtype, copy=False)), shape=(n_rows, n_cols)
    )


def _read_h5_labels(h5, path: Path, label_key: str, strict: bool) -> np.ndarray | None:
    with _reading(path, "obs"):
        columns = sorted(h5["obs"].keys()) if "obs" in h5 else []
    if label_key not in columns:
        if strict:
            raise DataError(f"{path}: no label column '{label_key}' in obs; available columns: {columns}")
        return None
    return _decode(_read_h5_array(h5, f"obs/{label_key}", path), path, f"label column 'obs/{label_key}'")


def read_cellblast_h5(path, label_key: str = DEFAULT_LABEL_KEY, species: str | None = None,
                      name: str | None = None, strict_label_key: bool = False) -> CellData:
    """Read a Cell BLAST ``.h5``: CSR group or dense ``exprs``, byte-string names, ``obs`` columns.

    A dataset without the label column is unlabelled (pre-training only) unless
    ``strict_label_key`` asks for an error listing the available columns. Sizes the file declares
    are checked against what it stores before anything is read; any h5py error is one DataError.
    """
    path = Path(path)
    with _open_h5(path) as h5:
        X = _read_h5_matrix(h5, path)
        if "var_names" not in h5:
            raise DataError(f"{path}: no 'var_names' (gene symbols)")
        genes = _decode(_read_h5_array(h5, "var_names", path), path, "'var_names'")
        cells = (_decode(_read_h5_array(h5, "obs_names", path), path, "'obs_names'") if "obs_names" in h5
                 else _default_cell_names(X.shape[0]))
        labels = _read_h5_labels(h5, path, label_key, strict_label_key)
        with _reading(path, "species attribute"):
            stored_species = h5.attrs.get("species")
    if species is None and stored_species is not None:
        species = stored_species.decode() if isinstance(stored_species, bytes) else str(stored_species)
    return finish_dataset(name or path.stem, X, genes, cells, labels, species, path)


# --------------------------------------------------------------------------- h5ad

# Layer names that hold counts by convention (compared lower-case), tried after X and raw.X.
COUNT_LAYER_NAMES = ("counts", "raw_counts", "count", "raw", "umi", "umis", "umi_counts", "rawcounts")
# log1p of counts per 10,000 stays below ~10, of counts per million below ~14, log2(CPM + 1)
# below 20; counts, TPM and CPM exceed it (a TPM row sums to 1e6 over ~20k genes: mean 50).
LOG_MAX = 20.0
SCALED_VALUES, BAD_VALUES = "scaled", "bad"
ENSEMBL_ID = r"^ENS[A-Z]*G\d{6,}(\.\d+)?$"
CELLXGENE_SYMBOLS = "feature_name"


def value_kind(X) -> tuple[str, str]:
    """What a matrix holds, and why we think so: ``(RAW_VALUES, why)`` for counts, TPM or other
    unlogged values, ``(LOG1P_VALUES, why)`` for log-normalised values, ``(SCALED_VALUES, why)``
    for negative (scaled or centred) values, ``(BAD_VALUES, why)`` for NaN or infinity.

    The rule, in order: any negative value -> scaled; all stored values whole numbers -> raw
    counts (however small); largest value above ``LOG_MAX`` -> raw (TPM, CPM: log-normalised data
    never get there); rows that sum to one constant -> raw (normalised, not logged); otherwise
    log-normalised (non-integer and small; when rows of ``expm1`` sum to a constant such as 1e4,
    the reason says so: the signature of log1p of normalised counts).
    """
    values = np.asarray(X.data if sp.issparse(X) else X).ravel()
    if values.size == 0:
        return RAW_VALUES, "no stored values"
    if not np.all(np.isfinite(values)):
        return BAD_VALUES, "NaN or infinite values"
    low, high = float(values.min()), float(values.max())
    if low < 0:
        return SCALED_VALUES, f"scaled or centred values, down to {low:.3g}"
    if np.all(np.mod(values, 1) == 0):
        return RAW_VALUES, "raw counts"
    if high > LOG_MAX:
        return RAW_VALUES, f"TPM-like values, non-integer up to {high:.3g}"
    if _rows_sum_to_constant(X):
        return RAW_VALUES, "normalised values whose rows sum to one constant, not logged"
    expm1 = X.copy() if sp.issparse(X) else np.asarray(X, dtype=np.float64)
    if sp.issparse(expm1):
        expm1.data = np.expm1(expm1.data.astype(np.float64))
    else:
        expm1 = np.expm1(expm1)
    if _rows_sum_to_constant(expm1):
        total = float(np.median(np.asarray(expm1.sum(axis=1)).ravel()))
        return LOG1P_VALUES, f"log-normalised values, rows of expm1 summing to {total:.3g}"
    return LOG1P_VALUES, f"log-normalised values, non-integer and at most {high:.3g}"


def _rows_sum_to_constant(X, tolerance: float = 0.02) -> bool:
    """At least 95 % of the non-empty rows (two or more) sum to within ``tolerance`` of their median."""
    sums = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
    sums = sums[sums > 0]
    if len(sums) < 2:
        return False
    median = float(np.median(sums))
    return float(np.mean(np.abs(sums - median) <= tolerance * median)) >= 0.95


@dataclass
class _H5adSource:
    """One place an AnnData keeps a matrix: its name in messages, the matrix, its ``var``."""

    name: str  # "X", "raw.X" or "layers['counts']"
    X: object
    var: pd.DataFrame
    from_raw: bool = False


def _h5ad_source(adata, layer: str, path) -> _H5adSource:
    """``X``, ``raw`` (``adata.raw.X``) or a layer; an unknown name lists what exists."""
    if layer == "X" and adata.X is not None:
        return _H5adSource("X", adata.X, adata.var)
    if layer == "raw" and adata.raw is not None:
        return _H5adSource("raw.X", adata.raw.X, adata.raw.var, from_raw=True)
    if layer in adata.layers:
        return _H5adSource(f"layers['{layer}']", adata.layers[layer], adata.var)
    raise DataError(f"{path}: no layer '{layer}'; available: {_h5ad_layer_names(adata)} "
                    "(pass one of them to --layer)")


def _h5ad_layer_names(adata, count_names_only: bool = False) -> list[str]:
    """``X``, ``raw`` (for raw.X), then the layers (only those with a count name if asked)."""
    names = (["X"] if adata.X is not None else []) + (["raw"] if adata.raw is not None else [])
    return names + [k for k in adata.layers.keys()
                    if k not in names and (not count_names_only or k.lower() in COUNT_LAYER_NAMES)]


def _h5ad_candidates(adata) -> list[_H5adSource]:
    """Where raw counts are looked for, in order: X, raw.X, then layers with a count name."""
    return [_h5ad_source(adata, n, None) for n in _h5ad_layer_names(adata, count_names_only=True)]


def choose_h5ad_values(adata, path, layer: str | None = None, log_transformed: bool = False):
    """The matrix to read from an AnnData and what it holds: ``(source, RAW_VALUES or LOG1P_VALUES, why)``.

    With ``layer``, that matrix (its values must fit ``log_transformed``). Without: ``X`` when
    ``log_transformed``, else the first of X, raw.X and count-named layers that holds raw values
    by :func:`value_kind`; a file with only log-normalised values is refused, naming
    ``--log_transformed``.
    """
    available = _h5ad_layer_names(adata)
    if layer is not None or log_transformed:
        source = _h5ad_source(adata, "X" if layer is None else layer, path)
        kind, why = value_kind(source.X)
        if kind == BAD_VALUES:
            raise DataError(f"{path}: {source.name} holds {why}; fix or drop those entries")
        if kind == SCALED_VALUES:
            raise DataError(f"{path}: {source.name} holds {why}: neither counts nor log-normalised values; "
                            f"choose another with --layer (available: {available})")
        if kind == LOG1P_VALUES and not log_transformed:
            raise DataError(f"{path}: {source.name} holds {why}; pass --log_transformed to use them as they are, "
                            f"or choose raw counts with --layer (available: {available})")
        if kind == RAW_VALUES and log_transformed:
            log.warning("%s: %s looks like raw values (%s), but --log_transformed feeds them to the encoder "
                        "without log1p", Path(path).name, source.name, why)
        return source, (LOG1P_VALUES if log_transformed else RAW_VALUES), why
    tried = []
    for source in _h5ad_candidates(adata):
        kind, why = value_kind(source.X)
        if kind == BAD_VALUES:  # bad data, not a sign to look elsewhere
            raise DataError(f"{path}: {source.name} holds {why}; fix or drop those entries")
        if kind == RAW_VALUES:
            return source, RAW_VALUES, why
        tried.append((source.name, kind, why))
    found = "; ".join(f"{name}: {why}" for name, _, why in tried) or "no matrix at all"
    if any(kind == LOG1P_VALUES for _, kind, _ in tried):
        raise DataError(f"{path}: no raw counts, only log-normalised values ({found}); pass --log_transformed to "
                        f"use them as already-transformed features (with --layer to choose one of {available}), "
                        "or add the counts to the file (e.g. as layers['counts'])")
    raise DataError(f"{path}: no raw counts in X, raw.X or a counts layer ({found}); add the counts to the file "
                    "(e.g. as layers['counts']) or choose a matrix with --layer")


def h5ad_gene_symbols(adata, source: _H5adSource, path, gene_symbols: str | None = None) -> tuple[np.ndarray, bool]:
    """Gene symbols for ``source``'s columns and whether they came from a ``var`` column.

    ``gene_symbols`` names a column of ``var`` (of ``raw.var`` for ``raw.X`` when it is there;
    else ``var``'s column matched by gene ID). Without it, Ensembl IDs in ``var_names`` with a
    ``feature_name`` column (CELLxGENE schema) take their symbols from that column; otherwise
    ``var_names``. A gene with no symbol in the column keeps its ``var_names`` entry.
    """
    ids = pd.Index(source.var.index.astype(str))
    column = gene_symbols
    if column is None:
        if not _looks_ensembl(ids):
            return np.asarray(ids, dtype=object), False
        if CELLXGENE_SYMBOLS not in source.var.columns and CELLXGENE_SYMBOLS not in adata.var.columns:
            log.warning("%s: var_names look like Ensembl IDs (e.g. %s); genes are matched by symbol, so pass "
                        "--gene_symbols COLUMN (var columns: %s)", Path(path).name, ids[0], list(adata.var.columns))
            return np.asarray(ids, dtype=object), False
        column = CELLXGENE_SYMBOLS
        log.info("%s: var_names are Ensembl IDs; gene symbols from var['%s'] (CELLxGENE schema)",
                 Path(path).name, column)
    if column in source.var.columns:
        symbols = source.var[column]
    elif column in adata.var.columns:
        if not adata.var.index.is_unique:
            raise DataError(f"{path}: var_names are not unique, so var['{column}'] cannot be matched to raw.var; "
                            "make var_names unique and try again")
        symbols = adata.var[column].reindex(ids)
    else:
        where = "raw.var or var" if source.from_raw else "var"
        raise DataError(f"{path}: no column '{column}' in {where} for --gene_symbols; "
                        f"available columns: {list(adata.var.columns)}")
    symbols = pd.Series(symbols.to_numpy(dtype=object), index=ids).astype("string").str.strip()
    missing = symbols.isna() | (symbols == "")
    symbols[missing] = ids[missing.to_numpy()]
    return symbols.to_numpy(dtype=object).astype(str).astype(object), True


def _looks_ensembl(ids: pd.Index) -> bool:
    sample = pd.Series(ids[:2000], dtype=str)
    return len(sample) > 0 and float(sample.str.match(ENSEMBL_ID).mean()) > 0.5


def sum_duplicate_columns(X: sp.csr_matrix, genes: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray, int]:
    """Columns with the same gene symbol summed into one (first occurrence's place); returns the
    matrix, the unique symbols and how many columns were merged away."""
    codes, uniques = pd.factorize(np.asarray(genes, dtype=object))
    if len(uniques) == len(codes):
        return X, np.asarray(genes, dtype=object), 0
    merge = sp.csr_matrix((np.ones(len(codes), np.float32), (np.arange(len(codes)), codes)),
                          shape=(len(codes), len(uniques)))
    return sp.csr_matrix(X @ merge, dtype=np.float32), np.asarray(uniques, dtype=object), len(codes) - len(uniques)


def read_h5ad(path, label_key: str = DEFAULT_LABEL_KEY, species: str | None = None, name: str | None = None,
              layer: str | None = None, gene_symbols: str | None = None,
              log_transformed: bool = False, strict_label_key: bool = True) -> CellData:
    """Read an ``.h5ad``: values chosen by :func:`choose_h5ad_values` (the log says which),
    symbols by :func:`h5ad_gene_symbols`, labels from ``obs[label_key]`` (a missing column is an
    error listing the available ones, or with ``strict_label_key=False`` an unlabelled dataset,
    as a Cell BLAST file without it is: pre-training data).

    Duplicate ``var_names`` are refused as in every reader; but symbols taken from a ``var``
    column (``--gene_symbols``, CELLxGENE's ``feature_name``) often repeat for distinct gene
    IDs, so their columns are summed, with a warning. ``log_transformed`` marks the values as
    already transformed (``CellData.values == LOG1P_VALUES``: no second log1p).
    """
    import anndata

    path = Path(path)
    with _open_h5(path, "an h5ad") as h5:
        check_all_stored_sizes(h5, path)
    try:
        adata = anndata.read_h5ad(path)
    except Exception as exc:  # anndata raises many types; name the file
        raise DataError(f"{path}: cannot be read as h5ad ({type(exc).__name__}: {exc})") from None
    columns = list(adata.obs.columns)
    if label_key is not None and label_key not in columns:
        if strict_label_key:
            raise DataError(f"{path}: no label column '{label_key}' in obs; available columns: {columns}")
        log.info("%s: no label column '%s' in obs: unlabelled (pre-training only)", path.name, label_key)
        label_key = None
    labels = None if label_key is None else np.asarray(adata.obs[label_key].astype(str).values, dtype=object)
    source, values, why = choose_h5ad_values(adata, path, layer, log_transformed)
    log.info("%s: values from %s (%s%s)", path.name, source.name, why,
             "; used as given, --log_transformed" if values == LOG1P_VALUES else "")
    X = _to_csr32(source.X)
    genes, from_column = h5ad_gene_symbols(adata, source, path, gene_symbols)
    if from_column:
        X, genes, n_merged = sum_duplicate_columns(X, genes)
        if n_merged:
            log.warning("%s: %d gene columns share a symbol with another; summing them", path.name, n_merged)
    cells = np.asarray(adata.obs_names, dtype=object)
    return finish_dataset(name or path.stem, X, genes, cells, labels, species, path, values)


def _to_csr32(X) -> sp.csr_matrix:
    return sp.csr_matrix(X, dtype=np.float32)


def read_numpy_dir(path, species: str | None = None, name: str | None = None) -> CellData:
    """Read a folder holding ``feature.npy`` (cells x genes), ``label.npy`` and ``gene_list.npy``."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a folder (expected feature.npy, label.npy, gene_list.npy)")
    missing = [f for f in ("feature.npy", "gene_list.npy") if not (path / f).exists()]
    if missing:
        raise DataError(f"{path}: missing {missing}")
    feature = _load_npy(path / "feature.npy")
    if feature.ndim != 2:
        raise DataError(f"{path / 'feature.npy'}: must be 2-D (cells x genes), got shape {feature.shape}")
    if feature.dtype.kind not in "biuf":
        raise DataError(f"{path / 'feature.npy'}: must hold numbers, got dtype {feature.dtype}")
    genes = _decode(_load_npy(path / "gene_list.npy"), path / "gene_list.npy", "the gene list")
    labels = None
    if (path / "label.npy").exists():
        labels = _decode(_load_npy(path / "label.npy"), path / "label.npy", "the labels")
    X = sp.csr_matrix(feature.astype(np.float32, copy=False))
    return finish_dataset(name or path.name, X, genes, _default_cell_names(X.shape[0]), labels, species, path)


def _load_npy(path: Path) -> np.ndarray:
    """``np.load`` after checking that the header's shape and dtype match the file's size."""
    _check_npy_header(path)
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # corrupt file, or an object array (needs pickle)
        raise DataError(f"{path}: cannot be read as a .npy array of numbers or strings ({exc}); "
                        "save it with np.save from a numeric or str array") from exc


def _check_npy_header(path: Path) -> None:
    """A tiny file cannot ask for terabytes: shape x itemsize must be the bytes after the header."""
    fix = "save it again with np.save from a numeric or str array"
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise DataError(f"{path}: .npy format version {version} is not supported; {fix}")
            header_end = fh.tell()
    except DataError:
        raise
    except (OSError, ValueError, EOFError, SyntaxError) as exc:
        raise DataError(f"{path}: not a readable .npy file ({exc}); {fix}") from None
    if dtype.hasobject:
        return  # np.load refuses it (needs pickle) with its own message
    declared = int(np.prod([int(s) for s in shape], dtype=object)) * dtype.itemsize
    stored = path.stat().st_size - header_end
    if declared != stored:
        raise DataError(f"{path}: header declares shape {shape} of {dtype} ({declared:,} bytes) but the file holds "
                        f"{stored:,} bytes of data; it is truncated or damaged; {fix}")


def _default_cell_names(n: int) -> np.ndarray:
    return np.array([f"cell_{i}" for i in range(n)], dtype=object)


# --------------------------------------------------------------------------- validation


def finish_dataset(name, X, genes, cells, labels, species, path, values: str = RAW_VALUES) -> CellData:
    """Validate a freshly read dataset and normalise its labels and species."""
    validate_matrix(X, genes, cells, path)
    labels = _normalise_labels(labels, X.shape[0], path)
    species = species or guess_species(genes)
    if species not in ("human", "mouse"):
        raise DataError(f"{path}: species must be 'human' or 'mouse', got '{species}'")
    return CellData(str(name), X, genes, cells, labels, species, str(path), values)


def validate_matrix(X: sp.csr_matrix, genes: np.ndarray, cells: np.ndarray, path) -> None:
    n_cells, n_genes = X.shape
    if n_cells == 0 or n_genes == 0:
        raise DataError(f"{path}: empty dataset ({n_cells} cells x {n_genes} genes)")
    if len(genes) != n_genes:
        raise DataError(f"{path}: {len(genes)} gene names for a matrix of {n_genes} genes")
    if len(cells) != n_cells:
        raise DataError(f"{path}: {len(cells)} cell names for a matrix of {n_cells} cells")
    if X.data.size and not np.all(np.isfinite(X.data)):
        raise DataError(f"{path}: expression holds NaN or infinite values")
    if X.data.size and X.data.min() < 0:
        raise DataError(f"{path}: expression holds negative values; raw counts or TPM are expected")
    dup = pd.Index(genes).duplicated()
    if dup.any():
        examples = list(pd.unique(np.asarray(genes)[dup]))[:5]
        raise DataError(
            f"{path}: {int(dup.sum())} duplicate gene names (e.g. {examples}); "
            "make var_names unique (sum or drop the duplicates) and try again"
        )


def _normalise_labels(labels, n_cells: int, path) -> np.ndarray | None:
    """Missing labels ('', 'na', ...) become ''; a dataset with no real label is unlabelled."""
    if labels is None:
        return None
    labels = np.asarray(labels, dtype=object)
    if labels.ndim != 1:
        raise DataError(f"{path}: labels must be 1-D (one per cell), got shape {labels.shape}")
    if len(labels) != n_cells:
        raise DataError(f"{path}: {len(labels)} labels for {n_cells} cells")
    labels = np.array([str(v).strip() for v in labels], dtype=object)
    labels[pd.Series(labels).str.lower().isin(MISSING_LABELS).to_numpy()] = ""
    return labels if (labels != "").any() else None


def guess_species(genes: Sequence[str]) -> str:
    """Mouse symbols are capitalised (``Actb``), human ones upper-case (``ACTB``)."""
    sample = pd.Series(np.asarray(genes, dtype=str)[:2000])
    has_lower = sample.str.contains("[a-z]", regex=True).mean()
    return "mouse" if has_lower > 0.5 else "human"


# --------------------------------------------------------------------------- genes


def load_ortholog_table(path=ORTHOLOG_TABLE) -> dict[str, str]:
    """Mouse symbol (upper-case) -> human symbol (upper-case), from the one-to-one table.

    Fixed: the original keyed this table by its mouse-lemur column; we key it by mouse.
    """
    table = pd.read_csv(path, usecols=["human__gene_name", "mouse__gene_name"]).dropna()
    mouse = table["mouse__gene_name"].str.upper()
    human = table["human__gene_name"].str.upper()
    keep = ~mouse.duplicated(keep=False)
    return dict(zip(mouse[keep], human[keep]))


def map_genes(genes: Sequence[str], species: str, orthologs: dict[str, str] | None = None) -> np.ndarray:
    """Upper-case symbols; mouse symbols become their human ortholog where one exists."""
    upper = pd.Series(np.asarray(genes, dtype=str)).str.upper()
    if species == "mouse":
        orthologs = load_ortholog_table() if orthologs is None else orthologs
        upper = upper.map(orthologs).fillna(upper)
    return upper.to_numpy(dtype=object)


def map_dataset_genes(data: CellData, orthologs: dict[str, str] | None = None) -> CellData:
    """Return ``data`` with mapped gene symbols; columns that map to one symbol are summed."""
    mapped = map_genes(data.genes, data.species, orthologs)
    if data.species == "mouse":
        n_mapped = int(np.sum(mapped != pd.Series(data.genes, dtype=str).str.upper().to_numpy()))
        log.info("%s: %d of %d mouse genes mapped to human orthologs", data.name, n_mapped, len(mapped))
    X, genes, n_merged = sum_duplicate_columns(data.X, mapped)
    if n_merged:
        log.warning("%s: %d gene columns collapse onto the same symbol after mapping; summing them",
                    data.name, n_merged)
    return replace(data, X=X, genes=genes)


def build_gene_universe(datasets: Sequence[CellData]) -> np.ndarray:
    """Sorted universe: mapped genes seen in both species, or all genes if one species only.

    Expects datasets whose genes are already mapped (:func:`map_dataset_genes`).
    """
    by_species: dict[str, set] = {}
    for d in datasets:
        by_species.setdefault(d.species, set()).update(d.genes)
    if len(by_species) > 1:  # scPretrain: genes present in both species
        universe = set.intersection(*by_species.values())
    else:
        universe = set().union(*by_species.values())
    if not universe:
        raise DataError("the datasets share no gene between species; cannot build a gene universe")
    return np.array(sorted(universe), dtype=object)


@dataclass(frozen=True)
class GeneLookup:
    """Where each of a dataset's genes sits in a gene universe (-1 where it is not there)."""

    positions: np.ndarray  # int64, one per dataset gene
    n_universe: int

    @property
    def n_found(self) -> int:
        return int((self.positions >= 0).sum())


def gene_lookup(data: CellData, universe: Sequence[str], whose: str = "the gene universe's") -> GeneLookup:
    """The one lookup of a dataset's (mapped) genes in a universe: alignment, pretrained-weight
    initialisation and coverage checks all use it. Logs the coverage with both denominators;
    a dataset sharing no gene is an error."""
    universe_index = universe if isinstance(universe, pd.Index) else pd.Index(universe)
    positions = universe_index.get_indexer(pd.Index(data.genes)).astype(np.int64)
    lookup = GeneLookup(positions, len(universe_index))
    n = lookup.n_found
    if n == 0:
        raise DataError(f"{data.source or data.name}: shares no gene with {whose} {len(universe_index)} genes "
                        f"(e.g. {list(universe_index[:3])}); check the species and the gene symbols")
    log.info("%s: covers %d of %s %d genes (%.1f%%); %d of its own %d (%.1f%%)", data.name, n, whose,
             len(universe_index), 100.0 * n / len(universe_index), n, data.n_genes, 100.0 * n / data.n_genes)
    return lookup


def align_to_universe(data: CellData, universe: Sequence[str], lookup: GeneLookup | None = None) -> CellData:
    """Reorder ``data``'s columns onto ``universe``, staying sparse.

    Genes of the universe missing from the dataset are zero columns; genes outside the
    universe are dropped. ``lookup`` (from :func:`gene_lookup`) is computed when not given.
    """
    lookup = gene_lookup(data, universe) if lookup is None else lookup
    X = remap_columns(data.X, lookup.positions, lookup.n_universe)
    return replace(data, X=X, genes=np.asarray(universe, dtype=object))


def remap_columns(X: sp.csr_matrix, target: np.ndarray, n_cols: int) -> sp.csr_matrix:
    """Move column j of ``X`` to ``target[j]`` (dropped where -1) without densifying.

    The result is a canonical CSR (column indices sorted within each row, as torch's sparse CSR
    and cuSPARSE require) with its own copy of the values. Extra memory is about the output
    plus one byte per stored value of ``X``.
    """
    idx_dtype = np.int32 if max(n_cols, X.nnz) < 2**31 else np.int64
    target = np.asarray(target).astype(idx_dtype)
    keep = (target >= 0)[X.indices]  # one byte per stored value
    if keep.all():
        data, new_indices, indptr = X.data.copy(), target[X.indices], X.indptr.astype(idx_dtype)
    else:
        rows = np.flatnonzero(np.diff(X.indptr))  # rows with stored values; each sums its own slice
        counts = np.zeros(X.shape[0], dtype=idx_dtype)
        if len(rows):  # (reduceat casts keep to idx_dtype: done before the output exists)
            counts[rows] = np.add.reduceat(keep, X.indptr[rows], dtype=idx_dtype)
        indptr = np.zeros(X.shape[0] + 1, dtype=idx_dtype)
        np.cumsum(counts, out=indptr[1:])
        data, new_indices = X.data[keep], target[X.indices[keep]]
    del keep
    out = sp.csr_matrix((data, new_indices, indptr), shape=(X.shape[0], n_cols))
    kept_targets = target[target >= 0]  # the new column of each kept gene, in the old column order
    if X.has_sorted_indices and bool(np.all(np.diff(kept_targets) > 0)):
        out.has_sorted_indices = True  # order-preserving map of sorted rows: already sorted
    else:
        out.sort_indices()
    return out


# --------------------------------------------------------------------------- features


def log1p_features(X: sp.csr_matrix) -> sp.csr_matrix:
    """``log1p`` of raw values, sharing the index arrays (only the values are copied).

    scPretrain: log1p of the raw values, no library-size normalisation.
    """
    X = sp.csr_matrix(X)
    return sp.csr_matrix((np.log1p(X.data), X.indices, X.indptr), shape=X.shape)


NORMALIZATIONS = ("none", "cp10k")


def features(data: CellData, normalize: str = "none") -> sp.csr_matrix:
    """The encoder's input for a dataset, the one place raw values are transformed: ``log1p`` of
    the raw values (``normalize="none"``, the paper's) or of counts per 10,000 (``"cp10k"``: each
    cell scaled to the same total first, so that cells sequenced to different depths look alike);
    already-transformed values are used as they are."""
    if data.values == LOG1P_VALUES:
        return sp.csr_matrix(data.X)
    if normalize == "cp10k":
        return log1p_features(per_10k(data.X))
    if normalize != "none":
        raise ValueError(f"unknown normalisation '{normalize}'; choose one of {NORMALIZATIONS}")
    return log1p_features(data.X)


def per_10k(X: sp.csr_matrix) -> sp.csr_matrix:
    """Each row scaled to sum to 10,000 (empty rows stay empty); shares the index arrays."""
    X = sp.csr_matrix(X)
    totals = np.asarray(X.sum(axis=1), dtype=np.float64).ravel()
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


# --------------------------------------------------------------------------- labels, splits, batches


def encode_labels(labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes for labels, classes in sorted order (deterministic across runs)."""
    classes, codes = np.unique(np.asarray(labels, dtype=str), return_inverse=True)
    return codes.astype(np.int64), classes.astype(object)


def validation_split(n_cells: int, seed: int, per_val: float = 0.1, max_val: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, validation) of all cells: validation = min(int(per_val n), max_val), at least
    one cell; every other cell trains (a reference for annotation has no test cells)."""
    order = np.random.default_rng(seed).permutation(n_cells)
    n_val = max(1, min(int(per_val * n_cells), max_val))
    if n_cells - n_val < 2:
        raise DataError(f"{n_cells} cells are too few for a training and a validation set")
    return order[n_val:], order[:n_val]


def split_cells(n_cells: int, seed: int, per_train: float = 0.6, per_val: float = 0.1,
                max_train: int = 1000, max_val: int = 1000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded shuffle split: train = min(int(per_train n), max_train), val likewise, test = rest.

    scPretrain: the split sizes (0.6 n up to 1000 train, 0.1 n up to 1000 validation, the rest test);
    seeded and shared by both methods (the original's were neither).
    """
    order = np.random.default_rng(seed).permutation(n_cells)
    n_train = min(int(per_train * n_cells), max_train)
    n_val = min(int(per_val * n_cells), max_val)
    if n_train < 1 or n_val < 1 or n_cells - n_train - n_val < 1:
        raise DataError(f"{n_cells} cells are too few for a train/validation/test split")
    return order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]


def dense_rows(features: sp.csr_matrix, rows: np.ndarray | None = None) -> np.ndarray:
    """The chosen rows (all when ``rows`` is None) as a dense float32 array, values unchanged."""
    sub = features[rows] if rows is not None else features
    return sub.toarray().astype(np.float32, copy=False)


def row_block(X: sp.csr_matrix, start: int, stop: int) -> sp.csr_matrix:
    """Rows ``start:stop`` of a CSR matrix as a CSR that shares its arrays (no copy of the values)."""
    lo, hi = int(X.indptr[start]), int(X.indptr[stop])
    return csr_sharing(X.data[lo:hi], X.indices[lo:hi], X.indptr[start:stop + 1] - lo, (stop - start, X.shape[1]))


def csr_sharing(values: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape) -> sp.csr_matrix:
    """A CSR matrix over these arrays, not copies of them: they are set on an empty matrix, since
    scipy copies sliced arrays passed to its constructor (1.17)."""
    out = sp.csr_matrix(shape, dtype=values.dtype)
    out.data, out.indices, out.indptr = values, indices, indptr
    return out


class CSRStack:
    """CSR matrices with the same columns, appended one under the other into one CSR whose arrays
    are allocated once, for ``capacity`` stored values (grown by copying if that is exceeded):
    pages are committed only as values are written, so the peak is the parts not yet appended
    plus what has been, not two copies of everything."""

    def __init__(self, n_cols: int, capacity: int, dtype=np.float32):
        self.n_cols, self.dtype = n_cols, dtype
        self.index_dtype = np.int32 if capacity < 2**31 and n_cols < 2**31 else np.int64
        self.indices = np.empty(capacity, dtype=self.index_dtype)
        self.values = np.empty(capacity, dtype=dtype)
        self.indptrs, self.offsets, self.nnz = [np.zeros(1, dtype=np.int64)], [0], 0

    def append(self, m: sp.csr_matrix) -> None:
        m = sp.csr_matrix(m)
        if m.shape[1] != self.n_cols:
            raise ValueError(f"cannot stack a matrix of {m.shape[1]} columns under ones of {self.n_cols}")
        if self.nnz + m.nnz > len(self.values):
            self._grow(self.nnz + m.nnz)
        self.indices[self.nnz:self.nnz + m.nnz] = m.indices
        self.values[self.nnz:self.nnz + m.nnz] = m.data
        self.indptrs.append(self.nnz + np.asarray(m.indptr[1:], dtype=np.int64))
        self.nnz += m.nnz
        self.offsets.append(self.offsets[-1] + m.shape[0])

    def _grow(self, needed: int) -> None:
        capacity = max(needed, 2 * len(self.values))
        if capacity >= 2**31 and self.index_dtype == np.int32:
            self.index_dtype = np.int64
        for name in ("indices", "values"):
            old = getattr(self, name)
            new = np.empty(capacity, dtype=self.index_dtype if name == "indices" else self.dtype)
            new[:self.nnz] = old[:self.nnz]
            setattr(self, name, new)

    def finish(self) -> tuple[sp.csr_matrix, np.ndarray]:
        """The stacked CSR (its arrays the first ``nnz`` of the buffers: no copy) and the first row of
        each part, plus the total."""
        indptr = np.concatenate(self.indptrs)
        if self.index_dtype == np.int32 and self.nnz < 2**31:
            indptr = indptr.astype(np.int32)
        out = csr_sharing(self.values[:self.nnz], self.indices[:self.nnz], indptr, (self.offsets[-1], self.n_cols))
        return out, np.asarray(self.offsets, dtype=np.int64)


def stack_csr(mats: list[sp.csr_matrix], dtype=np.float32) -> tuple[sp.csr_matrix, np.ndarray]:
    """CSR matrices with the same columns as one CSR, one under the other, and the first row of
    each (plus the total). ``mats`` is emptied as it goes, each part freed once copied."""
    stack = CSRStack(mats[0].shape[1] if mats else 0, sum(m.nnz for m in mats), dtype)
    while mats:
        stack.append(mats.pop(0))
    return stack.finish()


def iter_batches(n_cells: int, batch_size: int, rng: np.random.Generator | None = None) -> Iterator[np.ndarray]:
    """Row indices of successive mini-batches; shuffled when ``rng`` is given."""
    order = rng.permutation(n_cells) if rng is not None else np.arange(n_cells)
    for start in range(0, n_cells, batch_size):
        yield order[start:start + batch_size]


# --------------------------------------------------------------------------- collection, download


def read_collection_table(path=COLLECTION_TABLE) -> pd.DataFrame:
    """The paper's Cell BLAST datasets: name, species, labelled."""
    return pd.read_csv(path, dtype=str).set_index("name")


def resolve_dataset_path(name_or_path: str, dataset_dir=DATASET_DIR, url_template: str = DEFAULT_URL_TEMPLATE,
                         timeout: float = 30.0) -> Path:
    """A path as given, or ``dataset_dir/NAME.h5``, downloaded first if it is not there yet."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".h5", ".h5ad") or candidate.is_dir() or os.sep in name_or_path:
        if not candidate.exists():
            raise DataError(f"{candidate}: file not found")
        return candidate
    local = Path(dataset_dir) / f"{name_or_path}.h5"
    if not local.exists():
        download_dataset(name_or_path, local, url_template, timeout)
    return local


def download_dataset(name: str, dest: Path, url_template: str = DEFAULT_URL_TEMPLATE,
                     timeout: float = 30.0) -> Path:
    """Fetch ``url_template.format(name=name)`` to ``dest`` via a temporary file renamed when complete.

    Any failure (offline, HTTP error, truncated body, not HDF5) raises one DataError that names
    the dataset and URL, and leaves no partial file behind. Partial files of an earlier download
    of the same dataset killed before it could clean up (``.NAME.h5.*.part``) are removed first.
    """
    from tqdm.auto import tqdm

    url = url_template.format(name=name)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_partial_downloads(dest)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    log.info("downloading %s from %s", name, url)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            expected = response.headers.get("Content-Length")
            expected = int(expected) if expected is not None else None
            with tqdm(total=expected, unit="B", unit_scale=True, desc=name, leave=False) as bar:
                received = _copy_stream(response, out, bar)
        if expected is not None and received != expected:
            raise DataError(f"received {received} of {expected} bytes (truncated)")
        with open(tmp_name, "rb") as fh:
            if fh.read(8) != HDF5_SIGNATURE:
                raise DataError("the server did not send an HDF5 file")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_name, 0o666 & ~umask)  # as a plain open() would create it (mkstemp gives 0600)
        os.replace(tmp_name, dest)
        return dest
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError, DataError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise DataError(f"cannot download dataset '{name}' from {url}: {reason}. "
                        f"Check the network, or place {dest.name} in {dest.parent} by hand.") from None
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def _remove_partial_downloads(dest: Path) -> None:
    """Delete the ``.NAME.h5.*.part`` files a killed download of ``dest`` left in its folder."""
    for stale in dest.parent.glob(f".{glob_escape(dest.name)}.*.part"):
        try:
            stale.unlink()
            log.info("removed %s, left by an interrupted download", stale.name)
        except FileNotFoundError:  # another process removed it first
            pass


def _copy_stream(response, out, bar, chunk: int = 1 << 20) -> int:
    received = 0
    while True:
        block = response.read(chunk)
        if not block:
            return received
        out.write(block)
        received += len(block)
        bar.update(len(block))


def read_any(path, label_key: str = DEFAULT_LABEL_KEY, species: str | None = None, name: str | None = None,
             strict_label_key: bool = False, layer: str | None = None, gene_symbols: str | None = None,
             log_transformed: bool = False) -> CellData:
    """Dispatch on the path: a folder (numpy), ``.h5ad`` (anndata) or Cell BLAST ``.h5``.

    ``layer`` and ``gene_symbols`` apply to h5ad only; ``log_transformed`` to every format (the
    values are fed to the encoder as they are, with no log1p).
    """
    path = Path(path)
    if path.suffix == ".h5ad" and not path.is_dir():
        return read_h5ad(path, label_key, species, name, layer=layer, gene_symbols=gene_symbols,
                         log_transformed=log_transformed, strict_label_key=strict_label_key)
    if path.is_dir():
        d = read_numpy_dir(path, species, name)
    else:
        d = read_cellblast_h5(path, label_key, species, name, strict_label_key)
    return replace(d, values=LOG1P_VALUES) if log_transformed else d


def load_collection(names: Sequence[str] | None = None, dataset_dir=DATASET_DIR,
                    url_template: str = DEFAULT_URL_TEMPLATE, label_key: str = DEFAULT_LABEL_KEY,
                    orthologs: dict[str, str] | None = None, layer: str | None = None,
                    gene_symbols: str | None = None, log_transformed: bool = False) -> list[CellData]:
    """Read the chosen datasets (default: the embedded demo collection), genes mapped.

    ``names`` holds Cell BLAST names (downloaded when missing), paths, or the words ``demo`` /
    ``paper`` for the demo collection and the paper's 66 datasets. ``layer``, ``gene_symbols``
    and ``log_transformed`` are passed to :func:`read_any` for every dataset.
    """
    names = expand_dataset_names(names)
    table = read_collection_table()
    orthologs = load_ortholog_table() if orthologs is None else orthologs
    out = []
    for entry in names:
        path = resolve_dataset_path(entry, dataset_dir, url_template)
        species = table.loc[entry, "species"] if entry in table.index else None
        data = read_any(path, label_key, species=species, name=Path(entry).stem if path.suffix else entry,
                        layer=layer, gene_symbols=gene_symbols, log_transformed=log_transformed)
        out.append(map_dataset_genes(data, orthologs))
        log.info("%s: %d cells x %d genes, %s, %s", data.name, data.n_cells, data.n_genes, data.species,
                 f"{len(np.unique(data.labels[data.labels != '']))} labelled types" if data.is_labelled
                 else "unlabelled")
    return out


def expand_dataset_names(names: Sequence[str] | None) -> list[str]:
    if not names:
        names = ["demo"]
    out: list[str] = []
    for n in names:
        if n == "demo":
            out.extend(DEMO_DATASETS)
        elif n == "paper":
            out.extend(read_collection_table().index)
        else:
            out.append(n)
    return list(dict.fromkeys(out))


def labelled_cells(data: CellData) -> CellData:
    """Only the cells that carry a label (fine-tuning needs them)."""
    if data.labels is None:
        raise DataError(f"{data.source or data.name}: has no labels")
    keep = np.flatnonzero(data.labels != "")
    if len(keep) == data.n_cells:
        return data
    log.info("%s: dropping %d cells without a label", data.name, data.n_cells - len(keep))
    return replace(data, X=data.X[keep], cells=data.cells[keep], labels=data.labels[keep])


def atomic_write(path, write_fn, mode: str = "w") -> None:
    """Call ``write_fn(fileobj)`` on a temporary file next to ``path``, then rename it over ``path``."""

    def write(tmp: str) -> None:
        with open(tmp, mode) as fh:
            write_fn(fh)

    atomic_write_path(path, write)


def plain_string_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of ``frame`` with its index, string columns and string categories held as Python objects.

    pandas 3 reads text as its string dtype, which anndata >= 0.11 writes only when
    ``allow_write_nullable_strings`` is set, and then in an encoding anndata < 0.11 cannot read.
    Objects write everywhere as anndata's plain string arrays and read back as the same text."""
    out = frame.copy()
    if is_typed_strings(out.index.dtype):
        out.index = pd.Index(out.index, dtype=object, name=out.index.name)
    for column in out.columns:
        values = out[column]
        if isinstance(values.dtype, pd.CategoricalDtype):
            if is_typed_strings(values.cat.categories.dtype):
                out[column] = values.cat.set_categories(pd.Index(values.cat.categories, dtype=object), rename=True)
        elif is_typed_strings(values.dtype):
            out[column] = values.astype(object)
    return out


def is_typed_strings(dtype) -> bool:
    """pandas' string dtype (pandas 3's default for text), as opposed to strings held as objects."""
    return isinstance(dtype, pd.StringDtype)


def atomic_write_path(path, write_fn) -> None:
    """Call ``write_fn(temporary_path)`` (for writers that take a file name), then rename the
    temporary file over ``path``: never a half-written file. The file gets the permissions a plain
    ``open`` would give it (mkstemp makes it 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_fn(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
