"""Multi-task pre-training of scPretrain: K-means pseudo-labels, joint training, checkpoints.

Phase 1 clusters each dataset's log1p input; phase 2 clusters the phase-1 encoder's output and
trains fresh heads on the same encoder. Each step takes one mini-batch from every dataset and
sums the cross-entropies; the epoch loss drives early stopping. Works in one process or under
``torchrun`` (each rank takes its share of every batch; gradients are averaged by
DistributedDataParallel). Importing does nothing.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist

import checkpoints
import data
import genes
import kmeans
import results
import runtime
from checkpoints import Feeding
from errors import CheckpointError
from features import features as feature_matrix
from model import ModelConfig, PretrainModel, make_adam, offset_targets, represent
from settings import PretrainSettings, ReadSettings, identity
from sparse import CSRStack, DeviceCSR, HostCSR, SparseBatch, device_sparse_batch, row_block, sparse_products, to_device

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

    @classmethod
    def of_stacked(cls, names, digests, stacked: sp.csr_matrix, offsets: np.ndarray, raw, gene_universe,
                   fed: Feeding = Feeding()) -> "Collection":
        """The collection whose datasets are the row ranges ``offsets`` of ``stacked``."""
        views = [row_block(stacked, offsets[i], offsets[i + 1]) for i in range(len(offsets) - 1)]
        return cls(list(names), list(digests), views, raw, np.asarray(gene_universe, dtype=object), stacked, offsets,
                   fed)

    def rows_of(self, datasets: list[int], rows: list[np.ndarray]) -> np.ndarray:
        """Rows of ``stacked`` for the given rows of the given datasets, dataset after dataset."""
        return np.concatenate([self.offsets[d] + np.asarray(r, dtype=np.int64) for d, r in zip(datasets, rows)])


def build_collection(datasets: list[data.CellData], gene_universe=None, keep_raw: bool = False,
                     normalize: str = "none") -> Collection:
    """Align every dataset to the universe; ``datasets`` is emptied as it goes, so that each
    unaligned matrix is freed as soon as its aligned copy exists (memory stays flat)."""
    universe = genes.build_gene_universe(datasets) if gene_universe is None else np.asarray(gene_universe, dtype=object)
    log.info("gene universe: %d genes", len(universe))
    fed = collection_feeding(datasets, normalize)
    names, digests, raw = [], [], []
    # aligning keeps or sums a dataset's values, never adds any: their total bounds the collection's
    stack = CSRStack(len(universe), sum(d.X.nnz for d in datasets))
    while datasets:
        d = datasets.pop(0)
        digests.append(data.dataset_digest(d))
        aligned = genes.align_to_universe(d, universe)
        names.append(d.name)
        del d
        stack.append(feature_matrix(aligned, normalize))
        raw.append(aligned.X if keep_raw else None)
        del aligned
    return Collection.of_stacked(names, digests, *stack.finish(), raw, universe, fed)


def collection_feeding(datasets: list[data.CellData], normalize: str) -> Feeding:
    """What the encoder is fed: one kind of values for every dataset (``--values`` applies to all)."""
    kinds = sorted({d.values for d in datasets})
    if len(kinds) > 1:
        mixed = {k: [d.name for d in datasets if d.values == k][:3] for k in kinds}
        raise data.DataError(f"the datasets hold different kinds of values ({mixed}); one encoder must be fed one "
                             "kind: pass --values, or --layer, so that every dataset gives the same")
    return Feeding(kinds[0] if kinds else "raw", normalize)


# --------------------------------------------------------------------------- distributed helpers


def dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> bool:
    """Join the torchrun process group when launched by torchrun; gloo on CPU, nccl on GPU."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ or dist.is_initialized():
        return dist.is_initialized()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return True


def finish_distributed(completed: bool) -> None:
    """Leave the torchrun process group: after a completed run every rank meets once (rank 0 has
    saved), then the group is destroyed, so that no rank exits with its gloo/nccl threads still
    running (that aborts the process, and torchrun then waits on the other node)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if completed:
        dist.barrier()
    dist.destroy_process_group()


def exit_worker_now() -> None:
    """End a torchrun worker right after a finished run, skipping interpreter teardown: on a loaded
    CPU, torch's teardown after the process group is gone aborted a rank about once in 18 runs
    ("terminate called without an active exception", no Python frame), failing the whole launch.
    A no-op outside torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def broadcast(obj):
    """Rank 0's object on every rank (a no-op in one process)."""
    rank, world = dist_info()
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------- pseudo-labels


