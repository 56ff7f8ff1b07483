"""Annotation of new datasets with an scPretrain classifier: training on a labelled reference
(for the genes a query has, when it is known), calibrated probabilities, CellTypist's two modes,
majority voting over an over-clustering of the representation, and the representation itself.

Queries are a :class:`data.CellData` in memory or a :class:`data.StreamedData` read from disk a
block of cells at a time; either way only one block of values is in memory, and the encoder is
re-expressed on the query's own genes, so no block is densified or reordered. The script
``annotate.py`` (command line and Python API) stands on these functions. Importing does nothing.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

import checkpoints
import classifier
import data
import genes
import kmeans
import pretrain
import runtime
from checkpoints import RESERVED_LABELS, Feeding, LoadedEncoder
from errors import DataError
from features import features as feature_matrix
from model import Classifier, Encoder, apply_in_batches, encoder_on_genes, linear_on_genes
from settings import MODES, AnnotateSettings, ClassifierSettings, PredictSettings, PretrainSettings
from sparse import inference_input
from splits import encode_labels, validation_split

log = logging.getLogger("scpretrain.annotate")

UNASSIGNED, HETEROGENEOUS = RESERVED_LABELS
EMBEDDING_KEY = "X_scpretrain"
PROBABILITIES_KEY = "scpretrain_probabilities"
UNS_KEY = "scpretrain"
LABEL_JOIN = "|"
LOW_COVERAGE = 0.5  # below this share of the model's genes, predictions are warned about
MISSING_INPUT_WARNING = 0.1  # ... and when genes carrying this share of the model's input are missing
OVERCLUSTER_FIT_CELLS = 200_000  # K-means over-clusters are fitted on a seeded sample this large


# --------------------------------------------------------------------------- the model


class AnnotationModel:
    """A trained classifier and its self-describing checkpoint (genes, classes, what it was fed,
    its calibration, the reference it learned from)."""

    def __init__(self, clf: Classifier, ckpt: dict, path=None):
        self.clf, self.ckpt, self.path = clf.eval(), ckpt, path

    @property
    def classes(self) -> list[str]:
        return list(self.ckpt["classes"])

    @property
    def genes(self) -> np.ndarray:
        return np.asarray(self.ckpt["gene_universe"], dtype=object)

    @property
    def fed(self) -> Feeding:
        return checkpoints.feeding(self.ckpt)

    @property
    def temperature(self) -> float:
        return float(self.ckpt.get("calibration", {}).get("temperature", 1.0))

    @property
    def digest(self) -> str:
        return checkpoints.model_digest(self.ckpt)

    def save(self, path) -> Path:
        """The checkpoint, written atomically (``load`` reads it back)."""
        self.path = checkpoints.save(self.ckpt, path)
        return self.path

    @classmethod
    def load(cls, path) -> "AnnotationModel":
        clf, ckpt = checkpoints.load_classifier(path)
        return cls(clf, ckpt, Path(path))

    def __repr__(self) -> str:
        return (f"AnnotationModel({len(self.classes)} classes, {len(self.genes)} genes, reference "
                f"'{self.ckpt['reference']['name']}', {self.fed.describe()})")


# --------------------------------------------------------------------------- training


def check_reference_labels(labels, where) -> None:
    """A reference class may not be named like one of predict's own labels."""
    clash = sorted({str(v) for v in labels} & set(RESERVED_LABELS))
    if clash:
        raise DataError(f"{where}: has cells labelled {clash}, which annotation uses for its own labels "
                        f"({', '.join(RESERVED_LABELS)}); rename that class in the reference")


def downsample_per_type(d: data.CellData, max_cells: int, seed: int) -> data.CellData:
    """At most ``max_cells`` seeded cells of each type (all of a smaller type); logged."""
    if not max_cells:
        return d
    rng = np.random.default_rng(seed)
    keep = []
    for label in sorted(set(d.labels)):
        cells = np.flatnonzero(d.labels == label)
        keep.append(cells if len(cells) <= max_cells else rng.choice(cells, max_cells, replace=False))
    keep = np.sort(np.concatenate(keep))
    if len(keep) < d.n_cells:
        log.info("%s: %d of %d cells kept, at most %d of each type (--max_cells_per_type, seed %d)", d.name,
                 len(keep), d.n_cells, max_cells, seed)
    return replace(d, X=d.X[keep], cells=d.cells[keep], labels=d.labels[keep])


