"""The pre-training heads alone: one step's 60 side-by-side heads, their losses and gradients,
against the limit of their matrix products. Needs no data files.

The collection's shape is ``bench/synth.py``'s (``collection_specs``: 0.5 is the whole 914,763-cell
collection, 0.05 a tenth of it), each dataset's heads are ``kmeans.granularities`` of its size, and
one step's batch of a dataset is ``n // batch_num`` cells (at least 1). ``z`` is uniform in (0, 1)
(a sigmoid's output) of width ``--hid``; the targets are uniform within each granularity.

Paths timed (forward + backward + the heads' fused Adam step, as ``model.make_adam``), each a
list in ``--paths``:

- ``per_dataset``: today's ``PretrainModel.summed_loss`` per dataset, divided by its batch and
  summed, as ``pretrain.MultiTaskStep`` did before ``heads.py``;
- ``fused``: ``heads.py``'s CPU path (``HeadBank.loss(..., path="fused")``): one GEMM per
  dataset, one numba pass over every logit of the step that writes the loss and its gradient in
  place, then the two backward GEMMs per dataset;
- ``torch``: ``heads.py``'s pure-torch path (``path="torch"``, what a GPU runs): per-dataset
  GEMMs, one loss over the concatenated logits;
- ``fused_mkl``: the fused path with every product by ``torch.mm`` one after the other (MKL on
  torch's threads), as before ``heads._products`` (2026-12-02);
- ``limit``: the three products alone, ``torch.matmul`` on the same shapes: the logits
  ``z W^T``, the weight gradient ``D^T z`` and ``z``'s gradient ``D W`` (``D`` a ready
  ``cells x k`` tensor); nothing else;
- ``limit_products``: the same three products through ``heads._products`` (numpy's BLAS, one
  thread each, side by side).

    python bench/bench_heads.py --scale 0.05
    python bench/bench_heads.py --scale 0.5 --repeats 5
    python bench/bench_heads.py --scale 0.05 --device cuda --paths per_dataset,torch,limit
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]

import synth  # noqa: E402

PATHS = ("per_dataset", "fused", "fused_mkl", "torch", "limit", "limit_products")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=0.05, help="synthetic collection scale (default: %(default)s)")
    p.add_argument("--n_datasets", type=int, default=60, help="(default: %(default)s)")
    p.add_argument("--batch_num", type=int, default=30, help="steps per epoch (default: %(default)s)")
    p.add_argument("--hid", type=int, default=200, help="(default: %(default)s)")
    p.add_argument("--avg_cluster_num", type=int, default=100, help="(default: %(default)s)")
    p.add_argument("--no_sigmoid_logits", action="store_true", help="plain cross-entropy on the logits")
    p.add_argument("--paths", default=None,
                   help=f"comma-separated, of {','.join(PATHS)} (default: all but fused on a GPU, all on the CPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per path (default: 20, 5 at scale >= 0.2)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps of each path first, which its peak memory is read over (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    return p.parse_args(argv)


def shapes(args) -> tuple[list[int], list[list[int]], list[int]]:
    """Per dataset: its cells, its three numbers of clusters, its step batch."""
    import kmeans

    n_cells = [s.n_cells for s in synth.collection_specs(args.n_datasets, args.scale, seed=args.seed)]
    counts = [kmeans.granularities(n, args.avg_cluster_num) for n in n_cells]
    return n_cells, counts, [max(1, n // args.batch_num) for n in n_cells]


def setup(args, counts, batches, device):
    import torch

    from model import ModelConfig, PretrainModel, head_offsets

    torch.manual_seed(args.seed + 1)
    model = PretrainModel(ModelConfig(n_genes=1, hid=args.hid, sigmoid_logits=not args.no_sigmoid_logits),
                          counts).to(device)
    gen = torch.Generator().manual_seed(args.seed)
    z = torch.rand(sum(batches), args.hid, generator=gen).to(device)
    targets = []
    for c, b in zip(counts, batches):
        cols = [torch.randint(0, k, (b,), generator=gen) + o for k, o in zip(c, head_offsets(c))]
        targets.append(torch.stack(cols, 1).to(device))
    denominators = torch.tensor([float(b) for b in batches], device=device)
    return model, z, targets, denominators


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, repeats: int, warmup: int, device) -> list[float]:
    """Seconds of each of ``repeats`` steps after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    sync(device)
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        sync(device)
        out.append(time.perf_counter() - t)
    return out


def _one_by_one(jobs) -> None:
    """``heads._products`` as it was before 2026-12-02: ``torch.mm`` after ``torch.mm``."""
    import torch

    for a, b, out in jobs:
        torch.mm(a, b, out=out)


