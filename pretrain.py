"""Multi-task pre-training of scPretrain: K-means pseudo-labels, joint training, checkpoints.

Phase 1 clusters each dataset's log1p input; phase 2 clusters the phase-1 encoder's output and
trains fresh heads on the same encoder. Each step takes one mini-batch from every dataset and
sums the cross-entropies; the epoch loss drives early stopping.

Under ``torchrun`` every rank owns a share of the datasets (:mod:`shards`): it reads only those,
clusters them, and holds their heads; each step it computes its datasets' share of the loss, the
encoder's gradients are summed over the ranks, and every rank takes the same optimiser step. What
is drawn at random (heads' initial weights, epochs' batches) is drawn for the whole collection in
its order on every rank, so that any number of ranks gives one process's encoder up to float
rounding; one process is the one-rank case. Importing does nothing.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

import checkpoints
import data
import genes
import kmeans
import results
import runtime
import shards
from shards import dist_info
from checkpoints import Feeding
from errors import CheckpointError
from features import features as feature_matrix
from model import ModelConfig, PretrainModel, make_adam, offset_targets, represent
from settings import PretrainSettings, ReadSettings, identity
from sparse import (CSRStack, DeviceCSR, HostCSR, SparseBatch, device_sparse_batch, row_block, row_blocks, sparse_products,
                    take_rows, to_device)

log = logging.getLogger("scpretrain.pretrain")


@dataclass
class Collection:
    """The pre-training inputs: names and log1p CSR matrices aligned to one gene universe."""

    names: list[str]
    digests: list[str]  # data.dataset_digest of each dataset as read: what each one is
    features: list[sp.csr_matrix]  # the encoder's input (data.features), cells x universe genes: views of stacked
    raw: list[sp.csr_matrix | None]  # raw values, kept only when K-means wants them
    gene_universe: np.ndarray
    stacked: sp.csr_matrix  # every dataset's features (float32), one under the other: a step's one row gather
    offsets: np.ndarray  # the first row of each dataset in stacked, and the total

    fed: Feeding = Feeding()  # what the encoder is fed
    global_ids: list[int] = field(default_factory=list)  # each dataset's place in the whole collection

    def __post_init__(self):
        if not self.global_ids:
            self.global_ids = list(range(len(self.names)))

    @classmethod
    def of_stacked(cls, names, digests, stacked: sp.csr_matrix, offsets: np.ndarray, raw, gene_universe,
                   fed: Feeding = Feeding()) -> "Collection":
        """The collection whose datasets are the row ranges ``offsets`` of ``stacked``."""
        views = [row_block(stacked, offsets[i], offsets[i + 1]) for i in range(len(offsets) - 1)]
        return cls(list(names), list(digests), views, raw, np.asarray(gene_universe, dtype=object), stacked, offsets,
                   fed)

    @cached_property
    def row_blocks(self) -> np.ndarray | None:
        """``stacked``'s ``sparse.row_blocks`` table (2 bytes a cell and gene block), built on a CPU
        step's first use: each step's copy of its cells then skips the scan of their column indices.
        None where ``stacked`` cannot have one (its steps then scan their rows)."""
        t0 = time.perf_counter()
        table = row_blocks(self.stacked)
        if table is not None:
            log.debug("row_blocks of the collection: %d x %d, %.0f MiB, %.1fs", *table.shape, table.nbytes / 2**20,
                      time.perf_counter() - t0)
        return table

    def rows_of(self, datasets: list[int], rows: list[np.ndarray]) -> np.ndarray:
        """Rows of ``stacked`` for the given rows of the given datasets, dataset after dataset."""
        return np.concatenate([self.offsets[d] + np.asarray(r, dtype=np.int64) for d, r in zip(datasets, rows)])


def build_collection(datasets: list[data.CellData], gene_universe=None, keep_raw: bool = False,
                     normalize: str = "none", digests: list[str] | None = None) -> Collection:
    """Align every dataset to the universe; ``datasets`` is emptied as it goes, so that each
    unaligned matrix is freed as soon as its aligned copy exists (memory stays flat).
    ``digests``: the datasets' ``data.dataset_digest`` when already computed."""
    universe = genes.build_gene_universe(datasets) if gene_universe is None else np.asarray(gene_universe, dtype=object)
    log.info("gene universe: %d genes", len(universe))
    fed = collection_feeding([(d.name, d.values) for d in datasets], normalize)
    digests = list(digests) if digests is not None else data.dataset_digests(datasets, torch.get_num_threads())
    names, raw = [], []
    # aligning keeps or sums a dataset's values, never adds any: their total bounds the collection's
    stack = CSRStack(len(universe), sum(d.X.nnz for d in datasets))

    def taken():  # each dataset let go of as its aligned copy is made (a thread's at a time)
        while datasets:
            yield datasets.pop(0)

    def aligned_features(d: data.CellData):
        aligned = genes.align_to_universe(d, universe)
        return d.name, feature_matrix(aligned, normalize), aligned.X if keep_raw else None

    for name, features_of_d, raw_of_d in data.map_in_order(aligned_features, taken(), torch.get_num_threads()):
        names.append(name)
        stack.append(features_of_d)
        raw.append(raw_of_d)
        del features_of_d, raw_of_d
    return Collection.of_stacked(names, digests, *stack.finish(), raw, universe, fed)


