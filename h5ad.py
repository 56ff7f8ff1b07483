"""h5ad files, read through h5py so that no matrix is ever loaded whole unless asked: the values
(``X``, ``raw.X`` or a layer, CSR or dense) a block of cells at a time, each block checked as the
Cell BLAST reader checks its matrix; which matrix holds raw counts; gene symbols (CELLxGENE's
``feature_name``); ``obs`` and ``var`` through anndata's element reader. Importing does nothing.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

import hdf5
import values as vals
from errors import DataError

log = logging.getLogger("scpretrain.data")

# Layer names that hold counts by convention (compared lower-case), tried after X and raw.X.
COUNT_LAYER_NAMES = ("counts", "raw_counts", "count", "raw", "umi", "umis", "umi_counts", "rawcounts")
ENSEMBL_ID = r"^ENS[A-Z]*G\d{6,}(\.\d+)?$"
CELLXGENE_SYMBOLS = "feature_name"
EVIDENCE_BLOCKS = 20  # the value evidence of a large matrix: this many contiguous blocks of rows


def _anndata_io():
    try:
        import anndata.io as io  # anndata >= 0.11
        if hasattr(io, "read_elem"):
            return io
    except ImportError:
        pass
    import anndata.experimental as io  # anndata 0.10

    return io


def read_elem(node, path, member: str):
    """One element of an h5ad (a DataFrame, array, dict) by anndata's own reader."""
    try:
        return _anndata_io().read_elem(node)
    except DataError:
        raise
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: '{member}' holds names that are not UTF-8 text ({exc.reason}); write them as UTF-8 "
                        "strings") from None
    except Exception as exc:  # anndata raises many types; name the file and member
        raise DataError(f"{path}: cannot read '{member}' as h5ad ({type(exc).__name__}: {exc}); the file is damaged "
                        "or not an h5ad; write it again") from None


def _attr(node, name: str, default=None):
    value = node.attrs.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


# --------------------------------------------------------------------------- one matrix


