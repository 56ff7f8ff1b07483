"""The encoder's two sparse products on the CPU, ``X W`` and ``X^T G``, in gene blocks.

``X`` is a CSR batch of cells (~5 % non-zero), ``W`` the gene-major ``genes x hid`` weight and
``G`` a ``cells x hid`` gradient. A plain CSR x dense product reads one ``hid``-float row of ``W``
for every stored value, from all of ``W`` (17,000 x 200 floats, 13.6 MB: out of the core's cache);
the weight gradient through the batch's transpose needs that transpose built every step. Here
both products walk the batch's genes in blocks of ``BLOCK_GENES`` (a block of ``W``, or of the
gradient being summed, is 0.4 MB and stays in the core's L2 cache), from two tables of where
each row's values of each block start and end: no transpose is built. The values either stay in a
CSR's own arrays (``block_pointers``, one pass over the column indices, no copy) or are copied
block by block (``take_block_major_rows``: a pre-training step's rows), so that a block's values
of all the rows are one stream; the gradient's thread of a block otherwise fetches a short piece
of every row from out of cache (a 30,500-cell step's two products 0.52 -> 0.34 s on a Zen 4).

Every output row (forward) or gene block (gradient) is summed by one thread in a fixed order, so
results do not depend on the number of threads. Only multiply-adds are fused (``contract``): NaN
and infinity propagate as in torch's products (full fast-math measured no faster). Compiled by
numba on first use (~3 s) and cached beside this file (``__pycache__``); the threads are torch's
(``torch.get_num_threads``). Importing compiles nothing.
"""
from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange

BLOCK_GENES = 512  # genes per block: 512 x 200 float32 = 0.4 MB of W (or of its gradient) in L2
FORWARD_ROWS = 128  # cells a thread takes through all gene blocks at a time (their outputs stay cached)
GRADIENT_ROWS = 2048  # cells whose gradient rows every block's thread reads before the next cells
ROW_BLOCKS_CHUNK = 4096  # rows a thread scans at a time when building a matrix's row_blocks table


@njit(parallel=True, cache=True)
def _block_pointers(indptr, indices, n_genes, block):  # pragma: no cover - compiled
    n = indptr.size - 1
    n_blocks = (n_genes + block - 1) // block
    ptr = np.empty((n_blocks + 1, n), dtype=np.int64)
    bad = np.zeros(n, dtype=np.bool_)
    for i in prange(n):
        bad[i] = _row_pointers(indices, indptr[i], indptr[i + 1], ptr, i, n_genes, block)
    return ptr, bad.any()


@njit(cache=True)
def _row_pointers(indices, p, end, ptr, i, n_genes, block):  # pragma: no cover - compiled
    """Row ``i``'s block starts (``indices[p:end]``) into ``ptr[:, i]``; whether they are unsorted,
    negative or at or past ``n_genes``."""
    ptr[0, i] = p
    last, bad = -1, False
    for b in range(ptr.shape[0] - 1):
        limit = min((b + 1) * block, n_genes)
        while p < end and indices[p] < limit:
            if indices[p] < last or indices[p] < 0:  # unsorted within the row, or negative
                bad = True
            last = indices[p]
            p += 1
        ptr[b + 1, i] = p
    return bad or p != end  # p short of end: a column index at or past n_genes


