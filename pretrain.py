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

import common
import data
import kmeans
import results
from model import (RESUME_KIND, CheckpointError, DeviceCSR, HostCSR, ModelConfig, PretrainModel, SparseBatch,
                   atomic_torch_save, device_sparse_batch, encoder_checkpoint, encoder_from_checkpoint, load_checkpoint,
                   make_adam, model_normalize, offset_targets, represent, to_device)

log = logging.getLogger("scpretrain.pretrain")


def add_pretrain_args(parser) -> None:
    g = parser.add_argument_group("pre-training")
    g.add_argument("--pt_lr", type=common.positive_float, default=1e-4, help="Adam learning rate (default: %(default)s)")
    g.add_argument("--pt_epoch", type=common.positive_int, default=50, help="at most this many epochs (default: %(default)s)")
    g.add_argument("--pt_patience", type=common.positive_int, default=5, help="stop after this many epochs without a lower loss (default: %(default)s)")
    g.add_argument("--batch_num", type=common.positive_int, default=30, help="steps per epoch; batch of a dataset = n/batch_num (default: %(default)s)")
    g.add_argument("--avg_cluster_num", type=common.positive_int, default=100, help="a in k = n//a, n//(a//2), n//(2a)+1 (default: %(default)s)")
    g.add_argument("--kmeans_iter", type=common.positive_int, default=20, help="K-means iterations (default: %(default)s)")
    g.add_argument("--kmeans_tol", type=common.kmeans_tolerance, default=kmeans.DEFAULT_TOL,
                   help="stop K-means once at most this share of cells changes cluster in an iteration; 0 = "
                        "when none changes (the same clusters as all --kmeans_iter iterations, sooner); -1 = "
                        "never stop early, exactly --kmeans_iter iterations as the original (default: %(default)s)")
    g.add_argument("--kmeans_on", choices=["log1p", "raw"], default="log1p",
                   help="phase-1 K-means input; 'raw' is the original's (default: %(default)s)")
    g.add_argument("--kmeans_max_cells", type=common.non_negative_int, default=0,
                   help="fit K-means centroids on at most this many sampled cells, then assign all "
                        "(0 = all cells, as the original; default: %(default)s)")
    g.add_argument("--no_sigmoid_logits", action="store_true",
                   help="plain cross-entropy on the heads' logits (the original applies a sigmoid first)")
    g.add_argument("--pretrain_output", action="store_true",
                   help="phase 2: cluster the --pretrained_model encoder's output and continue training it")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch checkpoint")
    g.add_argument("--pca_pt", action="store_true",
                   help="the original's PCA inputs for pre-training: not available in this version (it stops "
                        "with a message); --pca_ft is")
    g.add_argument("--batch_format", choices=["auto", "sparse", "dense"], default="auto",
                   help="how a step's cells reach the encoder: CSR products (only the non-zeros are multiplied) "
                        "or a dense batch; auto = sparse on CPU, dense on GPU (default: %(default)s)")


@dataclass
class Collection:
    """The pre-training inputs: names and log1p CSR matrices aligned to one gene universe."""

    names: list[str]
    features: list[sp.csr_matrix]  # the encoder's input (data.features), cells x universe genes: views of stacked
    raw: list[sp.csr_matrix | None]  # raw values, kept only when K-means wants them
    gene_universe: np.ndarray
    stacked: sp.csr_matrix  # every dataset's features (float32), one under the other: a step's one row gather
    offsets: np.ndarray  # the first row of each dataset in stacked, and the total

    @classmethod
    def of_stacked(cls, names, stacked: sp.csr_matrix, offsets: np.ndarray, raw, gene_universe) -> "Collection":
        """The collection whose datasets are the row ranges ``offsets`` of ``stacked``."""
        views = [data.row_block(stacked, offsets[i], offsets[i + 1]) for i in range(len(offsets) - 1)]
        return cls(list(names), views, raw, np.asarray(gene_universe, dtype=object), stacked, offsets)

    def rows_of(self, datasets: list[int], rows: list[np.ndarray]) -> np.ndarray:
        """Rows of ``stacked`` for the given rows of the given datasets, dataset after dataset."""
        return np.concatenate([self.offsets[d] + np.asarray(r, dtype=np.int64) for d, r in zip(datasets, rows)])