class H5adMatrix:
    """One matrix of an open h5ad (``X``, ``raw/X`` or ``layers/NAME``) read a block of rows at a
    time: CSR groups by their row pointers (read once), dense datasets by row slices; CSC groups
    are read whole on first use (they cannot be cut by rows). Every block is a canonical float32
    CSR whose arrays were checked: integer indices in range, row pointers monotone, numbers,
    finite and non-negative values (``check_values``)."""

    def __init__(self, h5, member: str, name: str, path):
        import h5py

        self.path, self.member, self.name = path, member, name
        with hdf5.reading(path, member):
            node = h5[member]
        self.dense = isinstance(node, h5py.Dataset)
        self._csc = None
        self._warned_duplicates = False
        if self.dense:
            self._init_dense(node)
        else:
            self._init_sparse(node)

    def _init_dense(self, node) -> None:
        if node.ndim != 2:
            raise DataError(f"{self.path}: '{self.member}' must be 2-D (cells x genes), got shape {node.shape}")
        if node.dtype.kind not in "biuf":
            raise DataError(f"{self.path}: '{self.member}' holds {node.dtype} values, not numbers; store the "
                            "expression as a numeric matrix")
        hdf5.check_stored_size(node, self.path, self.member)
        self.node, self.shape = node, tuple(int(s) for s in node.shape)

    def _init_sparse(self, node) -> None:
        encoding = _attr(node, "encoding-type") or (f"{_attr(node, 'h5sparse_format')}_matrix"
                                                     if _attr(node, "h5sparse_format") else None)
        if encoding not in ("csr_matrix", "csc_matrix"):
            raise DataError(f"{self.path}: '{self.member}' is a group of encoding '{encoding}', not a sparse matrix "
                            "anndata writes (csr_matrix or csc_matrix)")
        shape = node.attrs.get("shape", node.attrs.get("h5sparse_shape"))
        if shape is None or len(shape) != 2:
            raise DataError(f"{self.path}: '{self.member}' has no 2-entry 'shape' attribute")
        missing = [k for k in ("data", "indices", "indptr") if k not in node]
        if missing:
            raise DataError(f"{self.path}: '{self.member}' lacks {missing}")
        parts = {k: hdf5.h5_dataset(node, k, self.path) for k in ("data", "indices", "indptr")}
        self.csc = encoding == "csc_matrix"
        self.shape = tuple(int(s) for s in shape)
        major = self.shape[::-1] if self.csc else self.shape
        vals.check_csr_layout(self.path, major, *((p.shape, p.dtype) for p in parts.values()), member=self.member)
        self.parts = parts
        with hdf5.reading(self.path, f"{self.member}/indptr"):
            self.indptr = np.asarray(parts["indptr"][()], dtype=np.int64)
        n_values = int(parts["data"].shape[0])
        if len(self.indptr) and (self.indptr[0] != 0 or self.indptr[-1] != n_values or np.any(np.diff(self.indptr) < 0)):
            raise DataError(f"{self.path}: '{self.member}' indptr is not a non-decreasing 0..{n_values} sequence; "
                            "the file is damaged; write it again")

    @property
    def n_rows(self) -> int:
        return self.shape[0]

    @property
    def n_cols(self) -> int:
        return self.shape[1]

    @property
    def nnz(self) -> int:
        if self.dense:
            return self.shape[0] * self.shape[1]
        return int(self.indptr[-1])

    def rows(self, start: int, stop: int, check_values: bool = True) -> sp.csr_matrix:
        """Rows ``start:stop`` as a canonical float32 CSR."""
        stop = min(stop, self.n_rows)
        if self.dense:
            with hdf5.reading(self.path, self.member):
                block = np.asarray(self.node[start:stop], dtype=np.float32)
            X = sp.csr_matrix(block)
        elif self.csc:
            X = self._whole_csc()[start:stop]
        else:
            lo, hi = int(self.indptr[start]), int(self.indptr[stop])
            with hdf5.reading(self.path, self.member):
                data = self.parts["data"][lo:hi]
                indices = self.parts["indices"][lo:hi]
            X = self._checked_csr(data, indices, self.indptr[start:stop + 1] - lo, (stop - start, self.n_cols))
        if check_values:
            vals.check_finite_non_negative(X.data, self.path, self.name)
        return X

    def _checked_csr(self, data, indices, indptr, shape) -> sp.csr_matrix:
        vals.check_csr_arrays(data, indices, indptr, shape[1], self.path, self.member)
        X = sp.csr_matrix((np.asarray(data, dtype=np.float32), np.asarray(indices, dtype=np.int32 if shape[1] < 2**31 else np.int64),
                           np.asarray(indptr, dtype=np.int64)), shape=shape)
        if self._warned_duplicates:
            X.sum_duplicates()
            return X
        before = X.nnz
        X = vals.canonical_csr(X, self.path, self.member)
        self._warned_duplicates = X.nnz != before
        return X

    def _whole_csc(self) -> sp.csr_matrix:
        if self._csc is None:
            log.info("%s: '%s' is stored by genes (CSC); it is read whole and turned into rows", self.path, self.member)
            with hdf5.reading(self.path, self.member):
                data, indices = self.parts["data"][()], self.parts["indices"][()]
            vals.check_csr_arrays(data, indices, self.indptr, self.n_rows, self.path, self.member)
            csc = sp.csc_matrix((np.asarray(data, np.float32), indices, self.indptr), shape=self.shape)
            self._csc = vals.canonical_csr(csc.tocsr(), self.path, self.member)
        return self._csc

    def read_all(self) -> sp.csr_matrix:
        return self.rows(0, self.n_rows)

    def evidence(self) -> sp.csr_matrix:
        """Rows for :func:`values.value_kind`: all, or contiguous blocks spread over the matrix."""
        if self.n_rows <= vals.EVIDENCE_ROWS:
            return self.rows(0, self.n_rows, check_values=False)
        size = vals.EVIDENCE_ROWS // EVIDENCE_BLOCKS
        starts = np.linspace(0, self.n_rows - size, EVIDENCE_BLOCKS).astype(np.int64)
        return sp.vstack([self.rows(int(s), int(s) + size, check_values=False) for s in starts], format="csr")