def collection_feeding(names_and_values, normalize: str) -> Feeding:
    """What the encoder is fed: one kind of values for every dataset (``--values`` applies to all);
    ``names_and_values``: (name, values) of each dataset."""
    kinds = sorted({v for _, v in names_and_values})
    if len(kinds) > 1:
        mixed = {k: [n for n, v in names_and_values if v == k][:3] for k in kinds}
        raise data.DataError(f"the datasets hold different kinds of values ({mixed}); one encoder must be fed one "
                             "kind: pass --values, or --layer, so that every dataset gives the same")
    return Feeding(kinds[0] if kinds else "raw", normalize)


# --------------------------------------------------------------------------- pseudo-labels


def compute_pseudo_labels(coll: Collection, settings: PretrainSettings, device, encoder=None) -> list[list[np.ndarray]]:
    """Labels at the three granularities for each of this rank's datasets: on the input (phase 1)
    or on the encoder's output (phase 2); the other ranks cluster theirs at the same time."""
    rank, world = dist_info()
    labels = []
    t_all = time.time()
    for i, name in enumerate(runtime.progress(coll.names, desc="K-means", disable=rank != 0)):
        if encoder is not None:
            X = represent(encoder, coll.features[i], device=device)
        else:
            X = coll.raw[i] if settings.kmeans_on == "raw" else coll.features[i]
        t0 = time.time()
        per_k = kmeans.pseudo_labels(X, settings.avg_cluster_num, settings.kmeans_iter, seed=settings.seed,
                                     device=device, max_cells=settings.kmeans_max_cells, tol=settings.kmeans_tol)
        log.info("%s: K-means k=%s in %.1fs", name, [int(lab.max()) + 1 for lab in per_k], time.time() - t0)
        log.debug("%s: peak resident memory so far %s MiB", name, runtime.mib(runtime.peak_memory_mib()))
        labels.append(per_k)
    seconds = shards.gather_to_root(time.time() - t_all)
    if world > 1 and rank == 0:
        log.info("K-means on %d ranks: %s s (each rank its own datasets)", world,
                 ", ".join(f"rank {r} {t:.1f}" for r, t in enumerate(seconds)))
    log.debug("pseudo-labels ready; peak resident memory so far %s MiB", runtime.mib(runtime.peak_memory_mib()))
    return labels


# --------------------------------------------------------------------------- training


# how a step's heads are computed: "auto" (heads.py: fused on the CPU, torch kernels on a GPU),
# "fused", "torch", or "per_dataset" (PretrainModel.summed_loss per dataset, the reference)
HEADS_PATH = "auto"


