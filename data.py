"""Data layer of scPretrain: reading the formats datasets come in, and the collection.

Every reader returns a :class:`CellData`: a cell x gene ``scipy.sparse.csr_matrix`` of float32
values plus gene symbols, cell names, labels and species. The format is recognised by its
content (a folder of ``.npy`` files, or an HDF5 file holding Cell BLAST's ``exprs`` or an
h5ad's ``X``/``obs``), never by its suffix alone. Every matrix is checked as it is read
(:mod:`values`): well-formed, finite, non-negative, and raw or log-normalised by its evidence.
Genes live in :mod:`genes`, features in :mod:`features`, splits in :mod:`splits`, downloads in
:mod:`download`. Importing does nothing.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import pandas as pd
import scipy.sparse as sp

import download
import genes as gn
import h5ad
import hdf5
import values as vals
from errors import DataError
from files import same_file
from settings import DEFAULT_LABEL_KEY, ReadSettings

log = logging.getLogger("scpretrain.data")

REPO_DIR = Path(__file__).resolve().parent
DATASET_DIR = REPO_DIR / "dataset"
COLLECTION_TABLE = DATASET_DIR / "cellblast_collection.csv"
DEMO_DATASETS = ("pbmc68k_reduced", "oligodendroglioma", "pbmc3k", "celltypist_sample")
# label spellings read as "no label" (compared lower-case, after stripping blanks)
MISSING_LABELS = ("", "na", "nan", "none", "unknown")
NUMPY_FILES = ("feature.npy", "label.npy", "gene_list.npy")
# datasets read (or hashed, or aligned) at a time: h5py's reads take turns, but numpy's passes over
# one dataset's values (checks, conversions, digests) release the GIL and overlap another's read
MAX_THREADS = 4


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
    values: str = vals.RAW_VALUES  # RAW_VALUES or LOG1P_VALUES

    @property
    def n_cells(self) -> int:
        return self.X.shape[0]

    @property
    def n_genes(self) -> int:
        return self.X.shape[1]

    @property
    def is_labelled(self) -> bool:
        return self.labels is not None


_In = TypeVar("_In")
_Out = TypeVar("_Out")


def default_threads() -> int:
    """Threads of the datasets' reading: this process's cores, at most ``MAX_THREADS``."""
    return max(1, min(MAX_THREADS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1))


def map_in_order(fn: Callable[[_In], _Out], items: Iterable[_In], threads: int | None = None) -> Iterator[_Out]:
    """``fn`` of each item, yielded in the items' order, at most ``threads`` items in hand at a
    time (``items`` is consumed lazily: an item is taken only when a thread is free for it). An
    exception of ``fn`` is raised at its item, and the items not yet started are never started."""
    threads = default_threads() if threads is None else max(1, int(threads))
    if threads == 1:
        yield from map(fn, items)
        return
    source = iter(items)
    with ThreadPoolExecutor(threads, thread_name_prefix="datasets") as pool:
        pending = deque(pool.submit(fn, item) for _, item in zip(range(threads), source))
        try:
            while pending:
                done = pending.popleft().result()
                for item in source:  # one more in hand for the one taken
                    pending.append(pool.submit(fn, item))
                    break
                yield done
        finally:
            for future in pending:
                future.cancel()


def dataset_digests(datasets: Sequence[CellData], threads: int | None = None) -> list[str]:
    """:func:`dataset_digest` of each dataset (several at a time: hashing releases the GIL)."""
    return list(map_in_order(dataset_digest, datasets, threads))


def dataset_digest(d: CellData) -> str:
    """What a dataset is, as 16 hex digits: its values (the CSR arrays), genes, labels, species and
    what its values are. Result rows and resume checks carry it, so that a changed file is never
    taken for the one an earlier run used."""
    h = hashlib.blake2b(digest_size=8)
    X = d.X
    h.update(repr((X.shape, d.values, d.species)).encode())
    for array, dtype in ((X.indptr, np.int64), (X.indices, np.int64), (X.data, np.float32)):
        _hash_as(h, array, dtype)
    h.update("\n".join(map(str, d.genes)).encode())
    if d.labels is not None:
        h.update("\n".join(map(str, d.labels)).encode())
    return h.hexdigest()


# values converted at a time for a digest: a small buffer reused, no converted copy of the whole array
# (allocating one took page faults that serialised the threads hashing several datasets)
DIGEST_CHUNK = 1 << 18


def _hash_as(h, array: np.ndarray, dtype) -> None:
    """Feed ``h`` the bytes of ``array`` as ``dtype`` (the same bytes as one converted copy)."""
    array = np.ascontiguousarray(array).ravel()
    if array.dtype == dtype:
        h.update(array.data)
        return
    buffer = np.empty(min(DIGEST_CHUNK, array.size), dtype=dtype)
    for start in range(0, array.size, DIGEST_CHUNK):
        part = array[start:start + DIGEST_CHUNK]
        out = buffer[:part.size]
        out[:] = part
        h.update(out.data)


# --------------------------------------------------------------------------- Cell BLAST .h5


def _read_h5_matrix(h5, path: Path) -> sp.csr_matrix:
    import h5py

    if "exprs" not in h5:
        raise DataError(f"{path}: no 'exprs' matrix (found: {sorted(h5.keys())})")
    with hdf5.reading(path, "exprs"):
        node = h5["exprs"]
    if isinstance(node, h5py.Dataset):
        return _read_dense_exprs(node, path)
    missing = [k for k in ("data", "indices", "indptr", "shape") if k not in node]
    if missing:
        raise DataError(f"{path}: 'exprs' group lacks {missing}")
    shape_node = hdf5.h5_dataset(h5, "exprs/shape", path)
    if shape_node.dtype.kind not in "iu":
        raise DataError(f"{path}: 'exprs/shape' must be 2 integers, got {shape_node.size} of dtype {shape_node.dtype}")
    with hdf5.reading(path, "exprs/shape"):
        shape = tuple(int(s) for s in np.ravel(shape_node[()]))
    parts = {k: hdf5.h5_dataset(h5, f"exprs/{k}", path) for k in ("data", "indices", "indptr")}
    vals.check_csr_layout(path, shape, *((v.shape, v.dtype) for v in parts.values()))
    with hdf5.reading(path, "exprs"):
        data, indices, indptr = (parts[k][()] for k in ("data", "indices", "indptr"))
    return vals.build_csr(data, indices, indptr, shape, path)


def _read_dense_exprs(node, path) -> sp.csr_matrix:
    if node.ndim != 2:
        raise DataError(f"{path}: dense 'exprs' must be 2-D, got shape {node.shape}")
    if node.dtype.kind not in "biuf":
        raise DataError(f"{path}: dense 'exprs' is not numeric (dtype {node.dtype})")
    with hdf5.reading(path, "exprs"):
        hdf5.check_stored_size(node, path, "exprs")
        dense = np.asarray(node[()], dtype=np.float32)
    return sp.csr_matrix(dense)


def _read_h5_labels(h5, path: Path, label_key: str, strict: bool) -> np.ndarray | None:
    with hdf5.reading(path, "obs"):
        columns = sorted(h5["obs"].keys()) if "obs" in h5 else []
    if label_key not in columns:
        if strict:
            raise DataError(f"{path}: no label column '{label_key}' in obs; available columns: {columns}")
        return None
    return hdf5.decode_names(hdf5.read_h5_array(h5, f"obs/{label_key}", path), path, f"label column 'obs/{label_key}'")


def read_cellblast_h5(path, label_key: str = DEFAULT_LABEL_KEY, species: str | None = None,
                      name: str | None = None, strict_label_key: bool = False, values: str = "auto") -> CellData:
    """Read a Cell BLAST ``.h5``: CSR group or dense ``exprs``, byte-string names, ``obs`` columns.

    A dataset without the label column is unlabelled (pre-training only) unless
    ``strict_label_key`` asks for an error listing the available columns. Sizes the file declares
    are checked against what it stores before anything is read; any h5py error is one DataError.
    """
    path = Path(path)
    with hdf5.open_h5(path) as h5:
        hdf5.check_all_stored_sizes(h5, path)
        X = _read_h5_matrix(h5, path)
        if "var_names" not in h5:
            raise DataError(f"{path}: no 'var_names' (gene symbols)")
        genes = hdf5.decode_names(hdf5.read_h5_array(h5, "var_names", path), path, "'var_names'")
        cells = (hdf5.decode_names(hdf5.read_h5_array(h5, "obs_names", path), path, "'obs_names'")
                 if "obs_names" in h5 else _default_cell_names(X.shape[0]))
        labels = _read_h5_labels(h5, path, label_key, strict_label_key)
        with hdf5.reading(path, "species attribute"):
            stored_species = h5.attrs.get("species")
    if species is None and stored_species is not None:
        species = stored_species.decode() if isinstance(stored_species, bytes) else str(stored_species)
    return finish_dataset(name or path.stem, X, genes, cells, labels, species, path, wanted=(values, "exprs"))


def settled_values(X, wanted: str, where: str, path) -> str:
    """What a whole matrix holds (``values.value_kind``), settled by ``--values``; said in the log."""
    kind, why = vals.value_kind(X)
    settled = vals.settle_values(kind, why, wanted, where, path)
    log.info("%s: values from %s (%s%s)", Path(path).name, where, why,
             "; used as given, --values log1p" if settled == vals.LOG1P_VALUES else "")
    return settled


# --------------------------------------------------------------------------- h5ad, numpy folders


def read_h5ad(path, label_key: str = DEFAULT_LABEL_KEY, species: str | None = None, name: str | None = None,
              layer: str | None = None, gene_symbols: str | None = None, values: str = "auto",
              strict_label_key: bool = True) -> CellData:
    """Read an ``.h5ad`` whole: its matrix, symbols and labels as :func:`h5ad.open_h5ad` chooses
    them (the log says which).

    Duplicate ``var_names`` are refused as in every reader; but symbols taken from a ``var``
    column (``--gene_symbols``, CELLxGENE's ``feature_name``) often repeat for distinct gene
    IDs, so their columns are summed, with a warning.
    """
    path = Path(path)
    with h5ad.open_h5ad(path, label_key, layer, gene_symbols, values, strict_label_key) as f:
        X = f.matrix.read_all()
        genes, from_column, cells, labels, kind = f.genes, f.symbols_from_column, f.cells, f.labels, f.values
    if from_column:
        X, genes, n_merged = gn.sum_duplicate_columns(X, genes)
        if n_merged:
            log.warning("%s: %d gene columns share a symbol with another; summing them", path.name, n_merged)
    return finish_dataset(name or path.stem, X, genes, cells, labels, species, path, kind)


def read_numpy_dir(path, species: str | None = None, name: str | None = None, values: str = "auto") -> CellData:
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
    genes = hdf5.decode_names(_load_npy(path / "gene_list.npy"), path / "gene_list.npy", "the gene list")
    labels = None
    if (path / "label.npy").exists():
        labels = hdf5.decode_names(_load_npy(path / "label.npy"), path / "label.npy", "the labels")
    X = sp.csr_matrix(feature.astype(np.float32, copy=False))
    return finish_dataset(name or path.name, X, genes, _default_cell_names(X.shape[0]), labels, species, path,
                          wanted=(values, "feature.npy"))


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


def finish_dataset(name, X, genes, cells, labels, species, path, values: str = vals.RAW_VALUES,
                   wanted: tuple[str, str] | None = None) -> CellData:
    """Validate a freshly read dataset and normalise its labels and species. With ``wanted``
    (``--values``, and where in the file the matrix is), what the values are is settled here, once
    the matrix is known to be well formed (:func:`settled_values`)."""
    validate_matrix(X, genes, cells, path)
    labels = _normalise_labels(labels, X.shape[0], path)
    if wanted is not None:
        values = settled_values(X, *wanted, path)
    species = species or gn.guess_species(genes)
    if species not in ("human", "mouse"):
        raise DataError(f"{path}: species must be 'human' or 'mouse', got '{species}'")
    return CellData(str(name), X, genes, cells, labels, species, str(path), values)


def validate_matrix(X: sp.csr_matrix, genes: np.ndarray, cells: np.ndarray, path, allow_empty: bool = False) -> None:
    """Shape, names and values of a matrix read from ``path`` (``allow_empty``: the names only, for
    a matrix still on disk)."""
    n_cells, n_genes = X.shape
    if not allow_empty:
        if n_cells == 0 or n_genes == 0:
            raise DataError(f"{path}: empty dataset ({n_cells} cells x {n_genes} genes)")
        if len(cells) != n_cells:
            raise DataError(f"{path}: {len(cells)} cell names for a matrix of {n_cells} cells")
    if len(genes) != n_genes:
        raise DataError(f"{path}: {len(genes)} gene names for a matrix of {n_genes} genes")
    vals.check_finite_non_negative(X.data, path, "the expression")
    dup = pd.Index(genes).duplicated()
    if dup.any():
        examples = list(pd.unique(np.asarray(genes)[dup]))[:5]
        raise DataError(
            f"{path}: {int(dup.sum())} duplicate gene names (e.g. {examples}); "
            "make var_names unique (sum or drop the duplicates) and try again"
        )


def _normalise_labels(labels, n_cells: int, path) -> np.ndarray | None:
    """Missing labels (``MISSING_LABELS``) become ''; a dataset with no real label is unlabelled."""
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


# --------------------------------------------------------------------------- any format


def file_format(path) -> str:
    """``"numpy"``, ``"cellblast"`` or ``"h5ad"`` by the file's content (not its suffix)."""
    import h5py

    path = Path(path)
    if path.is_dir():
        return "numpy"
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not hdf5.is_hdf5(path):
        raise DataError(f"{path}: neither a numpy folder nor an HDF5 file (Cell BLAST .h5 or .h5ad)")
    with hdf5.open_h5(path, "an HDF5") as h5, hdf5.reading(path, "the top level"):
        keys = set(h5.keys())
        if "exprs" in keys:
            return "cellblast"
        if "X" in keys or ("obs" in keys and isinstance(h5["obs"], h5py.Group) and h5["obs"].attrs.get("encoding-type")):
            return "h5ad"
    raise DataError(f"{path}: an HDF5 file, but neither Cell BLAST's layout ('exprs') nor an h5ad ('X', 'obs'); "
                    f"found {sorted(keys)[:8]}")


def read_any(path, label_key: str = DEFAULT_LABEL_KEY, species: str | None = None, name: str | None = None,
             strict_label_key: bool = False, layer: str | None = None, gene_symbols: str | None = None,
             values: str = "auto", log_transformed: bool = False) -> CellData:
    """Read a dataset of any format (:func:`file_format`).

    ``layer`` and ``gene_symbols`` apply to h5ad only; ``values`` (``auto``, ``raw``, ``log1p``;
    ``log_transformed`` is ``values="log1p"``) to every format: log1p values are fed to the
    encoder as they are.
    """
    path = Path(path)
    values = vals.LOG1P_VALUES if log_transformed else values
    kind = file_format(path)
    if kind == "h5ad":
        return read_h5ad(path, label_key, species, name, layer=layer, gene_symbols=gene_symbols, values=values,
                         strict_label_key=strict_label_key)
    if kind == "numpy":
        return read_numpy_dir(path, species, name, values)
    return read_cellblast_h5(path, label_key, species, name, strict_label_key, values)


# --------------------------------------------------------------------------- the collection


def read_collection_table(path=COLLECTION_TABLE) -> pd.DataFrame:
    """The paper's Cell BLAST datasets: name, species, labelled."""
    return pd.read_csv(path, dtype=str).set_index("name")


def expand_dataset_names(names: Sequence[str] | None) -> list[str]:
    if not names:
        names = ["demo"]
    out: list[str] = []
    for n in names:
        if n == "demo":  # the embedded files, by path
            out.extend(str(DATASET_DIR / f"{name}.h5") for name in DEMO_DATASETS)
        elif n == "paper":
            out.extend(read_collection_table().index)
        else:
            out.append(n)
    return list(dict.fromkeys(out))


@dataclass(frozen=True)
class DatasetEntry:
    """One dataset of a run: its unique name, its file, the species the collection table gives."""

    name: str
    path: Path
    species: str | None


def dataset_entries(names: Sequence[str] | None, settings: ReadSettings | None = None) -> list[DatasetEntry]:
    """The datasets of ``--datasets``, each resolved to a file (Cell BLAST names downloaded first,
    every one before any is read, so a failure stops the run before any work) under a name unique
    in the run; the same file named twice is used once."""
    settings = settings or ReadSettings()
    table = read_collection_table()
    found: list[tuple[str, Path]] = []
    for entry in expand_dataset_names(names):
        path = download.resolve_dataset_path(entry, settings.dataset_dir or DATASET_DIR,
                                              settings.url_template or download.DEFAULT_URL_TEMPLATE)
        twin = next((e for e, p in found if same_file(p, path)), None)
        if twin is not None:
            log.warning("%s is the same file as %s; it is used once", entry, twin)
            continue
        found.append((entry, path))
    names_unique = unique_names([(entry, path) for entry, path in found])
    return [DatasetEntry(name, path, table.loc[entry, "species"] if entry in table.index else None)
            for name, (entry, path) in zip(names_unique, found)]


def unique_names(entries: list[tuple[str, Path]]) -> list[str]:
    """A dataset's name is its Cell BLAST name or its file's stem; where stems repeat (``a/data.h5``
    and ``b/data.h5``), as many parent folders as make them unique are put in front."""
    def stem(entry: str, path: Path) -> str:
        return Path(entry).stem if download.looks_like_path(entry) else entry

    names = [stem(e, p) for e, p in entries]
    depth = 0
    while len(set(names)) < len(names) and depth < 32:
        depth += 1
        counts = pd.Series(names).value_counts()
        names = [n if counts[n] == 1 else "/".join([*p.resolve().parent.parts[-depth:], stem(e, p)])
                 for n, (e, p) in zip(names, entries)]
    return names


def load_collection(names: Sequence[str] | None = None, settings: ReadSettings | None = None,
                    orthologs: dict[str, str] | None = None) -> list[CellData]:
    """Read the chosen datasets (default: the embedded demo collection), genes mapped.

    ``names`` holds Cell BLAST names (downloaded when missing), paths, or the words ``demo`` /
    ``paper`` for the demo collection and the paper's 66 datasets; ``settings`` says how files
    are read and where names are found.
    """
    settings = settings or ReadSettings()
    return load_entries(dataset_entries(names, settings), settings, orthologs)


def load_entries(entries: Sequence[DatasetEntry], settings: ReadSettings | None = None,
                 orthologs: dict[str, str] | None = None, threads: int | None = None) -> list[CellData]:
    """Read these datasets (:func:`dataset_entries`), genes mapped, ``threads`` files at a time
    (None: :func:`default_threads`); the first that fails stops the reading, named in its error."""
    settings = settings or ReadSettings()
    orthologs = gn.load_ortholog_table() if orthologs is None else orthologs

    def read(entry: DatasetEntry) -> CellData:
        return gn.map_dataset_genes(read_any(entry.path, settings.label_key, species=entry.species, name=entry.name,
                                             **settings.reader_options()), orthologs)

    out = []
    for data in map_in_order(read, entries, threads):
        log.info("%s: %d cells x %d genes, %s, %s", data.name, data.n_cells, data.n_genes, data.species,
                 f"{len(np.unique(data.labels[data.labels != '']))} labelled types" if data.is_labelled
                 else "unlabelled")
        out.append(data)
    return out


def labelled_cells(data: CellData) -> CellData:
    """Only the cells that carry a label (fine-tuning needs them)."""
    if data.labels is None:
        raise DataError(f"{data.source or data.name}: has no labels")
    keep = np.flatnonzero(data.labels != "")
    if len(keep) == data.n_cells:
        return data
    log.info("%s: dropping %d cells without a label", data.name, data.n_cells - len(keep))
    return replace(data, X=data.X[keep], cells=data.cells[keep], labels=data.labels[keep])


def with_two_classes(datasets: list[CellData]) -> list[CellData]:
    """The datasets with at least two cell types; the others are left out with a warning (one
    class gives no classification or clustering score worth a row)."""
    kept = []
    for d in datasets:
        n_types = len(np.unique(d.labels))
        if n_types < 2:
            log.warning("%s: one cell type only (%s); left out", d.name, d.labels[0])
            continue
        kept.append(d)
    return kept


def labelled_datasets(names: Sequence[str] | None, settings: ReadSettings | None = None) -> list[CellData]:
    """The labelled datasets of ``names``, genes mapped, cells without a label dropped."""
    datasets = load_collection(names, settings)
    skipped = [d.name for d in datasets if not d.is_labelled]
    if skipped:
        log.info("unlabelled, left out: %s", ", ".join(skipped))
    labelled = with_two_classes([labelled_cells(d) for d in datasets if d.is_labelled])
    if not labelled:
        raise DataError("none of the chosen datasets is labelled with two or more cell types; "
                        "nothing to classify or cluster")
    return labelled


def dataset_files(names: Sequence[str] | None, settings: ReadSettings | None = None) -> list[Path]:
    """The files ``names`` will read, for checking outputs against before any work: paths as
    given, and the local files (either layout) of Cell BLAST names where they exist."""
    settings = settings or ReadSettings()
    out = []
    for entry in expand_dataset_names(names):
        if download.looks_like_path(entry):
            out.append(Path(entry))
            continue
        folder = Path(settings.dataset_dir or DATASET_DIR)
        out += [folder / f"{entry}{suffix}" for suffix in download.DATASET_SUFFIXES]
    return out


# --------------------------------------------------------------------------- queries: in memory or a block at a time


@dataclass
class StreamedData:
    """A dataset whose values stay on disk (an h5ad's ``X``, ``raw.X`` or a layer, CSR or dense),
    read a block of cells at a time by :meth:`blocks`: each block checked as it is read, its
    columns merged onto the mapped genes, never the whole matrix in memory. Its metadata are those
    of a :class:`CellData`. ``close()`` (or ``with``) closes the file."""

    name: str
    file: h5ad.H5adFile
    merge: gn.ColumnMerge  # from the file's columns to ``genes``
    genes: np.ndarray  # mapped symbols
    cells: np.ndarray
    labels: np.ndarray | None
    species: str
    source: str
    values: str

    @property
    def n_cells(self) -> int:
        return self.file.matrix.n_rows

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def is_labelled(self) -> bool:
        return self.labels is not None

    def blocks(self, chunk_cells: int):
        """(first row, CSR of the block's cells over ``genes``), a block at a time."""
        for start in range(0, self.n_cells, chunk_cells):
            yield start, self.merge.apply(self.file.matrix.rows(start, start + chunk_cells))

    def obs(self) -> pd.DataFrame:
        return self.file.obs()

    def close(self) -> None:
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def in_blocks(d: CellData, chunk_cells: int):
    """(first row, CSR view of the block's cells) of a dataset in memory, as :meth:`StreamedData.blocks`."""
    from sparse import row_block

    for start in range(0, d.n_cells, chunk_cells):
        yield start, row_block(d.X, start, min(start + chunk_cells, d.n_cells))


def blocks_of(d, chunk_cells: int):
    """The blocks of a dataset in memory or on disk."""
    return d.blocks(chunk_cells) if isinstance(d, StreamedData) else in_blocks(d, chunk_cells)


def open_streamed(path, label_key: str | None, settings: ReadSettings | None = None, strict_label_key: bool = True,
                  orthologs: dict[str, str] | None = None) -> StreamedData:
    """An h5ad opened for reading a block of cells at a time, its genes mapped (symbols from a
    ``var`` column and mouse orthologs that repeat are summed, block by block)."""
    settings = settings or ReadSettings()
    path = Path(path)
    f = h5ad.open_h5ad(path, label_key, settings.layer, settings.gene_symbols, settings.values, strict_label_key)
    try:
        if f.matrix.n_rows == 0 or f.matrix.n_cols == 0:
            raise DataError(f"{path}: empty dataset ({f.matrix.n_rows} cells x {f.matrix.n_cols} genes)")
        if not f.symbols_from_column:  # var_names must be unique; symbols from a column may repeat
            validate_matrix(sp.csr_matrix((0, len(f.genes))), f.genes, np.zeros(0), path, allow_empty=True)
        labels = _normalise_labels(f.labels, f.matrix.n_rows, path)
        species = gn.guess_species(f.genes)
        by_symbol = _symbol_merge(f)
        mapped = gn.mapped_merge(by_symbol.genes, species, path.stem, orthologs)
        merge = gn.ColumnMerge(mapped.genes, mapped.codes[by_symbol.codes])  # both merges in one
        return StreamedData(path.stem, f, merge, merge.genes, f.cells, labels, species, str(path), f.values)
    except BaseException:
        f.close()
        raise


def _symbol_merge(f: h5ad.H5adFile) -> gn.ColumnMerge:
    """A file's columns onto its distinct symbols (repeats come from a ``var`` symbol column)."""
    merge = gn.column_merge(f.genes)
    if merge.n_merged:
        log.warning("%s: %d gene columns share a symbol with another; summing them", f.path.name, merge.n_merged)
    return merge


def open_query(path, label_key: str | None, settings: ReadSettings | None = None, stream: bool = True):
    """A dataset to annotate or embed, genes mapped: an h5ad streamed from disk (``stream``), any
    other format (or ``stream=False``) read whole into a :class:`CellData`."""
    if stream and file_format(path) == "h5ad":
        return open_streamed(path, label_key, settings, strict_label_key=label_key is not None)
    settings = settings or ReadSettings()
    d = read_any(path, label_key=label_key, strict_label_key=label_key is not None, **settings.reader_options())
    return gn.map_dataset_genes(d)


def from_anndata(adata, label_key: str | None = None, settings: ReadSettings | None = None,
                 name: str = "adata") -> CellData:
    """An AnnData in memory as a :class:`CellData`, its values and symbols chosen by the rules every
    h5ad file is read with (``X``, ``raw.X`` or a counts layer; ``--values``; ``feature_name``),
    genes mapped. The AnnData is not changed."""
    settings = settings or ReadSettings()
    where = f"AnnData '{name}'"
    matrix, kind, _ = h5ad.choose_matrix(adata, where, settings.layer, settings.values)
    from_raw = matrix.member.startswith("raw/")
    genes, from_column = h5ad.symbols_for(adata.raw.var if from_raw else adata.var, adata.var, from_raw, where,
                                          settings.gene_symbols)
    X = matrix.read_all()
    if from_column:
        X, genes, _ = gn.sum_duplicate_columns(X, genes)
    labels = h5ad._labels(adata.obs, label_key, True, where) if label_key is not None else None
    d = finish_dataset(name, X, genes, np.asarray(adata.obs_names.astype(str), dtype=object), labels, None,
                       where, kind)
    return gn.map_dataset_genes(d)
