"""Networks of scPretrain: the encoder, the pre-training heads and the cell-type classifier,
in torch; their inputs and sparse products are :mod:`sparse`'s, their checkpoints
:mod:`checkpoints`'. Importing does nothing."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import sparse
from errors import CheckpointError
from heads import HeadBank
from sparse import SPARSE_INPUTS, HostCSR, SparseBatch, inference_batch
from splits import iter_batches

if TYPE_CHECKING:
    from genes import GeneLookup


@dataclass
class ModelConfig:
    n_genes: int
    hid: int = 200
    sigmoid_logits: bool = True  # scPretrain: heads' sigmoid(logits) go into cross-entropy


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
        return sparse.linear(x, self.weight_t, self.bias)

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
    datasets each bring three small heads. ``heads`` is a ``heads.HeadBank`` (a ``ModuleList`` of
    those ``Linear``s, the same state dict), whose ``loss`` takes a whole step's datasets in one
    call (``batched_loss``); ``summed_loss`` is the per-dataset reference.
    """

    def __init__(self, cfg: ModelConfig, cluster_counts: Sequence[Sequence[int]], encoder: Encoder | None = None,
                 keep: Sequence[int] | None = None):
        """``cluster_counts``: every dataset's granularities, in the collection's order; the heads of
        all are drawn in that order (as one process draws them), and those of the datasets ``keep``
        are kept (a rank's own: default all), their dataset's place in ``dataset_ids``."""
        super().__init__()
        self.cfg = cfg
        keep = list(range(len(cluster_counts))) if keep is None else list(keep)
        self.encoder = encoder if encoder is not None else Encoder(cfg.n_genes, cfg.hid)
        drawn = [nn.Linear(cfg.hid, int(sum(counts))) for counts in cluster_counts]
        self.dataset_ids = keep
        self.cluster_counts = [[int(k) for k in cluster_counts[g]] for g in keep]
        self.heads = HeadBank(cfg.hid, self.cluster_counts, [drawn[g] for g in keep])
        del drawn
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


    def batched_loss(self, z: torch.Tensor, targets, dataset_ids, denominators: torch.Tensor,
                     path: str = "auto") -> torch.Tensor:
        """``sum_i summed_loss(z_i, dataset_ids[i], targets[i]) / denominators[i]`` over a step's
        datasets, their cells one after the other in ``z``, in one call: on the CPU one fused
        numba pass over all the step's logits, elsewhere a few torch kernels (``heads.py``)."""
        return self.heads.loss(z, targets, dataset_ids, denominators, self.cfg.sigmoid_logits, path)


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
def linear_on_genes(linear: GeneLinear, lookup: GeneLookup) -> GeneLinear:
    """The same gene-input linear layer expressed on another gene list (a query's own genes, in
    its own order): gene j gets the weight row of its gene in the layer's universe, or zero where
    the universe lacks it. Feeding a dataset's own columns to it equals feeding them, reordered
    onto the universe with zeros for missing genes, to ``linear``: no copy of the data is reordered."""
    found = torch.as_tensor(np.flatnonzero(lookup.positions >= 0), device=linear.weight_t.device)
    weight_t = linear.weight_t.new_zeros((len(lookup.positions), linear.out_features))
    weight_t[found] = linear.weight_t[torch.as_tensor(lookup.positions, device=found.device)[found]]
    return GeneLinear.of(weight_t, linear.bias.detach()).requires_grad_(False)


@torch.no_grad()
def encoder_on_genes(encoder: Encoder, lookup: GeneLookup) -> Encoder:
    """The encoder expressed on another gene list (:func:`linear_on_genes`)."""
    linear = linear_on_genes(encoder.linear, lookup)
    return Encoder(linear.in_features, linear.out_features, linear=linear).eval()


@torch.no_grad()
def init_encoder_from_pretrained(encoder: Encoder, pretrained_state: dict, lookup: GeneLookup) -> int:
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


@torch.no_grad()
def apply_in_batches(fn, features, rows: np.ndarray | None = None, device="cpu",
                     batch_size: int = 4096) -> np.ndarray:
    """``fn`` (a network's forward) on the chosen rows of ``features``, one batch at a time (only
    one batch is ever dense, and on the CPU none is: ``inference_batch``); returns the stacked
    outputs as a numpy array."""
    rows = np.arange(features.shape[0]) if rows is None else np.asarray(rows)
    out = [fn(inference_batch(features, rows[batch], device)).cpu().numpy()
           for batch in iter_batches(len(rows), batch_size)]
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