class MultiTaskStep(torch.nn.Module):
    """One step's loss over this rank's datasets' batches, in one forward."""

    def __init__(self, model: PretrainModel, heads_path: str | None = None):
        super().__init__()
        self.model = model
        self.heads_path = HEADS_PATH if heads_path is None else heads_path

    def forward(self, x, targets, dataset_ids, denominators):
        """``x``: the step's cells of the datasets ``dataset_ids``, stacked in that order;
        ``targets``: per dataset, ``cells x granularities`` head columns; ``denominators``: per
        dataset, the batch size its summed cross-entropy is divided by."""
        z = self.model.encoder(x)
        if self.heads_path != "per_dataset":
            return self.model.batched_loss(z, targets, dataset_ids, denominators, self.heads_path)
        losses = [self.model.summed_loss(z_d, d, t_d)
                  for z_d, t_d, d in zip(torch.split(z, [t.shape[0] for t in targets]), targets, dataset_ids)]
        return (torch.stack(losses) / denominators).sum()


def epoch_batches(n_cells: list[int], batch_num: int, seed: int, phase: int, epoch: int):
    """Per step, the rows of every dataset: a seeded shuffle cut into ``batch_num`` parts."""
    rng = np.random.default_rng([seed, phase, epoch])
    parts = [np.array_split(rng.permutation(n), batch_num) for n in n_cells]
    return [[parts[d][s] for d in range(len(n_cells))] for s in range(batch_num)]


@dataclass
class HostStep:
    """One step's inputs: the cells of the datasets ``used``, stacked, as CSR on the host (with its
    gene-block pointers for the CPU's sparse products), or, gathered on the device or sent to it
    as a sparse batch, as the encoder's input."""

    used: list[int]
    X: sp.csr_matrix | HostCSR | None
    targets: list[np.ndarray]
    denominators: list[float]
    on_device: torch.Tensor | SparseBatch | None = None


def step_source(coll: Collection, device: torch.device) -> DeviceCSR | None:
    """On a GPU with room for it, the collection itself, so that steps gather their cells there;
    otherwise None (steps are built on the host and copied)."""
    if not DeviceCSR.fits(coll.stacked, device):
        if device.type == "cuda":
            log.info("the collection (%d non-zeros) does not fit in half the GPU's free memory: "
                     "steps are built on the host", coll.stacked.nnz)
        return None
    log.info("the collection (%d non-zeros) is on the GPU: steps gather their cells there", coll.stacked.nnz)
    return DeviceCSR(coll.stacked, device)


def prepare_step(coll: Collection, targets, rows_per_dataset, sparse: bool, device: torch.device,
                 source: DeviceCSR | None = None) -> HostStep | None:
    """One step's cells of this rank's datasets (``rows_per_dataset``: their rows, dataset by
    dataset): gathered from ``source`` on the device, or from the host's collection (a ``HostCSR``
    for the CPU's sparse products, a CSR otherwise). None when they bring no cell."""
    used = [d for d, rows in enumerate(rows_per_dataset) if len(rows)]
    if not used:
        return None
    rows = coll.rows_of(used, [rows_per_dataset[d] for d in used])
    ys = [targets[d][rows_per_dataset[d]] for d in used]
    denominators = [float(len(rows_per_dataset[d])) for d in used]  # each dataset's loss: a mean over its batch
    if source is not None:
        return HostStep(used, None, ys, denominators, source.sparse(rows) if sparse else source.dense(rows))
    if sparse and device.type == "cpu":
        return HostStep(used, HostCSR.of_rows(coll.stacked, rows, coll.row_blocks), ys, denominators)
    X = take_rows(coll.stacked, rows)
    if not sparse:
        return HostStep(used, X, ys, denominators)
    # a GPU without room for the collection: the step's CSR goes there, its transpose is made there
    return HostStep(used, None, ys, denominators, device_sparse_batch(X, device))


def step_inputs(host: HostStep, device: torch.device):
    """(encoder input, targets, dataset ids, denominators) on the device; the encoder input is a
    ``HostCSR`` (CPU), a ``SparseBatch`` (GPU) or a dense float32 tensor."""
    if host.on_device is not None:
        x = host.on_device
    elif isinstance(host.X, HostCSR):
        x = host.X
    else:
        x = to_device(torch.from_numpy(host.X.toarray()), device)
    ts = [to_device(torch.from_numpy(t), device) for t in host.targets]
    return x, ts, host.used, to_device(torch.tensor(host.denominators), device)