def compute_pseudo_labels(coll: Collection, settings: PretrainSettings, device, encoder=None) -> list[list[np.ndarray]]:
    """Labels at the three granularities for every dataset: on the input (phase 1) or on the
    encoder's output (phase 2). Computed on rank 0 and shared with every rank."""
    rank, _ = dist_info()
    labels = None
    if rank == 0:
        labels = []
        for i, name in enumerate(runtime.progress(coll.names, desc="K-means", disable=rank != 0)):
            if encoder is not None:
                X = represent(encoder, coll.features[i], device=device)
            else:
                X = coll.raw[i] if settings.kmeans_on == "raw" else coll.features[i]
            t0 = time.time()
            per_k = kmeans.pseudo_labels(X, settings.avg_cluster_num, settings.kmeans_iter, seed=settings.seed,
                                         device=device, max_cells=settings.kmeans_max_cells, tol=settings.kmeans_tol)
            log.info("%s: K-means k=%s in %.1fs", name, [int(lab.max()) + 1 for lab in per_k], time.time() - t0)
            labels.append(per_k)
        log.debug("pseudo-labels ready; peak resident memory so far %s MiB", runtime.mib(runtime.peak_memory_mib()))
    return broadcast(labels)


# --------------------------------------------------------------------------- training


class MultiTaskStep(torch.nn.Module):
    """One step's loss over every dataset's batch; one forward, so DDP wraps it cleanly."""

    def __init__(self, model: PretrainModel):
        super().__init__()
        self.model = model

    def forward(self, x, targets, dataset_ids, denominators):
        """``x``: the step's cells of the datasets ``dataset_ids``, stacked in that order;
        ``targets``: per dataset, ``cells x granularities`` head columns; ``denominators``: per
        dataset, the batch size its summed cross-entropy is divided by."""
        z = self.model.encoder(x)
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


def prepare_step(coll: Collection, targets, rows_per_dataset, rank: int, world: int, sparse: bool,
                 device: torch.device, source: DeviceCSR | None = None) -> HostStep | None:
    """This rank's share of one step's cells: gathered from ``source`` on the device, or from the
    host's collection (a ``HostCSR`` for the CPU's sparse products, a CSR otherwise)."""
    mine = [rows[rank::world] for rows in rows_per_dataset]  # this rank's share of each batch
    used = [d for d, rows in enumerate(mine) if len(rows)]
    if not used:
        return None
    rows = coll.rows_of(used, [mine[d] for d in used])
    ys = [targets[d][mine[d]] for d in used]
    # each dataset's summed loss is divided by its whole batch: a mean once DDP averages ranks
    denominators = [len(rows_per_dataset[d]) / world for d in used]
    if source is not None:
        return HostStep(used, None, ys, denominators, source.sparse(rows) if sparse else source.dense(rows))
    X = coll.stacked[rows]
    if not sparse:
        return HostStep(used, X, ys, denominators)
    if device.type == "cpu":
        return HostStep(used, HostCSR(X), ys, denominators)
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
                epoch: int, source: DeviceCSR | None = None) -> float:
    """One epoch; returns the mean step loss (the same number on every rank). ``source``: the
    collection on the device (``step_source``), where steps then gather their cells."""
    rank, world = dist_info()
    n_cells = [X.shape[0] for X in coll.features]
    steps = epoch_batches(n_cells, settings.batch_num, settings.seed, phase, epoch)
    sparse = sparse_products(settings.batch_format, device)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    # on a GPU the host prepares the next step while the device works on this one: nothing here
    # waits for the device but the logged loss. The bar is advanced by hand: iterating it over the
    # steps' batches would keep each batch referenced while the next one is gathered
    bar = runtime.progress(total=len(steps), desc=f"phase {phase} epoch {epoch}", leave=False, disable=rank != 0)
    for step, rows in enumerate(steps):
        host = prepare_step(coll, targets, rows, rank, world, sparse, device, source)
        bar.update(1)
        if host is None:
            continue
        loss = step_module(*step_inputs(host, device))
        del host  # the batch now lives only in the graph (its weight gradient reads it)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
        if rank == 0 and (step % 10 == 9 or step == len(steps) - 1):
            bar.set_postfix(loss=f"{loss.item():.4f}")  # rank 0's share estimates the whole
        # the graph, and the batch it holds, go before the next step's cells are gathered (kept to
        # the next forward, a 30,000-cell step's batch raised the peak)
        del loss
    bar.close()
    if world > 1:  # each rank's loss estimates the whole batch's: average them
        dist.all_reduce(loss_sum)
        loss_sum /= world
    return float(loss_sum) / len(steps)