@njit(parallel=True, fastmath={"contract"}, cache=True)
def _times_dense(starts, ends, indices, data, weight, bias, rows):  # pragma: no cover - compiled
    n_blocks, n = starts.shape
    hid = weight.shape[1]
    out = np.empty((n, hid), dtype=np.float32)
    for c in prange((n + rows - 1) // rows):
        lo, hi = c * rows, min(n, (c + 1) * rows)
        for i in range(lo, hi):
            out[i, :] = bias
        for b in range(n_blocks):
            for i in range(lo, hi):
                p, end = starts[b, i], ends[b, i]
                # eight stored values a pass over the output row: it is read and written once for
                # eight of them, summed in the same order as one by one (the same float result)
                while p + 8 <= end:
                    j0, j1, j2, j3 = indices[p], indices[p + 1], indices[p + 2], indices[p + 3]
                    j4, j5, j6, j7 = indices[p + 4], indices[p + 5], indices[p + 6], indices[p + 7]
                    v0, v1, v2, v3 = data[p], data[p + 1], data[p + 2], data[p + 3]
                    v4, v5, v6, v7 = data[p + 4], data[p + 5], data[p + 6], data[p + 7]
                    for k in range(hid):
                        o = out[i, k]
                        o += v0 * weight[j0, k]
                        o += v1 * weight[j1, k]
                        o += v2 * weight[j2, k]
                        o += v3 * weight[j3, k]
                        o += v4 * weight[j4, k]
                        o += v5 * weight[j5, k]
                        o += v6 * weight[j6, k]
                        o += v7 * weight[j7, k]
                        out[i, k] = o
                    p += 8
                while p < end:
                    j, v = indices[p], data[p]
                    for k in range(hid):
                        out[i, k] += v * weight[j, k]
                    p += 1
    return out


@njit(parallel=True, fastmath={"contract"}, cache=True)
def _transposed_times(starts, ends, indices, data, grad, n_genes, rows):  # pragma: no cover - compiled
    n_blocks, n = starts.shape
    hid = grad.shape[1]
    out = np.zeros((n_genes, hid), dtype=np.float32)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        for b in prange(n_blocks):  # a block's genes are summed by one thread: no races
            for i in range(lo, hi):
                p, end = starts[b, i], ends[b, i]
                while p + 4 <= end:  # four genes a pass over the row's gradient (each kept in a register)
                    j0, j1, j2, j3 = indices[p], indices[p + 1], indices[p + 2], indices[p + 3]
                    v0, v1, v2, v3 = data[p], data[p + 1], data[p + 2], data[p + 3]
                    for k in range(hid):
                        g = grad[i, k]
                        out[j0, k] += v0 * g
                        out[j1, k] += v1 * g
                        out[j2, k] += v2 * g
                        out[j3, k] += v3 * g
                    p += 4
                while p < end:
                    j, v = indices[p], data[p]
                    for k in range(hid):
                        out[j, k] += v * grad[i, k]
                    p += 1
    return out


@njit(cache=True)
def _gathered_starts(indptr, rows):  # pragma: no cover - compiled
    """Where each of the rows ``rows`` starts once they are copied one after the other (and the end)."""
    starts = np.empty(rows.size + 1, dtype=np.int64)
    starts[0] = 0
    for q in range(rows.size):
        starts[q + 1] = starts[q] + (indptr[rows[q] + 1] - indptr[rows[q]])
    return starts


@njit(parallel=True, cache=True)
def _take_rows(indptr, indices, data, rows):  # pragma: no cover - compiled
    n = rows.size
    out_ptr = _gathered_starts(indptr, rows)
    out_ind = np.empty(out_ptr[n], dtype=indices.dtype)
    out_val = np.empty(out_ptr[n], dtype=data.dtype)
    for q in prange(n):
        src, dst, size = indptr[rows[q]], out_ptr[q], out_ptr[q + 1] - out_ptr[q]
        out_ind[dst:dst + size] = indices[src:src + size]
        out_val[dst:dst + size] = data[src:src + size]
    return out_ptr, out_ind, out_val


@njit(parallel=True, cache=True)
def _take_block_major_rows(indptr, indices, data, rows, n_genes, block):  # pragma: no cover - compiled
    n = rows.size
    n_blocks = (n_genes + block - 1) // block
    src = np.empty((n_blocks + 1, n), dtype=np.int64)  # where each row's values of each block start in X
    bad = np.zeros(n, dtype=np.bool_)
    for q in prange(n):
        bad[q] = _row_pointers(indices, indptr[rows[q]], indptr[rows[q] + 1], src, q, n_genes, block)
    if bad.any():
        return src[:-1], src[1:], indices[:0].copy(), data[:0].copy(), True
    starts, ends, out_ind, out_val = _block_major_copy(indices, data, src)
    return starts, ends, out_ind, out_val, False


@njit(parallel=True, cache=True)
def _block_major_copy(indices, data, src):  # pragma: no cover - compiled
    """The rows whose values of block ``b`` are ``src[b, q]:src[b + 1, q]`` copied block by block."""
    n_blocks, n = src.shape[0] - 1, src.shape[1]
    starts = np.empty((n_blocks, n), dtype=np.int64)
    ends = np.empty((n_blocks, n), dtype=np.int64)
    base = np.zeros(n_blocks + 1, dtype=np.int64)  # where each block's values start in the copy
    for b in prange(n_blocks):
        total = 0
        for q in range(n):
            total += src[b + 1, q] - src[b, q]
        base[b + 1] = total
    for b in range(n_blocks):
        base[b + 1] += base[b]
    for b in prange(n_blocks):  # within a block, the rows one after the other
        at = base[b]
        for q in range(n):
            starts[b, q] = at
            at += src[b + 1, q] - src[b, q]
            ends[b, q] = at
    out_ind = np.empty(base[n_blocks], dtype=indices.dtype)
    out_val = np.empty(base[n_blocks], dtype=data.dtype)
    for q in prange(n):
        for b in range(n_blocks):
            at, p, size = starts[b, q], src[b, q], src[b + 1, q] - src[b, q]
            out_ind[at:at + size] = indices[p:p + size]
            out_val[at:at + size] = data[p:p + size]
    return starts, ends, out_ind, out_val


@njit(parallel=True, cache=True)
def _row_blocks(indptr, indices, n_genes, block, table):  # pragma: no cover - compiled
    n, n_blocks = table.shape
    bad = np.zeros(n, dtype=np.bool_)
    for c in prange((n + ROW_BLOCKS_CHUNK - 1) // ROW_BLOCKS_CHUNK):
        lo, hi = c * ROW_BLOCKS_CHUNK, min(n, (c + 1) * ROW_BLOCKS_CHUNK)
        ptr = np.empty((n_blocks + 1, hi - lo), dtype=np.int64)
        for i in range(lo, hi):
            bad[i] = _row_pointers(indices, indptr[i], indptr[i + 1], ptr, i - lo, n_genes, block)
            for b in range(n_blocks):
                table[i, b] = ptr[b + 1, i - lo] - indptr[i]
    return bad.any()


@njit(parallel=True, cache=True)
def _take_tabled_rows(indptr, indices, data, rows, table):  # pragma: no cover - compiled
    n = rows.size
    n_blocks = table.shape[1]
    src = np.empty((n_blocks + 1, n), dtype=np.int64)  # each row's block starts in X, from its table row
    bad = np.zeros(n, dtype=np.bool_)
    for q in prange(n):
        first = indptr[rows[q]]
        src[0, q] = first
        for b in range(n_blocks):
            src[b + 1, q] = first + np.int64(table[rows[q], b])
            bad[q] |= src[b + 1, q] < src[b, q]
        bad[q] |= src[n_blocks, q] != indptr[rows[q] + 1]  # the table's row is not this matrix's
    if bad.any():
        return src[:-1], src[1:], indices[:0].copy(), data[:0].copy(), True
    starts, ends, out_ind, out_val = _block_major_copy(indices, data, src)
    return starts, ends, out_ind, out_val, False


@njit(parallel=True, cache=True)
def _row_major(starts, ends, indices, data):  # pragma: no cover - compiled
    n_blocks, n = starts.shape
    indptr = np.zeros(n + 1, dtype=np.int64)
    for i in range(n):
        size = 0
        for b in range(n_blocks):
            size += ends[b, i] - starts[b, i]
        indptr[i + 1] = indptr[i] + size
    out_ind = np.empty(indptr[n], dtype=indices.dtype)
    out_val = np.empty(indptr[n], dtype=data.dtype)
    for i in prange(n):
        at = indptr[i]
        for b in range(n_blocks):
            p, end = starts[b, i], ends[b, i]
            out_ind[at:at + end - p] = indices[p:end]
            out_val[at:at + end - p] = data[p:end]
            at += end - p
    return indptr, out_ind, out_val


@njit(parallel=True, cache=True)
def _gene_blocks(indptr, indices, data, block, n_blocks):  # pragma: no cover - compiled
    n = indptr.size - 1
    crow = np.zeros((n_blocks, n + 1), dtype=np.int32)
    bad = np.zeros(n, dtype=np.bool_)
    for i in prange(n):
        for p in range(indptr[i], indptr[i + 1]):
            b = indices[p] // block
            if indices[p] < 0 or b >= n_blocks:
                bad[i] = True
            else:
                crow[b, i + 1] += 1
    if bad.any():
        return crow, np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.float32)
    for b in prange(n_blocks):
        for i in range(n):
            crow[b, i + 1] += crow[b, i]
    base = np.zeros(n_blocks + 1, dtype=np.int64)
    for b in range(n_blocks):
        base[b + 1] = base[b] + crow[b, n]
    col = np.empty(base[n_blocks], dtype=np.int32)
    val = np.empty(base[n_blocks], dtype=np.float32)
    for i in prange(n):
        at = np.empty(n_blocks, dtype=np.int64)
        for b in range(n_blocks):
            at[b] = base[b] + crow[b, i]
        for p in range(indptr[i], indptr[i + 1]):
            b = indices[p] // block
            col[at[b]] = indices[p] - b * block
            val[at[b]] = data[p]
            at[b] += 1
    return crow, base, col, val


def _use_torch_threads() -> None:
    """numba's kernels take torch's number of threads. The first call starts numba's OpenMP
    threads, which sets the process's OpenMP thread count to numba's pool size (all the cores) and
    with it torch's: a torchrun rank given one thread then ran two in torch and numba alike (two
    ranks on two cores: K-means 2.4x slower); torch's count is put back."""
    threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def block_pointers(indptr: np.ndarray, indices: np.ndarray, n_genes: int, block: int = BLOCK_GENES) -> np.ndarray:
    """``(blocks + 1) x rows``: where each row's values of each gene block start in ``indices``
    (row ``i``'s values of block ``b`` are ``ptr[b, i]:ptr[b + 1, i]``). The column indices of each
    row must be sorted and within ``[0, n_genes)``; ValueError otherwise (the products would read
    outside the weight)."""
    _use_torch_threads()
    ptr, bad = _block_pointers(indptr, indices, int(n_genes), int(block))
    if bad:
        raise ValueError(f"a CSR batch needs sorted column indices within [0, {n_genes}) in every row")
    return ptr


def gene_blocks(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_cols: int, block: int):
    """A CSR's values cut into column blocks of ``block`` columns, each a CSR over all the rows:
    (row pointers ``blocks x (rows + 1)`` int32, where each block starts in ``col`` / ``val``,
    block-relative int32 columns, float32 values); within a block the values keep their order.
    ``indptr`` may be a slice of a larger CSR's (its first entry need not be 0)."""
    _use_torch_threads()
    n_blocks = (int(n_cols) + block - 1) // block
    crow, base, col, val = _gene_blocks(np.asarray(indptr, dtype=np.int64), indices, data, int(block), n_blocks)
    if len(base) == 0:
        raise ValueError(f"a CSR chunk has column indices outside [0, {n_cols})")
    return crow, base, col, val


def take_rows(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, rows: np.ndarray):
    """The CSR rows ``rows`` (in that order, in range), copied by the threads: (indptr int64,
    indices, data)."""
    rows = _rows_in_range(rows, len(indptr) - 1)
    _use_torch_threads()
    return _take_rows(indptr, indices, data, rows)


def row_blocks(indptr: np.ndarray, indices: np.ndarray, n_genes: int, block: int = BLOCK_GENES) -> np.ndarray:
    """``rows x blocks``: how many of each CSR row's values lie in gene blocks ``0..b`` (row ``i``'s
    values of block ``b`` are ``indptr[i] + table[i, b - 1]`` up to ``indptr[i] + table[i, b]``),
    uint16 where every row fits (2 bytes a row and block), uint32 otherwise. Built once for a matrix
    whose steps take many row copies, it spares each ``take_block_major_rows`` the scan of its rows'
    column indices. ValueError where a row's column indices are unsorted or outside ``[0, n_genes)``."""
    indptr = np.asarray(indptr, dtype=np.int64)
    n_blocks = (int(n_genes) + block - 1) // block
    widest = int(np.diff(indptr).max()) if len(indptr) > 1 else 0
    table = np.empty((len(indptr) - 1, n_blocks), dtype=np.uint16 if widest <= np.iinfo(np.uint16).max else np.uint32)
    _use_torch_threads()
    if _row_blocks(indptr, indices, int(n_genes), int(block), table):
        raise ValueError(f"a CSR matrix needs sorted column indices within [0, {n_genes}) in every row")
    return table


def take_block_major_rows(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, rows: np.ndarray,
                          n_genes: int, block: int = BLOCK_GENES, table: np.ndarray | None = None):
    """The CSR rows ``rows`` (in that order) copied gene block by gene block: all the rows' values
    of block 0, row after row, then of block 1, and so on; row ``q``'s values of block ``b`` are
    ``starts[b, q]:ends[b, q]``. Returns ``(starts, ends, indices, data)``. Both products then read
    each block's values as one stream (the row-major copy had the weight gradient's thread of a
    block fetch a short piece of every row, out of cache). ``table``: the matrix's ``row_blocks``
    for these ``n_genes`` and ``block``, when built (the copy is then one pass; a table of another
    matrix is refused where its rows' totals differ). ValueError where a row's column indices are
    unsorted or outside ``[0, n_genes)``, or the table is not the matrix's; IndexError for rows out
    of range."""
    rows = _rows_in_range(rows, len(indptr) - 1)
    _use_torch_threads()
    if table is not None:
        n_blocks = (int(n_genes) + block - 1) // block
        if table.shape != (len(indptr) - 1, n_blocks) or table.dtype not in (np.uint16, np.uint32):
            raise ValueError(f"a row_blocks table of {len(indptr) - 1} rows x {n_blocks} blocks (uint16 or uint32) "
                             f"was expected, not {table.shape} {table.dtype}")
        starts, ends, out_ind, out_val, bad = _take_tabled_rows(indptr, indices, data, rows, table)
        if bad:
            raise ValueError("the row_blocks table does not count these rows' values: it is another matrix's")
        return starts, ends, out_ind, out_val
    starts, ends, out_ind, out_val, bad = _take_block_major_rows(indptr, indices, data, rows, int(n_genes), int(block))
    if bad:
        raise ValueError(f"a CSR batch needs sorted column indices within [0, {n_genes}) in every row")
    return starts, ends, out_ind, out_val


def row_major(starts: np.ndarray, ends: np.ndarray, indices: np.ndarray, data: np.ndarray):
    """A batch's values in row order again (``indptr``, ``indices``, ``data``), wherever its
    blocks' pieces lie (``take_block_major_rows``'s layout or a CSR's own)."""
    _use_torch_threads()
    return _row_major(starts, ends, indices, data)


def _rows_in_range(rows, n_rows: int) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= n_rows):
        raise IndexError(f"rows outside a matrix of {n_rows} rows")
    return rows