def train_epoch(step_module, optimizer, coll: Collection, targets, settings: PretrainSettings, device, phase: int,
                epoch: int, source: DeviceCSR | None = None, n_cells_all: list[int] | None = None) -> float:
    """One epoch; returns the mean step loss of the whole collection (the same number on every
    rank). ``source``: the collection on the device (``step_source``), where steps then gather
    their cells; ``n_cells_all``: every dataset's cells, over all ranks, in the collection's order
    (this rank's when None), for which the epoch's batches are drawn."""
    rank, world = dist_info()
    n_cells_all = n_cells_all or [X.shape[0] for X in coll.features]
    steps = epoch_batches(n_cells_all, settings.batch_num, settings.seed, phase, epoch)
    sparse = sparse_products(settings.batch_format, device)
    encoder = step_module.model.encoder
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    # on a GPU the host prepares the next step while the device works on this one: nothing here
    # waits for the device but the logged loss. The bar is advanced by hand: iterating it over the
    # steps' batches would keep each batch referenced while the next one is gathered
    bar = runtime.progress(total=len(steps), desc=f"phase {phase} epoch {epoch}", leave=False, disable=rank != 0)
    for step, rows in enumerate(steps):
        bar.update(1)
        if not any(len(r) for r in rows):  # no dataset brings a cell to this step, on any rank
            continue
        host = prepare_step(coll, targets, [rows[g] for g in coll.global_ids], sparse, device, source)
        optimizer.zero_grad(set_to_none=True)
        loss = None
        if host is not None:
            loss = step_module(*step_inputs(host, device))
            del host  # the batch now lives only in the graph (its weight gradient reads it)
            loss.backward()
            loss_sum += loss.detach()
        sum_encoder_gradients(encoder)
        optimizer.step()
        if rank == 0 and loss is not None and (step % 10 == 9 or step == len(steps) - 1):
            bar.set_postfix(loss=f"{loss.item():.4f}")  # rank 0's share of the step
        # the graph, and the batch it holds, go before the next step's cells are gathered (kept to
        # the next forward, a 30,000-cell step's batch raised the peak)
        del loss
    bar.close()
    shards.sum_over_ranks_([loss_sum])
    return float(loss_sum) / len(steps)


def sum_encoder_gradients(encoder: torch.nn.Module) -> None:
    """The encoder's gradients summed over the ranks (a rank whose datasets brought no cell to the
    step adds zeros); the heads' stay their rank's own. Nothing to do in one process."""
    if dist_info()[1] == 1:
        return
    params = list(encoder.parameters())
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    shards.sum_over_ranks_([p.grad for p in params])


@dataclass
class Start:
    """Where a phase starts: phase 2 continues the phase-1 encoder on its gene universe."""

    phase: int
    encoder: torch.nn.Module | None = None
    cfg: ModelConfig | None = None
    gene_universe: list | None = None
    model_digest: str = results.NO_MODEL
    fed: Feeding | None = None  # what the starting encoder was fed
    path: Path | str | None = None  # where the starting encoder came from (for messages)


def phase_start(settings: PretrainSettings, pretrained_model=None) -> Start:
    """Phase 1 starts from nothing; phase 2 from the phase-1 encoder ``pretrained_model``, which
    must have been fed the features this run feeds it."""
    if settings.phase == 1:
        return Start(phase=1)
    if not pretrained_model:
        raise CheckpointError("phase 2 (--pretrain_output) needs --pretrained_model FILE from phase 1")
    return start_from(checkpoints.load_encoder(pretrained_model), settings)


