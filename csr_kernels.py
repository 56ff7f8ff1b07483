"""The encoder's two sparse products on the CPU, ``X W`` and ``X^T G``, in gene blocks.

``X`` is a CSR batch of cells (~5 % non-zero), ``W`` the gene-major ``genes x hid`` weight and
``G`` a ``cells x hid`` gradient. A plain CSR x dense product reads one ``hid``-float row of ``W``
for every stored value, from all of ``W`` (17,000 x 200 floats, 13.6 MB: out of the core's cache);
the weight gradient through the batch's transpose needs that transpose built every step. Here
both products walk the batch's genes in blocks of ``BLOCK_GENES`` (a block of ``W``, or of the
gradient being summed, is 0.4 MB and stays in the core's L2 cache), from the batch's own CSR
arrays and one table of where each row's values of each block start (``block_pointers``, one
pass over the column indices): no transpose, no copy of the batch.

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


@njit(parallel=True, cache=True)
def _block_pointers(indptr, indices, n_genes, block):  # pragma: no cover - compiled
    n = indptr.size - 1
    n_blocks = (n_genes + block - 1) // block
    ptr = np.empty((n_blocks + 1, n), dtype=np.int64)
    bad = np.zeros(n, dtype=np.bool_)
    for i in prange(n):
        p, end = indptr[i], indptr[i + 1]
        ptr[0, i] = p
        last = -1
        for b in range(n_blocks):
            limit = min((b + 1) * block, n_genes)
            while p < end and indices[p] < limit:
                if indices[p] < last or indices[p] < 0:  # unsorted within the row, or negative
                    bad[i] = True
                last = indices[p]
                p += 1
            ptr[b + 1, i] = p
        if p != end:  # a column index at or past n_genes
            bad[i] = True
    return ptr, bad.any()


@njit(parallel=True, fastmath={"contract"}, cache=True)
def _times_dense(ptr, indices, data, weight, bias, rows):  # pragma: no cover - compiled
    n_blocks, n = ptr.shape[0] - 1, ptr.shape[1]
    hid = weight.shape[1]
    out = np.empty((n, hid), dtype=np.float32)
    for c in prange((n + rows - 1) // rows):
        lo, hi = c * rows, min(n, (c + 1) * rows)
        for i in range(lo, hi):
            out[i, :] = bias
        for b in range(n_blocks):
            for i in range(lo, hi):
                for p in range(ptr[b, i], ptr[b + 1, i]):
                    j, v = indices[p], data[p]
                    for k in range(hid):
                        out[i, k] += v * weight[j, k]
    return out


@njit(parallel=True, fastmath={"contract"}, cache=True)
def _transposed_times(ptr, indices, data, grad, n_genes, rows):  # pragma: no cover - compiled
    n_blocks, n = ptr.shape[0] - 1, ptr.shape[1]
    hid = grad.shape[1]
    out = np.zeros((n_genes, hid), dtype=np.float32)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        for b in prange(n_blocks):  # a block's genes are summed by one thread: no races
            for i in range(lo, hi):
                for p in range(ptr[b, i], ptr[b + 1, i]):
                    j, v = indices[p], data[p]
                    for k in range(hid):
                        out[j, k] += v * grad[i, k]
    return out


def _use_torch_threads() -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


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


def times_dense(ptr: np.ndarray, indices: np.ndarray, data: np.ndarray, weight: np.ndarray,
                bias: np.ndarray) -> np.ndarray:
    """``X weight + bias`` (``cells x hid`` float32) for the CSR batch ``(ptr, indices, data)``."""
    _use_torch_threads()
    return _times_dense(ptr, indices, data, weight, bias, FORWARD_ROWS)


def transposed_times(ptr: np.ndarray, indices: np.ndarray, data: np.ndarray, grad: np.ndarray,
                     n_genes: int) -> np.ndarray:
    """``X^T grad`` (``n_genes x hid`` float32) for the CSR batch ``(ptr, indices, data)`` whose
    block pointers were built for ``n_genes`` genes (each block's rows of the output are one
    thread's)."""
    _use_torch_threads()
    return _transposed_times(ptr, indices, data, grad, int(n_genes), GRADIENT_ROWS)