def times_dense(starts: np.ndarray, ends: np.ndarray, indices: np.ndarray, data: np.ndarray, weight: np.ndarray,
                bias: np.ndarray) -> np.ndarray:
    """``X weight + bias`` (``cells x hid`` float32) for the batch whose row ``i``'s values of gene
    block ``b`` are ``indices/data[starts[b, i]:ends[b, i]]`` (a CSR's ``block_pointers`` ``ptr``:
    ``ptr[:-1], ptr[1:]``; or ``take_block_major_rows``'s)."""
    _use_torch_threads()
    return _times_dense(starts, ends, indices, data, weight, bias, FORWARD_ROWS)


def transposed_times(starts: np.ndarray, ends: np.ndarray, indices: np.ndarray, data: np.ndarray, grad: np.ndarray,
                     n_genes: int) -> np.ndarray:
    """``X^T grad`` (``n_genes x hid`` float32) for the batch ``(starts, ends, indices, data)`` (as
    ``times_dense``'s) whose blocks were cut for ``n_genes`` genes (each block's rows of the output
    are one thread's)."""
    _use_torch_threads()
    return _transposed_times(starts, ends, indices, data, grad, int(n_genes), GRADIENT_ROWS)


# --------------------------------------------------------------------------- K-means' cluster sums