def for_query(reference: data.CellData, query_genes, query_name: str) -> data.CellData:
    """The reference cut to the genes a query also has (in the reference's order); none is an error."""
    keep = np.flatnonzero(pd.Index(np.asarray(query_genes, dtype=object)).get_indexer(pd.Index(reference.genes)) >= 0)
    if not len(keep):
        raise DataError(f"{reference.source or reference.name} and {query_name} share no gene (e.g. reference "
                        f"{list(reference.genes[:3])}, query {list(np.asarray(query_genes)[:3])}); check the species "
                        "and the gene symbols (--gene_symbols)")
    log.info("%s: trained on the %d genes it shares with %s (%.1f%% of its %d; %.1f%% of the query's %d)",
             reference.name, len(keep), query_name, 100.0 * len(keep) / reference.n_genes, reference.n_genes,
             100.0 * len(keep) / max(len(query_genes), 1), len(query_genes))
    return genes.restrict_to_genes(reference, reference.genes[keep])


QUERY_PRETRAINED = "pre-trained on the reference and the query"


def pretrain_with_query(reference: data.CellData, query: data.CellData, settings: PretrainSettings, device,
                        phases: int = 1, save_path=None) -> LoadedEncoder:
    """The paper's own setting for a transfer: an encoder pre-trained without labels (phase 1 of
    scPretrain; then phase 2 on its output with ``phases=2``) on the reference and the query
    together, on the genes they share, to be fine-tuned on the reference's labels. ``settings``
    must feed the features the classifier will be fed. Saved at ``save_path`` when given."""
    if phases not in (1, 2):
        raise ValueError(f"phases must be 1 or 2, not {phases}")
    ref = for_query(reference, query.genes, query.name)
    both = [replace(ref, name=f"reference {ref.name}", labels=None),
            replace(genes.restrict_to_genes(query, ref.genes), name=f"query {query.name}", labels=None)]
    log.info("pre-training on the reference (%d cells) and the query (%d cells), %d shared genes, %d phase%s",
             both[0].n_cells, both[1].n_cells, len(ref.genes), phases, "s" if phases > 1 else "")
    t0 = time.time()
    where = Path(save_path) if save_path is not None else Path(QUERY_PRETRAINED)
    phase1 = settings.with_(pretrain_output=False)
    ckpt = pretrain.pretrain_in_memory(list(both), phase1, device, save_path=save_path if phases == 1 else None)
    loaded = checkpoints.loaded_encoder(ckpt, where)
    if phases == 2:
        phase2 = settings.with_(pretrain_output=True)
        ckpt = pretrain.pretrain_in_memory(list(both), phase2, device, pretrain.start_from(loaded, phase2),
                                           save_path=save_path)
        loaded = checkpoints.loaded_encoder(ckpt, where)
    log.info("pre-trained in %.1fs (%d epochs)", time.time() - t0, int(ckpt["epoch"]))
    return loaded


def gene_means(features, rows: np.ndarray) -> np.ndarray:
    """Each gene's mean feature value over the training cells (what a missing gene takes away)."""
    return np.asarray(features[rows].mean(axis=0), dtype=np.float32).ravel()