@dataclass
class Start:
    """Where a phase starts: phase 2 continues the phase-1 encoder on its gene universe."""

    phase: int
    encoder: torch.nn.Module | None = None
    cfg: ModelConfig | None = None
    gene_universe: list | None = None
    model_digest: str = results.NO_MODEL
    fed: Feeding | None = None  # what the starting encoder was fed


def phase_start(settings: PretrainSettings, pretrained_model=None) -> Start:
    """Phase 1 starts from nothing; phase 2 from the phase-1 encoder ``pretrained_model``, which
    must have been fed the features this run feeds it."""
    if settings.phase == 1:
        return Start(phase=1)
    if not pretrained_model:
        raise CheckpointError("phase 2 (--pretrain_output) needs --pretrained_model FILE from phase 1")
    loaded = checkpoints.load_encoder(pretrained_model)
    cfg = ModelConfig(**loaded.ckpt["model_args"])
    if cfg.hid != settings.hid:
        log.info("phase 2 keeps the phase-1 encoder's %d hidden units (--hid %d not used)", cfg.hid, settings.hid)
    if loaded.fed.normalize != settings.normalize:
        raise CheckpointError(f"{pretrained_model}: phase 1 was fed --normalize {loaded.fed.normalize}, "
                              f"this run --normalize {settings.normalize}; phase 2 must see the same features")
    return Start(2, loaded.encoder, cfg, list(loaded.gene_universe), loaded.digest, loaded.fed)


def model_config(start: Start, coll: Collection, settings: PretrainSettings) -> ModelConfig:
    return ModelConfig(n_genes=len(coll.gene_universe), hid=start.cfg.hid if start.cfg else settings.hid,
                       sigmoid_logits=settings.sigmoid_logits)


def run_settings(settings: PretrainSettings, read: ReadSettings, start: Start, coll: Collection) -> dict:
    """Everything that changes this run's numbers (the settings' identity fields, what each dataset
    is, the gene universe, the starting model): --resume must find the same."""
    found = identity(settings, read, drop=("label_key",))
    found.update(datasets=list(coll.names), dataset_digests=list(coll.digests), gene_universe=results.short_digest(
        "\n".join(map(str, coll.gene_universe)).encode()), start_model=start.model_digest)
    return found


def build_model(cfg: ModelConfig, labels, start: Start, settings: PretrainSettings, device):
    """The model (shared encoder, side-by-side heads), its optimiser, and the step module that
    DistributedDataParallel wraps when there are several processes."""
    counts = [[int(np.max(lab)) + 1 for lab in per_d] for per_d in labels]
    torch.manual_seed(settings.seed + start.phase)
    model = PretrainModel(cfg, counts, start.encoder).to(device)
    optimizer = make_adam(model.parameters(), settings.pt_lr)
    step_module = MultiTaskStep(model)
    if dist_info()[1] > 1:
        # the only buffers are the constant head-segment matrices: nothing to broadcast each step
        step_module = torch.nn.parallel.DistributedDataParallel(step_module, find_unused_parameters=True,
                                                                broadcast_buffers=False)
    targets = [offset_targets(per_d, c) for per_d, c in zip(labels, counts)]
    return model, optimizer, step_module, targets


def new_progress() -> dict:
    return {"epoch": 0, "best_loss": float("inf"), "wait": 0, "losses": []}