@njit(parallel=True, cache=True)
def _cluster_sums(indptr, indices, data, labels, sums, n_parts):  # pragma: no cover - compiled
    # part t adds the rows of the clusters c with c % n_parts == t, in row order: each cluster's
    # sum is one thread's, in the same order whatever the number of threads
    for t in prange(n_parts):
        for r in range(labels.size):
            c = labels[r]
            if c % n_parts != t:
                continue
            for p in range(indptr[r], indptr[r + 1]):
                sums[c, indices[p]] += data[p]


@njit(parallel=True, cache=True)
def _move_rows(indptr, indices, data, rows, old, new, sums, n_parts):  # pragma: no cover - compiled
    for t in prange(n_parts):
        for q in range(rows.size):
            r, a, b = rows[q], old[q], new[q]
            if a % n_parts == t:
                for p in range(indptr[r], indptr[r + 1]):
                    sums[a, indices[p]] -= data[p]
            if b % n_parts == t:
                for p in range(indptr[r], indptr[r + 1]):
                    sums[b, indices[p]] += data[p]


@njit(parallel=True, cache=True)
def _row_norms(indptr, data):  # pragma: no cover - compiled
    n = indptr.size - 1
    out = np.empty(n, dtype=np.float32)
    for r in prange(n):
        s = np.float32(0.0)
        for p in range(indptr[r], indptr[r + 1]):
            s += data[p] * data[p]
        out[r] = s
    return out


# the clusters are split into this many parts, one thread's each: more parts than threads keeps the
# threads' shares even when a few clusters are large
CLUSTER_PARTS = 64


def cluster_sums(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, labels: np.ndarray,
                 sums: np.ndarray) -> None:
    """Add each CSR row ``r`` to row ``labels[r]`` of the float32 ``k x genes`` ``sums``, in place;
    each cluster's rows in row order (independent of threads)."""
    _use_torch_threads()
    _cluster_sums(indptr, indices, data, labels, sums, CLUSTER_PARTS)


def move_rows(indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, rows: np.ndarray, old: np.ndarray,
              new: np.ndarray, sums: np.ndarray) -> None:
    """Move CSR rows ``rows`` from the sums of clusters ``old`` to those of ``new`` (in place)."""
    _use_torch_threads()
    _move_rows(indptr, indices, data, rows, old, new, sums, CLUSTER_PARTS)


def row_norms(indptr: np.ndarray, data: np.ndarray) -> np.ndarray:
    """Each CSR row's squared norm (float32)."""
    _use_torch_threads()
    return _row_norms(indptr, data)