class LoadedMatrix:
    """A matrix of an h5ad read whole by anndata (a layout older than anndata 0.7, whose tables this
    module does not read itself), with the interface of :class:`H5adMatrix`."""

    def __init__(self, X, member: str, name: str, path):
        self.path, self.member, self.name = path, member, name
        self.dense = not sp.issparse(X)
        if self.dense and (np.asarray(X).ndim != 2 or np.asarray(X).dtype.kind not in "biuf"):
            raise DataError(f"{path}: '{member}' holds {np.asarray(X).dtype} values, not a numeric matrix")
        self.X = vals.canonical_csr(sp.csr_matrix(X, dtype=np.float32), path, member)
        self.shape = self.X.shape

    n_rows = H5adMatrix.n_rows
    n_cols = H5adMatrix.n_cols

    @property
    def nnz(self) -> int:
        return self.X.nnz

    def rows(self, start: int, stop: int, check_values: bool = True) -> sp.csr_matrix:
        X = self.X[start:min(stop, self.n_rows)]
        if check_values:
            vals.check_finite_non_negative(X.data, self.path, self.name)
        return X

    read_all = H5adMatrix.read_all
    evidence = H5adMatrix.evidence


# --------------------------------------------------------------------------- which matrix


def matrix_names(h5) -> list[tuple[str, str, str]]:
    """(layer name as --layer takes it, member, name in messages) of every matrix in the file (an
    open h5py file, or an AnnData for older layouts): X, raw (raw.X), then the layers."""
    if not hasattr(h5, "attrs"):  # an AnnData
        found = [("X", "X", "X")] if h5.X is not None else []
        found += [("raw", "raw/X", "raw.X")] if h5.raw is not None else []
        return found + [(k, f"layers/{k}", f"layers['{k}']") for k in h5.layers.keys()]
    found = []
    if "X" in h5:
        found.append(("X", "X", "X"))
    if "raw" in h5 and "X" in h5["raw"]:
        found.append(("raw", "raw/X", "raw.X"))
    if "layers" in h5:
        found += [(k, f"layers/{k}", f"layers['{k}']") for k in h5["layers"].keys()]
    return found


def open_matrix(h5, member: str, name: str, path):
    """The matrix ``member`` of an open h5py file (read by blocks) or of an AnnData (in memory)."""
    if hasattr(h5, "attrs"):
        return H5adMatrix(h5, member, name, path)
    X = h5.X if member == "X" else h5.raw.X if member == "raw/X" else h5.layers[member.split("/", 1)[1]]
    return LoadedMatrix(X, member, name, path)


