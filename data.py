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
from dataclasses import dataclass, replace
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


def _decode(values) -> np.ndarray:
    """Byte strings (as Cell BLAST stores them) to a numpy array of str."""
    arr = np.asarray(values)
    if arr.dtype.kind == "S" or arr.dtype == object:
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr], dtype=object)
    return arr.astype(str).astype(object)


def _open_h5(path: Path):
    import h5py

    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not a Cell BLAST .h5 file")
    with open(path, "rb") as fh:
        if fh.read(8) != HDF5_SIGNATURE:
            raise DataError(f"{path}: not an HDF5 file (expected a Cell BLAST .h5)")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"{path}: cannot be opened as HDF5 ({exc})") from exc


def _read_h5_matrix(h5, path: Path) -> sp.csr_matrix:
    if "exprs" not in h5:
        raise DataError(f"{path}: no 'exprs' matrix (found: {sorted(h5.keys())})")
    node = h5["exprs"]
    if hasattr(node, "shape") and not hasattr(node, "keys"):  # a dense dataset
        try:
            dense = np.asarray(node[()], dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise DataError(f"{path}: dense 'exprs' is not numeric ({exc})") from exc
        if dense.ndim != 2:
            raise DataError(f"{path}: dense 'exprs' must be 2-D, got shape {dense.shape}")
        return sp.csr_matrix(dense)
    missing = [k for k in ("data", "indices", "indptr", "shape") if k not in node]
    if missing:
        raise DataError(f"{path}: 'exprs' group lacks {missing}")
    try:
        shape = tuple(int(s) for s in np.ravel(node["shape"][()]))
        data = np.asarray(node["data"][()], dtype=np.float32)
        indices = np.asarray(node["indices"][()])
        indptr = np.asarray(node["indptr"][()])
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: 'exprs' arrays are not numeric ({exc})") from exc
    return build_csr(data, indices, indptr, shape, path)


def build_csr(data, indices, indptr, shape, path) -> sp.csr_matrix:
    """A CSR matrix from its arrays, after checking they agree with each other."""
    if len(shape) != 2:
        raise DataError(f"{path}: 'exprs/shape' must have 2 entries, got {shape}")
    n_rows, n_cols = shape
    if len(indptr) != n_rows + 1:
        raise DataError(f"{path}: indptr has {len(indptr)} entries but shape says {n_rows} cells (+1 expected)")
    if len(data) != len(indices):
        raise DataError(f"{path}: data ({len(data)}) and indices ({len(indices)}) differ in length")
    if indptr[0] != 0 or indptr[-1] != len(data) or np.any(np.diff(indptr) < 0):
        raise DataError(f"{path}: indptr is not a non-decreasing 0..{len(data)} sequence")
    if len(indices) and (indices.min() < 0 or indices.max() >= n_cols):
        raise DataError(f"{path}: gene indices fall outside 0..{n_cols - 1}")
    idx_dtype = np.int32 if max(n_cols, len(data)) < 2**31 else np.int64
    return sp.csr_matrix(
        (data, indices.astype(idx_dtype, copy=False), indptr.astype(idx_dtype, copy=False)), shape=(n_rows, n_cols)
    )


def _read_h5_labels(h5, path: Path, label_key: str, strict: bool) -> np.ndarray | None:
    columns = sorted(h5["obs"].keys()) if "obs" in h5 else []
    if label_key not in columns:
        if strict:
            raise DataError(f"{path}: no label column '{label_key}' in obs; available columns: {columns}")
        return None
    return _decode(h5["obs"][label_key][()])


def read_cellblast_h5(path, label_key: str = DEFAULT_LABEL_KEY, species: str | None = None,
                      name: str | None = None, strict_label_key: bool = False) -> CellData:
    """Read a Cell BLAST ``.h5``: CSR group or dense ``exprs``, byte-string names, ``obs`` columns.

    A dataset without the label column is unlabelled (pre-training only) unless
    ``strict_label_key`` asks for an error listing the available columns.
    """
    path = Path(path)
    with _open_h5(path) as h5:
        X = _read_h5_matrix(h5, path)
        if "var_names" not in h5:
            raise DataError(f"{path}: no 'var_names' (gene symbols)")
        genes = _decode(h5["var_names"][()])
        cells = _decode(h5["obs_names"][()]) if "obs_names" in h5 else _default_cell_names(X.shape[0])
        labels = _read_h5_labels(h5, path, label_key, strict_label_key)
        stored_species = h5.attrs.get("species")
    if species is None and stored_species is not None:
        species = stored_species.decode() if isinstance(stored_species, bytes) else str(stored_species)
    return finish_dataset(name or path.stem, X, genes, cells, labels, species, path)


def read_h5ad(path, label_key: str = DEFAULT_LABEL_KEY, species: str | None = None,
              name: str | None = None) -> CellData:
    """Read an ``.h5ad``; uses ``X`` when it holds raw values, else ``raw.X`` (and says which)."""
    import anndata

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        adata = anndata.read_h5ad(path)
    except Exception as exc:  # anndata raises many types; name the file
        raise DataError(f"{path}: cannot be read as h5ad ({exc})") from exc
    columns = list(adata.obs.columns)
    if label_key is not None and label_key not in columns:
        raise DataError(f"{path}: no label column '{label_key}' in obs; available columns: {columns}")
    X, genes, which = _h5ad_raw_matrix(adata, path)
    log.info("%s: using %s as raw expression", path.name, which)
    labels = None if label_key is None else np.asarray(adata.obs[label_key].astype(str).values, dtype=object)
    cells = np.asarray(adata.obs_names, dtype=object)
    return finish_dataset(name or path.stem, X, genes, cells, labels, species, path)


def _is_raw_like(X) -> bool:
    """Raw counts/TPM are non-negative; scaled or centred data (as in many h5ad ``X``) is not."""
    values = X.data if sp.issparse(X) else np.asarray(X)
    # NaN is bad data (rejected later, naming the file), not a sign that X is scaled
    return values.size == 0 or not float(np.nanmin(values)) < 0


def _h5ad_raw_matrix(adata, path: Path):
    if _is_raw_like(adata.X):
        return _to_csr32(adata.X), np.asarray(adata.var_names, dtype=object), "X"
    if adata.raw is not None and _is_raw_like(adata.raw.X):
        return _to_csr32(adata.raw.X), np.asarray(adata.raw.var_names, dtype=object), "raw.X"
    raise DataError(f"{path}: neither X nor raw.X holds non-negative expression values")


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
    genes = _decode(_load_npy(path / "gene_list.npy"))
    labels = None
    if (path / "label.npy").exists():
        labels = _decode(_load_npy(path / "label.npy"))
    X = sp.csr_matrix(feature.astype(np.float32, copy=False))
    return finish_dataset(name or path.name, X, genes, _default_cell_names(X.shape[0]), labels, species, path)


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:  # corrupt file, or an object array (needs pickle)
        raise DataError(f"{path}: cannot be read as a .npy array of numbers or strings ({exc}); "
                        "save it with np.save from a numeric or str array") from exc


def _default_cell_names(n: int) -> np.ndarray:
    return np.array([f"cell_{i}" for i in range(n)], dtype=object)


# --------------------------------------------------------------------------- validation


def finish_dataset(name, X, genes, cells, labels, species, path) -> CellData:
    """Validate a freshly read dataset and normalise its labels and species."""
    validate_matrix(X, genes, cells, path)
    labels = _normalise_labels(labels, X.shape[0], path)
    species = species or guess_species(genes)
    if species not in ("human", "mouse"):
        raise DataError(f"{path}: species must be 'human' or 'mouse', got '{species}'")
    return CellData(str(name), X, genes, cells, labels, species, str(path))


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
    if labels.ndim != 1 or len(labels) != n_cells:
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
    codes, uniques = pd.factorize(mapped)
    if len(uniques) == len(mapped):
        return replace(data, genes=mapped)
    log.warning("%s: %d gene columns collapse onto the same symbol after mapping; summing them",
                data.name, len(mapped) - len(uniques))
    merge = sp.csr_matrix((np.ones(len(codes), np.float32), (np.arange(len(codes)), codes)),
                          shape=(len(codes), len(uniques)))
    return replace(data, X=sp.csr_matrix(data.X @ merge, dtype=np.float32), genes=np.asarray(uniques, dtype=object))


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


def features(data: CellData) -> sp.csr_matrix:
    """The encoder's input for a dataset: ``log1p`` of raw values, or already-transformed values
    as they are. The one place raw values are transformed."""
    if data.values == LOG1P_VALUES:
        return sp.csr_matrix(data.X)
    return log1p_features(data.X)


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
    """Seeded shuffle split: train = min(int(per_train n), max_train), val likewise, test = rest."""
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


def stack_rows(mats: Sequence[sp.csr_matrix], rows: Sequence[np.ndarray]) -> sp.csr_matrix:
    """The chosen rows of several CSR matrices with the same columns, one under the other."""
    return sp.vstack([X[r] for X, r in zip(mats, rows)], format="csr")


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
    the dataset and URL, and leaves no partial file behind.
    """
    from tqdm.auto import tqdm

    url = url_template.format(name=name)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
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


def _copy_stream(response, out, bar, chunk: int = 1 << 20) -> int:
    received = 0
    while True:
        block = response.read(chunk)
        if not block:
            return received
        out.write(block)
        received += len(block)
        bar.update(len(block))


def read_any(path, label_key: str = DEFAULT_LABEL_KEY, species: str | None = None,
             name: str | None = None, strict_label_key: bool = False) -> CellData:
    """Dispatch on the path: a folder (numpy), ``.h5ad`` (anndata) or Cell BLAST ``.h5``."""
    path = Path(path)
    if path.is_dir():
        return read_numpy_dir(path, species, name)
    if path.suffix == ".h5ad":
        return read_h5ad(path, label_key, species, name)
    return read_cellblast_h5(path, label_key, species, name, strict_label_key)


def load_collection(names: Sequence[str] | None = None, dataset_dir=DATASET_DIR,
                    url_template: str = DEFAULT_URL_TEMPLATE, label_key: str = DEFAULT_LABEL_KEY,
                    orthologs: dict[str, str] | None = None) -> list[CellData]:
    """Read the chosen datasets (default: the embedded demo collection), genes mapped.

    ``names`` holds Cell BLAST names (downloaded when missing), paths, or the words ``demo`` /
    ``paper`` for the demo collection and the paper's 66 datasets.
    """
    names = expand_dataset_names(names)
    table = read_collection_table()
    orthologs = load_ortholog_table() if orthologs is None else orthologs
    out = []
    for entry in names:
        path = resolve_dataset_path(entry, dataset_dir, url_template)
        species = table.loc[entry, "species"] if entry in table.index else None
        data = read_any(path, label_key, species=species, name=Path(entry).stem if path.suffix else entry)
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
