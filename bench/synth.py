"""Synthetic Cell BLAST-shaped collections for the benchmarks, written without ever densifying.

The paper pre-trains on 60 Cell BLAST datasets of 870 to 160,796 cells and 2 to 81 cell types,
human and mouse, each with ~17,000 genes at a few per cent non-zero. This script draws a
collection of that shape (sizes log-uniform between the paper's extremes, or given with
``--sizes``), scales it by ``--scale``, and writes each dataset as a Cell BLAST ``.h5``
(``exprs`` CSR group, byte-string ``var_names``/``obs_names``, ``obs/cell_ontology_class``),
the layout ``data.read_cellblast_h5`` reads.

Counts are built row chunk by row chunk directly in CSR: for every cell, the positions of its
non-zeros are drawn from its cell type's gene-usage distribution (so types differ), duplicates
merged, and each stored value is ``1 + NegativeBinomial`` with a mean set by the type's profile
and the cell's library size. Memory is one chunk, whatever the number of cells.

    python bench/synth.py --scale 0.01                     # 60 datasets, ~18k cells in all
    python bench/synth.py --sizes 160796 --genes 17000     # the paper's largest, at full size

Gene names overlap across datasets: a pool of ``--genes`` symbols ``SYNTH00000``...; every
dataset holds a random 80-100 % of them, upper-case for human datasets and capitalised
(``Synth00000``) for mouse ones, so the gene universe is built as for the real collection.
Importing does nothing.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

log = logging.getLogger("scpretrain.bench.synth")

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "out" / "synth"
PAPER_MIN_CELLS, PAPER_MAX_CELLS = 870, 160_796
PAPER_MIN_TYPES, PAPER_MAX_TYPES = 2, 81
GENE_PREFIX = "SYNTH"


@dataclass
class DatasetSpec:
    name: str
    n_cells: int
    n_types: int
    species: str  # "human" or "mouse"
    seed: int
    gene_fraction: float  # share of the gene pool this dataset holds


# --------------------------------------------------------------------------- the collection's shape


def collection_specs(n_datasets: int = 60, scale: float = 1.0, sizes=None, seed: int = 0,
                     mouse_fraction: float = 0.75, min_cells: int = 60, min_gene_fraction: float = 0.8,
                     prefix: str = "synth") -> list[DatasetSpec]:
    """Sizes and cell-type numbers drawn like the paper's collection, then scaled.

    Without ``sizes``: log-uniform between 870 and 160,796 cells, the two extremes included
    (when there are at least two datasets) so the largest dataset is always benchmarked.
    Cell types: log-uniform between 2 and 81, at most one type per 10 cells.
    """
    rng = np.random.default_rng([seed, 1])
    if sizes is None:
        sizes = np.exp(rng.uniform(np.log(PAPER_MIN_CELLS), np.log(PAPER_MAX_CELLS), n_datasets))
        if n_datasets >= 2:
            sizes[:2] = PAPER_MAX_CELLS, PAPER_MIN_CELLS
    sizes = [max(int(round(s * scale)), min_cells) for s in sizes]
    specs = []
    for i, n in enumerate(sizes):
        types = int(round(np.exp(rng.uniform(np.log(PAPER_MIN_TYPES), np.log(PAPER_MAX_TYPES + 1)))))
        types = int(np.clip(types, PAPER_MIN_TYPES, max(PAPER_MIN_TYPES, min(PAPER_MAX_TYPES, n // 10))))
        species = "mouse" if rng.random() < mouse_fraction else "human"
        specs.append(DatasetSpec(f"{prefix}{i:02d}_{species}_{n}", n, types, species, seed * 1000 + i,
                                 float(rng.uniform(min_gene_fraction, 1.0))))
    return specs


def gene_pool(n_genes: int) -> np.ndarray:
    return np.array([f"{GENE_PREFIX}{i:05d}" for i in range(n_genes)], dtype=object)


# --------------------------------------------------------------------------- counts, chunk by chunk


class CountModel:
    """Per cell type: where non-zeros fall (a distribution over genes) and how large they are."""

    def __init__(self, n_genes: int, n_types: int, density: float, rng: np.random.Generator,
                 marker_share: float = 0.03, dispersion: float = 2.0):
        base = rng.normal(0.0, 1.0, n_genes)  # gene-wise log expression
        lfc = np.zeros((n_types, n_genes))
        n_markers = max(1, int(marker_share * n_genes))
        for t in range(n_types):  # each type over-expresses its own marker genes
            markers = rng.choice(n_genes, n_markers, replace=False)
            lfc[t, markers] = rng.normal(2.0, 0.7, n_markers)
        weight = np.exp(base + lfc)
        self.prob = weight / weight.sum(1, keepdims=True)  # types x genes
        self.cdf = np.cumsum(self.prob, 1)
        self.cdf[:, -1] = 1.0
        self.stacked_cdf = (self.cdf + np.arange(n_types)[:, None]).ravel()  # non-decreasing
        self.n_genes, self.n_types, self.density, self.dispersion = n_genes, n_types, density, dispersion
        target = max(1.0, density * n_genes)
        # draws with replacement that give ``target`` distinct genes on average, per type
        self.inflation = np.array([_draws_for_distinct(p, target) / target for p in self.prob])
        self.type_share = rng.dirichlet(np.full(n_types, 1.5))

    def chunk(self, types: np.ndarray, rng: np.random.Generator) -> sp.csr_matrix:
        """A CSR block of counts for cells of the given types; never dense."""
        n = len(types)
        library = rng.lognormal(0.0, 0.35, n)  # cell-wise sequencing depth
        draws = np.maximum(1, np.rint(self.density * self.n_genes * library * self.inflation[types])).astype(np.int64)
        draws = np.minimum(draws, 4 * self.n_genes)
        row = np.repeat(np.arange(n, dtype=np.int64), draws)
        # inverse-CDF sampling of the gene of every draw from its cell's type distribution, with
        # each row's uniforms already sorted, so genes come out sorted within a row and a repeated
        # gene sits next to itself (no sort, no hash)
        u = _sorted_uniforms_per_row(draws, rng)
        # (type t's CDF is shifted by t, so one search over all types finds t * G + gene)
        gene = np.searchsorted(self.stacked_cdf, types[row] + u, side="right") - types[row] * self.n_genes
        del u
        np.clip(gene, 0, self.n_genes - 1, out=gene)
        first = np.ones(len(gene), dtype=bool)
        first[1:] = (gene[1:] != gene[:-1]) | (row[1:] != row[:-1])
        row, gene = row[first], gene[first]
        del first
        t = types[row]
        relative = self.prob[t, gene] * self.n_genes  # > 1 for genes the type uses a lot
        mean = np.clip(0.8 * relative * library[row], 0.05, 200.0)
        r = self.dispersion
        values = 1 + rng.negative_binomial(r, r / (r + mean))
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(row, minlength=n), out=indptr[1:])
        return sp.csr_matrix((values.astype(np.float32), gene.astype(np.int32), indptr), shape=(n, self.n_genes))


def _sorted_uniforms_per_row(draws: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``draws[i]`` sorted U(0,1) values for every row i, concatenated: normalised exponential spacings."""
    spacing = rng.standard_exponential(int(draws.sum()) + len(draws))
    total = np.cumsum(spacing)
    del spacing
    end = np.cumsum(draws + 1) - 1  # the position of each row's closing spacing
    base = np.r_[0.0, total[end[:-1]]]
    span = total[end] - base
    keep = np.ones(len(total), dtype=bool)
    keep[end] = False
    owner = np.repeat(np.arange(len(draws)), draws)
    out = (total[keep] - base[owner]) / span[owner]
    return np.minimum(out, np.nextafter(1.0, 0.0))