def start_from(loaded: checkpoints.LoadedEncoder, settings: PretrainSettings) -> Start:
    """Phase 2's start: the phase-1 encoder ``loaded``, fed the features this run feeds it."""
    cfg = ModelConfig(**loaded.ckpt["model_args"])
    if cfg.hid != settings.hid:
        log.info("phase 2 keeps the phase-1 encoder's %d hidden units (--hid %d not used)", cfg.hid, settings.hid)
    if loaded.fed.normalize != settings.normalize:
        raise CheckpointError(f"{loaded.path}: phase 1 was fed --normalize {loaded.fed.normalize}, "
                              f"this run --normalize {settings.normalize}; phase 2 must see the same features")
    return Start(2, loaded.encoder, cfg, list(loaded.gene_universe), loaded.digest, loaded.fed, loaded.path)


def model_config(start: Start, coll: Collection, settings: PretrainSettings) -> ModelConfig:
    return ModelConfig(n_genes=len(coll.gene_universe), hid=start.cfg.hid if start.cfg else settings.hid,
                       sigmoid_logits=settings.sigmoid_logits)


def run_settings(settings: PretrainSettings, read: ReadSettings, start: Start, whole: "Whole") -> dict:
    """Everything that changes this run's numbers (the settings' identity fields, what each dataset
    is, the gene universe, the starting model): --resume must find the same."""
    found = identity(settings, read, drop=("label_key",))
    found.update(datasets=list(whole.names), dataset_digests=list(whole.digests), gene_universe=results.short_digest(
        "\n".join(map(str, whole.gene_universe)).encode()), start_model=start.model_digest)
    return found


def head_counts(labels) -> list[list[int]]:
    """Each dataset's number of clusters at each granularity (its heads' widths)."""
    return [[int(np.max(lab)) + 1 for lab in per_d] for per_d in labels]


def build_model(cfg: ModelConfig, counts_all: list[list[int]], own: list[int], labels, start: Start,
                settings: PretrainSettings, device):
    """The model (shared encoder, this rank's datasets' heads, drawn as one process draws every
    dataset's, in the collection's order), its optimiser, the step module and the targets."""
    torch.manual_seed(settings.seed + start.phase)
    model = PretrainModel(cfg, counts_all, start.encoder, keep=own).to(device)
    optimizer = make_adam(model.parameters(), settings.pt_lr)
    targets = [offset_targets(per_d, counts_all[g]) for per_d, g in zip(labels, own)]
    return model, optimizer, MultiTaskStep(model), targets


def new_progress() -> dict:
    return {"epoch": 0, "best_loss": float("inf"), "wait": 0, "losses": []}


@dataclass
class Whole:
    """What every rank knows of the whole collection, in its order (the datasets of all ranks)."""

    names: list[str]
    digests: list[str]
    cells: list[int]
    gene_universe: np.ndarray
    fed: Feeding
    plan: shards.ShardPlan


def whole_collection(datasets: list[data.CellData], own: list[int], plan: shards.ShardPlan, start: Start,
                     normalize: str) -> Whole:
    """Every rank's datasets' names, digests, cell counts and genes, told to every rank; the gene
    universe from all of them (phase 2: the phase-1 encoder's); one kind of values for all."""
    digests = data.dataset_digests(datasets, torch.get_num_threads())
    facts = [(g, d.name, digest, d.n_cells, d.species, list(d.genes), d.values)
             for g, d, digest in zip(own, datasets, digests)]
    every = sorted(f for part in shards.gather_to_all(facts) for f in part)
    if start.gene_universe is not None:
        universe = np.asarray(start.gene_universe, dtype=object)
    else:
        universe = genes.gene_universe_of([(species, names) for _, _, _, _, species, names, _ in every])
    fed = collection_feeding([(f[1], f[6]) for f in every], normalize)
    return Whole([f[1] for f in every], [f[2] for f in every], [f[3] for f in every], universe, fed, plan)


def run_epochs(model, optimizer, step_module, coll, targets, labels, progress, run_ids: dict, whole: Whole,
               settings: PretrainSettings, device, phase, resume_path: Path | None) -> dict:
    """Epochs until --pt_epoch or --pt_patience epochs without a lower loss; an epoch checkpoint
    after each, so that --resume can continue (``run_ids``: what it must find the same)."""
    writer = checkpoints.BackgroundWriter()  # each epoch checkpoint is written while the next epoch runs
    try:
        progress = _epoch_loop(model, optimizer, step_module, coll, targets, labels, progress, run_ids, whole,
                               settings, device, phase, resume_path, writer)
    except BaseException:
        writer.finish(quiet=True)  # the last epoch checkpoint whole (or its failure logged) as the run stops
        raise
    writer.finish()  # before the final checkpoint, which removes the epoch checkpoint
    if progress["wait"] >= settings.pt_patience:
        log.info("early stop: no lower loss for %d epochs", settings.pt_patience)
    return progress


