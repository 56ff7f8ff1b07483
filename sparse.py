"""Sparse matrices and their products, in one place: CSR batches of cells on the host
(``HostCSR``, multiplied by ``csr_kernels``) and on a GPU (``SparseBatch``, torch CSR with its
transpose), a CSR matrix held on the device (``DeviceCSR``), K-means' gene-blocked chunks
(``GeneBlockedCSR``, ``RowChunks``), the classifier's training batches, CSR views and stacks,
and the one rule for when products are sparse (:func:`sparse_products`). Importing does nothing.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np
import scipy.sparse as sp
import torch

import csr_kernels


def sparse_products(batch_format: str, device) -> bool:
    """The one rule for whether a network multiplies CSR batches (only the non-zeros) or dense
    ones: ``--batch_format`` / ``--ft_batch_format`` ``sparse`` or ``dense``, or ``auto`` = CSR
    on a CPU (the gene-blocked kernels), dense on a GPU (a dense product beats torch's sparse one
    there)."""
    if batch_format not in ("auto", "sparse", "dense"):
        raise ValueError(f"unknown batch format '{batch_format}'; choose auto, sparse or dense")
    return batch_format == "sparse" or (batch_format == "auto" and torch.device(device).type != "cuda")


@contextmanager
def quiet_beta():
    """torch warns on every CSR tensor it builds (its sparse CSR support is in beta; its invariant
    checks are off by default); silenced in one place."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*beta.*")
        warnings.filterwarnings("ignore", message=".*[Ss]parse invariant checks.*")
        yield


# --------------------------------------------------------------------------- batches of cells


class SparseBatch(NamedTuple):
    """A batch of cells as a torch CSR tensor on a GPU, and the CSR of its transpose for the weight
    gradient (None for inference). On the CPU a batch is a ``HostCSR``."""

    x: torch.Tensor  # cells x genes
    x_t: torch.Tensor | None  # genes x cells