def run_epochs(model, optimizer, step_module, coll, targets, labels, progress, run_ids: dict,
               settings: PretrainSettings, device, phase, resume_path: Path) -> dict:
    """Epochs until --pt_epoch or --pt_patience epochs without a lower loss; an epoch checkpoint
    after each, so that --resume can continue (``run_ids``: what it must find the same)."""
    rank, _ = dist_info()
    n_cells = sum(X.shape[0] for X in coll.features)
    source = step_source(coll, device) if progress["epoch"] < settings.pt_epoch else None
    while progress["epoch"] < settings.pt_epoch and progress["wait"] < settings.pt_patience:
        epoch = progress["epoch"] + 1
        t0 = time.time()
        loss = train_epoch(step_module, optimizer, coll, targets, settings, device, phase, epoch, source=source)
        improved = loss < progress["best_loss"]
        progress.update(epoch=epoch, best_loss=min(loss, progress["best_loss"]),
                        wait=0 if improved else progress["wait"] + 1, losses=progress["losses"] + [loss])
        if rank == 0:
            seconds = max(time.time() - t0, 1e-9)
            log.info("phase %d epoch %d: loss %.4f%s (%.1fs, %.0f cells/s)", phase, epoch, loss,
                     "" if improved else f" (no improvement for {progress['wait']})", seconds, n_cells / seconds)
            log.debug("peak resident memory so far %s MiB", runtime.mib(runtime.peak_memory_mib()))
            checkpoints.save(checkpoints.resume_checkpoint(model, optimizer, progress, labels, coll.names,
                                                           coll.gene_universe, run_ids, phase), resume_path)
    if progress["wait"] >= settings.pt_patience:
        log.info("early stop: no lower loss for %d epochs", settings.pt_patience)
    return progress


def save_final(model, cfg, coll: Collection, progress, phase: int, save_path: Path, config: dict) -> dict:
    """The self-describing encoder checkpoint, written by rank 0; the epoch checkpoint goes."""
    final = checkpoints.encoder_checkpoint(model.encoder, cfg, coll.gene_universe, fed=coll.fed, phase=phase,
                                           epoch=progress["epoch"], losses=progress["losses"], datasets=coll.names,
                                           config=config)
    if dist_info()[0] == 0:
        checkpoints.save(final, save_path)
        resume_path_for(save_path).unlink(missing_ok=True)
        log.info("saved phase-%d encoder to %s", phase, save_path)
    return final


def run_pretraining(datasets: list[data.CellData], settings: PretrainSettings, save_path, device: torch.device,
                    read: ReadSettings = ReadSettings(), pretrained_model=None, resume: bool = False,
                    config: dict | None = None) -> dict:
    """Phase 1 or 2 end to end; returns the final encoder checkpoint (also saved by rank 0).

    ``datasets`` is consumed (emptied) to keep one copy of each matrix in memory; ``read`` says how
    they were read (part of what --resume checks); ``pretrained_model`` is phase 2's start;
    ``config`` (the run's arguments) is recorded in the checkpoint.
    """
    start = phase_start(settings, pretrained_model)
    coll = build_collection(datasets, start.gene_universe, keep_raw=(start.phase == 1 and settings.kmeans_on == "raw"),
                            normalize=settings.normalize)
    if start.fed is not None and start.fed != coll.fed:
        checkpoints.check_feeding(start.fed, coll.fed, pretrained_model)
    run_ids = run_settings(settings, read, start, coll)
    save_path = Path(save_path)
    resume_path = resume_path_for(save_path)
    state = load_resume(resume_path, run_ids, start.phase) if resume else None
    labels = state["pseudo_labels"] if state else compute_pseudo_labels(coll, settings, device, start.encoder)
    # from here on the steps' buffers are reused (K-means stays under the reading threshold: kept
    # buffers of its many sizes raised the peak by up to 0.8 GB, bench/README.md)
    runtime.reuse_freed_memory()
    cfg = model_config(start, coll, settings)
    model, optimizer, step_module, targets = build_model(cfg, labels, start, settings, device)
    progress = new_progress()
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        progress = {k: state[k] for k in progress}
        log.info("resuming phase %d after epoch %d (loss %.4f)", start.phase, progress["epoch"],
                 progress["losses"][-1])
    progress = run_epochs(model, optimizer, step_module, coll, targets, labels, progress, run_ids, settings, device,
                          start.phase, resume_path)
    return save_final(model, cfg, coll, progress, start.phase, save_path, config or {})


# --------------------------------------------------------------------------- resume


def resume_path_for(save_path: Path) -> Path:
    return save_path.with_name(save_path.name + ".resume")


def load_resume(path: Path, settings: dict, phase: int) -> dict | None:
    """The interrupted run's state, after checking that every result-changing setting matches."""
    if not path.exists():
        log.warning("--resume: no epoch checkpoint at %s; starting from the beginning", path)
        return None
    state = checkpoints.load(path, checkpoints.RESUME_KIND)
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