def _epoch_loop(model, optimizer, step_module, coll, targets, labels, progress, run_ids: dict, whole: Whole,
                settings: PretrainSettings, device, phase, resume_path: Path | None, writer) -> dict:
    rank, _ = dist_info()
    n_cells = sum(whole.cells)
    source = step_source(coll, device) if progress["epoch"] < settings.pt_epoch else None
    while progress["epoch"] < settings.pt_epoch and progress["wait"] < settings.pt_patience:
        epoch = progress["epoch"] + 1
        t0 = time.time()
        loss = train_epoch(step_module, optimizer, coll, targets, settings, device, phase, epoch, source=source,
                           n_cells_all=whole.cells)
        improved = loss < progress["best_loss"]
        progress.update(epoch=epoch, best_loss=min(loss, progress["best_loss"]),
                        wait=0 if improved else progress["wait"] + 1, losses=progress["losses"] + [loss])
        if rank == 0:
            seconds = max(time.time() - t0, 1e-9)
            log.info("phase %d epoch %d: loss %.4f%s (%.1fs, %.0f cells/s)", phase, epoch, loss,
                     "" if improved else f" (no improvement for {progress['wait']})", seconds, n_cells / seconds)
            log.debug("peak resident memory so far %s MiB", runtime.mib(runtime.peak_memory_mib()))
        if resume_path is not None:
            save_resume(resume_path, model, optimizer, progress, labels, coll, whole, run_ids, phase,
                        write=writer.submit)
    return progress


def label_digest(per_k) -> str:
    """What one dataset's pseudo-labels are (all granularities), as 16 hex digits."""
    h = hashlib.blake2b(digest_size=8)
    for lab in per_k:
        h.update(np.ascontiguousarray(np.asarray(lab, dtype=np.int64)).data)
    return h.hexdigest()


def save_final(model, cfg, coll: Collection, whole: Whole, labels, progress, phase: int, save_path: Path | None,
               config: dict) -> dict:
    """The self-describing encoder checkpoint, written by rank 0 (with which datasets each rank held
    and what their pseudo-labels were); the epoch checkpoint goes."""
    digests = dict(pair for part in shards.gather_to_all(
        [(g, label_digest(per_k)) for g, per_k in zip(coll.global_ids, labels)]) for pair in part)
    held = shards.gather_to_all({"rank": dist_info()[0], "datasets": list(coll.names), "cells": int(coll.stacked.shape[0])})
    final = checkpoints.encoder_checkpoint(model.encoder, cfg, whole.gene_universe, fed=whole.fed, phase=phase,
                                           epoch=progress["epoch"], losses=progress["losses"], datasets=whole.names,
                                           config=config)
    final["shards"] = held
    final["pseudo_label_digests"] = [digests[g] for g in range(len(whole.names))]
    if dist_info()[0] == 0 and save_path is not None:
        checkpoints.save(final, save_path)
        resume_path_for(save_path).unlink(missing_ok=True)
        log.info("saved phase-%d encoder to %s", phase, save_path)
    return final


def run_pretraining(entries: list[data.DatasetEntry], settings: PretrainSettings, save_path, device: torch.device,
                    read: ReadSettings = ReadSettings(), pretrained_model=None, resume: bool = False,
                    config: dict | None = None) -> dict:
    """Phase 1 or 2 end to end on the datasets ``entries`` (``data.dataset_entries``); returns the
    final encoder checkpoint (saved by rank 0). Each rank reads, clusters and trains the heads of
    its share of the datasets only (:func:`shards.plan_shards`); ``read`` says how they are read
    (part of what --resume checks); ``pretrained_model`` is phase 2's start; ``config`` (the run's
    arguments) is recorded in the checkpoint."""
    rank, world = dist_info()
    plan = shards.plan_shards([shards.dataset_cost(e.path) for e in entries], world)
    own = plan.mine(rank)
    start = phase_start(settings, pretrained_model)
    datasets = data.load_entries([entries[g] for g in own], read, threads=torch.get_num_threads())
    return pretrain_datasets(datasets, own, plan, start, settings, Path(save_path), device, read, resume, config)