def _draws_for_distinct(p: np.ndarray, target: float) -> float:
    """m such that drawing m genes with replacement from ``p`` gives ``target`` distinct ones on average."""
    lo, hi = target, 50.0 * target
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        distinct = float(np.sum(-np.expm1(mid * np.log1p(-np.minimum(p, 1 - 1e-12)))))
        lo, hi = (mid, hi) if distinct < target else (lo, mid)
    return 0.5 * (lo + hi)


def synth_counts(n_cells: int, n_genes: int, n_types: int = 10, density: float = 0.05, seed: int = 0,
                 chunk_cells: int = 8192) -> tuple[sp.csr_matrix, np.ndarray]:
    """An in-memory CSR count matrix and the type of each cell (for benchmarks that need no file)."""
    rng = np.random.default_rng(seed)
    model = CountModel(n_genes, n_types, density, rng)
    types = rng.choice(n_types, n_cells, p=model.type_share)
    blocks = [model.chunk(types[s:s + chunk_cells], rng) for s in range(0, n_cells, chunk_cells)]
    return sp.vstack(blocks, format="csr"), types


# --------------------------------------------------------------------------- writing


def _chunk_of(model: "CountModel", types: np.ndarray, seed: tuple[int, int]) -> sp.csr_matrix:
    """One block drawn from its own generator (parallel writing: the same blocks for any worker count)."""
    return model.chunk(types, np.random.default_rng(seed))