def choose_matrix(h5, path, layer: str | None = None, wanted: str = "auto") -> tuple[H5adMatrix, str, str]:
    """The matrix to read and what it holds: ``(matrix, RAW_VALUES or LOG1P_VALUES, why)``.

    With ``layer``, that matrix (``values.settle_values`` decides what it holds). Without: with
    ``wanted`` log1p, ``X``; else the first of X, raw.X and count-named layers whose evidence says
    raw values; a file whose candidates hold only log-normalised (or ambiguous) values is refused,
    naming each candidate's evidence and the flags that settle it.
    """
    names = matrix_names(h5)
    available = [n for n, _, _ in names]
    if layer is not None or wanted == vals.LOG1P_VALUES:
        chosen = layer if layer is not None else "X"
        match = [entry for entry in names if entry[0] == chosen]
        if not match:
            raise DataError(f"{path}: no layer '{chosen}'; available: {available} (pass one of them to --layer)")
        matrix = open_matrix(h5, match[0][1], match[0][2], path)
        kind, why = vals.value_kind(matrix.evidence())
        return matrix, vals.settle_values(kind, why, wanted, matrix.name, path), why
    candidates = [entry for entry in names if entry[0] in ("X", "raw") or entry[0].lower() in COUNT_LAYER_NAMES]
    tried = []
    for _, member, name in candidates:
        matrix = open_matrix(h5, member, name, path)
        kind, why = vals.value_kind(matrix.evidence())
        if kind == vals.BAD_VALUES:  # bad data, not a sign to look elsewhere
            vals.settle_values(kind, why, wanted, name, path)
        if kind == vals.RAW_VALUES:
            return matrix, vals.RAW_VALUES, why
        tried.append((name, kind, why))
    found = "; ".join(f"{name}: {why}" for name, _, why in tried) or "no matrix at all"
    if wanted == vals.RAW_VALUES and candidates:
        matrix = open_matrix(h5, candidates[0][1], candidates[0][2], path)
        return matrix, vals.settle_values(tried[0][1], tried[0][2], wanted, matrix.name, path), tried[0][2]
    kinds = {kind for _, kind, _ in tried}
    if kinds & {vals.LOG1P_VALUES, vals.AMBIGUOUS_VALUES}:
        what = "only log-normalised values" if vals.AMBIGUOUS_VALUES not in kinds else "no matrix that is clearly raw"
        raise DataError(f"{path}: no raw counts, {what} ({found}); pass --values log1p (--log_transformed) to use "
                        f"log-normalised values as they are, or --values raw if they are raw values, with --layer to "
                        f"choose one of {available}; or add the counts to the file (e.g. as layers['counts'])")
    raise DataError(f"{path}: no raw counts in X, raw.X or a counts layer ({found}); add the counts to the file "
                    "(e.g. as layers['counts']) or choose a matrix with --layer")


# --------------------------------------------------------------------------- genes


def symbols_for(var: pd.DataFrame, main_var: pd.DataFrame, from_raw: bool, path,
                 column: str | None = None) -> tuple[np.ndarray, bool]:
    """Gene symbols for a matrix's columns (``var``: its own, ``raw.var`` for raw.X) and whether
    they came from a ``var`` column.

    ``column`` (``--gene_symbols``) names a column of ``var``, else of ``main_var`` matched by gene
    ID. Without it, Ensembl IDs in ``var_names`` with a ``feature_name`` column (CELLxGENE schema)
    take their symbols from that column; otherwise ``var_names``. A gene with no symbol in the
    column keeps its ``var_names`` entry.
    """
    ids = pd.Index(var.index.astype(str))
    if column is None:
        if not looks_ensembl(ids):
            return np.asarray(ids, dtype=object), False
        if CELLXGENE_SYMBOLS not in var.columns and CELLXGENE_SYMBOLS not in main_var.columns:
            log.warning("%s: var_names look like Ensembl IDs (e.g. %s); genes are matched by symbol, so pass "
                        "--gene_symbols COLUMN (var columns: %s)", Path(path).name, ids[0], list(main_var.columns))
            return np.asarray(ids, dtype=object), False
        column = CELLXGENE_SYMBOLS
        log.info("%s: var_names are Ensembl IDs; gene symbols from var['%s'] (CELLxGENE schema)",
                 Path(path).name, column)
    if column in var.columns:
        symbols = var[column]
    elif column in main_var.columns:
        if not main_var.index.is_unique:
            raise DataError(f"{path}: var_names are not unique, so var['{column}'] cannot be matched to raw.var; "
                            "make var_names unique and try again")
        symbols = main_var[column].reindex(ids)
    else:
        where = "raw.var or var" if from_raw else "var"
        raise DataError(f"{path}: no column '{column}' in {where} for --gene_symbols; "
                        f"available columns: {list(main_var.columns)}")
    symbols = pd.Series(symbols.to_numpy(dtype=object), index=ids).astype("string").str.strip()
    missing = symbols.isna() | (symbols == "")
    symbols[missing] = ids[missing.to_numpy()]
    return symbols.to_numpy(dtype=object).astype(str).astype(object), True


def looks_ensembl(ids: pd.Index) -> bool:
    sample = pd.Series(ids[:2000], dtype=str)
    return len(sample) > 0 and float(sample.str.match(ENSEMBL_ID).mean()) > 0.5


# --------------------------------------------------------------------------- the file


