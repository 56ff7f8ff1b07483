"""Genes: symbols, mouse-to-human orthologs, the pre-training gene universe, the one lookup of a
dataset's genes in a universe, alignment onto it, and the genes two datasets share. Works on any
object with ``X``, ``genes``, ``species``, ``name`` and ``source`` (a ``data.CellData``).
Importing does nothing.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from errors import DataError

if TYPE_CHECKING:
    from data import CellData

log = logging.getLogger("scpretrain.data")

ORTHOLOG_TABLE = (Path(__file__).resolve().parent / "dataset"
                  / "ncbi_mgi_ensembl__mouse-lemur_human_mouse__orthologs__gene_names__one2one.csv")


def guess_species(genes: Sequence[str]) -> str:
    """Mouse symbols are capitalised (``Actb``), human ones upper-case (``ACTB``)."""
    sample = pd.Series(np.asarray(genes, dtype=str)[:2000])
    has_lower = sample.str.contains("[a-z]", regex=True).mean()
    return "mouse" if has_lower > 0.5 else "human"


@dataclass(frozen=True)
class ColumnMerge:
    """How a matrix's columns become the columns of its distinct gene symbols: column ``j`` is
    added into column ``codes[j]`` (the first occurrence's place). A block of cells read from disk
    is merged the same way as a whole matrix in memory."""

    genes: np.ndarray  # the distinct symbols, in order of first occurrence
    codes: np.ndarray  # int64, one per source column

    @property
    def n_merged(self) -> int:
        return len(self.codes) - len(self.genes)

    def apply(self, X: sp.csr_matrix) -> sp.csr_matrix:
        """``X`` with its columns summed into the distinct symbols' (``X`` itself when none repeat)."""
        if not self.n_merged:
            return X
        merge = sp.csr_matrix((np.ones(len(self.codes), np.float32), (np.arange(len(self.codes)), self.codes)),
                              shape=(len(self.codes), len(self.genes)))
        return sp.csr_matrix(X @ merge, dtype=np.float32)


def column_merge(genes: Sequence[str]) -> ColumnMerge:
    codes, uniques = pd.factorize(np.asarray(genes, dtype=object))
    return ColumnMerge(np.asarray(uniques, dtype=object), codes.astype(np.int64))


def sum_duplicate_columns(X: sp.csr_matrix, genes: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray, int]:
    """Columns with the same gene symbol summed into one (first occurrence's place); returns the
    matrix, the unique symbols and how many columns were merged away."""
    merge = column_merge(genes)
    return merge.apply(X), merge.genes, merge.n_merged


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


def mapped_merge(genes: Sequence[str], species: str, name: str,
                 orthologs: dict[str, str] | None = None) -> ColumnMerge:
    """How a dataset's columns become mapped symbols (upper-case, mouse to human), columns that map
    to one symbol summed; logged as :func:`map_dataset_genes` says it."""
    mapped = map_genes(genes, species, orthologs)
    if species == "mouse":
        n_mapped = int(np.sum(mapped != pd.Series(genes, dtype=str).str.upper().to_numpy()))
        log.info("%s: %d of %d mouse genes mapped to human orthologs", name, n_mapped, len(mapped))
    merge = column_merge(mapped)
    if merge.n_merged:
        log.warning("%s: %d gene columns collapse onto the same symbol after mapping; summing them", name,
                    merge.n_merged)
    return merge


def map_dataset_genes(data: CellData, orthologs: dict[str, str] | None = None) -> CellData:
    """Return ``data`` with mapped gene symbols; columns that map to one symbol are summed."""
    merge = mapped_merge(data.genes, data.species, data.name, orthologs)
    return replace(data, X=merge.apply(data.X), genes=merge.genes)


def build_gene_universe(datasets: Sequence[CellData]) -> np.ndarray:
    """Sorted universe: mapped genes seen in both species, or all genes if one species only.

    Expects datasets whose genes are already mapped (:func:`map_dataset_genes`).
    """
    return gene_universe_of([(d.species, d.genes) for d in datasets])


def gene_universe_of(species_and_genes) -> np.ndarray:
    """:func:`build_gene_universe` of (species, mapped genes) pairs, one per dataset."""
    by_species: dict[str, set] = {}
    for species, names in species_and_genes:
        by_species.setdefault(species, set()).update(names)
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


def shared_genes(a_genes: Sequence[str], b_genes: Sequence[str]) -> np.ndarray:
    """The (mapped) genes two datasets share, in the order of the first."""
    b = pd.Index(np.asarray(b_genes, dtype=object))
    a = np.asarray(a_genes, dtype=object)
    return a[b.get_indexer(pd.Index(a)) >= 0]


def restrict_to_genes(data: "CellData", keep: Sequence[str]) -> "CellData":
    """``data`` with only the columns of ``keep`` (genes it has), in the order of ``keep``."""
    lookup = pd.Index(np.asarray(data.genes, dtype=object)).get_indexer(pd.Index(np.asarray(keep, dtype=object)))
    if np.any(lookup < 0):
        missing = np.asarray(keep, dtype=object)[lookup < 0][:3]
        raise DataError(f"{data.source or data.name}: lacks genes it should have (e.g. {list(missing)})")
    return replace(data, X=sp.csr_matrix(data.X[:, lookup]), genes=np.asarray(keep, dtype=object))
