"""Pre-training in several processes (``torchrun``, on one node or several): the datasets shared
out among the ranks by their cost, what the ranks tell each other, and the process group's start
and end. One process is the one-rank case: every function here is then a no-op or the identity.
Importing does nothing.
"""
from __future__ import annotations

import heapq
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger("scpretrain.pretrain")


# --------------------------------------------------------------------------- the process group


def dist_info() -> tuple[int, int]:
    """(this process's rank, the number of processes); (0, 1) outside torchrun."""
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


# --------------------------------------------------------------------------- what ranks tell each other


def broadcast(obj):
    """Rank 0's object on every rank."""
    rank, world = dist_info()
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_all(obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    _, world = dist_info()
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def gather_to_root(obj) -> list | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None on the others)."""
    rank, world = dist_info()
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def sum_over_ranks_(tensors: list[torch.Tensor]) -> None:
    """Each tensor replaced, in place, by its sum over the ranks (one all-reduce of one buffer)."""
    if dist_info()[1] == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    at = 0
    for t in tensors:
        t.copy_(flat[at:at + t.numel()].view_as(t))
        at += t.numel()


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class ShardPlan:
    """Which rank owns each dataset of the collection (by its index in the collection's order)."""

    owners: tuple[int, ...]
    world: int

    def mine(self, rank: int) -> list[int]:
        return [i for i, owner in enumerate(self.owners) if owner == rank]

    def describe(self, names, cells) -> list[dict]:
        """Per rank: its datasets' names and how many cells they hold."""
        return [{"rank": r, "datasets": [names[i] for i in self.mine(r)],
                 "cells": int(sum(cells[i] for i in self.mine(r)))} for r in range(self.world)]


def plan_shards(costs, world: int) -> ShardPlan:
    """Datasets shared out so that every rank's summed cost is about the same: the costliest first,
    each to the rank with the least so far (ties: the lower rank). The same on every rank."""
    loads = [(0.0, r) for r in range(world)]
    heapq.heapify(loads)
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        load, rank = heapq.heappop(loads)
        owners[i] = rank
        heapq.heappush(loads, (load + float(costs[i]), rank))
    return ShardPlan(tuple(owners), world)


def dataset_cost(path) -> float:
    """What a dataset costs pre-training, from its file's metadata (nothing is read): its stored
    values times its cells (K-means' products and the heads' grow with both); the file's size
    where the layout says nothing."""
    import h5py

    path = Path(path)
    try:
        if path.is_dir():
            header = np.load(path / "feature.npy", mmap_mode="r").shape
            return float(header[0]) * header[0] * header[1]
        with h5py.File(path, "r") as h5:
            for member in ("exprs", "X", "raw/X"):
                if member in h5:
                    node = h5[member]
                    if isinstance(node, h5py.Dataset):
                        return float(node.shape[0]) * node.shape[0] * node.shape[1]
                    n_cells = node["indptr"].shape[0] - 1 if "indptr" in node else 1
                    return float(node["data"].shape[0]) * n_cells
    except (OSError, KeyError, ValueError, TypeError):
        pass
    return float(path.stat().st_size) if path.exists() else 0.0