def make_step(path: str, model, z, targets, denominators, optimizer):
    import torch

    import heads

    ids = list(range(len(targets)))
    rows = [t.shape[0] for t in targets]
    if path == "fused_mkl":
        fused = make_step("fused", model, z, targets, denominators, optimizer)

        def step():
            saved, heads._products = heads._products, _one_by_one
            try:
                fused()
            finally:
                heads._products = saved
            step.loss = fused.loss
        return step
    if path == "limit_products":
        weights = [h.weight.detach() for h in model.heads]
        grads = [torch.rand(b, w.shape[0]) * 1e-3 for b, w in zip(rows, weights)]
        zs = torch.split(z, rows)
        outs = [(torch.empty(b, w.shape[0]), torch.empty(w.shape), torch.empty(b, w.shape[1]))
                for b, w in zip(rows, weights)]

        def step():
            heads._products([(z_d, w.t(), o[0]) for z_d, w, o in zip(zs, weights, outs)])
            heads._products([job for z_d, w, g, o in zip(zs, weights, grads, outs)
                             for job in ((g.t(), z_d, o[1]), (g, w, o[2]))])
        return step
    if path == "limit":
        weights = [h.weight.detach() for h in model.heads]
        grads = [torch.rand(b, w.shape[0], device=z.device) * 1e-3 for b, w in zip(rows, weights)]
        zs = torch.split(z, rows)

        def step():
            for z_d, w, g in zip(zs, weights, grads):
                torch.matmul(z_d, w.t())  # the logits
                torch.matmul(g.t(), z_d)  # the weight gradient
                torch.matmul(g, w)  # z's gradient
        return step

    def step():
        x = z.detach().requires_grad_(True)
        if path == "per_dataset":
            losses = [model.summed_loss(z_d, d, t_d) for z_d, t_d, d in zip(torch.split(x, rows), targets, ids)]
            loss = (torch.stack(losses) / denominators).sum()
        else:
            loss = model.heads.loss(x, targets, ids, denominators, model.cfg.sigmoid_logits, path=path)
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
        step.loss = float(loss.detach())  # a sync on a GPU, as train_epoch's logged loss
    return step


def main(args) -> dict:
    import torch

    import runtime
    from model import make_adam

    runtime.flush_denormals()  # as main.py runs
    runtime.reuse_freed_memory()  # as pretrain.run_pretraining from the epochs on
    device = torch.device(args.device)
    cpu_only = ("fused", "fused_mkl", "limit_products")
    paths = args.paths.split(",") if args.paths else [p for p in PATHS if device.type == "cpu" or p not in cpu_only]
    unknown = set(paths) - set(PATHS)
    if unknown:
        raise SystemExit(f"unknown paths {sorted(unknown)}; choose from {PATHS}")
    repeats = args.repeats or (5 if args.scale >= 0.2 else 20)
    n_cells, counts, batches = shapes(args)
    k_total = [sum(c) for c in counts]
    logits = sum(b * k for b, k in zip(batches, k_total))
    gflop = 3 * 2 * args.hid * logits / 1e9
    print(f"scale {args.scale:g}: {len(n_cells)} datasets, {sum(n_cells):,} cells; a step: {sum(batches):,} cells, "
          f"{logits / 1e6:.1f} M logits, {gflop:.1f} GFLOP in its three products; k per dataset "
          f"{min(k_total)}-{max(k_total)} (sum {sum(k_total):,}); hid {args.hid}; sigmoid "
          f"{not args.no_sigmoid_logits}; device {device}, torch threads {torch.get_num_threads()}; "
          f"{repeats} timed steps per path; code {synth.code_version(('model.py', 'pretrain.py', 'heads.py'))}",
          flush=True)
    # each path from the same heads and Adam state (their losses after as many steps agree): first
    # its warm-up steps alone, which give its peak memory; then the timed steps round-robin, one
    # step of every path in turn, so that load from other processes falls on all paths alike
    steps, results = {}, {}
    if {"fused", "fused_mkl"} & set(paths):  # numba loads (or compiles) its kernels on first use: not a step's memory
        tiny = argparse.Namespace(**{**vars(args), "scale": 0.0, "n_datasets": 2})
        make_step("fused", *setup(tiny, [[2, 3, 2]] * 2, [3, 3], device), None)()
    for path in paths:
        model, z, targets, denominators = setup(args, counts, batches, device)
        optimizer = make_adam(model.heads.parameters(), 1e-4)
        steps[path] = make_step(path, model, z, targets, denominators, optimizer)
        sync(device)
        before = synth.memory_mib()["rss"]
        reset = synth.reset_peak_memory()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        time_steps(steps[path], 0, max(1, args.warmup), device)
        results[path] = {"peak_mib": synth.memory_mib()["peak"] if reset else float("nan"), "rss_before_mib": before}
        if device.type == "cuda":
            results[path]["gpu_peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    seconds = {path: [] for path in paths}
    for _ in range(repeats):
        for path in paths:
            seconds[path] += time_steps(steps[path], 1, 0, device)
    for path in paths:
        s = seconds[path]
        results[path].update(min=min(s), median=statistics.median(s), max=max(s), seconds=s,
                             loss=getattr(steps[path], "loss", None))
    limit = results.get("limit")
    print(f"{'path':<12} {'s/step min':>10} {'median':>8} {'s/epoch':>8} {'/ limit':>13} {'peak MiB':>9} "
          f"{'(+ over start)':>14}  loss")
    for path, r in results.items():
        ratio = f"{r['min'] / limit['min']:6.2f} {r['median'] / limit['median']:6.2f}" if limit else f"{'-':>13}"
        peak = r["peak_mib"]
        extra = f" gpu peak {r['gpu_peak_mib']:.0f} MiB" if "gpu_peak_mib" in r else ""
        loss = f"{r['loss']:.6f}" if r["loss"] is not None else "-"
        print(f"{path:<12} {r['min']:10.4f} {r['median']:8.4f} {args.batch_num * r['median']:8.2f} {ratio} "
              f"{peak:9.0f} {peak - r['rss_before_mib']:+14.0f}  {loss}{extra}")
    if limit:
        print(f"the product limit: {gflop / limit['min']:.0f} GFLOP/s (its fastest step); '/ limit': min over "
              f"min, median over median; s/epoch = {args.batch_num} x the median step; peak: over the "
              f"warm-up steps")
    out = {"scale": args.scale, "device": str(device), "threads": torch.get_num_threads(), "gflop": gflop,
           "logits": logits, "sigmoid": not args.no_sigmoid_logits, "paths": results}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main(parse_args())
