"""Fine-tuning near its limit: a sweep epoch against the products it cannot avoid, and the sweep's
time per dataset, dense batches (before) vs CSR batches (after), on a synthetic labelled set.

1. Writes (once, reused) a Cell BLAST .h5 of ``--cells`` cells x ``--genes`` genes (``synth.py``'s
   count model, ``--types`` types), shaped like a real pancreas set (2,142 x 20,125).
2. Epoch: ``classifier.train_classifier`` for ``--epochs`` epochs (patience above that, so every
   epoch runs) with ``--ft_batch_format dense`` and ``sparse``, on the sweep's split of the first
   repeat; seconds per epoch (training step and validation scoring). The limit: the encoder's two
   products on a ready batch of the training cells (forward, and the weight gradient), the fastest
   of dense, torch CSR and (on the CPU) csr_kernels' gene-blocked CSR, with nothing else.
3. Sweep: ``main.py --kmeans`` on the dataset (``--fold2`` repeats, both methods, the encoder
   pre-trained for one epoch on the same cells), dense vs auto (CSR on this CPU); wall seconds.

    python bench/bench_ft_epoch.py                  # 2,142 x 20,000, ~6 % non-zero
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]

import synth  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=2142, help="(default: %(default)s)")
    p.add_argument("--genes", type=int, default=20000, help="(default: %(default)s)")
    p.add_argument("--types", type=int, default=14, help="(default: %(default)s)")
    p.add_argument("--density", type=float, default=0.06, help="share of non-zeros (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=30, help="epochs timed per format (default: %(default)s)")
    p.add_argument("--fold2", type=int, default=2, help="sweep repeats (default: %(default)s)")
    p.add_argument("--recipe", default="paper", help="main.py --recipe of the runs (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    p.add_argument("--skip_sweep", action="store_true", help="time epochs only")
    p.add_argument("--out", default=str(BENCH_DIR / "out" / "ft_epoch"), help="(default: %(default)s)")
    return p.parse_args(argv)


def make_dataset(args) -> Path:
    spec = synth.DatasetSpec(f"ft_{args.cells}", args.cells, args.types, "human", 11, 1.0)
    path = Path(args.out) / f"{spec.name}_{args.genes}.h5"
    if not path.exists():
        row = synth.write_dataset(spec, path, synth.gene_pool(args.genes), args.density)
        print(f"wrote {path}: {row['nnz']:,} non-zeros ({100 * row['density']:.2f} %)", flush=True)
    return path


def best_of(fn, repeats: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def product_limit(features, rows, hid: int, device) -> dict:
    """The encoder's forward and weight-gradient products on ready batches of these rows."""
    import scipy.sparse as sp
    import torch

    from sparse import HostCSR, torch_csr

    X = sp.csr_matrix(features[rows], dtype=np.float32)
    weight_t = torch.randn(X.shape[1], hid, device=device)
    grad = torch.randn(X.shape[0], hid, device=device)
    dense = torch.from_numpy(X.toarray()).to(device)
    x, x_t = torch_csr(X, device), torch_csr(X.T.tocsr(), device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

    def run(f):
        return lambda: (f(), sync())

    dense_s = best_of(run(lambda: (dense @ weight_t, dense.T @ grad)))
    sparse_s = best_of(run(lambda: (torch.sparse.mm(x, weight_t), torch.sparse.mm(x_t, grad))))
    out = {"dense_products_s": dense_s, "sparse_products_s": sparse_s}
    if torch.device(device).type == "cpu":  # what the CPU's sparse batches use: csr_kernels on a HostCSR
        b, w, g, bias = HostCSR(X), weight_t.numpy(), grad.numpy(), np.zeros(hid, np.float32)
        out["blocked_products_s"] = best_of(lambda: (b.times(w, bias), b.transposed_times(g)))
    return {**out, "limit_s": min(out.values())}


def epoch_seconds(path: Path, batch_format: str, args, warm_up: bool = False) -> tuple[float, dict]:
    """``train_classifier`` as the sweep runs it with ``main.py --recipe R`` (main.py's other
    defaults: its reading, split sizes and first repeat's seed), every epoch run."""
    import torch

    import classifier
    import cli
    import data
    import features as features_mod
    import splits
    from settings import ClassifierSettings, ReadSettings, SplitSettings, SweepSettings

    epochs = 2 if warm_up else args.epochs
    settings = ClassifierSettings(**cli.RECIPES[args.recipe], ft_epoch=epochs, patience=epochs + 1,
                                  ft_batch_format=batch_format)
    d = data.labelled_cells(data.load_collection([str(path)], ReadSettings())[0])
    codes, classes = splits.encode_labels(d.labels)
    features = features_mod.features(d, settings.normalize)
    sweep = SweepSettings()
    seed = splits.repeat_seeds(sweep.seed, sweep.fold1, sweep.fold2)[0]
    split = splits.split_of(d.n_cells, seed, SplitSettings(), what=d.name)
    clf = classifier.build_classifier(len(classes), features.shape[1], settings, seed)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    _, epochs, _ = classifier.train_classifier(clf, features, codes, split, settings, seed, device)
    seconds = (time.perf_counter() - t0) / epochs
    if warm_up:
        return seconds, {}
    info = {"cells": d.n_cells, "genes": features.shape[1], "train": len(split[0]), "validation": len(split[1]),
            "density": features.nnz / (features.shape[0] * features.shape[1]), "epochs": epochs,
            **product_limit(features, split[0], settings.hid, device)}
    return seconds, info


def sweep_seconds(path: Path, model: Path, batch_format: str, args) -> float:
    import main

    csv = Path(args.out) / f"sweep_{batch_format}.csv"
    csv.unlink(missing_ok=True)
    t0 = time.perf_counter()
    main.main(main.parse_args(["--kmeans", "--datasets", str(path), "--pretrained_model", str(model),
                               "--fold2", str(args.fold2), "--recipe", args.recipe, "--ft_batch_format",
                               batch_format, "--save_result", str(csv), "--log_level", "WARNING",
                               *(["--cuda"] if args.device.startswith("cuda") else [])]))
    return time.perf_counter() - t0


def pretrained(path: Path, args) -> Path:
    import main

    model = Path(args.out) / "encoder.pt"
    if not model.exists():
        main.main(main.parse_args(["--is_pretrain", "--kmeans", "--datasets", str(path), "--pt_epoch", "1",
                                   "--save_model", str(model), "--log_level", "WARNING"]))
    return model


def main(args) -> dict:
    import torch

    import runtime

    runtime.flush_denormals()
    print(f"code: {synth.code_version(('classifier.py', 'model.py', 'sparse.py', 'finetune.py'))}; torch threads "
          f"{torch.get_num_threads()}; device {args.device}; recipe {args.recipe}", flush=True)
    path = make_dataset(args)
    out = {}
    epoch_seconds(path, "dense", args, warm_up=True)  # CUDA context, kernels and allocator: not an epoch's cost
    for batch_format in ("dense", "sparse"):
        seconds, info = epoch_seconds(path, batch_format, args)
        out[batch_format] = seconds
        print(f"{batch_format:>6} batches: {1000 * seconds:.1f} ms/epoch over {info['epochs']} epochs", flush=True)
    print(f"{info['cells']} cells x {info['genes']} genes ({100 * info['density']:.1f} % non-zero), "
          f"{info['train']} training and {info['validation']} validation cells")
    print(f"limit (the encoder's forward and weight-gradient products on a ready batch of the training cells): "
          f"dense {1000 * info['dense_products_s']:.2f} ms, torch CSR {1000 * info['sparse_products_s']:.2f} ms"
          + (f", gene-blocked CSR (csr_kernels) {1000 * info['blocked_products_s']:.2f} ms"
             if "blocked_products_s" in info else ""))
    for batch_format in ("dense", "sparse"):
        print(f"epoch / limit, {batch_format}: {out[batch_format] / info['limit_s']:.2f}")
    print(f"dense / sparse epoch: {out['dense'] / out['sparse']:.2f}x", flush=True)
    if not args.skip_sweep:
        model = pretrained(path, args)
        for batch_format in ("dense", "auto"):
            out[f"sweep_{batch_format}"] = sweep_seconds(path, model, batch_format, args)
            print(f"sweep, {args.fold2} repeats x 2 methods, --ft_batch_format {batch_format}: "
                  f"{out[f'sweep_{batch_format}']:.1f} s", flush=True)
    return out


if __name__ == "__main__":
    main(parse_args())