def train(reference: data.CellData, settings: ClassifierSettings, training: AnnotateSettings, label_key: str,
          pretrained: LoadedEncoder | None = None, query_genes=None, query_name: str = "the query",
          device="cpu", config: dict | None = None, allow_mismatch: bool = False) -> AnnotationModel:
    """A classifier trained on a labelled reference (genes mapped, cells without a label dropped),
    exactly as the sweep trains one, on every cell but a seeded validation set; with
    ``query_genes``, on the reference cut to the genes it shares with the query (network,
    pretrained encoder columns and linear base alike: the same model as one trained on a cut
    reference). Its probabilities are calibrated on the validation cells (``training.calibrate``)."""
    check_reference_labels(reference.labels, reference.source or reference.name)
    reference = downsample_per_type(reference, training.max_cells_per_type, training.seed)
    if query_genes is not None:
        reference = for_query(reference, query_genes, query_name)
    fed = Feeding(reference.values, settings.normalize)
    features = feature_matrix(reference, settings.normalize)
    model_genes = reference.genes
    start, digest, settings = pretrained_start(pretrained, fed, model_genes, reference.name, settings, allow_mismatch)
    codes, classes = encode_labels(reference.labels)
    train_idx, val_idx = validation_split(reference.n_cells, training.seed, training.per_val, what=reference.name)
    log.info("%s: %d cells, %d types; %d train, %d validate", reference.name, reference.n_cells, len(classes),
             len(train_idx), len(val_idx))
    t0 = time.time()
    clf = classifier.build_classifier(len(classes), len(model_genes), settings, training.seed, start)
    clf, epochs, val_accuracy = classifier.train_classifier(clf, features, codes, (train_idx, val_idx, None), settings,
                                                            training.seed, device)
    log.info("trained in %.1fs, %d epochs; validation accuracy %.4f", time.time() - t0, epochs, val_accuracy)
    calibration = calibrate(clf, features, codes, val_idx, device) if training.calibrate else {"temperature": 1.0}
    info = {"reference": {"name": reference.name, "path": reference.source, "n_cells": reference.n_cells,
                          "n_genes": reference.n_genes, "species": reference.species,
                          "class_counts": {str(c): int(n) for c, n in zip(classes, np.bincount(codes))}},
            "trained_on_shared_genes": query_genes is not None, "query": query_name if query_genes is not None else None,
            "gene_means": torch.from_numpy(gene_means(features, train_idx)),
            "validation_accuracy": float(val_accuracy), "epochs": int(epochs), "n_train": len(train_idx),
            "n_val": len(val_idx), "calibration": calibration, "linear_base": linear_base_info(clf),
            "pretrained_model": str(pretrained.path) if pretrained else None, "pretrained_digest": digest,
            "config": config or {}}
    ckpt = checkpoints.classifier_checkpoint(clf.cpu(), model_genes, classes, fed=fed, label_key=label_key, info=info)
    return AnnotationModel(clf, ckpt)


def linear_base_info(clf: Classifier) -> dict | None:
    """The linear base's C and share (blend) when the classifier has one."""
    if clf.base is None:
        return None
    return {"mode": clf.base_mode, "C": float(getattr(clf, "base_c", float("nan"))), "share": float(clf.base_share)}


def pretrained_start(pretrained: LoadedEncoder | None, fed: Feeding, model_genes, name: str,
                     settings: ClassifierSettings, allow_mismatch: bool):
    """The classifier's start from a pretrained encoder (its width, its columns of the model's
    genes), or random init; and the encoder's digest."""
    if pretrained is None:
        log.warning("no pretrained model: the classifier starts from random init ('Without pretraining')")
        return None, checkpoints.NO_MODEL, settings
    checkpoints.check_feeding(pretrained.fed, fed, pretrained.path, allow_mismatch)
    lookup = genes.gene_lookup(_Genes(name, model_genes), pretrained.gene_universe, whose="the pretrained model's")
    settings = settings.with_(hid=int(pretrained.ckpt["model_args"]["hid"]))
    return classifier.PretrainedStart(pretrained.ckpt["model"], lookup), pretrained.digest, settings


@dataclass
class _Genes:
    """A gene list as ``genes.gene_lookup`` takes a dataset."""

    name: str
    genes: np.ndarray
    source: str = ""

    @property
    def n_genes(self) -> int:
        return len(self.genes)


# --------------------------------------------------------------------------- calibration


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """ECE: the gap between confidence (the best class's probability) and accuracy, averaged over
    ``bins`` equal-width confidence bins weighted by their cells."""
    return calibration_error(probs.max(1), probs.argmax(1) == targets, bins)