def pretrain_in_memory(datasets: list[data.CellData], settings: PretrainSettings, device: torch.device | str,
                       start: Start | None = None, save_path=None, config: dict | None = None) -> dict:
    """Phase 1 (or phase 2 from ``start``, :func:`start_from`) on datasets already read, in this
    one process; returns the final encoder checkpoint, also saved at ``save_path`` when given
    (without it nothing is written: no epoch checkpoint either)."""
    if dist_info()[1] > 1:
        raise RuntimeError("pretrain_in_memory runs in one process; under torchrun use run_pretraining")
    device = torch.device(device)  # a name ("cpu", "cuda") or a device
    start = start or phase_start(settings)
    plan = shards.plan_shards([1.0] * len(datasets), 1)
    return pretrain_datasets(list(datasets), list(range(len(datasets))), plan, start, settings,
                             Path(save_path) if save_path is not None else None, device, config=config)


def pretrain_datasets(datasets: list[data.CellData], own: list[int], plan: shards.ShardPlan, start: Start,
                      settings: PretrainSettings, save_path: Path | None, device: torch.device,
                      read: ReadSettings = ReadSettings(), resume: bool = False, config: dict | None = None) -> dict:
    """This rank's ``datasets`` (the collection's ``own``) pre-trained with the other ranks': the
    whole collection's facts, K-means, the model and the epochs; the final checkpoint. Without
    ``save_path`` nothing is written (and nothing can be resumed)."""
    rank, world = dist_info()
    whole = whole_collection(datasets, own, plan, start, settings.normalize)
    if world > 1 and rank == 0:
        for part in plan.describe(whole.names, whole.cells):
            log.info("rank %d: %d datasets, %d cells", part["rank"], len(part["datasets"]), part["cells"])
    coll = build_collection(datasets, whole.gene_universe, keep_raw=(start.phase == 1 and settings.kmeans_on == "raw"),
                            normalize=settings.normalize, digests=[whole.digests[g] for g in own])
    coll.global_ids, coll.fed = own, whole.fed
    log.debug("collection aligned (%d cells); peak resident memory so far %s MiB", coll.stacked.shape[0],
              runtime.mib(runtime.peak_memory_mib()))
    if start.fed is not None and start.fed != whole.fed:
        checkpoints.check_feeding(start.fed, whole.fed, start.path)
    run_ids = run_settings(settings, read, start, whole)
    resume_path = resume_path_for(save_path) if save_path is not None else None
    state = load_resume(resume_path, run_ids, start.phase) if resume and resume_path is not None else None
    labels = ([state["pseudo_labels"][g] for g in own] if state
              else compute_pseudo_labels(coll, settings, device, start.encoder))
    counts_all = [c for part in shards.gather_to_all(list(zip(own, head_counts(labels)))) for c in part]
    counts_all = [c for _, c in sorted(counts_all)]
    # from here on the steps' buffers are reused (K-means stays under the reading threshold: kept
    # buffers of its many sizes raised the peak by up to 0.8 GB, bench/README.md)
    runtime.reuse_freed_memory()
    cfg = model_config(start, coll, settings)
    model, optimizer, step_module, targets = build_model(cfg, counts_all, own, labels, start, settings, device)
    progress = new_progress()
    if state:
        restore(model, optimizer, state)
        progress = {k: state[k] for k in progress}
        log.info("resuming phase %d after epoch %d (loss %.4f)", start.phase, progress["epoch"],
                 progress["losses"][-1])
    progress = run_epochs(model, optimizer, step_module, coll, targets, labels, progress, run_ids, whole, settings,
                          device, start.phase, resume_path)
    return save_final(model, cfg, coll, whole, labels, progress, start.phase, save_path, config or {})