def build_collection(datasets: list[data.CellData], gene_universe=None, keep_raw: bool = False,
                     normalize: str = "none") -> Collection:
    """Align every dataset to the universe; ``datasets`` is emptied as it goes, so that each
    unaligned matrix is freed as soon as its aligned copy exists (memory stays flat)."""
    universe = data.build_gene_universe(datasets) if gene_universe is None else np.asarray(gene_universe, dtype=object)
    log.info("gene universe: %d genes", len(universe))
    names, raw = [], []
    # aligning keeps or sums a dataset's values, never adds any: their total bounds the collection's
    stack = data.CSRStack(len(universe), sum(d.X.nnz for d in datasets))
    while datasets:
        d = datasets.pop(0)
        aligned = data.align_to_universe(d, universe)
        names.append(d.name)
        del d
        stack.append(data.features(aligned, normalize))
        raw.append(aligned.X if keep_raw else None)
        del aligned
    return Collection.of_stacked(names, *stack.finish(), raw, universe)


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


def compute_pseudo_labels(coll: Collection, args, device, encoder=None) -> list[list[np.ndarray]]:
    """Labels at the three granularities for every dataset: on the input (phase 1) or on the
    encoder's output (phase 2). Computed on rank 0 and shared with every rank."""
    rank, _ = dist_info()
    labels = None
    if rank == 0:
        labels = []
        for i, name in enumerate(common.progress(coll.names, desc="K-means", disable=rank != 0)):
            if encoder is not None:
                X = represent(encoder, coll.features[i], device=device)
            else:
                X = coll.raw[i] if args.kmeans_on == "raw" else coll.features[i]
            t0 = time.time()
            per_k = kmeans.pseudo_labels(X, args.avg_cluster_num, args.kmeans_iter, seed=args.seed, device=device,
                                         max_cells=args.kmeans_max_cells, tol=args.kmeans_tol)
            log.info("%s: K-means k=%s in %.1fs", name, [int(lab.max()) + 1 for lab in per_k], time.time() - t0)
            labels.append(per_k)
        log.debug("pseudo-labels ready; peak resident memory so far %s MiB", _mib(common.peak_memory_mib()))
    return broadcast(labels)


def _mib(value: float | None) -> str:
    return "unknown" if value is None else f"{value:,.0f}"


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


def sparse_input(args, device: torch.device) -> bool:
    """Whether ``--batch_format`` sends CSR batches to the encoder on this device."""
    return args.batch_format == "sparse" or (args.batch_format == "auto" and device.type != "cuda")


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


def train_epoch(step_module, optimizer, coll: Collection, targets, args, device, phase: int, epoch: int,
                source: DeviceCSR | None = None) -> float:
    """One epoch; returns the mean step loss (the same number on every rank). ``source``: the
    collection on the device (``step_source``), where steps then gather their cells."""
    rank, world = dist_info()
    n_cells = [X.shape[0] for X in coll.features]
    steps = epoch_batches(n_cells, args.batch_num, args.seed, phase, epoch)
    sparse = sparse_input(args, device)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    # on a GPU the host prepares the next step while the device works on this one: nothing here
    # waits for the device but the logged loss. The bar is advanced by hand: iterating it over the
    # steps' batches would keep each batch referenced while the next one is gathered
    bar = common.progress(total=len(steps), desc=f"phase {phase} epoch {epoch}", leave=False, disable=rank != 0)
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


# the arguments that change a pre-training run's numbers; --resume refuses when any differs
# (extending --pt_epoch / --pt_patience is allowed; --batch_format changes only float rounding)
RESULT_SETTINGS = (*common.INPUT_OPTIONS, "normalize", "pt_lr", "hid", "batch_num", "avg_cluster_num", "kmeans_iter",
                   "kmeans_tol", "kmeans_on", "kmeans_max_cells", "no_sigmoid_logits", "seed", "pretrain_output")