@dataclass
class H5adFile:
    """An open h5ad's chosen matrix and what goes with it: the values it holds, the symbols of its
    columns (and whether they came from a ``var`` column, whose repeats are summed), the cells,
    and the labels. ``close()`` (or ``with``) closes the file."""

    path: Path
    h5: object
    matrix: H5adMatrix
    values: str
    why: str
    genes: np.ndarray
    symbols_from_column: bool
    cells: np.ndarray
    labels: np.ndarray | None
    source: object = None  # the open h5py file, or an AnnData read whole (older layouts)

    def close(self) -> None:
        self.h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def obs(self) -> pd.DataFrame:
        """The file's ``obs`` table."""
        if self.source is not None and not hasattr(self.source, "attrs"):
            return self.source.obs
        return read_elem(self.h5["obs"], self.path, "obs")


def open_h5ad(path, label_key: str | None, layer: str | None = None, gene_symbols: str | None = None,
              values: str = "auto", strict_label_key: bool = True) -> H5adFile:
    """Open an h5ad and choose its matrix (:func:`choose_matrix`), symbols (:func:`symbols_for`)
    and labels (``obs[label_key]``; a missing column is an error listing the available ones, or
    with ``strict_label_key=False`` an unlabelled dataset). No matrix is read beyond the rows the
    value evidence needs."""
    path = Path(path)
    h5 = hdf5.open_h5(path, "an h5ad")
    try:
        return _opened(path, h5, label_key, layer, gene_symbols, values, strict_label_key)
    except BaseException:
        h5.close()
        raise


def is_legacy(h5) -> bool:
    """A layout older than anndata 0.7: tables as structured arrays, ``raw.X`` at the top level."""
    import h5py

    return any(k in h5 for k in ("raw.X", "raw.var")) or ("obs" in h5 and isinstance(h5["obs"], h5py.Dataset))


def _read_legacy(path):
    import anndata

    try:
        return anndata.read_h5ad(path)
    except Exception as exc:  # anndata raises many types; name the file
        raise DataError(f"{path}: cannot be read as h5ad ({type(exc).__name__}: {exc})") from None


def _opened(path, h5, label_key, layer, gene_symbols, values, strict_label_key) -> H5adFile:
    hdf5.check_all_stored_sizes(h5, path)
    for member in ("obs", "var"):
        if member not in h5:
            raise DataError(f"{path}: no '{member}' table; not an h5ad file (write it with anndata)")
    source = _read_legacy(path) if is_legacy(h5) else h5
    if source is h5:
        obs, var = read_elem(h5["obs"], path, "obs"), read_elem(h5["var"], path, "var")
    else:
        log.info("%s: an h5ad of anndata's layout before 0.7; read whole by anndata", path.name)
        obs, var = source.obs, source.var
    labels = _labels(obs, label_key, strict_label_key, path)
    matrix, kind, why = choose_matrix(source, path, layer, values)
    log.info("%s: values from %s (%s%s)", path.name, matrix.name, why,
             "; used as given, --values log1p" if kind == vals.LOG1P_VALUES else "")
    from_raw = matrix.member.startswith("raw/")
    own_var = _raw_var(source, path) if from_raw else var
    if len(own_var) != matrix.n_cols:
        raise DataError(f"{path}: {matrix.name} has {matrix.n_cols} genes but its var table {len(own_var)} rows")
    if len(obs) != matrix.n_rows:
        raise DataError(f"{path}: {matrix.name} has {matrix.n_rows} cells but obs {len(obs)} rows")
    genes, from_column = symbols_for(own_var, var, from_raw, path, gene_symbols)
    cells = np.asarray(obs.index.astype(str), dtype=object)
    return H5adFile(path, h5, matrix, kind, why, genes, from_column, cells, labels, source)


def _raw_var(source, path) -> pd.DataFrame:
    if not hasattr(source, "attrs"):
        return source.raw.var
    if "var" in source["raw"]:
        return read_elem(source["raw/var"], path, "raw/var")
    raise DataError(f"{path}: raw.X has no raw/var table naming its genes; write the file again with anndata")