class HostCSR:
    """A CSR batch of cells as the encoder's input on the CPU: its column indices and values, and
    where each row's values of each gene block lie (row ``i``'s of block ``b`` are
    ``starts[b, i]:ends[b, i]``; ``csr_kernels``). The forward product and the weight gradient both
    read these: no transpose is built, and only the non-zeros are multiplied. ``HostCSR(X)`` keeps
    ``X``'s own arrays (its values in row order); ``of_rows`` copies the rows block by block."""

    def __init__(self, X: sp.csr_matrix):
        X = X if X.format == "csr" else X.tocsr()
        X = X if X.dtype == np.float32 else X.astype(np.float32)
        try:
            ptr = csr_kernels.block_pointers(X.indptr, X.indices, X.shape[1])
        except ValueError:  # unsorted column indices (out-of-range ones fail again below)
            X = X.sorted_indices()
            ptr = csr_kernels.block_pointers(X.indptr, X.indices, X.shape[1])
        self.shape, self.indices, self.data = X.shape, X.indices, X.data
        self.starts, self.ends, self.row_order = ptr[:-1], ptr[1:], True

    @classmethod
    def of_rows(cls, X: sp.csr_matrix, rows: np.ndarray, table: np.ndarray | None = None) -> "HostCSR":
        """The rows ``rows`` of the CSR matrix ``X`` (in that order) as a batch, copied gene block by
        gene block in two threaded passes, one finding each row's block starts and one copying
        (``csr_kernels.take_block_major_rows``): each block's values are then one stream for both
        products (a 30,500-cell step's forward and weight gradient 0.52 -> 0.34 s, the copy
        +0.05 s), with the same sums in the same order. ``table``: ``X``'s
        ``csr_kernels.row_blocks``, for a matrix that gives many batches (the first pass is then a
        look-up, ~25 ms less a 30,500-cell step)."""
        if X.format != "csr" or X.dtype != np.float32:
            return cls(take_rows(as_csr(X), rows))
        try:
            starts, ends, indices, data = csr_kernels.take_block_major_rows(X.indptr, X.indices, X.data, rows,
                                                                            X.shape[1], table=table)
        except ValueError:  # unsorted column indices (out-of-range ones fail again in the constructor)
            if table is not None:  # a table is only built for a matrix whose rows are sorted and in range
                raise
            return cls(take_rows(X, rows))
        out = cls.__new__(cls)
        out.shape, out.indices, out.data = (starts.shape[1], X.shape[1]), indices, data
        out.starts, out.ends, out.row_order = starts, ends, False
        return out

    def csr(self) -> sp.csr_matrix:
        """The batch as a scipy CSR matrix (sharing its arrays where they are in row order)."""
        if self.row_order and len(self.starts):
            indptr = np.append(self.starts[0], self.ends[-1, -1] if self.shape[0] else 0)
            indices, data = self.indices, self.data
        else:
            indptr, indices, data = csr_kernels.row_major(self.starts, self.ends, self.indices, self.data)
        return sp.csr_matrix((data, indices, indptr), shape=self.shape)

    def times(self, weight_t: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """``X weight_t + bias`` for the gene-major ``genes x hid`` float32 ``weight_t``."""
        return csr_kernels.times_dense(self.starts, self.ends, self.indices, self.data, weight_t, bias)

    def transposed_times(self, grad: np.ndarray) -> np.ndarray:
        """``X^T grad`` (``genes x hid``) for a ``cells x hid`` float32 ``grad``."""
        return csr_kernels.transposed_times(self.starts, self.ends, self.indices, self.data, grad, self.shape[1])

    def with_values(self, data: np.ndarray) -> "HostCSR":
        """The same cells and genes with other stored values (e.g. after dropout), in ``data``'s
        order."""
        out = HostCSR.__new__(HostCSR)
        out.shape, out.indices, out.starts, out.ends, out.row_order = (self.shape, self.indices, self.starts,
                                                                        self.ends, self.row_order)
        out.data = np.ascontiguousarray(data, dtype=np.float32)
        return out


def row_blocks(X: sp.csr_matrix) -> np.ndarray | None:
    """``X``'s table of each row's values per gene block (``csr_kernels.row_blocks``) for the batches
    ``HostCSR.of_rows`` copies from it; None where ``X`` is not a float32 CSR with sorted, in-range
    column indices (its batches then scan their rows, or are sorted first)."""
    if X.format != "csr" or X.dtype != np.float32:
        return None
    try:
        return csr_kernels.row_blocks(X.indptr, X.indices, X.shape[1])
    except ValueError:
        return None


SPARSE_INPUTS = (SparseBatch, HostCSR)  # the encoder's inputs that are not dense tensors


class _HostSparseLinear(torch.autograd.Function):
    """``x W^T + b`` for a ``HostCSR`` ``x`` and the gene-major ``W^T``: both products touch only
    the non-zeros (~5 % of a batch), gene block by gene block. No gradient flows to ``x`` (data)."""

    @staticmethod
    def forward(ctx, weight_t, bias, x: HostCSR):
        ctx.x = x
        return torch.from_numpy(x.times(weight_t.detach().numpy(), bias.detach().numpy()))

    @staticmethod
    def backward(ctx, grad):
        grad_w = None
        if ctx.needs_input_grad[0]:
            grad_w = torch.from_numpy(ctx.x.transposed_times(grad.detach().contiguous().numpy()))
        grad_b = grad.sum(0) if ctx.needs_input_grad[1] else None
        return grad_w, grad_b, None


class _SparseInputLinear(torch.autograd.Function):
    """``x W^T + b`` for a torch CSR ``x`` (a GPU's ``SparseBatch``) and the gene-major ``W^T``, the
    weight gradient from the CSR of ``x``'s transpose. No gradient flows to ``x`` (it is data)."""

    @staticmethod
    def forward(ctx, x, x_t, weight_t, bias):
        ctx.x_t = x_t
        return torch.sparse.mm(x, weight_t) + bias

    @staticmethod
    def backward(ctx, grad):
        grad_w = torch.sparse.mm(ctx.x_t, grad) if ctx.needs_input_grad[2] else None
        grad_b = grad.sum(0) if ctx.needs_input_grad[3] else None
        return None, None, grad_w, grad_b


def linear(x, weight_t: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x W^T + b`` for the gene-major ``weight_t`` (``genes x out``) and any input of a gene
    layer: a ``HostCSR`` (the CPU's gene-blocked kernels), a ``SparseBatch`` (torch CSR on a GPU)
    or a dense tensor."""
    if isinstance(x, HostCSR):
        if weight_t.device.type != "cpu" or weight_t.dtype != torch.float32:
            raise TypeError(f"a HostCSR batch needs a float32 layer on the CPU, not {weight_t.dtype} "
                            f"on {weight_t.device}")
        return _HostSparseLinear.apply(weight_t, bias, x)
    if isinstance(x, SparseBatch):
        return _SparseInputLinear.apply(x.x, x.x_t, weight_t, bias)
    return torch.nn.functional.linear(x, weight_t.t(), bias)


def inference_input(X: sp.csr_matrix, device) -> SparseBatch | HostCSR:
    """A CSR block as an encoder input for inference (no transpose: no gradient is needed); only
    its non-zeros are multiplied."""
    device = torch.device(device)
    return HostCSR(X) if device.type == "cpu" else device_sparse_batch(X, device, transposed=False)


def device_sparse_batch(X: sp.csr_matrix, device: torch.device, transposed: bool = True) -> SparseBatch:
    """A host CSR batch on a GPU, with the CSR of its transpose made there when ``transposed``
    (for training)."""
    x = torch_csr(X if X.dtype == np.float32 else X.astype(np.float32), device)
    return with_transpose(x) if transposed else SparseBatch(x, None)


def with_transpose(x: torch.Tensor) -> SparseBatch:
    """A torch CSR batch with the CSR of its transpose (made where ``x`` is)."""
    with quiet_beta():
        csc = x.to_sparse_csc()
        x_t = torch.sparse_csr_tensor(csc.ccol_indices(), csc.row_indices(), csc.values(), size=x.shape[::-1])
    return SparseBatch(x, x_t)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device: pinned and copied without blocking on a GPU, as it is on the CPU."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def torch_csr(X: sp.csr_matrix, device: torch.device) -> torch.Tensor:
    """A scipy CSR matrix as a torch sparse CSR tensor (zero-copy on the CPU)."""
    with quiet_beta():
        return torch.sparse_csr_tensor(to_device(torch.from_numpy(X.indptr), device),
                                       to_device(torch.from_numpy(X.indices), device),
                                       to_device(torch.from_numpy(X.data), device), size=X.shape)


class DeviceCSR:
    """A CSR matrix held on the device, whose batches of rows are gathered there: no step copies
    cells from the host, and no step waits for the device (row lengths come from a host copy of
    the row pointers, so every output size is known in advance)."""

    def __init__(self, X: sp.csr_matrix, device: torch.device):
        self.device, self.shape = torch.device(device), X.shape
        self.host_indptr = np.asarray(X.indptr, dtype=np.int64)
        self.indptr = torch.from_numpy(self.host_indptr).to(self.device)
        self.indices = torch.from_numpy(X.indices).to(self.device)
        self.data = torch.from_numpy(np.asarray(X.data, dtype=np.float32)).to(self.device)

    @staticmethod
    def fits(X: sp.csr_matrix, device: torch.device, share: float = 0.5) -> bool:
        """Whether the matrix takes at most ``share`` of the GPU's free memory (False off a GPU)."""
        device = torch.device(device)
        if device.type != "cuda":
            return False
        free, _ = torch.cuda.mem_get_info(device)
        needed = X.data.size * 4 + X.indices.nbytes + X.indptr.size * 8
        return needed <= share * free

    def gather(self, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The rows, in the given order: (row pointers, each value's row, column indices, values)."""
        rows = np.asarray(rows, dtype=np.int64)
        lengths = self.host_indptr[rows + 1] - self.host_indptr[rows]
        crow = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=crow[1:])
        total = int(crow[-1])
        on = lambda a: to_device(torch.from_numpy(a), self.device)  # noqa: E731
        lengths_d, crow_d = on(lengths), on(crow)
        starts = self.indptr[on(rows)]
        row_of_value = torch.repeat_interleave(torch.arange(len(rows), device=self.device), lengths_d,
                                               output_size=total)
        at = (starts - crow_d[:-1])[row_of_value] + torch.arange(total, device=self.device)
        return crow_d, row_of_value, self.indices[at], self.data[at]

    def take(self, rows: np.ndarray) -> "DeviceCSR":
        """The rows as a new ``DeviceCSR`` on the same device."""
        out = DeviceCSR.__new__(DeviceCSR)
        out.device, out.shape = self.device, (len(rows), self.shape[1])
        if self.device.type == "cpu":  # the threads copy the rows' values (no per-value index)
            crow, col, val = csr_kernels.take_rows(self.host_indptr, self.indices.numpy(), self.data.numpy(), rows)
            out.host_indptr = crow
            out.indptr, out.indices, out.data = torch.from_numpy(crow), torch.from_numpy(col), torch.from_numpy(val)
            return out
        crow, _, col, val = self.gather(rows)
        out.host_indptr = crow.cpu().numpy()
        out.indptr, out.indices, out.data = crow, col, val
        return out

    def dense(self, rows: np.ndarray) -> torch.Tensor:
        """The rows as a dense float32 tensor on the device."""
        _, row_of_value, col, val = self.gather(rows)
        out = torch.zeros(len(rows), self.shape[1], device=self.device)
        out[row_of_value, col.long()] = val
        return out

    def sparse(self, rows: np.ndarray, transposed: bool = True) -> SparseBatch:
        """The rows as a ``SparseBatch`` (with the CSR of its transpose when ``transposed``)."""
        crow, _, col, val = self.gather(rows)
        size = (len(rows), self.shape[1])
        with quiet_beta():
            x = torch.sparse_csr_tensor(crow, col.to(crow.dtype), val, size=size)
        return with_transpose(x) if transposed else SparseBatch(x, None)


def dense_batch(features, rows: np.ndarray) -> torch.Tensor:
    """Rows of a feature matrix (CSR, or dense numpy for PCA inputs) as a float32 tensor."""
    if sp.issparse(features):
        return torch.from_numpy(dense_rows(features, rows))
    return torch.from_numpy(np.ascontiguousarray(features[rows], dtype=np.float32))


def inference_batch(features, rows: np.ndarray, device) -> torch.Tensor | HostCSR:
    """Rows of a feature matrix as a network's input for inference on ``device``: a ``HostCSR``
    for CSR features on the CPU (only the non-zeros are multiplied), else a dense batch there."""
    device = torch.device(device)
    if sp.issparse(features) and device.type == "cpu":
        return HostCSR.of_rows(features, rows)
    return dense_batch(features, rows).to(device, non_blocking=True)


# --------------------------------------------------------------------------- K-means' chunks


GENE_BLOCK = 2048  # genes per column block of a CSR chunk: a block of the centroids then fits in L2
CENTROID_BLOCK = 128  # centroids per block of the product's output (MKL's products)
# a right-hand side at least this wide is multiplied by csr_kernels' gene-blocked kernel, in column
# blocks of at most WIDE_BLOCK; narrower ones by MKL's CSR products (see GeneBlockedCSR)
WIDE_COLUMNS = 64
WIDE_BLOCK = 256


class WideRight(NamedTuple):
    """A dense (genes x m) right-hand side as contiguous numpy column blocks (``csr_kernels``' form)."""
    blocks: list[np.ndarray]
    width: int


class GeneBlockedCSR:
    """A CSR chunk multiplied by dense right-hand sides (K-means' cells x centroids products) in
    blocks that stay in cache, by one of two products chosen by the right-hand side's width:

    - at least ``WIDE_COLUMNS`` columns: ``csr_kernels.times_dense`` on the chunk's own arrays
      (its rows' gene-block pointers built once, no copy of the values), a column block of at most
      ``WIDE_BLOCK`` at a time. On a 2.6 GHz Zen 4, 8,192 cells x 15,663 genes at 5 %: 1.2-1.6x
      faster than MKL's for 100-1,607 columns (bench/README.md);
    - narrower (the pruned passes' few moved centroids): MKL's CSR x dense products, the chunk cut
      into column blocks of ``GENE_BLOCK`` genes (each a CSR over all its rows, built on first use)
      times blocks of ``CENTROID_BLOCK`` columns; there the kernel's per-value cost dominates (0.25x
      MKL's at 10 columns).

    Where one CSR x (genes x k) product streams all of the right-hand side from memory for every
    stored value, both read blocks of it that stay in cache (MKL's blocks measured 5.8x faster on
    8,192 cells x 17,000 genes at 5 % and k = 3,215 on a 2-core Xeon)."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray, n_cols: int):
        """A CSR chunk (``indptr`` may be a slice of a larger matrix's, ``indices`` and ``data`` that
        matrix's arrays, held, not copied)."""
        self.shape = (len(indptr) - 1, n_cols)
        self.edges = list(range(0, n_cols, GENE_BLOCK)) + [n_cols]
        self._arrays = (np.asarray(indptr, dtype=np.int64), indices, data)
        self._ptr = None
        self._parts = None

    @property
    def parts(self) -> list[torch.Tensor]:
        """The chunk's values copied once into column blocks of ``GENE_BLOCK`` genes
        (``csr_kernels.gene_blocks``), torch CSR tensors for MKL's products."""
        if self._parts is None:
            indptr, indices, data = self._arrays
            n_rows, n_cols = self.shape
            crow, base, col, val = csr_kernels.gene_blocks(indptr, indices, data, n_cols, GENE_BLOCK)
            parts = []
            with quiet_beta():
                for b in range(len(self.edges) - 1):
                    # int32 indices (a chunk holds < 2**31 values): 8 bytes a value kept, and MKL takes them as they are
                    lo, hi = int(base[b]), int(base[b + 1])
                    parts.append(torch.sparse_csr_tensor(torch.from_numpy(crow[b]), torch.from_numpy(col[lo:hi]),
                                                         torch.from_numpy(val[lo:hi]),
                                                         size=(n_rows, self.edges[b + 1] - self.edges[b])))
            self._parts = parts
        return self._parts

    @staticmethod
    def prepare(right: torch.Tensor) -> "list[list[torch.Tensor]] | WideRight":
        """A dense (genes x m) right-hand side in the form its product takes: ``WideRight`` from
        ``WIDE_COLUMNS`` columns on, else contiguous blocks [column block][gene block]."""
        m = right.shape[1]
        if m >= WIDE_COLUMNS:
            n_blocks = -(-m // WIDE_BLOCK)
            step = -(-m // (16 * n_blocks)) * 16  # even blocks of whole vectors: 402 columns as 208 + 194
            host = right.detach().cpu().numpy()
            return WideRight([np.ascontiguousarray(host[:, c:c + step], dtype=np.float32)
                              for c in range(0, m, step)], m)
        edges = list(range(0, right.shape[0], GENE_BLOCK)) + [right.shape[0]]
        return [[right[a:b, c:c + CENTROID_BLOCK].contiguous() for a, b in zip(edges[:-1], edges[1:])]
                for c in range(0, right.shape[1], CENTROID_BLOCK)]

    def times(self, prepared: "list[list[torch.Tensor]] | WideRight") -> torch.Tensor:
        """This chunk times the right-hand side ``prepare`` made: (rows x m)."""
        if isinstance(prepared, WideRight):
            return self._wide(prepared)
        if len(prepared) == 1:
            return self._column_block(prepared[0])
        out = torch.empty(self.shape[0], sum(block[0].shape[1] for block in prepared))
        at = 0
        for column_block in prepared:  # each block written into the output (no list of them to concatenate)
            acc = self._column_block(column_block)
            out[:, at:at + acc.shape[1]] = acc
            at += acc.shape[1]
        return out

    def _wide(self, right: WideRight) -> torch.Tensor:
        indptr, indices, data = self._arrays
        if self._ptr is None:
            self._ptr = csr_kernels.block_pointers(indptr, indices, self.shape[1])
        if len(right.blocks) == 1:
            block = right.blocks[0]
            return torch.from_numpy(csr_kernels.times_dense(self._ptr[:-1], self._ptr[1:], indices, data, block,
                                                            np.zeros(block.shape[1], dtype=np.float32)))
        out = np.empty((self.shape[0], right.width), dtype=np.float32)
        at = 0
        for block in right.blocks:
            width = block.shape[1]
            out[:, at:at + width] = csr_kernels.times_dense(self._ptr[:-1], self._ptr[1:], indices, data, block,
                                                            np.zeros(width, dtype=np.float32))
            at += width
        return torch.from_numpy(out)

    def _column_block(self, column_block: list[torch.Tensor]) -> torch.Tensor:
        parts = self.parts
        acc = torch.sparse.mm(parts[0], column_block[0])
        for part, right in zip(parts[1:], column_block[1:]):
            acc.addmm_(part, right)  # in place: no (rows x CENTROID_BLOCK) product allocated per block
        return acc

    def to_dense(self) -> torch.Tensor:
        return torch.cat([p.to_dense() for p in self.parts], 1)


class RowChunks:
    """Uniform chunk access to a CSR (sparse path) or dense numpy matrix (dense path).

    A CSR matrix is held on the GPU when it is the device and has room for it (so iterations copy
    nothing), else on the host. On a GPU each chunk is densified there for the products (a dense
    product beats the sparse one by far there); on a CPU they multiply only the non-zeros.
    """

    def __init__(self, X, device: torch.device, store: DeviceCSR | None = None, cache: bool = False):
        self.sparse = store is not None or sp.issparse(X)
        self.device = device
        # CPU: each chunk's gene-blocked copy, kept for the next pass when ``cache`` (Lloyd's
        # iterations reread every chunk; the copies together are one copy of the matrix)
        self.cache = {} if cache else None
        self._norms = None
        if self.sparse:
            if store is None:
                X = as_csr(X)
                store = DeviceCSR(X, device if DeviceCSR.fits(X, device) else torch.device("cpu"))
            self.store = store
            self.dense_products = device.type == "cuda"
            self.n_rows, self.n_cols = store.shape
        else:
            self.dense = torch.from_numpy(np.ascontiguousarray(X, dtype=np.float32))
            self.n_rows, self.n_cols = X.shape

    def chunk(self, start: int, stop: int):
        """Rows ``start:stop`` in the form ``times`` multiplies (kept when the rows cache chunks)."""
        if not self.sparse:
            return self.dense[start:stop].to(self.device, non_blocking=True)
        if self.cache is not None and (start, stop) in self.cache:
            return self.cache[(start, stop)]
        if self.dense_products:
            row_of_value, col, val = self.values(start, stop)
            block = torch.zeros(stop - start, self.n_cols, device=self.device)
            block[row_of_value, col.long()] = val
            return block
        store = self.store
        block = GeneBlockedCSR(store.host_indptr[start:stop + 1], store.indices.numpy(), store.data.numpy(), self.n_cols)
        if self.cache is not None:
            self.cache[(start, stop)] = block
        return block

    def values(self, start: int, stop: int):
        """Sparse rows ``start:stop`` as (row within the chunk, column, value) of each stored value."""
        store = self.store
        lo, hi = int(store.host_indptr[start]), int(store.host_indptr[stop])
        col = store.indices[lo:hi].to(self.device, non_blocking=True)
        val = store.data[lo:hi].to(self.device, non_blocking=True)
        lengths = torch.from_numpy(np.diff(store.host_indptr[start:stop + 1])).to(self.device, non_blocking=True)
        row_of_value = torch.repeat_interleave(torch.arange(stop - start, device=self.device), lengths,
                                               output_size=hi - lo)
        return row_of_value, col, val

    def host_arrays(self):
        """The CSR's (indptr, indices, data) as numpy arrays when it and the products are on the host
        (the K-means kernels of ``csr_kernels`` read them as they are), else None."""
        if not self.sparse or self.device.type != "cpu" or self.store.device.type != "cpu":
            return None
        return self.store.host_indptr, self.store.indices.numpy(), self.store.data.numpy()

    def norms(self, chunk_rows: int = 8192) -> torch.Tensor:
        """Squared norm of every row (computed once, a chunk at a time)."""
        if self._norms is None:
            host = self.host_arrays()
            if host is not None:
                self._norms = torch.from_numpy(csr_kernels.row_norms(host[0], host[2]))
            elif not self.sparse:
                self._norms = (self.dense * self.dense).sum(1).to(self.device)
            else:
                self._norms = torch.zeros(self.n_rows, device=self.device)
                for start in range(0, self.n_rows, chunk_rows):
                    stop = min(start + chunk_rows, self.n_rows)
                    row_of_value, _, val = self.values(start, stop)
                    self._norms[start:stop].index_add_(0, row_of_value, val * val)
        return self._norms

    def prepare_product(self, right: torch.Tensor):
        """A dense (genes x m) right-hand side in the form ``times`` takes, once per pass."""
        if self.sparse and not self.dense_products:
            return GeneBlockedCSR.prepare(right)
        return right

    @staticmethod
    def times(block, prepared) -> torch.Tensor:
        """A chunk from ``chunk`` times a right-hand side from ``prepare_product``."""
        return block.times(prepared) if isinstance(block, GeneBlockedCSR) else block @ prepared

    def rows_dense(self, rows) -> torch.Tensor:
        """The given rows, in the given order, as a dense tensor on the device."""
        rows = np.asarray(rows, dtype=np.int64)
        if not self.sparse:
            return self.dense[torch.as_tensor(rows)].to(self.device)
        return self.store.dense(rows).to(self.device)

    def subset(self, rows: np.ndarray, cache: bool = False) -> "RowChunks":
        """A new _Rows over the given rows (sparse stays sparse)."""
        if not self.sparse:
            return RowChunks(self.dense[torch.as_tensor(rows)].numpy(), self.device)
        return RowChunks(None, self.device, store=self.store.take(rows), cache=cache)




# --------------------------------------------------------------------------- the classifier's training batches


def training_rows(X: sp.csr_matrix, device: torch.device):
    """A CSR batch as training input: a ``HostCSR`` on the CPU, its CSR and transpose on a GPU."""
    return HostTrainingCSR(X) if device.type == "cpu" else DeviceTrainingCSR(X, device)


class HostTrainingCSR:
    """A CSR batch on the CPU (``HostCSR``: the sparse products need no transpose); dropout acts
    on its stored values."""

    def __init__(self, X: sp.csr_matrix):
        self.x = HostCSR(X)
        self.values = torch.from_numpy(self.x.data)

    def inference(self) -> HostCSR:
        return self.x

    def batch(self, dropout: float = 0.0) -> HostCSR:
        if not dropout:
            return self.x
        return self.x.with_values(torch.nn.functional.dropout(self.values, dropout, training=True).numpy())


class DeviceTrainingCSR:
    """A CSR batch and the CSR of its transpose on the device, with where each of the transpose's
    values sits in the batch's (so that dropout on the values reaches both alike)."""

    def __init__(self, X: sp.csr_matrix, device: torch.device):
        order = sp.csr_matrix((np.arange(X.nnz, dtype=np.int64), X.indices, X.indptr), shape=X.shape)
        order_t = order.T.tocsr()
        self.x = torch_csr(X, device)
        self.values = self.x.values()
        self.to_t = torch.from_numpy(order_t.data).to(device)
        self.x_t = torch_csr(sp.csr_matrix((X.data[order_t.data], order_t.indices, order_t.indptr),
                                           shape=order_t.shape), device)

    def inference(self) -> SparseBatch:
        return SparseBatch(self.x, None)

    def batch(self, dropout: float = 0.0) -> SparseBatch:
        if not dropout:
            return SparseBatch(self.x, self.x_t)
        values = torch.nn.functional.dropout(self.values, dropout, training=True)
        return SparseBatch(_with_values(self.x, values), _with_values(self.x_t, values[self.to_t]))


def _with_values(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A CSR tensor with ``x``'s structure and these values."""
    with quiet_beta():
        return torch.sparse_csr_tensor(x.crow_indices(), x.col_indices(), values, size=x.shape)


# --------------------------------------------------------------------------- CSR views and stacks


def dense_rows(features: sp.csr_matrix, rows: np.ndarray | None = None) -> np.ndarray:
    """The chosen rows (all when ``rows`` is None) as a dense float32 array, values unchanged."""
    sub = features[rows] if rows is not None else features
    return sub.toarray().astype(np.float32, copy=False)


def row_block(X: sp.csr_matrix, start: int, stop: int) -> sp.csr_matrix:
    """Rows ``start:stop`` of a CSR matrix as a CSR that shares its arrays (no copy of the values)."""
    lo, hi = int(X.indptr[start]), int(X.indptr[stop])
    return csr_sharing(X.data[lo:hi], X.indices[lo:hi], X.indptr[start:stop + 1] - lo, (stop - start, X.shape[1]))


def take_rows(X: sp.csr_matrix, rows: np.ndarray) -> sp.csr_matrix:
    """Rows of a CSR matrix in the given order, copied by the threads (scipy's row indexing is one
    thread's: 2.9 s of a 31 s pre-training epoch of 914,763 cells)."""
    indptr, indices, data = csr_kernels.take_rows(X.indptr, X.indices, X.data, rows)
    if indptr[-1] < 2**31 and indices.dtype == np.int32:
        indptr = indptr.astype(np.int32)  # scipy's kernels take one index type
    return csr_sharing(data, indices, indptr, (len(rows), X.shape[1]))


def as_csr(X) -> sp.csr_matrix:
    """A CSR matrix of ``X`` whose arrays are ``X``'s own where they can be (int32 column indices
    where they fit). Not ``sp.csr_matrix(X)``: scipy copies arrays that are views of much larger
    ones (``prune``), and a dataset's rows in the stacked collection are such a view (K-means held
    a second copy of its largest dataset: 503 MB of a rank's peak)."""
    if not (sp.issparse(X) and X.format == "csr"):
        X = sp.csr_matrix(X)
    indices = X.indices
    if indices.dtype != np.int32 and X.nnz < 2**31 and X.shape[1] < 2**31:
        indices = indices.astype(np.int32)
    out = csr_sharing(X.data, indices, X.indptr, X.shape)
    if not out.has_sorted_indices:  # csr_kernels' products need each row's columns sorted
        out = out.sorted_indices()  # a copy: the caller's matrix keeps its order
    return out


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