@dataclass
class Start:
    """Where a phase starts: phase 2 continues the phase-1 encoder on its gene universe."""

    phase: int
    encoder: torch.nn.Module | None = None
    cfg: ModelConfig | None = None
    gene_universe: list | None = None
    model_digest: str = results.NO_MODEL


def phase_start(args) -> Start:
    if not args.pretrain_output:
        return Start(phase=1)
    if not args.pretrained_model:
        raise CheckpointError("phase 2 (--pretrain_output) needs --pretrained_model FILE from phase 1")
    ckpt = load_checkpoint(args.pretrained_model)
    encoder, cfg = encoder_from_checkpoint(ckpt, args.pretrained_model)
    if cfg.hid != args.hid:
        log.info("phase 2 keeps the phase-1 encoder's %d hidden units (--hid %d not used)", cfg.hid, args.hid)
    if model_normalize(ckpt) != args.normalize:
        raise CheckpointError(f"{args.pretrained_model}: phase 1 was fed --normalize {model_normalize(ckpt)}, "
                              f"this run --normalize {args.normalize}; phase 2 must see the same features")
    return Start(2, encoder, cfg, ckpt["gene_universe"], results.model_digest(ckpt))


def model_config(start: Start, coll: Collection, args) -> ModelConfig:
    return ModelConfig(n_genes=len(coll.gene_universe), hid=start.cfg.hid if start.cfg else args.hid,
                       sigmoid_logits=not args.no_sigmoid_logits)


def run_settings(args, start: Start, coll: Collection) -> dict:
    """Everything that changes this run's numbers: --resume must find the same."""
    settings = results.settings_of(args, RESULT_SETTINGS)
    settings.update(datasets=list(coll.names), gene_universe=results.short_digest(
        "\n".join(map(str, coll.gene_universe)).encode()), start_model=start.model_digest)
    return settings


def build_model(cfg: ModelConfig, labels, start: Start, args, device):
    """The model (shared encoder, side-by-side heads), its optimiser, and the step module that
    DistributedDataParallel wraps when there are several processes."""
    counts = [[int(np.max(lab)) + 1 for lab in per_d] for per_d in labels]
    torch.manual_seed(args.seed + start.phase)
    model = PretrainModel(cfg, counts, start.encoder).to(device)
    optimizer = make_adam(model.parameters(), args.pt_lr)
    step_module = MultiTaskStep(model)
    if dist_info()[1] > 1:
        # the only buffers are the constant head-segment matrices: nothing to broadcast each step
        step_module = torch.nn.parallel.DistributedDataParallel(step_module, find_unused_parameters=True,
                                                                broadcast_buffers=False)
    targets = [offset_targets(per_d, c) for per_d, c in zip(labels, counts)]
    return model, optimizer, step_module, targets


def new_progress() -> dict:
    return {"epoch": 0, "best_loss": float("inf"), "wait": 0, "losses": []}


def run_epochs(model, optimizer, step_module, coll, targets, labels, progress, settings, args, device, phase,
               resume_path: Path) -> dict:
    """Epochs until --pt_epoch or --pt_patience epochs without a lower loss; an epoch checkpoint
    after each, so that --resume can continue."""
    rank, _ = dist_info()
    n_cells = sum(X.shape[0] for X in coll.features)
    source = step_source(coll, device) if progress["epoch"] < args.pt_epoch else None
    while progress["epoch"] < args.pt_epoch and progress["wait"] < args.pt_patience:
        epoch = progress["epoch"] + 1
        t0 = time.time()
        loss = train_epoch(step_module, optimizer, coll, targets, args, device, phase, epoch, source=source)
        improved = loss < progress["best_loss"]
        progress.update(epoch=epoch, best_loss=min(loss, progress["best_loss"]),
                        wait=0 if improved else progress["wait"] + 1, losses=progress["losses"] + [loss])
        if rank == 0:
            seconds = max(time.time() - t0, 1e-9)
            log.info("phase %d epoch %d: loss %.4f%s (%.1fs, %.0f cells/s)", phase, epoch, loss,
                     "" if improved else f" (no improvement for {progress['wait']})", seconds, n_cells / seconds)
            log.debug("peak resident memory so far %s MiB", _mib(common.peak_memory_mib()))
            save_resume(resume_path, model, optimizer, progress, labels, coll, settings, phase)
    if progress["wait"] >= args.pt_patience:
        log.info("early stop: no lower loss for %d epochs", args.pt_patience)
    return progress


