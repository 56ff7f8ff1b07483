"""Networks of scPretrain and their self-describing checkpoints. Pure torch; importing does nothing."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.nn import functional as F

from data import atomic_write

CHECKPOINT_KIND = "scpretrain-encoder"
RESUME_KIND = "scpretrain-resume"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, corrupt or of the wrong kind."""


@dataclass
class ModelConfig:
    n_genes: int
    hid: int = 200
    sigmoid_logits: bool = True  # scPretrain: heads' sigmoid(logits) go into cross-entropy


class Encoder(nn.Module):
    """One ``Linear(G, hid)``; a cell's representation is ``sigmoid(encoder(x))``."""

    def __init__(self, n_genes: int, hid: int = 200):
        super().__init__()
        self.linear = nn.Linear(n_genes, hid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(x))


class PretrainModel(nn.Module):
    """The shared encoder plus, per dataset, one ``Linear(hid, k)`` head per K-means granularity."""

    def __init__(self, cfg: ModelConfig, cluster_counts: Sequence[Sequence[int]], encoder: Encoder | None = None):
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder if encoder is not None else Encoder(cfg.n_genes, cfg.hid)
        self.heads = nn.ModuleList(
            nn.ModuleList(nn.Linear(cfg.hid, int(k)) for k in counts) for counts in cluster_counts
        )

    def forward(self, x: torch.Tensor, dataset_index: int) -> list[torch.Tensor]:
        z = self.encoder(x)
        return [head(z) for head in self.heads[dataset_index]]

    def loss(self, x: torch.Tensor, dataset_index: int, targets: Sequence[torch.Tensor]) -> torch.Tensor:
        """Sum of the cross-entropies of the granularities of one dataset."""
        logits = self.forward(x, dataset_index)
        return sum(pseudo_label_loss(lg, t, self.cfg.sigmoid_logits) for lg, t in zip(logits, targets))


def pseudo_label_loss(logits: torch.Tensor, targets: torch.Tensor, sigmoid_logits: bool = True) -> torch.Tensor:
    # scPretrain: the original passes sigmoid(logits) to cross-entropy; kept by default.
    return F.cross_entropy(torch.sigmoid(logits) if sigmoid_logits else logits, targets)


class Classifier(nn.Module):
    """``sigmoid(encoder(x)) -> Linear(hid, hid/2) -> sigmoid -> Linear(hid/2, classes)``."""

    def __init__(self, n_genes: int, n_classes: int, hid: int = 200):
        super().__init__()
        self.encoder = Encoder(n_genes, hid)
        self.hidden = nn.Linear(hid, hid // 2)
        self.out = nn.Linear(hid // 2, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.sigmoid(self.hidden(self.encoder(x))))


@torch.no_grad()
def init_encoder_from_pretrained(encoder: Encoder, pretrained_state: dict, gene_universe: Sequence[str],
                                 dataset_genes: Sequence[str]) -> int:
    """Copy, for each gene of the dataset, the pretrained weight column of the same gene.

    Genes the universe lacks keep their random init; the bias is copied. Returns the number
    of dataset genes that found a pretrained column.
    """
    weight = pretrained_state["linear.weight"]
    if weight.shape[0] != encoder.linear.weight.shape[0]:
        raise CheckpointError(f"pretrained encoder has {weight.shape[0]} hidden units, the classifier "
                              f"{encoder.linear.weight.shape[0]}; pass --hid {weight.shape[0]}")
    source = pd.Index(gene_universe).get_indexer(pd.Index(dataset_genes))
    found = np.flatnonzero(source >= 0)
    target = encoder.linear.weight
    target[:, torch.as_tensor(found)] = weight[:, torch.as_tensor(source[found])].to(target)
    encoder.linear.bias.copy_(pretrained_state["linear.bias"])
    return len(found)


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
        "model": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
        "model_args": asdict(cfg),
        "gene_universe": [str(g) for g in gene_universe],
        "config": config,
        "phase": int(phase),
        "epoch": int(epoch),
        "loss": float(loss),
    }


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


def encoder_from_checkpoint(ckpt: dict) -> tuple[Encoder, ModelConfig]:
    cfg = ModelConfig(**ckpt["model_args"])
    encoder = Encoder(cfg.n_genes, cfg.hid)
    encoder.load_state_dict(ckpt["model"])
    return encoder, cfg