def drawn_in_parallel(n_cells: int, chunk_cells: int, workers: int) -> bool:
    """Whether ``write_dataset`` draws a dataset's blocks from per-block generators (another draw)."""
    return workers > 1 and n_cells > chunk_cells


def file_stem(name: str, n_cells: int, chunk_cells: int, workers: int) -> str:
    """A dataset's file name without suffix: a parallel draw is another file than the sequential one."""
    return name + ("_parallel" if drawn_in_parallel(n_cells, chunk_cells, workers) else "")


def _blocks(model: "CountModel", types: np.ndarray, rng: np.random.Generator, seed: int, chunk_cells: int,
            workers: int):
    """The dataset's CSR blocks in order: drawn from ``rng`` one after another (``workers`` = 1), or
    each from a generator seeded by (seed, block number) in a pool of ``workers`` processes."""
    starts = range(0, len(types), chunk_cells)
    if not drawn_in_parallel(len(types), chunk_cells, workers):
        for start in starts:
            yield model.chunk(types[start:start + chunk_cells], rng)
        return
    with ProcessPoolExecutor(workers) as pool:
        pending = deque()  # at most 2 x workers blocks drawn ahead of the writer
        for i, start in enumerate(starts):
            pending.append(pool.submit(_chunk_of, model, types[start:start + chunk_cells], (seed, i)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _draw(spec: DatasetSpec, pool: np.ndarray, density: float):
    """A dataset's genes, count model and cell types, from its seed."""
    rng = np.random.default_rng(spec.seed)
    n_genes = max(1, int(round(spec.gene_fraction * len(pool))))
    genes = pool[np.sort(rng.choice(len(pool), n_genes, replace=False))]
    genes = [g.capitalize() for g in genes] if spec.species == "mouse" else list(genes)
    model = CountModel(n_genes, spec.n_types, density, rng)
    types = rng.choice(spec.n_types, spec.n_cells, p=model.type_share)
    return rng, genes, model, types


def _write_blocks(group, spec: DatasetSpec, model: "CountModel", types, rng, chunk_cells: int, workers: int) -> int:
    """The dataset's CSR arrays written into an HDF5 group (``data``, ``indices``, ``indptr``) block
    by block; returns its non-zeros."""
    data = group.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 20,))
    indices = group.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 20,))
    indptr = np.zeros(spec.n_cells + 1, dtype=np.int64)
    nnz = 0
    for start, block in zip(range(0, spec.n_cells, chunk_cells),
                            _blocks(model, types, rng, spec.seed, chunk_cells, workers)):
        data.resize((nnz + block.nnz,))
        indices.resize((nnz + block.nnz,))
        data[nnz:] = block.data
        indices[nnz:] = block.indices
        indptr[start + 1:start + 1 + block.shape[0]] = nnz + block.indptr[1:].astype(np.int64)  # past 2^31 non-zeros
        nnz += block.nnz
    group["indptr"] = indptr
    return nnz