def save_final(model, cfg, coll, progress, args, phase: int, save_path: Path) -> dict:
    """The self-describing encoder checkpoint, written by rank 0; the epoch checkpoint goes."""
    final = encoder_checkpoint(model.encoder, cfg, coll.gene_universe, results.args_to_dict(args), phase,
                               progress["epoch"], progress["losses"][-1] if progress["losses"] else float("nan"))
    final["losses"] = list(map(float, progress["losses"]))
    final["normalize"] = args.normalize
    final["datasets"] = list(coll.names)
    if dist_info()[0] == 0:
        atomic_torch_save(final, save_path)
        resume_path_for(save_path).unlink(missing_ok=True)
        log.info("saved phase-%d encoder to %s", phase, save_path)
    return final


def run_pretraining(args, datasets: list[data.CellData], device: torch.device) -> dict:
    """Phase 1 or 2 end to end; returns the final encoder checkpoint (also saved by rank 0).

    ``datasets`` is consumed (emptied) to keep one copy of each matrix in memory.
    """
    start = phase_start(args)
    coll = build_collection(datasets, start.gene_universe, keep_raw=(start.phase == 1 and args.kmeans_on == "raw"),
                            normalize=args.normalize)
    settings = run_settings(args, start, coll)
    save_path = Path(args.save_model)
    resume_path = resume_path_for(save_path)
    state = load_resume(resume_path, settings, start.phase) if args.resume else None
    labels = state["pseudo_labels"] if state else compute_pseudo_labels(coll, args, device, start.encoder)
    # from here on the steps' buffers are reused (K-means stays under the reading threshold: kept
    # buffers of its many sizes raised the peak by up to 0.8 GB, bench/README.md)
    common.reuse_freed_memory()
    cfg = model_config(start, coll, args)
    model, optimizer, step_module, targets = build_model(cfg, labels, start, args, device)
    progress = new_progress()
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        progress = {k: state[k] for k in progress}
        log.info("resuming phase %d after epoch %d (loss %.4f)", start.phase, progress["epoch"],
                 progress["losses"][-1])
    progress = run_epochs(model, optimizer, step_module, coll, targets, labels, progress, settings, args, device,
                          start.phase, resume_path)
    return save_final(model, cfg, coll, progress, args, start.phase, save_path)


# --------------------------------------------------------------------------- resume


def resume_path_for(save_path: Path) -> Path:
    return save_path.with_name(save_path.name + ".resume")


def save_resume(path: Path, model, optimizer, progress, labels, coll: Collection, settings: dict,
                phase: int) -> None:
    atomic_torch_save({
        "kind": RESUME_KIND,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},  # saved at once: no copy needed
        "optimizer": optimizer.state_dict(),
        **progress,
        "pseudo_labels": [[torch.as_tensor(lab) for lab in per_d] for per_d in labels],
        "datasets": list(coll.names),
        "gene_universe": [str(g) for g in coll.gene_universe],
        "phase": phase,
        "settings": settings,
    }, path)


def load_resume(path: Path, settings: dict, phase: int) -> dict | None:
    """The interrupted run's state, after checking that every result-changing setting matches."""
    if not path.exists():
        log.warning("--resume: no epoch checkpoint at %s; starting from the beginning", path)
        return None
    state = load_checkpoint(path, kind=RESUME_KIND)
    saved = state.get("settings")
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: written by an older version without its settings; delete it or run "
                              "without --resume")
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
