"""Networks of scPretrain and their self-describing checkpoints. Torch, with the CPU's sparse products in
``csr_kernels``; importing does nothing."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Sequence
import warnings

import numpy as np
import scipy.sparse as sp
import torch
from torch import nn
from torch.nn import functional as F

import csr_kernels
import data
from data import atomic_write

CHECKPOINT_KIND = "scpretrain-encoder"
CLASSIFIER_KIND = "scpretrain-classifier"
RESUME_KIND = "scpretrain-resume"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or of the wrong kind."""


@dataclass
class ModelConfig:
    n_genes: int
    hid: int = 200
    sigmoid_logits: bool = True  # scPretrain: heads' sigmoid(logits) go into cross-entropy


class SparseBatch(NamedTuple):
    """A batch of cells as a torch CSR tensor on a GPU, and the CSR of its transpose for the weight
    gradient (None for inference). On the CPU a batch is a ``HostCSR``."""

    x: torch.Tensor  # cells x genes
    x_t: torch.Tensor | None  # genes x cells


class HostCSR:
    """A CSR batch of cells as the encoder's input on the CPU: the batch's own column indices and
    values (not copied) and where each row's values of each gene block start
    (``csr_kernels.block_pointers``). The forward product and the weight gradient both read these
    (``csr_kernels``): no transpose is built, and only the non-zeros are multiplied."""

    def __init__(self, X: sp.csr_matrix):
        X = X if X.format == "csr" else X.tocsr()
        X = X if X.dtype == np.float32 else X.astype(np.float32)
        try:
            ptr = csr_kernels.block_pointers(X.indptr, X.indices, X.shape[1])
        except ValueError:  # unsorted column indices (out-of-range ones fail again below)
            X = X.sorted_indices()
            ptr = csr_kernels.block_pointers(X.indptr, X.indices, X.shape[1])
        self.shape, self.indices, self.data, self.ptr = X.shape, X.indices, X.data, ptr

    def csr(self) -> sp.csr_matrix:
        """The batch as a scipy CSR matrix (sharing its arrays)."""
        indptr = np.append(self.ptr[0], self.ptr[-1, -1] if self.shape[0] else 0)
        return sp.csr_matrix((self.data, self.indices, indptr), shape=self.shape)

    def times(self, weight_t: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """``X weight_t + bias`` for the gene-major ``genes x hid`` float32 ``weight_t``."""
        return csr_kernels.times_dense(self.ptr, self.indices, self.data, weight_t, bias)

    def transposed_times(self, grad: np.ndarray) -> np.ndarray:
        """``X^T grad`` (``genes x hid``) for a ``cells x hid`` float32 ``grad``."""
        return csr_kernels.transposed_times(self.ptr, self.indices, self.data, grad, self.shape[1])

    def with_values(self, data: np.ndarray) -> "HostCSR":
        """The same cells and genes with other stored values (e.g. after dropout)."""
        out = HostCSR.__new__(HostCSR)
        out.shape, out.indices, out.ptr = self.shape, self.indices, self.ptr
        out.data = np.ascontiguousarray(data, dtype=np.float32)
        return out


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


class GeneLinear(nn.Module):
    """``nn.Linear(G, hid)`` with its weight stored gene-major, as the contiguous ``G x hid``
    parameter ``weight_t``: the sparse products read it and write its gradient with no
    transpose copies, and Adam's fused kernel takes it as it is. ``weight`` is the usual
    ``hid x G`` view, and state dicts hold ``weight`` and ``bias`` as ``nn.Linear``'s do.
    Initialised exactly as ``nn.Linear`` (same draws)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        init = nn.Linear(in_features, out_features)
        self.in_features, self.out_features = in_features, out_features
        self.weight_t = nn.Parameter(init.weight.detach().t().contiguous())
        self.bias = nn.Parameter(init.bias.detach().clone())

    @classmethod
    def of(cls, weight_t: torch.Tensor, bias: torch.Tensor) -> "GeneLinear":
        """The layer with these weights (gene-major) and bias; draws nothing."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = weight_t.shape
        layer.weight_t, layer.bias = nn.Parameter(weight_t.contiguous()), nn.Parameter(bias.clone())
        return layer

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_t.t()

    def forward(self, x: torch.Tensor | SparseBatch | HostCSR) -> torch.Tensor:
        if isinstance(x, HostCSR):
            if self.weight_t.device.type != "cpu" or self.weight_t.dtype != torch.float32:
                raise TypeError(f"a HostCSR batch needs a float32 layer on the CPU, not {self.weight_t.dtype} "
                                f"on {self.weight_t.device}")
            return _HostSparseLinear.apply(self.weight_t, self.bias, x)
        if isinstance(x, SparseBatch):
            return _SparseInputLinear.apply(x.x, x.x_t, self.weight_t, self.bias)
        return F.linear(x, self.weight, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = (self.weight_t if keep_vars else self.weight_t.detach()).t()
        destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "weight" in state_dict:  # load_state_dict passes its own copy of the dict
            state_dict[prefix + "weight_t"] = state_dict.pop(prefix + "weight").t()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class Encoder(nn.Module):
    """One ``Linear(G, hid)``; a cell's representation is ``sigmoid(encoder(x))``.

    ``x`` is a dense ``cells x genes`` tensor, a ``HostCSR`` (CPU) or a ``SparseBatch`` (GPU); all
    give the same function.
    """

    def __init__(self, n_genes: int, hid: int = 200, linear: GeneLinear | None = None):
        super().__init__()
        self.linear = linear if linear is not None else GeneLinear(n_genes, hid)

    def forward(self, x: torch.Tensor | SparseBatch | HostCSR) -> torch.Tensor:
        return torch.sigmoid(self.linear(x))


class PretrainModel(nn.Module):
    """The shared encoder plus, per dataset, one ``Linear(hid, k)`` head per K-means granularity.

    A dataset's heads are stored side by side as one ``Linear(hid, k1 + k2 + k3)``: the same
    functions and the same initial distribution (``nn.Linear`` draws from +-1/sqrt(hid) whatever
    the number of outputs) as separate heads, but one matrix product and one optimiser tensor
    per dataset instead of one per granularity, which is most of a step's cost when 60
    datasets each bring three small heads.
    """

    def __init__(self, cfg: ModelConfig, cluster_counts: Sequence[Sequence[int]], encoder: Encoder | None = None):
        super().__init__()
        self.cfg = cfg
        self.cluster_counts = [[int(k) for k in counts] for counts in cluster_counts]
        self.encoder = encoder if encoder is not None else Encoder(cfg.n_genes, cfg.hid)
        self.heads = nn.ModuleList(nn.Linear(cfg.hid, sum(counts)) for counts in self.cluster_counts)
        for d, counts in enumerate(self.cluster_counts):
            # segments[j, g] = 1 when output j belongs to granularity g: sums exp over each head
            self.register_buffer(f"segments_{d}", segment_matrix(counts), persistent=False)

    def logits(self, z: torch.Tensor, dataset_index: int) -> list[torch.Tensor]:
        """Each granularity's logits for representations ``z`` of one dataset's cells."""
        return list(torch.split(self.heads[dataset_index](z), self.cluster_counts[dataset_index], dim=1))

    def forward(self, x: torch.Tensor, dataset_index: int) -> list[torch.Tensor]:
        return self.logits(self.encoder(x), dataset_index)

    def summed_loss(self, z: torch.Tensor, dataset_index: int, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy summed over cells and granularities; ``targets`` is ``cells x granularities``
        of column indices into the side-by-side heads (``offset_targets``)."""
        out = self.heads[dataset_index](z)
        if not self.cfg.sigmoid_logits:
            return sum(F.cross_entropy(lg, t - o, reduction="sum") for lg, t, o in
                       zip(torch.split(out, self.cluster_counts[dataset_index], dim=1), targets.t(),
                           head_offsets(self.cluster_counts[dataset_index])))
        # scPretrain: sigmoid(logits) go into cross-entropy. They lie in (0, 1), so each head's
        # log-sum-exp needs no max shift: log(sum_j exp(s_j)) - s_target, all heads at once.
        s = torch.sigmoid(out)
        log_norm = torch.log(torch.exp(s) @ getattr(self, f"segments_{dataset_index}"))
        return (log_norm - s.gather(1, targets)).sum()


def head_offsets(counts: Sequence[int]) -> list[int]:
    """First column of each granularity's head in the side-by-side layout."""
    return [int(o) for o in np.concatenate([[0], np.cumsum(counts)[:-1]])]


def segment_matrix(counts: Sequence[int]) -> torch.Tensor:
    seg = torch.zeros(int(sum(counts)), len(counts))
    for g, (o, k) in enumerate(zip(head_offsets(counts), counts)):
        seg[o:o + k, g] = 1.0
    return seg


def offset_targets(labels: Sequence[np.ndarray], counts: Sequence[int]) -> np.ndarray:
    """One dataset's pseudo-labels as ``cells x granularities`` columns of the side-by-side heads."""
    cols = [np.asarray(lab, dtype=np.int64) + o for lab, o in zip(labels, head_offsets(counts))]
    return np.stack(cols, axis=1)


LINEAR_BASE_MODES = ("residual", "blend")


class Classifier(nn.Module):
    """``sigmoid(encoder(x)) -> Linear(hid, hid/2) -> sigmoid -> Linear(hid/2, classes)``, and
    optionally a fixed linear model of the genes (``linear_base``, ``--ft_linear_base``) that the
    network's output is combined with: ``residual``, the network's logits added to the base's
    (the network learns a correction of it); ``blend``, the mixture of their log-probabilities
    ``(1 - s) log p_network + s log p_base`` with the share ``s`` (``base_share``) chosen on
    validation cells.

    scPretrain: the classifier's architecture (without the linear base).
    """

    def __init__(self, n_genes: int, n_classes: int, hid: int = 200, dropout: float = 0.0,
                 linear_base: str | None = None):
        super().__init__()
        self.encoder = Encoder(n_genes, hid)
        self.hidden = nn.Linear(hid, hid // 2)
        self.out = nn.Linear(hid // 2, n_classes)
        self.dropout = float(dropout)  # while training, on the input, z and the hidden layer (0: none)
        self.base, self.base_mode = None, None
        if linear_base is not None:
            self.set_base(GeneLinear(n_genes, n_classes), linear_base)

    def set_base(self, base: "GeneLinear", mode: str, share: float = 1.0) -> None:
        """Give the classifier a fixed linear base (never trained here) combined as ``mode``."""
        if mode not in LINEAR_BASE_MODES:
            raise ValueError(f"linear base mode {mode!r} is not one of {LINEAR_BASE_MODES}")
        self.base, self.base_mode = base.requires_grad_(False), mode
        self.register_buffer("base_share", torch.tensor(float(share), device=base.weight_t.device))

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, training=True) if self.dropout and self.training else x

    def classify(self, z: torch.Tensor) -> torch.Tensor:
        """The network's class logits of representations ``z = encoder(x)`` (without the base)."""
        return self.out(self._drop(torch.sigmoid(self.hidden(self._drop(z)))))

    def network(self, x: torch.Tensor | SparseBatch | HostCSR) -> torch.Tensor:
        """The network's logits; a dense ``x`` gets input dropout here while training (a sparse
        batch gets it on its stored values when it is made)."""
        x = x if isinstance(x, SPARSE_INPUTS) else self._drop(x)
        return self.classify(self.encoder(x))

    def base_logits(self, x: torch.Tensor | SparseBatch | HostCSR) -> torch.Tensor | None:
        """The linear base's logits of ``x`` (None without a base)."""
        return None if self.base is None else self.base(x)

    def combine(self, network_logits: torch.Tensor, base_logits: torch.Tensor | None) -> torch.Tensor:
        """The classifier's logits from the network's and the base's (see the class)."""
        if self.base is None:
            return network_logits
        if self.base_mode == "residual":
            return network_logits + base_logits
        share = self.base_share
        return (1 - share) * F.log_softmax(network_logits, 1) + share * F.log_softmax(base_logits, 1)

    def forward(self, x: torch.Tensor | SparseBatch | HostCSR) -> torch.Tensor:
        return self.combine(self.network(x), self.base_logits(x))


@torch.no_grad()
def linear_on_genes(linear: GeneLinear, lookup: data.GeneLookup) -> GeneLinear:
    """The same gene-input linear layer expressed on another gene list (a query's own genes, in
    its own order): gene j gets the weight row of its gene in the layer's universe, or zero where
    the universe lacks it. Feeding a dataset's own columns to it equals feeding them, reordered
    onto the universe with zeros for missing genes, to ``linear``: no copy of the data is reordered."""
    found = torch.as_tensor(np.flatnonzero(lookup.positions >= 0), device=linear.weight_t.device)
    weight_t = linear.weight_t.new_zeros((len(lookup.positions), linear.out_features))
    weight_t[found] = linear.weight_t[torch.as_tensor(lookup.positions, device=found.device)[found]]
    return GeneLinear.of(weight_t, linear.bias.detach()).requires_grad_(False)


@torch.no_grad()
def encoder_on_genes(encoder: Encoder, lookup: data.GeneLookup) -> Encoder:
    """The encoder expressed on another gene list (:func:`linear_on_genes`)."""
    linear = linear_on_genes(encoder.linear, lookup)
    return Encoder(linear.in_features, linear.out_features, linear=linear).eval()


def sparse_input(X: sp.csr_matrix, device) -> SparseBatch | HostCSR:
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
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
        crow, _, col, val = self.gather(rows)
        out = DeviceCSR.__new__(DeviceCSR)
        out.device, out.shape = self.device, (len(rows), self.shape[1])
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
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            x = torch.sparse_csr_tensor(crow, col.to(crow.dtype), val, size=size)
        return with_transpose(x) if transposed else SparseBatch(x, None)


@torch.no_grad()
def init_encoder_from_pretrained(encoder: Encoder, pretrained_state: dict, lookup: data.GeneLookup) -> int:
    """Copy, for each gene of the dataset, the pretrained weight column of the same gene.

    ``lookup`` places the dataset's genes in the pretrained gene universe
    (:func:`data.gene_lookup`). Genes the universe lacks keep their random init; the bias is
    copied. Returns the number of dataset genes that found a pretrained column.
    """
    weight = pretrained_state["linear.weight"]
    if weight.shape[0] != encoder.linear.weight.shape[0]:
        raise CheckpointError(f"pretrained encoder has {weight.shape[0]} hidden units, the classifier "
                              f"{encoder.linear.weight.shape[0]}; pass --hid {weight.shape[0]}")
    source = lookup.positions
    found = np.flatnonzero(source >= 0)
    target = encoder.linear.weight
    target[:, torch.as_tensor(found)] = weight[:, torch.as_tensor(source[found])].to(target)
    encoder.linear.bias.copy_(pretrained_state["linear.bias"])
    return len(found)


def dense_batch(features, rows: np.ndarray) -> torch.Tensor:
    """Rows of a feature matrix (CSR, or dense numpy for PCA inputs) as a float32 tensor."""
    if sp.issparse(features):
        return torch.from_numpy(data.dense_rows(features, rows))
    return torch.from_numpy(np.ascontiguousarray(features[rows], dtype=np.float32))


def inference_batch(features, rows: np.ndarray, device) -> torch.Tensor | HostCSR:
    """Rows of a feature matrix as a network's input for inference on ``device``: a ``HostCSR``
    for CSR features on the CPU (only the non-zeros are multiplied), else a dense batch there."""
    device = torch.device(device)
    if sp.issparse(features) and device.type == "cpu":
        return HostCSR(features[rows])
    return dense_batch(features, rows).to(device, non_blocking=True)


@torch.no_grad()
def apply_in_batches(fn, features, rows: np.ndarray | None = None, device="cpu",
                     batch_size: int = 4096) -> np.ndarray:
    """``fn`` (a network's forward) on the chosen rows of ``features``, one batch at a time (only
    one batch is ever dense, and on the CPU none is: ``inference_batch``); returns the stacked
    outputs as a numpy array."""
    rows = np.arange(features.shape[0]) if rows is None else np.asarray(rows)
    out = [fn(inference_batch(features, rows[batch], device)).cpu().numpy()
           for batch in data.iter_batches(len(rows), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def represent(encoder: Encoder, features, rows: np.ndarray | None = None, device="cpu",
              batch_size: int = 4096) -> np.ndarray:
    """A cell's scPretrain representation ``sigmoid(encoder(x))`` for every chosen row of a
    feature matrix aligned to the encoder's genes; the one function every script uses."""
    encoder = encoder.to(device).eval()
    out = apply_in_batches(encoder, features, rows, device, batch_size)
    return out if len(out) else np.zeros((0, encoder.linear.out_features), np.float32)


def make_adam(params, lr: float) -> torch.optim.Adam:
    """Adam with its fused kernel (one pass over all tensors, not ~10 small ops per tensor; on
    CPU torch's "foreach" path still loops per tensor) where this torch has one; the plain loop
    otherwise."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


# --------------------------------------------------------------------------- checkpoints


def atomic_torch_save(obj, path) -> None:
    """``torch.save`` to a temporary file renamed over ``path``: never a half-written checkpoint."""
    atomic_write(path, lambda fh: torch.save(obj, fh), mode="wb")


def encoder_checkpoint(encoder: Encoder, cfg: ModelConfig, gene_universe: Sequence[str], config: dict,
                       phase: int, epoch: int, loss: float) -> dict:
    """The self-describing encoder checkpoint (only tensors, str, numbers, lists, dicts)."""
    return {
        "kind": CHECKPOINT_KIND,
        "format_version": FORMAT_VERSION,
        "model": {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()},
        "model_args": asdict(cfg),
        "gene_universe": [str(g) for g in gene_universe],
        "config": config,
        "phase": int(phase),
        "epoch": int(epoch),
        "loss": float(loss),
    }


def classifier_checkpoint(clf: Classifier, genes: Sequence[str], classes: Sequence[str], info: dict) -> dict:
    """A trained classifier, self-describing: weights, its genes in order, its classes in order,
    and ``info`` (label key, reference, validation accuracy, training settings, ...)."""
    return {
        "kind": CLASSIFIER_KIND,
        "format_version": FORMAT_VERSION,
        "model": {k: v.detach().cpu().contiguous() for k, v in clf.state_dict().items()},
        "model_args": {"n_genes": clf.encoder.linear.in_features, "hid": clf.encoder.linear.out_features,
                       "n_classes": clf.out.out_features, "linear_base": clf.base_mode or "none"},
        "gene_universe": [str(g) for g in genes],
        "classes": [str(c) for c in classes],
        **info,
    }


def classifier_from_checkpoint(ckpt: dict, path="checkpoint") -> Classifier:
    """The classifier a checkpoint describes, its weights checked as :func:`encoder_from_checkpoint`
    checks an encoder's, and its classes and genes against its weights."""
    args = ckpt.get("model_args", {})
    try:
        base = str(args.get("linear_base", "none"))  # written before the option existed: none
        clf = Classifier(int(args["n_genes"]), int(args["n_classes"]), int(args["hid"]),
                         linear_base=None if base == "none" else base)
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: 'model_args' missing or not valid ({type(exc).__name__}: {exc}); "
                              "the checkpoint is damaged or not from scPretrain; train it again") from None
    load_checked_weights(clf, ckpt.get("model"), args, path)
    if len(ckpt.get("classes", [])) != clf.out.out_features or len(ckpt.get("gene_universe", [])) != \
            clf.encoder.linear.in_features:
        raise CheckpointError(f"{path}: its classes or genes disagree with its weights")
    return clf.eval()


def model_normalize(ckpt: dict) -> str:
    """The --normalize a checkpoint's model was fed (older checkpoints: the paper's, none)."""
    return str(ckpt.get("normalize", "none"))


def load_checkpoint(path, kind: str = CHECKPOINT_KIND) -> dict:
    """Load a checkpoint with ``weights_only=True`` and check it is of the expected kind."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files
        raise CheckpointError(f"{path}: not a readable scPretrain checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path}: expected a '{kind}' checkpoint, found '{found}'")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer version (format {ckpt['format_version']})")
    return ckpt


def encoder_from_checkpoint(ckpt: dict, source="checkpoint") -> tuple[Encoder, ModelConfig]:
    """The encoder a checkpoint describes. Missing keys, unknown ``model_args`` and weights whose
    shapes disagree with ``model_args`` are one CheckpointError naming ``source`` and what differs."""
    try:
        cfg = ModelConfig(**ckpt["model_args"])
        encoder = Encoder(int(cfg.n_genes), int(cfg.hid))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{source}: 'model_args' missing or not valid ({type(exc).__name__}: {exc}); "
                              "the checkpoint is damaged or not from scPretrain; train it again") from None
    load_checked_weights(encoder, ckpt.get("model"), asdict(cfg), source)
    return encoder, cfg


def load_checked_weights(module: nn.Module, state, model_args: dict, source) -> None:
    """Load a checkpoint's weights into ``module`` (built from its ``model_args``); missing,
    unexpected and wrongly shaped weights are one CheckpointError naming ``source`` and each."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: no 'model' weights in the checkpoint; train it again")
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}
    problems = [f"missing {sorted(set(expected) - set(found))}"] if set(expected) - set(found) else []
    problems += [f"unexpected {sorted(set(found) - set(expected))}"] if set(found) - set(expected) else []
    problems += [f"'{k}' has shape {found[k]}, model_args {model_args} need {shape}"
                 for k, shape in expected.items() if k in found and found[k] != shape]
    if problems:
        raise CheckpointError(f"{source}: weights do not match the checkpoint's model_args: {'; '.join(problems)}; "
                              "the checkpoint is damaged; train it again")
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{source}: weights cannot be loaded ({exc}); the checkpoint is damaged; "
                              "train it again") from None