def _written(spec: DatasetSpec, path: Path, pool: np.ndarray, density: float, write_fn) -> dict:
    """``write_fn(h5, rng, genes, model, types) -> nnz`` into a temporary HDF5 file renamed to
    ``path`` when complete; what was written."""
    import h5py

    t0 = time.time()
    rng, genes, model, types = _draw(spec, pool, density)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with h5py.File(tmp, "w") as h5:
            nnz = write_fn(h5, rng, genes, model, types)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {**asdict(spec), "path": str(path), "n_genes": len(genes), "nnz": nnz,
            "density": nnz / (spec.n_cells * len(genes)), "seconds": round(time.time() - t0, 2)}


def write_dataset(spec: DatasetSpec, path: Path, pool: np.ndarray, density: float,
                  chunk_cells: int = 8192, workers: int = 1) -> dict:
    """Write one dataset as a Cell BLAST .h5, chunk by chunk; returns what was written.

    ``workers`` > 1 draws the blocks in that many processes, each block from its own generator: a
    different (equally distributed) draw than ``workers`` = 1, the same for any number of workers."""
    def write(h5, rng, genes, model, types) -> int:
        g = h5.create_group("exprs")
        nnz = _write_blocks(g, spec, model, types, rng, chunk_cells, workers)
        g["shape"] = np.array([spec.n_cells, len(genes)], dtype=np.int64)
        h5["var_names"] = np.array([s.encode() for s in genes])
        h5["obs_names"] = np.array([f"{spec.name}_cell{i}".encode() for i in range(spec.n_cells)])
        h5.create_group("obs")["cell_ontology_class"] = np.array([f"type_{t:02d}".encode() for t in types])
        h5.attrs["species"] = spec.species
        return nnz

    return _written(spec, path, pool, density, write)


def write_h5ad_dataset(spec: DatasetSpec, path: Path, pool: np.ndarray, density: float,
                       chunk_cells: int = 8192, workers: int = 1) -> dict:
    """The same dataset as ``write_dataset`` draws, as an h5ad (``X`` a CSR group of counts,
    ``obs['cell_type']``, symbols in ``var_names``), written block by block: never whole in memory."""
    import pandas as pd

    try:
        import anndata.io as io
    except ImportError:  # anndata 0.10
        import anndata.experimental as io

    def write(h5, rng, genes, model, types) -> int:
        g = h5.create_group("X")
        g.attrs["encoding-type"], g.attrs["encoding-version"] = "csr_matrix", "0.1.0"
        g.attrs["shape"] = np.array([spec.n_cells, len(genes)], dtype=np.int64)
        nnz = _write_blocks(g, spec, model, types, rng, chunk_cells, workers)
        obs = pd.DataFrame({"cell_type": pd.Categorical([f"type_{t:02d}" for t in types])},
                           index=pd.Index([f"{spec.name}_cell{i}" for i in range(spec.n_cells)], dtype=object))
        io.write_elem(h5, "obs", obs)
        io.write_elem(h5, "var", pd.DataFrame(index=pd.Index(genes, dtype=object)))
        for group in ("obsm", "varm", "layers", "uns", "obsp", "varp"):
            io.write_elem(h5, group, {})
        h5.attrs["encoding-type"], h5.attrs["encoding-version"] = "anndata", "0.1.0"
        return nnz

    return _written(spec, path, pool, density, write)


def write_collection(specs: list[DatasetSpec], out, n_genes: int = 17000, density: float = 0.05,
                     chunk_cells: int = 8192, overwrite: bool = False, workers: int = 1) -> list[dict]:
    """Write every dataset (skipping files already there unless ``overwrite``) and a manifest.csv."""
    import pandas as pd

    out = Path(out)
    pool = gene_pool(n_genes)
    rows = []
    for spec in specs:
        path = out / f"{file_stem(spec.name, spec.n_cells, chunk_cells, workers)}.h5"
        if path.exists() and not overwrite:
            rows.append({**asdict(spec), "path": str(path), "reused": True})
            continue
        row = write_dataset(spec, path, pool, density, chunk_cells, workers)
        log.info("%s: %d cells x %d genes, %d types, %.2f%% non-zero, %.1fs", spec.name, spec.n_cells,
                 row["n_genes"], spec.n_types, 100 * row["density"], row["seconds"])
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out / "manifest.csv", index=False)
    return rows