def calibration_error(conf: np.ndarray, right: np.ndarray, bins: int = 15) -> float:
    """ECE from each cell's confidence and whether its label is right (any truth, e.g. mapped labels)."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    gap = 0.0
    for b in range(bins):
        cells = which == b
        if cells.any():
            gap += cells.mean() * abs(float(right[cells].mean()) - float(conf[cells].mean()))
    return float(gap)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


def fit_temperature(logits: np.ndarray, targets: np.ndarray) -> float:
    """The temperature ``T`` minimising the cross-entropy of ``softmax(logits / T)`` on these cells
    (temperature scaling: the best label is unchanged, the confidence is made honest)."""
    from scipy.optimize import minimize_scalar

    def nll(log_t: float) -> float:
        p = softmax(logits, float(np.exp(log_t)))
        return -float(np.mean(np.log(np.clip(p[np.arange(len(targets)), targets], 1e-12, None))))

    best = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(best.x))


def calibrate(clf: Classifier, features, codes: np.ndarray, val_idx: np.ndarray, device) -> dict:
    """Temperature scaling on the validation cells; the expected calibration error before and after."""
    clf.eval()
    logits = apply_in_batches(clf, features, val_idx, device)
    targets = codes[val_idx]
    temperature = fit_temperature(logits, targets)
    before = expected_calibration_error(softmax(logits), targets)
    after = expected_calibration_error(softmax(logits, temperature), targets)
    log.info("calibration on %d validation cells: temperature %.3f, expected calibration error %.4f -> %.4f",
             len(val_idx), temperature, before, after)
    return {"temperature": temperature, "ece_before": before, "ece_after": after, "n_cells": int(len(val_idx))}


# --------------------------------------------------------------------------- the query's genes


def query_lookup(query, model: AnnotationModel | LoadedEncoder, where) -> genes.GeneLookup:
    """The query's genes on the model's; a warning when the query lacks many of them, or genes that
    carry much of the model's input (the share is given, with the way to train for the query)."""
    model_genes = model.genes if isinstance(model, AnnotationModel) else model.gene_universe
    lookup = genes.gene_lookup(query, model_genes, whose="the model's")
    if lookup.n_found < LOW_COVERAGE * lookup.n_universe:
        log.warning("%s: the query has only %d of the model's %d genes (%.0f%%); predictions rest on the rest "
                    "being zero: check the species, --gene_symbols and the reference", where, lookup.n_found,
                    lookup.n_universe, 100.0 * lookup.n_found / lookup.n_universe)
    if isinstance(model, AnnotationModel):
        share = missing_input_share(model, lookup)
        if share >= MISSING_INPUT_WARNING:
            log.warning("%s: the query lacks %d of the model's genes, which carry %.0f%% of its input; a model "
                        "trained for this query's genes does better: `annotate.py transfer --reference REF --query "
                        "%s` (or train with --query)", where, lookup.n_universe - lookup.n_found, 100 * share, where)
        else:
            log.info("%s: the model's genes the query lacks carry %.1f%% of its input", where, 100 * share)
    return lookup


def missing_input_share(model: AnnotationModel, lookup: genes.GeneLookup) -> float:
    """The share of the model's input carried by the genes the query lacks: each gene weighs its
    mean feature value on the reference times the size of its weights (encoder and linear base)."""
    stored = model.ckpt.get("gene_means")
    means = np.ones(len(model.genes)) if stored is None else np.asarray(stored, dtype=np.float64)
    with torch.no_grad():
        weight = model.clf.encoder.linear.weight_t.norm(dim=1).double().numpy()
        if model.clf.base is not None:
            weight = weight + model.clf.base.weight_t.norm(dim=1).double().numpy()
    carried = np.abs(means) * weight
    present = np.zeros(len(model.genes), dtype=bool)
    present[lookup.positions[lookup.positions >= 0]] = True
    total = carried.sum()
    return float(carried[~present].sum() / total) if total > 0 else 0.0


# --------------------------------------------------------------------------- prediction


@dataclass
class Annotation:
    """What annotation adds to a query: per-cell columns (CellTypist's names), the representation,
    the probabilities (when asked) and a description for ``uns``."""

    table: pd.DataFrame  # index: the cells; predicted_labels, conf_score[, over_clustering, majority_voting]
    representation: np.ndarray  # cells x hid, float32
    probabilities: np.ndarray | None
    uns: dict