# --------------------------------------------------------------------------- resume


def resume_path_for(save_path: Path) -> Path:
    return save_path.with_name(save_path.name + ".resume")


def global_name(model: PretrainModel, name: str) -> str:
    """A parameter's name in the whole collection's layout: heads by their dataset's place in it."""
    parts = name.split(".")
    if parts[0] == "heads":
        parts[1] = str(model.dataset_ids[int(parts[1])])
    return ".".join(parts)


def rank_state(model: PretrainModel, optimizer) -> tuple[dict, dict]:
    """This rank's weights and optimiser state by global parameter name (the encoder's from rank 0)."""
    rank = dist_info()[0]
    weights, moments = {}, {}
    for name, p in model.named_parameters():
        if rank != 0 and name.startswith("encoder."):
            continue
        weights[global_name(model, name)] = p.detach().cpu().clone()
        if p in optimizer.state:
            moments[global_name(model, name)] = {k: v.detach().cpu().clone() for k, v in optimizer.state[p].items()}
    return weights, moments


def save_resume(path: Path, model, optimizer, progress, labels, coll: Collection, whole: Whole, run_ids: dict,
                phase: int, write=checkpoints.save) -> None:
    """The epoch checkpoint, in one process's layout whatever the number of ranks: rank 0 gathers
    every rank's heads, their optimiser state and pseudo-labels, and writes it with ``write``
    (``checkpoints.save``, or a ``BackgroundWriter``'s ``submit``: what it is handed is a copy)."""
    weights, moments = rank_state(model, optimizer)
    parts = shards.gather_to_root((weights, moments, list(zip(coll.global_ids, labels))))
    if dist_info()[0] != 0:
        return
    all_weights = {k: v for w, _, _ in parts for k, v in w.items()}
    all_moments = {k: v for _, m, _ in parts for k, v in m.items()}
    all_labels = dict(pair for _, _, part in parts for pair in part)
    state = checkpoints.resume_checkpoint(all_weights, {"lr": optimizer.param_groups[0]["lr"], "state": all_moments},
                                          copy.deepcopy(progress), [all_labels[g] for g in range(len(whole.names))],
                                          whole.names, whole.gene_universe, copy.deepcopy(run_ids), phase)
    write(state, path)


def restore(model: PretrainModel, optimizer, state: dict) -> None:
    """This rank's weights and optimiser state from an epoch checkpoint in the collection's layout."""
    saved, moments = state["model"], state["optimizer"]["state"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = global_name(model, name)
            p.copy_(saved[key].to(p.device))
            if key in moments:
                optimizer.state[p] = {k: v.clone().to(p.device) if v.dim() else v.clone()
                                      for k, v in moments[key].items()}


def load_resume(path: Path, settings: dict, phase: int) -> dict | None:
    """The interrupted run's state (read by rank 0, told to every rank), after checking that every
    result-changing setting matches."""
    found = path.exists() if dist_info()[0] == 0 else None
    if not shards.broadcast(found):
        log.warning("--resume: no epoch checkpoint at %s; starting from the beginning", path)
        return None
    state = checkpoints.load(path, checkpoints.RESUME_KIND) if dist_info()[0] == 0 else None
    state = shards.broadcast(state)
    saved = state["settings"]
    differs = [f"{key}: {saved.get(key)!r} in the checkpoint, {value!r} now"
               for key, value in settings.items() if saved.get(key) != value]
    if state.get("phase") != phase:
        differs.append(f"phase: {state.get('phase')} in the checkpoint, {phase} now")
    if differs:
        raise CheckpointError(f"{path}: --resume needs the settings of the interrupted run; these differ:\n  "
                              + "\n  ".join(differs) + "\nrun with the checkpoint's values, or without --resume "
                              "to start again (only --pt_epoch and --pt_patience may change)")
    state["pseudo_labels"] = [[lab.numpy() for lab in per_d] for per_d in state["pseudo_labels"]]
    return state