def make_collection(out=DEFAULT_OUT, n_datasets: int = 60, scale: float = 1.0, sizes=None, genes: int = 17000,
                    density: float = 0.05, seed: int = 0, mouse_fraction: float = 0.75, min_cells: int = 60,
                    overwrite: bool = False) -> list[str]:
    """Generate (or reuse) a collection; returns the paths of its .h5 files."""
    specs = collection_specs(n_datasets, scale, sizes, seed, mouse_fraction, min_cells)
    rows = write_collection(specs, out, genes, density, overwrite=overwrite)
    return [r["path"] for r in rows]


# --------------------------------------------------------------------------- measuring (shared by the benchmarks)


def memory_mib() -> dict:
    """This process's resident memory now (``rss``) and its high-water mark (``peak``), in MiB.

    Read from /proc/self/status, so it sees every allocator (numpy, torch, faiss) alike;
    tracemalloc would see numpy only.
    """
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key = "rss" if line.startswith("VmRSS") else "peak"
                    out[key] = int(line.split()[1]) / 1024
    except OSError:  # not Linux: ru_maxrss (KiB on Linux, bytes on macOS) as the peak only
        import resource

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak"] = maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    out.setdefault("rss", float("nan"))
    out.setdefault("peak", float("nan"))
    return out


def reset_peak_memory() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def bench_env(omp_wait_policy: str = "") -> dict:
    """Environment of a benchmark subprocess. OpenMP threads that spin-wait (the libgomp default)
    lose most of their time when other processes share the cores; PASSIVE makes them sleep."""
    env = dict(os.environ)
    if omp_wait_policy:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    else:
        env.pop("OMP_WAIT_POLICY", None)
    return env


def code_version(files=("kmeans.py", "pretrain.py", "data.py", "model.py", "finetune.py", "sparse.py", "csr_kernels.py",
                        "genes.py", "features.py", "classifier.py", "annotation.py")) -> str:
    """The commit measured, and which of the measured files differ from it (others edit them)."""
    import subprocess

    repo = BENCH_DIR.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *files], cwd=repo, capture_output=True,
                               text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    changed = [line[3:] for line in dirty if line.strip()]
    return head + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# --------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_datasets", type=int, default=60, help="datasets to draw (default: %(default)s)")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="explicit dataset sizes (before --scale)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every size by this (default: %(default)s)")
    p.add_argument("--min_cells", type=int, default=60, help="no dataset smaller than this after scaling (default: %(default)s)")
    p.add_argument("--genes", type=int, default=17000, help="size of the gene pool (default: %(default)s)")
    p.add_argument("--density", type=float, default=0.05, help="share of non-zero entries (default: %(default)s)")
    p.add_argument("--mouse_fraction", type=float, default=0.75, help="share of mouse datasets (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="rewrite files that already exist")
    p.add_argument("--workers", type=int, default=1,
                   help="processes drawing a large dataset's blocks; > 1 is another (equally distributed) draw "
                        "than 1 (default: %(default)s)")
    p.add_argument("--dry_run", action="store_true", help="print the plan (sizes, non-zeros, bytes) only")
    return p.parse_args(argv)


def main(args) -> list[str]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    specs = collection_specs(args.n_datasets, args.scale, args.sizes, args.seed, args.mouse_fraction, args.min_cells)
    cells = sum(s.n_cells for s in specs)
    nnz = sum(s.n_cells * s.gene_fraction * args.genes * args.density for s in specs)
    log.info("%d datasets, %d cells (%d to %d), ~%.0fM non-zeros, ~%.2f GB on disk -> %s", len(specs), cells,
             min(s.n_cells for s in specs), max(s.n_cells for s in specs), nnz / 1e6, nnz * 8 / 1e9, args.out)
    if args.dry_run:
        for s in specs:
            print(f"{s.name}\t{s.n_cells}\t{s.n_types}\t{s.species}")
        return []
    t0 = time.time()
    rows = write_collection(specs, args.out, args.genes, args.density, overwrite=args.overwrite, workers=args.workers)
    log.info("done in %.1fs; manifest: %s", time.time() - t0, Path(args.out) / "manifest.csv")
    return [r["path"] for r in rows]


if __name__ == "__main__":
    main(parse_args(sys.argv[1:]))