def _labels(obs: pd.DataFrame, label_key, strict: bool, path) -> np.ndarray | None:
    if label_key is None:
        return None
    if label_key not in obs.columns:
        if strict:
            raise DataError(f"{path}: no label column '{label_key}' in obs; available columns: {list(obs.columns)}")
        log.info("%s: no label column '%s' in obs: unlabelled (pre-training only)", Path(path).name, label_key)
        return None
    column = obs[label_key]
    text = column.astype(object).where(column.notna(), "")
    return np.asarray([str(v) for v in text], dtype=object)


# --------------------------------------------------------------------------- writing text


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


# --------------------------------------------------------------------------- writing an annotated copy


def _obsm_bytes(obsm: dict) -> int:
    return sum(int(np.asarray(v).nbytes) for v in obsm.values())


def with_columns(obs: pd.DataFrame, columns: pd.DataFrame, what: str) -> pd.DataFrame:
    """``obs`` with ``columns`` added (text as categories); a column of that name is replaced, and said."""
    obs = obs.copy()
    for column in columns.columns:
        if column in obs.columns:
            log.warning("%s: obs['%s'] is replaced by the prediction", what, column)
        values = columns[column].to_numpy()
        obs[column] = pd.Categorical(values) if values.dtype == object else values
    return plain_string_frame(obs)


def write_annotated_copy(source, out, columns: pd.DataFrame, obsm: dict, uns: dict) -> Path:
    """``source`` (an h5ad) written to ``out`` as it is, plus ``columns`` in ``obs``, ``obsm`` entries
    and ``uns`` entries, without reading its matrices: the file is copied and the new members are
    written into the copy (a layout older than anndata 0.7 is read whole and written anew). The
    disk must hold the copy; ``source`` is never opened for writing."""
    import shutil

    import h5py

    from files import atomic_write_path

    source, out = Path(source), Path(out)
    with hdf5.open_h5(source, "an h5ad") as h5:
        legacy = is_legacy(h5)
    if legacy:
        adata = _read_legacy(source)
        return write_anndata(out, adata, columns, obsm, uns)

    def write(tmp: str) -> None:
        shutil.copyfile(source, tmp)
        io = _anndata_io()
        with h5py.File(tmp, "r+") as h5:
            obs = with_columns(read_elem(h5["obs"], source, "obs"), columns, str(source))
            del h5["obs"]
            io.write_elem(h5, "obs", obs)
            for group, entries in (("obsm", obsm), ("uns", uns)):
                node = h5.require_group(group) if group in h5 else _new_mapping(h5, group)
                for key, value in entries.items():
                    if key in node:
                        del node[key]
                    io.write_elem(node, key, value)

    return atomic_write_path(out, write, expected_bytes=source.stat().st_size + _obsm_bytes(obsm))


def _new_mapping(h5, name: str):
    group = h5.create_group(name)
    group.attrs["encoding-type"], group.attrs["encoding-version"] = "dict", "0.1.0"
    return group


def write_anndata(out, adata, columns: pd.DataFrame, obsm: dict, uns: dict) -> Path:
    """An AnnData in memory with the new ``obs`` columns, ``obsm`` and ``uns`` entries written to
    ``out`` (its own data as they are; text as plain strings, which every anndata reads). The
    AnnData given is not changed."""
    import anndata

    from files import atomic_write_path

    adata = adata.copy()
    adata.obs = with_columns(adata.obs, columns, "the query")
    adata.var = plain_string_frame(adata.var)
    for key, value in obsm.items():
        adata.obsm[key] = value
    for key, value in uns.items():
        adata.uns[key] = value
    if adata.raw is not None:
        adata.raw = anndata.AnnData(X=adata.raw.X, var=plain_string_frame(adata.raw.var),
                                    varm=dict(adata.raw.varm), obs=adata.obs[[]])
    expected = int(getattr(adata.X, "data", adata.X).nbytes if adata.X is not None else 0) + _obsm_bytes(obsm)
    return atomic_write_path(out, adata.write_h5ad, expected_bytes=expected)