@torch.no_grad()
def run_blocks(query, lookup: genes.GeneLookup, network: Encoder | Classifier, device, chunk_cells: int,
               normalize: str, temperature: float = 1.0, keep_probabilities: bool = False, on_probabilities=None):
    """The representation of every query cell (``network``: an encoder or a classifier), and with a
    classifier its calibrated class probabilities, a block of cells at a time: each block is
    handed to ``on_probabilities(start, probs)`` and kept only when asked. The encoder and the
    base are re-expressed on the query's own genes, so each block is used as it is stored."""
    clf = network if isinstance(network, Classifier) else None
    on_query = encoder_on_genes(clf.encoder if clf is not None else network, lookup).to(device)
    base_on_query = linear_on_genes(clf.base, lookup).to(device) if clf is not None and clf.base is not None else None
    representation = np.empty((query.n_cells, on_query.linear.out_features), dtype=np.float32)
    kept = [] if keep_probabilities and clf is not None else None
    n_blocks = -(-query.n_cells // chunk_cells)
    counted = lookup.positions >= 0  # a cell's total counts over the model's genes only
    for start, block in runtime.progress(data.blocks_of(query, chunk_cells), total=n_blocks, desc="cells",
                                         unit="block"):
        x = inference_input(feature_matrix(_block_data(query, block), normalize, counted), device)
        z = on_query(x)
        representation[start:start + block.shape[0]] = z.cpu().numpy()
        if clf is not None:
            logits = clf.combine(clf.classify(z), base_on_query(x) if base_on_query is not None else None)
            probs = torch.softmax(logits / temperature, 1).cpu().numpy()
            on_probabilities(start, probs)
            if kept is not None:
                kept.append(probs)
    return representation, (np.concatenate(kept) if kept else None)


def _block_data(query, block: sp.csr_matrix) -> data.CellData:
    """A block of a query as a dataset, for ``features.features`` (values and name kept)."""
    return data.CellData(query.name, block, query.genes, np.empty(0, dtype=object), None, query.species,
                         query.source, query.values)


def best_labels(probs: np.ndarray, classes) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's most probable class and its probability."""
    best = probs.argmax(1)
    return np.asarray(classes, dtype=object)[best], probs[np.arange(len(best)), best]


def prob_match_labels(probs: np.ndarray, classes, p_thres: float) -> np.ndarray:
    """CellTypist's "prob match": every class whose probability is at least ``p_thres``, joined by
    ``|`` from the most probable; ``Unassigned`` when none passes."""
    classes = np.asarray(classes, dtype=object)
    order = np.argsort(-probs, axis=1, kind="stable")
    out = np.empty(len(probs), dtype=object)
    for i, (row, ranked) in enumerate(zip(probs, order)):
        passing = [classes[j] for j in ranked if row[j] >= p_thres]
        out[i] = LABEL_JOIN.join(passing) if passing else UNASSIGNED
    return out


CELLS_PER_CLUSTER = 30  # majority voting's over-clusters: about this many cells each (bench/README.md)
MAX_CLUSTERS = 500


def default_n_clusters(n_cells: int) -> int:
    """Over-clusters for majority voting: about ``CELLS_PER_CLUSTER`` cells each, between 2 and
    ``MAX_CLUSTERS`` (and at most n). Across held-out studies one cluster per 30 cells voted 0.833
    on average, one per 100 cells 0.713: a 280-cell query then gets 2 clusters."""
    return int(min(max(2, n_cells // CELLS_PER_CLUSTER), MAX_CLUSTERS, n_cells))


def over_cluster(representation: np.ndarray, n_clusters: int | None, seed: int, device) -> np.ndarray:
    """K-means clusters of the representation; above ``OVERCLUSTER_FIT_CELLS`` cells the centroids
    are fitted on a seeded sample and every cell is then assigned, a chunk at a time."""
    k = min(n_clusters or default_n_clusters(len(representation)), len(representation))
    sample = OVERCLUSTER_FIT_CELLS if len(representation) > OVERCLUSTER_FIT_CELLS else 0
    result = kmeans.kmeans(representation, k, n_iter=20, seed=seed, device=device, max_cells=sample)
    log.info("over-clustering: K-means on the representation, k=%d%s", k,
             f" (fitted on {sample:,} sampled cells)" if sample else "")
    return result.labels


def majority_vote(predicted: np.ndarray, clusters: np.ndarray, min_prop: float = 0.0) -> np.ndarray:
    """Each cluster's most frequent predicted label (ties: the first in sorted order); a cluster
    whose majority share is below ``min_prop`` is 'Heterogeneous'."""
    table = pd.crosstab(pd.Series(clusters, name="cluster"), pd.Series(predicted, name="label"))
    winner = table.idxmax(axis=1)
    share = table.max(axis=1) / table.sum(axis=1)
    winner[share < min_prop] = HETEROGENEOUS
    return winner.loc[clusters].to_numpy(dtype=object)


def predict(model: AnnotationModel, query, settings: PredictSettings = PredictSettings(), device="cpu",
            obs: pd.DataFrame | None = None, keep_probabilities: bool = False, allow_mismatch: bool = False,
            where=None) -> Annotation:
    """Label every cell of a query (in memory or streamed): calibrated probabilities, the labels of
    ``settings.mode``, and with ``settings.majority_voting`` each over-cluster's majority of the
    best labels (clusters of ``obs[settings.over_clustering]``, or K-means on the representation)."""
    where = where or query.source or query.name
    checkpoints.check_feeding(model.fed, Feeding(query.values, model.fed.normalize), model.path or "the model",
                              allow_mismatch)
    lookup = query_lookup(query, model, where)
    classes = model.classes
    best = np.empty(query.n_cells, dtype=np.int64)
    conf = np.empty(query.n_cells, dtype=np.float32)
    joined = np.empty(query.n_cells, dtype=object) if settings.mode == "prob_match" else None

    def labels_of(start, probs):
        stop = start + len(probs)
        best[start:stop], conf[start:stop] = probs.argmax(1), probs.max(1)
        if joined is not None:
            joined[start:stop] = prob_match_labels(probs, classes, settings.p_thres)

    t0 = time.time()
    representation, probs = run_blocks(query, lookup, model.clf.to(device), device, settings.chunk_cells,
                                       model.fed.normalize, model.temperature, keep_probabilities, labels_of)
    seconds = max(time.time() - t0, 1e-9)
    log.info("%d cells predicted in %.1fs (%.0f cells/s)", query.n_cells, seconds, query.n_cells / seconds)
    best_label = np.asarray(classes, dtype=object)[best]
    table = pd.DataFrame({"predicted_labels": joined if joined is not None else best_label, "conf_score": conf},
                         index=pd.Index(np.asarray(query.cells, dtype=object).astype(str), name="cell"))
    if settings.majority_voting:
        clusters = voting_clusters(representation, obs, settings, device, where)
        table["over_clustering"] = clusters
        table["majority_voting"] = majority_vote(best_label, clusters, settings.min_prop)
    log.info("labels: %s%s", summary_counts(table["predicted_labels"]),
             f"; Unassigned {100.0 * float(np.mean(table['predicted_labels'] == UNASSIGNED)):.1f}%"
             if settings.mode == "prob_match" else "")
    uns = {"model_digest": model.digest, "reference": model.ckpt["reference"]["name"],
           "normalize": model.fed.normalize, "values": model.fed.values, "classes": classes,
           "n_model_genes": lookup.n_universe, "n_model_genes_found": lookup.n_found,
           "gene_coverage": lookup.n_found / lookup.n_universe, "missing_input_share": missing_input_share(model, lookup),
           "mode": settings.mode, "p_thres": settings.p_thres, "majority_voting": bool(settings.majority_voting),
           "temperature": model.temperature}
    return Annotation(table, representation, probs, uns)


def voting_clusters(representation: np.ndarray, obs: pd.DataFrame | None, settings: PredictSettings, device,
                    where) -> np.ndarray:
    """The clusters majority voting votes in, as text."""
    if settings.over_clustering:
        if obs is None or settings.over_clustering not in obs.columns:
            columns = [] if obs is None else list(obs.columns)
            raise DataError(f"{where}: no obs column '{settings.over_clustering}' to vote in; available columns: "
                            f"{columns}")
        return obs[settings.over_clustering].astype(str).to_numpy(dtype=object)
    clusters = over_cluster(representation, settings.n_clusters, settings.seed, device)
    return clusters.astype(str).astype(object)


def summary_counts(labels: pd.Series, top: int = 8) -> str:
    counts = labels.value_counts()
    text = ", ".join(f"{k} {v}" for k, v in counts.head(top).items())
    return text + (f", ... ({len(counts) - top} more)" if len(counts) > top else "")


def embed(encoder: LoadedEncoder, query, chunk_cells: int = 8192, device="cpu", allow_mismatch: bool = False,
          where=None) -> Annotation:
    """The pretrained representation of every query cell, a block at a time."""
    where = where or query.source or query.name
    checkpoints.check_feeding(encoder.fed, Feeding(query.values, encoder.fed.normalize), encoder.path, allow_mismatch)
    lookup = query_lookup(query, encoder, where)
    representation, _ = run_blocks(query, lookup, encoder.encoder.to(device), device, chunk_cells, encoder.fed.normalize)
    uns = {"model_digest": encoder.digest, "normalize": encoder.fed.normalize, "values": encoder.fed.values,
           "n_model_genes": lookup.n_universe, "n_model_genes_found": lookup.n_found,
           "gene_coverage": lookup.n_found / lookup.n_universe}
    table = pd.DataFrame(index=pd.Index(np.asarray(query.cells, dtype=object).astype(str), name="cell"))
    return Annotation(table, representation, None, uns)
