"""One pre-training epoch: our sparse-until-the-batch loop vs its limit vs the original's data path.

On a synthetic collection shaped like the paper's (``bench/synth.py``, scaled by ``--scale``):

(a) the pure limit: only the encoder's matrix products, forward ``x W^T`` and the weight
    gradient ``g^T x``, on dense float32 batches of the same shapes as one epoch's steps,
    already in memory, no data preparation;
(b) our epoch: ``pretrain.train_epoch`` with a ``PretrainModel``/``MultiTaskStep`` built as
    ``pretrain.run_pretraining`` builds them (CSR features, each step densifies its rows);
(c) the original's approach re-created: every dataset densified whole (numpy float64, then a
    torch float32 tensor of raw values), a ``torch.utils.data.Dataset`` with a per-cell
    ``__getitem__``, one default-collating ``DataLoader`` per dataset (batch n // batch_num,
    shuffled), log1p of every collated batch, the encoder run per dataset, one ``nn.Linear``
    head and one mean cross-entropy per granularity, Adam with torch's defaults.

(b) and (c) run in fresh subprocesses that read the same .h5 files; their peak resident memory
is VmHWM from /proc/self/status at the end of the run (loading included). (a) and a
dense-vs-sparse-CSR comparison of the encoder product run in (b)'s process after its peak
was read. Pseudo-labels are seeded random labels with the K-means numbers of clusters (epoch
cost does not depend on their values); ``--kmeans`` computes the real ones first.

Targets: (b) within 1.5x of (a); (b) at least 5x faster than (c); peak of (b) at most 1/5 of (c).

    python bench/bench_pretrain.py --scale 0.01
    python bench/bench_pretrain.py --scale 0.05 --device cuda --skip_original   # (a) and (b) on a GPU
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]

import synth  # noqa: E402

TARGETS = {"b_over_a": 1.5, "c_over_b": 5.0, "peak_c_over_b": 5.0}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=0.01, help="synthetic collection scale (default: %(default)s)")
    p.add_argument("--n_datasets", type=int, default=60, help="(default: %(default)s)")
    p.add_argument("--genes", type=int, default=17000, help="(default: %(default)s)")
    p.add_argument("--density", type=float, default=0.05, help="(default: %(default)s)")
    p.add_argument("--batch_num", type=int, default=30, help="steps per epoch (default: %(default)s)")
    p.add_argument("--hid", type=int, default=200, help="(default: %(default)s)")
    p.add_argument("--epochs", type=int, default=2, help="epochs timed; the fastest counts (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--batch_format", choices=["auto", "sparse", "dense"], default="auto",
                   help="pretrain.py's --batch_format for (b) (default: %(default)s)")
    p.add_argument("--kmeans", action="store_true", help="real K-means pseudo-labels (slower; timed apart)")
    p.add_argument("--device", default="cpu",
                   help="torch device of (a) and (b), e.g. cuda; (c) stays on the CPU (default: %(default)s)")
    p.add_argument("--skip_original", action="store_true", help="do not run (c)")
    p.add_argument("--prepare_only", action="store_true", help="write the collection, measure nothing")
    p.add_argument("--data_dir", default=None, help="collection folder (default: bench/out/synth_s{scale})")
    p.add_argument("--omp_wait_policy", default="",
                   help="OMP_WAIT_POLICY of the measured runs; unset ('') is what users run with; PASSIVE "
                        "stops idle OpenMP threads spin-waiting when other work shares the cores, at a cost "
                        "to short parallel regions (default: unset)")
    p.add_argument("--worker", choices=["ours", "original"], help=argparse.SUPPRESS)
    p.add_argument("--paths_file", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- shared by (b) and (c)


def load(paths):
    import data

    return data.load_collection(paths)


def pseudo_targets(n_cells: list[int], seed: int, coll=None, kmeans_on: bool = False):
    """Per dataset, the ``cells x 3`` head columns of pseudo-labels, and the numbers of clusters."""
    import kmeans
    from model import offset_targets

    targets, counts = [], []
    for d, n in enumerate(n_cells):
        if kmeans_on:
            labels = kmeans.pseudo_labels(coll.features[d], seed=seed)
        else:
            rng = np.random.default_rng([seed, d])
            labels = [rng.integers(0, k, n) for k in kmeans.granularities(n)]
            for lab, k in zip(labels, kmeans.granularities(n)):
                lab[:k] = np.arange(k)  # every cluster present, as K-means gives
        counts.append([int(lab.max()) + 1 for lab in labels])
        targets.append(offset_targets(labels, counts[-1]))
    return targets, counts


def build_model(n_genes: int, counts, hid: int, seed: int, device="cpu"):
    import torch

    import pretrain
    from model import ModelConfig, PretrainModel, make_adam

    torch.manual_seed(seed + 1)
    model = PretrainModel(ModelConfig(n_genes=n_genes, hid=hid, sigmoid_logits=True), counts).to(device)
    step = pretrain.MultiTaskStep(model)
    return model, step, make_adam(model.parameters(), 1e-4)


# --------------------------------------------------------------------------- (b) ours, then (a)


def worker_ours(paths, args) -> dict:
    import torch

    import pretrain
    import runtime
    from settings import PretrainSettings
    from sparse import sparse_products

    t0 = time.perf_counter()
    coll = pretrain.build_collection(load(paths))  # as main.py: the list is emptied as it is aligned
    n_cells = [X.shape[0] for X in coll.features]
    t_kmeans = time.perf_counter()
    targets, counts = pseudo_targets(n_cells, args.seed, coll, args.kmeans)
    t_kmeans = time.perf_counter() - t_kmeans
    runtime.reuse_freed_memory()  # as pretrain.run_pretraining once the pseudo-labels are there
    load_seconds = time.perf_counter() - t0 - t_kmeans
    device = torch.device(args.device)
    model, step_module, optimizer = build_model(len(coll.gene_universe), counts, args.hid, args.seed, device)
    settings = PretrainSettings(hid=args.hid, batch_num=args.batch_num, seed=args.seed, batch_format=args.batch_format)
    epoch_seconds = []
    source = pretrain.step_source(coll, device)  # as run_epochs: on a GPU with room, the collection goes there
    for epoch in range(1, args.epochs + 1):
        t = time.perf_counter()
        pretrain.train_epoch(step_module, optimizer, coll, targets, settings, device, 1, epoch, source)  # ends on .item()
        epoch_seconds.append(time.perf_counter() - t)
    mem = synth.memory_mib()
    steps = pretrain.epoch_batches(n_cells, args.batch_num, args.seed, 1, 1)
    limit = pure_limit(coll, targets, steps, model.encoder.linear.weight.detach(), device)
    return {"cells": int(sum(n_cells)), "datasets": len(n_cells), "genes": len(coll.gene_universe),
            "nnz": int(sum(X.nnz for X in coll.features)), "load_seconds": load_seconds, "kmeans_seconds": t_kmeans,
            "epoch_seconds": epoch_seconds, "steps_gathered_on_device": source is not None,
            "peak_mib": mem["peak"], "batch_format": "sparse" if sparse_products(
                settings.batch_format, device) else "dense", "torch_threads": torch.get_num_threads(), "device": str(device), **limit}


def _step_input(coll, targets, rows_per_dataset, sparse: bool, device):
    """The encoder's input for one step exactly as pretrain.train_epoch builds it, on ``device``."""
    import pretrain

    host = pretrain.prepare_step(coll, targets, rows_per_dataset, sparse, device)
    return pretrain.step_inputs(host, device)[0]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pure_limit(coll, targets, steps, weight, device, repeats: int = 2) -> dict:
    """(a): the encoder's two products per step on ready dense batches; and the same on torch CSR."""
    import torch

    from sparse import HostCSR

    hid, n_genes = weight.shape
    sizes = [sum(len(r) for r in rows) for rows in steps]
    first = _step_input(coll, targets, steps[0], False, device)
    x = torch.zeros(max(sizes), n_genes, device=device)
    x[:len(first)] = first
    del first
    grad = torch.full((max(sizes), hid), 1e-3, device=device)
    y = torch.empty(max(sizes), hid, device=device)
    grad_w = torch.empty(hid, n_genes, device=device)
    w_t = weight.t()

    def dense_epoch():
        _sync(device)
        t = time.perf_counter()
        for b in sizes:
            torch.mm(x[:b], w_t, out=y[:b])
            torch.mm(grad[:b].t(), x[:b], out=grad_w)
        _sync(device)
        return time.perf_counter() - t

    dense = min(dense_epoch() for _ in range(repeats))
    # the same products on the sparse batches the epoch uses: on the CPU csr_kernels' gene-blocked
    # products on HostCSR batches, on a GPU torch CSR batches and their transposes
    batches = [_step_input(coll, targets, rows, True, device) for rows in steps]
    w_tc = w_t.contiguous()
    w_np, bias, grad_np = w_tc.cpu().numpy(), np.zeros(hid, np.float32), grad.cpu().numpy()

    def sparse_epoch():
        _sync(device)
        t = time.perf_counter()
        for batch in batches:
            if isinstance(batch, HostCSR):
                batch.times(w_np, bias)
                batch.transposed_times(grad_np[:batch.shape[0]])
            else:
                batch.x @ w_tc
                torch.sparse.mm(batch.x_t, grad[:batch.x.shape[0]])
        _sync(device)
        return time.perf_counter() - t

    sparse = min(sparse_epoch() for _ in range(repeats))
    del batches, x
    # what each costs with its per-step data preparation from the CSR collection
    t = time.perf_counter()
    for rows in steps:
        _step_input(coll, targets, rows, False, device)
    _sync(device)
    dense_prep = time.perf_counter() - t
    t = time.perf_counter()
    for rows in steps:
        _step_input(coll, targets, rows, True, device)
    _sync(device)
    sparse_prep = time.perf_counter() - t
    return {"limit_dense_seconds": dense, "limit_sparse_seconds": sparse, "prep_dense_seconds": dense_prep,
            "prep_sparse_seconds": sparse_prep, "steps": len(steps), "mean_batch": float(np.mean(sizes))}


