"""K-means pseudo-labels without densifying a dataset, on CPU or GPU (torch).

Lloyd's algorithm over row chunks: each chunk of a CSR matrix becomes a torch sparse CSR tensor
(zero-copy views of the numpy arrays), distances come from one sparse x dense product per
chunk, and centroid sums from one ``index_add_`` over the chunk's non-zeros. Memory is the
centroids plus one chunk's ``chunk x k`` distance block, whatever the number of cells.
Initialisation is k-means++ on a seeded sample of the cells. Importing does nothing.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

import csr_kernels
from sparse import RowChunks

log = logging.getLogger("scpretrain.kmeans")


@dataclass
class KMeansResult:
    labels: np.ndarray  # int64 cluster of each cell
    centroids: np.ndarray  # k x G float32
    inertia: float  # sum of squared distances of cells to their centroid
    n_iter_run: int = 0  # Lloyd iterations run (fewer than n_iter when the assignments settled)


# stop Lloyd's loop once at most this share of cells changes cluster in an iteration; 0 stops only
# when none changes (the centroids would then not move again: the same result as all iterations)
DEFAULT_TOL = 0.0


def granularities(n_cells: int, avg_cluster_num: int = 100) -> list[int]:
    """The three numbers of clusters, each within [2, n] (a 1-cluster head would teach nothing).

    scPretrain: the granularity formula n//a, n//(a//2), n//(2a)+1 with a = --avg_cluster_num.
    """
    a = avg_cluster_num
    ks = [n_cells // a, n_cells // max(a // 2, 1), n_cells // (2 * a) + 1]
    return [int(min(max(k, 2), n_cells)) for k in ks]


# each cell remembers its NEAREST nearest centroids between Lloyd's iterations, so that the next
# pass computes only its distances to the centroids that moved
NEAREST = 4
# above this share of centroids moved, a pass computes every distance (pruning would save little)
FULL_PASS_SHARE = 0.5


@dataclass
class Nearest:
    """What an assignment pass knows for the next: each cell's ``NEAREST`` nearest centroids (at
    the pass) and their distances, and a lower bound on its distance to every centroid not listed.

    Distances are ``|c|^2 - 2 x.c`` (the cell's own ``|x|^2`` left out: the same for every
    centroid). ``inf`` marks a slot that holds nothing.
    """
    dist: torch.Tensor  # cells x NEAREST
    index: torch.Tensor  # cells x NEAREST int64
    bound: torch.Tensor  # cells

    @staticmethod
    def empty(n_cells: int, m: int, device) -> "Nearest":
        return Nearest(torch.empty(n_cells, m, device=device), torch.empty(n_cells, m, dtype=torch.int64, device=device),
                       torch.empty(n_cells, device=device))

    @property
    def labels(self) -> torch.Tensor:
        return self.index[:, 0]

    @property
    def best(self) -> torch.Tensor:
        return self.dist[:, 0]


def kmeans(X, k: int, n_iter: int = 20, seed: int = 0, device: str | torch.device = "cpu",
           chunk_rows: int = 8192, init_sample: int | None = None, max_cells: int = 0,
           tol: float = DEFAULT_TOL, prune: bool = True) -> KMeansResult:
    """Cluster the rows of ``X`` (CSR, dense, or the ``RowChunks`` of an earlier run on the same
    matrix, whose cached chunks are then reused) into ``k`` clusters; seeded and deterministic.

    Lloyd's loop runs at most ``n_iter`` iterations and stops after one in which at most a share
    ``tol`` of the cells changed cluster; a negative ``tol`` never stops early (exactly
    ``n_iter`` iterations, as the original). With ``max_cells`` > 0, the centroids are fitted on a
    seeded sample of that many cells and every cell is then assigned to its nearest centroid (for
    very large datasets on a CPU).

    From the third iteration on, a cell's distances are computed only to the centroids that moved
    (a centroid moves only when a cell joined or left its cluster; after the first iteration all
    do) and the others are taken from the iteration before; the nearest centroid is the same as computing every distance (``prune=False``
    computes them all, for comparison), up to the rounding of products computed in another order.
    The cluster sums follow the cells that changed cluster.
    """
    device = torch.device(device)
    # the rows Lloyd's loop passes over keep their chunks
    rows = X if isinstance(X, RowChunks) else RowChunks(X, device, cache=not 0 < max_cells < X.shape[0])
    n = rows.n_rows
    subsample = 0 < max_cells < n
    k = int(min(max(k, 1), n))
    gen = np.random.default_rng(seed)
    fit_rows = rows
    if subsample:
        fit_rows = rows.subset(np.sort(gen.choice(n, size=max(max_cells, k), replace=False)), cache=True)
    centroids = _kmeans_pp(fit_rows, k, gen, init_sample)
    known, moved, sums, n_iter_run = None, None, None, 0
    for n_iter_run in range(1, n_iter + 1):
        nearest = _assign(fit_rows, centroids, chunk_rows, known if prune else None, moved)
        labels = nearest.labels
        changed = None if known is None else torch.nonzero(labels != known.labels).flatten()
        if changed is None or 2 * len(changed) > fit_rows.n_rows:
            sums = _cluster_sums(fit_rows, labels, k, chunk_rows, out=sums)
        else:
            _move_cells(fit_rows, sums, changed, known.labels[changed], labels[changed], chunk_rows)
        counts = torch.bincount(labels, minlength=k)
        if changed is None:
            moved = torch.ones(k, dtype=torch.bool, device=centroids.device)
        else:
            moved = torch.zeros(k, dtype=torch.bool, device=centroids.device)
            moved[known.labels[changed]] = True
            moved[labels[changed]] = True
        moved |= counts == 0  # an empty cluster restarts at a random cell
        centroids = _update(centroids, sums, counts, moved, fit_rows, gen)
        known = nearest
        # a re-seeded empty cluster has moved, so the loop goes on even when no cell changed
        if changed is not None and tol >= 0 and len(changed) <= tol * fit_rows.n_rows and bool((counts > 0).all()):
            break
    log.debug("k=%d: %d Lloyd iterations of at most %d", k, n_iter_run, n_iter)
    final = _assign(rows, centroids, chunk_rows, known if prune and not subsample else None, moved)
    inertia = torch.clamp(final.best + rows.norms(), min=0).double().sum()
    return KMeansResult(final.labels.cpu().numpy().astype(np.int64), centroids.cpu().numpy(), float(inertia),
                        n_iter_run)


def _kmeans_pp(rows: RowChunks, k: int, gen: np.random.Generator, init_sample: int | None,
               projection_dim: int = 256) -> torch.Tensor:
    """Greedy k-means++ (as scikit-learn: 2 + log k candidates a step) on a sample of >= 4k cells.

    The candidates are chosen on a seeded Gaussian random projection of the sample to
    ``projection_dim`` dimensions (distances are kept up to a few per cent,
    Johnson-Lindenstrauss), so that the k sequential steps cost O(m * projection_dim) instead of
    O(m * genes); the centroids returned are the chosen cells' full rows.
    """
    m = min(rows.n_rows, init_sample or max(4 * k, 1024))
    sample = rows.subset(np.sort(gen.choice(rows.n_rows, size=m, replace=False)))
    block = sample.chunk(0, m)
    if rows.n_cols > 2 * projection_dim:
        torch_gen = torch.Generator().manual_seed(int(gen.integers(2**31)))
        projection = torch.randn(rows.n_cols, projection_dim, generator=torch_gen) / projection_dim ** 0.5
        points = sample.times(block, sample.prepare_product(projection.to(sample.device)))
    else:
        points = block if isinstance(block, torch.Tensor) and block.layout == torch.strided else block.to_dense()
    sq = (points * points).sum(1)
    trials = 2 + int(np.log(k))

    def dist_to(idx):
        cand = points[torch.as_tensor(np.asarray(idx), device=points.device)]
        return torch.clamp(sq.unsqueeze(1) - 2 * (points @ cand.T) + (cand * cand).sum(1).unsqueeze(0), min=0)

    chosen = [int(gen.integers(m))]
    closest = dist_to(chosen)[:, 0]
    for _ in range(1, k):
        weights = closest.double().cpu().numpy()
        total = weights.sum()
        cand = gen.choice(m, size=trials, p=weights / total) if total > 0 else gen.integers(m, size=trials)
        candidate_closest = torch.minimum(closest.unsqueeze(1), dist_to(cand))
        best = int(torch.argmin(candidate_closest.double().sum(0)))
        chosen.append(int(cand[best]))
        closest = candidate_closest[:, best]
    return sample.rows_dense(chosen)


def _nearest_listed(dist: torch.Tensor, index: torch.Tensor | None, m: int):
    """The ``m`` smallest of each row of ``dist`` (ascending) with their centroids (``index``: the
    centroid of each entry, None = its column), and the next smallest (``inf`` if none)."""
    take = min(m + 1, dist.shape[1])
    vals, pos = dist.topk(take, 1, largest=False, sorted=True)
    idx = pos if index is None else index.gather(1, pos)
    if take <= m:  # fewer candidates than slots: pad, nothing is left unlisted
        pad = m + 1 - take
        vals = torch.cat([vals, vals.new_full((len(vals), pad), float("inf"))], 1)
        idx = torch.cat([idx, idx.new_zeros((len(idx), pad))], 1)
    return vals[:, :m], idx[:, :m], vals[:, m]


def _assign(rows: RowChunks, centroids: torch.Tensor, chunk_rows: int, known: Nearest | None = None,
            moved: torch.Tensor | None = None) -> Nearest:
    """Every row's nearest centroids (a ``Nearest``).

    With ``known`` (the previous pass over the same rows) and ``moved`` (per centroid: changed
    since), a row's distances to the centroids that did not move are taken from ``known`` and only
    those to the moved ones are computed. A row whose best known distance is not within its bound
    (every listed centroid moved away) is computed against all centroids.
    """
    k = centroids.shape[0]
    m = min(NEAREST, k)
    dev = centroids.device
    c_sq = (centroids * centroids).sum(1)
    out = Nearest.empty(rows.n_rows, m, dev)
    moved_idx = None if known is None or moved is None else torch.nonzero(moved).flatten()
    if moved_idx is None or len(moved_idx) > FULL_PASS_SHARE * k:
        _full_pass(rows, centroids, c_sq, chunk_rows, out, m)
        return out
    right = rows.prepare_product(centroids[moved_idx].T) if len(moved_idx) else None
    redo = []
    for start in range(0, rows.n_rows, chunk_rows):
        stop = min(start + chunk_rows, rows.n_rows)
        cand_d = known.dist[start:stop].masked_fill(moved[known.index[start:stop]], float("inf"))
        cand_i = known.index[start:stop]
        if right is not None:
            moved_d = rows.times(rows.chunk(start, stop), right).mul_(-2).add_(c_sq[moved_idx].unsqueeze(0))
            cand_d = torch.cat([cand_d, moved_d], 1)
            cand_i = torch.cat([cand_i, moved_idx.unsqueeze(0).expand(stop - start, -1)], 1)
        d, i, next_d = _nearest_listed(cand_d, cand_i, m)
        bound = known.bound[start:stop]
        out.dist[start:stop], out.index[start:stop] = d, i
        out.bound[start:stop] = torch.minimum(bound, next_d)
        redo.append(torch.nonzero(d[:, 0] > bound).flatten() + start)
    redo = torch.cat(redo)
    if len(redo):
        sub = rows.subset(redo.cpu().numpy())
        part = Nearest.empty(len(redo), m, dev)
        _full_pass(sub, centroids, c_sq, chunk_rows, part, m)
        out.dist[redo], out.index[redo], out.bound[redo] = part.dist, part.index, part.bound
    log.debug("pass: %d of %d centroids moved, %d of %d cells recomputed in full", len(moved_idx), k,
              len(redo), rows.n_rows)
    return out


def _full_pass(rows: RowChunks, centroids, c_sq, chunk_rows: int, out: Nearest, m: int) -> None:
    right = rows.prepare_product(centroids.T)
    for start in range(0, rows.n_rows, chunk_rows):
        stop = min(start + chunk_rows, rows.n_rows)
        dist = rows.times(rows.chunk(start, stop), right).mul_(-2).add_(c_sq.unsqueeze(0))  # in place: one block
        out.dist[start:stop], out.index[start:stop], out.bound[start:stop] = _nearest_listed(dist, None, m)


def _cluster_sums(rows: RowChunks, labels: torch.Tensor, k: int, chunk_rows: int,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """Per-cluster sums of the rows (k x genes), into ``out`` (the sums being replaced) when given:
    a second k x genes buffer would be held while the first is still referenced."""
    g = rows.n_cols
    sums = out.view(-1).zero_() if out is not None else torch.zeros(k * g, device=labels.device)
    host = rows.host_arrays()
    if host is not None:  # one pass over the CSR's own arrays, no per-value index built
        csr_kernels.cluster_sums(*host, labels.numpy(), sums.numpy().reshape(k, g))
        return sums.view(k, g)
    for start in range(0, rows.n_rows, chunk_rows):
        stop = min(start + chunk_rows, rows.n_rows)
        _add_rows(rows, start, stop, labels[start:stop], sums, 1.0)
    return sums.view(k, g)


def _add_rows(rows: RowChunks, start: int, stop: int, labels: torch.Tensor, sums: torch.Tensor, sign: float) -> None:
    """Add (``sign`` 1) or take away (-1) rows ``start:stop`` to the flat sums of their clusters."""
    g = rows.n_cols
    if not rows.sparse:
        block = rows.chunk(start, stop)
        sums.view(-1, g).index_add_(0, labels, block if sign > 0 else -block)
        return
    row_of_value, col, val = rows.values(start, stop)
    sums.index_add_(0, labels[row_of_value] * g + col, val if sign > 0 else -val)


def _move_cells(rows: RowChunks, sums: torch.Tensor, changed: torch.Tensor, old: torch.Tensor, new: torch.Tensor,
                chunk_rows: int) -> None:
    """Update the cluster sums (k x genes) for the ``changed`` rows moving from ``old`` to ``new``."""
    host = rows.host_arrays()
    if host is not None:  # in place from the CSR's arrays: no copy of the rows
        csr_kernels.move_rows(*host, changed.numpy(), old.numpy(), new.numpy(), sums.numpy())
        return
    flat = sums.view(-1)
    for start in range(0, len(changed), chunk_rows):  # a chunk's rows copied at a time
        stop = min(start + chunk_rows, len(changed))
        sub = rows.subset(changed[start:stop].cpu().numpy())
        _add_rows(sub, 0, sub.n_rows, old[start:stop], flat, -1.0)
        _add_rows(sub, 0, sub.n_rows, new[start:stop], flat, 1.0)


# clusters whose centroids are recomputed at a time (the whole k x genes at once took two copies of it)
UPDATE_BLOCK = 64


def _update(centroids, sums, counts, moved, rows: RowChunks, gen: np.random.Generator) -> torch.Tensor:
    """Each moved centroid = mean of its cells (in place); an empty cluster restarts at a random cell."""
    idx = torch.nonzero(moved).flatten()
    for start in range(0, len(idx), UPDATE_BLOCK):  # no k x genes temporaries: a few clusters at a time
        part = idx[start:start + UPDATE_BLOCK]
        centroids[part] = sums[part] / counts[part].clamp(min=1).unsqueeze(1).to(sums.dtype)
    empty = torch.nonzero(counts == 0).flatten().cpu().numpy()
    if len(empty):
        log.debug("re-seeding %d empty clusters", len(empty))
        sums[torch.as_tensor(empty, device=sums.device)] = 0  # no cells: what the sums follow starts again from 0
        centroids[torch.as_tensor(empty, device=centroids.device)] = rows.rows_dense(
            np.sort(gen.choice(rows.n_rows, size=len(empty), replace=False)))
    return centroids


def pseudo_labels(X, avg_cluster_num: int = 100, n_iter: int = 20, seed: int = 0,
                  device: str | torch.device = "cpu", max_cells: int = 0, tol: float = DEFAULT_TOL) -> list[np.ndarray]:
    """K-means labels of the rows of ``X`` at scPretrain's three granularities."""
    ks = granularities(X.shape[0], avg_cluster_num)
    # one set of rows for the three runs: the chunks they cache are built once
    rows = RowChunks(X, torch.device(device), cache=not 0 < max_cells < X.shape[0])
    return [kmeans(rows, k, n_iter=n_iter, seed=seed + i, device=device, max_cells=max_cells, tol=tol).labels
            for i, k in enumerate(ks)]