# --------------------------------------------------------------------------- (c) the original's data path


def worker_original(paths, args) -> dict:
    import torch
    from torch.utils.data import DataLoader, Dataset

    import genes as gn

    class CellDataset(Dataset):
        """The original's per-cell dataset: one (feature row, labels) pair per __getitem__."""

        def __init__(self, feature, label):
            self.feature, self.label = feature, label

        def __getitem__(self, idx):
            return self.feature[idx], self.label[idx]

        def __len__(self):
            return len(self.label)

    t0 = time.perf_counter()
    datasets = load(paths)
    universe = gn.build_gene_universe(datasets)
    features = []
    for i, d in enumerate(datasets):
        aligned = gn.align_to_universe(d, universe).X
        dense64 = aligned.astype(np.float64).toarray()  # the original's np.zeros((cells, genes)) float64
        features.append(torch.from_numpy(dense64).float())
        del dense64, aligned
        datasets[i] = None  # the original never kept a sparse copy
    densify_seconds = time.perf_counter() - t0
    n_cells = [len(f) for f in features]
    targets, counts = pseudo_targets(n_cells, args.seed)
    offsets = [np.concatenate([[0], np.cumsum(c)[:-1]]) for c in counts]
    labels = [torch.from_numpy(t - o) for t, o in zip(targets, offsets)]  # plain per-granularity labels
    # the original's model and optimiser: nn.Linear encoder, one nn.Linear head per granularity,
    # a mean cross-entropy of sigmoid(logits) per head, summed; Adam with torch's defaults
    torch.manual_seed(args.seed + 1)
    encoder = torch.nn.Linear(len(universe), args.hid)
    heads = torch.nn.ModuleList(torch.nn.ModuleList(torch.nn.Linear(args.hid, k) for k in c) for c in counts)
    optimizer = torch.optim.Adam(list(encoder.parameters()) + list(heads.parameters()), lr=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    loaders = [DataLoader(CellDataset(f, lab), batch_size=max(1, len(f) // args.batch_num), shuffle=True,
                          generator=gen) for f, lab in zip(features, labels)]
    epoch_seconds = []
    for _ in range(args.epochs):
        t = time.perf_counter()
        iters = [iter(loader) for loader in loaders]
        for _step in range(args.batch_num):
            loss = 0.0
            for d, it in enumerate(iters):
                try:
                    feature, label = next(it)
                except StopIteration:  # only for datasets smaller than batch_num
                    iters[d] = iter(loaders[d])
                    feature, label = next(iters[d])
                z = torch.sigmoid(encoder(feature.log1p()))  # the original's collate: log1p of the dense batch
                for g, head in enumerate(heads[d]):
                    loss = loss + torch.nn.functional.cross_entropy(torch.sigmoid(head(z)), label[:, g])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        epoch_seconds.append(time.perf_counter() - t)
    mem = synth.memory_mib()
    return {"cells": int(sum(n_cells)), "densify_seconds": densify_seconds, "epoch_seconds": epoch_seconds,
            "peak_mib": mem["peak"], "torch_threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- driver


def run_worker(which: str, paths_file: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", which, "--paths_file", str(paths_file),
           "--batch_num", str(args.batch_num), "--hid", str(args.hid), "--epochs", str(args.epochs),
           "--seed", str(args.seed), "--batch_format", args.batch_format, "--device", args.device] + (
               ["--kmeans"] if args.kmeans else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=synth.bench_env(args.omp_wait_policy))
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        return {"error": f"exit {proc.returncode}: {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def report(b: dict, c: dict | None) -> list[str]:
    lines = []
    a_time = b["limit_dense_seconds"]
    b_time = min(b["epoch_seconds"])
    lines.append(f"collection: {b['datasets']} datasets, {b['cells']} cells x {b['genes']} universe genes, "
                 f"{b['nnz'] / b['cells'] / b['genes']:.2%} non-zero; {b['steps']} steps of ~{b['mean_batch']:.0f} "
                 f"cells; torch threads {b['torch_threads']}")
    lines.append(f"(a) pure limit, dense products only:    {a_time:8.2f} s/epoch  ({b['cells'] / a_time:8.0f} cells/s)")
    lines.append(f"(b) ours, pretrain.train_epoch ({b['batch_format']}): {b_time:8.2f} s/epoch  ({b['cells'] / b_time:8.0f} cells/s)"
                 f"  epochs {', '.join(f'{s:.2f}' for s in b['epoch_seconds'])}; load {b['load_seconds']:.1f} s"
                 + (f"; K-means {b['kmeans_seconds']:.1f} s" if b["kmeans_seconds"] > 0.5 else ""))
    checks = {"b_over_a": b_time / a_time}
    if c and "error" not in c:
        c_time = min(c["epoch_seconds"])
        lines.append(f"(c) original's data path:                {c_time:8.2f} s/epoch  ({c['cells'] / c_time:8.0f} cells/s)"
                     f"  epochs {', '.join(f'{s:.2f}' for s in c['epoch_seconds'])}; load + densify "
                     f"{c['densify_seconds']:.1f} s")
        checks["c_over_b"] = c_time / b_time
        checks["peak_c_over_b"] = c["peak_mib"] / b["peak_mib"]
        lines.append(f"peak resident memory: (b) {b['peak_mib']:.0f} MiB, (c) {c['peak_mib']:.0f} MiB "
                     f"(of which interpreter + libraries {b['baseline_mib']:.0f} MiB; above that: (b) "
                     f"{b['peak_mib'] - b['baseline_mib']:.0f} MiB, (c) {c['peak_mib'] - c['baseline_mib']:.0f} MiB, "
                     f"{(c['peak_mib'] - c['baseline_mib']) / (b['peak_mib'] - b['baseline_mib']):.1f}x)")
        lines.append(f"(c) incl. its load + densify vs (b) incl. its load, one epoch each: "
                     f"{(c['densify_seconds'] + c_time) / (b['load_seconds'] + b_time):.2f}x")
    elif c:
        lines.append(f"(c) failed: {c['error']}")
    sparse_name = "gene-blocked CSR (csr_kernels)" if b["device"] == "cpu" else "torch CSR"
    lines.append(f"encoder products per epoch: dense {b['limit_dense_seconds']:.2f} s vs {sparse_name} "
                 f"{b['limit_sparse_seconds']:.2f} s -> {'sparse' if b['limit_sparse_seconds'] < a_time else 'dense'} "
                 f"is faster ({max(a_time, b['limit_sparse_seconds']) / min(a_time, b['limit_sparse_seconds']):.1f}x); "
                 f"batch preparation per epoch: dense {b['prep_dense_seconds']:.2f} s, "
                 f"{'CSR + block pointers' if b['device'] == 'cpu' else 'CSR + transposed CSR'} "
                 f"{b['prep_sparse_seconds']:.2f} s")
    lines.append("targets:")
    names = {"b_over_a": "(b)/(a) <= 1.5", "c_over_b": "(c)/(b) >= 5", "peak_c_over_b": "peak (c)/(b) >= 5"}
    for key, value in checks.items():
        met = value <= TARGETS[key] if key == "b_over_a" else value >= TARGETS[key]
        lines.append(f"  {names[key]:<18} {value:6.2f}  {'met' if met else 'MISSED'}")
    return lines


def main(args) -> dict:
    if args.worker:
        paths = Path(args.paths_file).read_text().split("\n")
        import logging

        logging.basicConfig(level=logging.WARNING)
        import data  # noqa: F401  (imports first, so the baseline below is the interpreter + libraries)
        import pretrain  # noqa: F401

        baseline = synth.memory_mib()["rss"]
        if args.worker == "ours":  # as main.py runs (main.main)
            import runtime

            runtime.flush_denormals()
            runtime.return_freed_memory()
        out = {"ours": worker_ours, "original": worker_original}[args.worker](paths, args)
        out["baseline_mib"] = baseline
        print(json.dumps(out))
        return out
    out_dir = Path(args.data_dir or BENCH_DIR / "out" / f"synth_s{args.scale:g}")
    t0 = time.time()
    paths = synth.make_collection(out_dir, args.n_datasets, args.scale, genes=args.genes, density=args.density,
                                  seed=args.seed)
    print(f"collection in {out_dir} ({time.time() - t0:.1f} s to generate or reuse); "
          f"OMP_WAIT_POLICY={args.omp_wait_policy or 'unset'}", flush=True)
    if args.prepare_only:
        return {"paths": paths}
    print(f"code: {synth.code_version()}", flush=True)
    paths_file = out_dir / "paths.txt"
    paths_file.write_text("\n".join(paths))
    b = run_worker("ours", paths_file, args)
    print("(b) " + json.dumps(b), flush=True)
    c = None if args.skip_original else run_worker("original", paths_file, args)
    if c:
        print("(c) " + json.dumps(c), flush=True)
    if "error" in b:
        print(f"(b) failed: {b['error']}")
        return {"b": b, "c": c}
    print()
    print("\n".join(report(b, c)))
    return {"b": b, "c": c}


if __name__ == "__main__":
    main(parse_args())
