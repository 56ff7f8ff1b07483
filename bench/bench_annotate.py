"""Annotation at scale (prints figures; not a test): ``annotate.py predict`` on a synthetic h5ad
query streamed from disk, and ``annotate.py train`` on a large synthetic reference.

    python bench/bench_annotate.py --cells 1000000                     # predict --majority_voting, 1 M cells
    python bench/bench_annotate.py --cells 4000000 --write_workers 2    # a query whose CSR is larger than 24 GiB
    python bench/bench_annotate.py --cells 200000 --check_in_memory     # streamed == read whole, on one query
    python bench/bench_annotate.py --train --cells 1000000 --max_cells_per_type 5000   # a 1 M-cell reference
    python bench/bench_annotate.py --cells 1000000 --device cuda        # the forward pass on a GPU

The query (written once, reused) is an h5ad of ``synth.py``'s count model: ``X`` a CSR group of
counts, 30 cell types, 17,000 genes at ~5 %. The classifier has random weights over the same genes
(speed does not depend on them). Each command runs as the user runs it, in its own process; the
figures are its wall time, the prediction's own line (cells/s), and its peak resident memory
(``ru_maxrss`` of the child), beside the query's CSR size.
"""
from __future__ import annotations

import argparse
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import synth  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=1_000_000, help="query (or reference) cells (default: %(default)s)")
    p.add_argument("--genes", type=int, default=17000, help="genes (default: %(default)s)")
    p.add_argument("--density", type=float, default=0.05, help="share of non-zeros (default: %(default)s)")
    p.add_argument("--classes", type=int, default=30, help="cell types (default: %(default)s)")
    p.add_argument("--chunk_cells", type=int, default=8192, help="annotate.py --chunk_cells (default: %(default)s)")
    p.add_argument("--out", default=str(synth.DEFAULT_OUT / "annotate"), help="where inputs and outputs go")
    p.add_argument("--device", default="cpu", help="annotate.py --device (default: %(default)s)")
    p.add_argument("--no_voting", action="store_true", help="predict without --majority_voting")
    p.add_argument("--check_in_memory", action="store_true",
                   help="also predict with --in_memory and compare every cell's label and confidence")
    p.add_argument("--train", action="store_true", help="time annotate.py train on the synthetic file instead")
    p.add_argument("--ft_epoch", type=int, default=None,
                   help="train's --ft_epoch (default: its own; synthetic types are separable from the first epoch, "
                        "so the validation loss keeps falling and early stopping may wait for the last epoch)")
    p.add_argument("--max_cells_per_type", type=int, default=0, help="train's --max_cells_per_type (default: 0)")
    p.add_argument("--prepare_only", action="store_true", help="write the inputs, measure nothing")
    p.add_argument("--write_workers", type=int, default=1,
                   help="processes drawing the query's blocks; > 1 is another (equally distributed) draw, kept in "
                        "its own file (default: %(default)s)")
    return p.parse_args(argv)


def make_query(args) -> Path:
    out = Path(args.out)
    spec = synth.DatasetSpec(f"query_{args.cells}", args.cells, args.classes, "human", 7, 1.0)
    path = out / f"{synth.file_stem(f'{spec.name}_{args.genes}', args.cells, args.chunk_cells, args.write_workers)}.h5ad"
    if not path.exists():
        t0 = time.time()
        row = synth.write_h5ad_dataset(spec, path, synth.gene_pool(args.genes), args.density, args.chunk_cells,
                                       workers=args.write_workers)
        print(f"wrote {path}: {row['nnz']:,} non-zeros ({100 * row['density']:.2f} %) in {time.time() - t0:.0f}s",
              flush=True)
    return path


def make_model(args) -> Path:
    import torch

    import checkpoints
    from model import Classifier

    path = Path(args.out) / f"classifier_{args.genes}_{args.classes}.pt"
    if not path.exists():
        torch.manual_seed(0)
        genes = [str(g) for g in synth.gene_pool(args.genes)]
        clf = Classifier(len(genes), args.classes)
        ckpt = checkpoints.classifier_checkpoint(clf, genes, [f"type_{i:02d}" for i in range(args.classes)],
                                                 fed=checkpoints.Feeding(), label_key="cell_type",
                                                 info={"reference": {"name": "random", "n_cells": 0}})
        checkpoints.save(ckpt, path)
    return path


def csr_mib(path: Path) -> float:
    import h5py

    with h5py.File(path, "r") as h5:
        return sum(h5["X"][k].size * h5["X"][k].dtype.itemsize for k in ("data", "indices", "indptr")) / 2**20


def run(command: list[str]) -> dict:
    """One command in its own process: wall time, its peak resident memory, its log."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.time()
    done = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, env=synth.bench_env())
    seconds = time.time() - t0
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(done.returncode)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if peak <= before:
        print("  (the peak of this command is not above an earlier child's; run one measurement per process)")
    return {"wall_s": round(seconds, 1), "peak_mib": round(peak / 1024, 1), "log": done.stderr}


def predicted_line(log: str) -> dict:
    found = re.search(r"(\d+) cells predicted in ([\d.]+)s \((\d+) cells/s\)", log)
    return {"predict_s": float(found.group(2)), "predict_cells_per_s": int(found.group(3))} if found else {}


def predict(args, query: Path, model: Path, out: Path, *extra) -> dict:
    command = ["annotate.py", "predict", "--model", str(model), "--query", str(query), "--out", str(out),
               "--chunk_cells", str(args.chunk_cells), "--device", args.device, *extra]
    if not args.no_voting:
        command.append("--majority_voting")
    return run(command)


def compare(a: Path, b: Path) -> str:
    import pandas as pd

    x, y = pd.read_csv(a), pd.read_csv(b)
    same_labels = bool((x["predicted_labels"] == y["predicted_labels"]).all())
    gap = float((x["conf_score"] - y["conf_score"]).abs().max())
    voting = bool((x["majority_voting"] == y["majority_voting"]).all()) if "majority_voting" in x else None
    return f"labels equal: {same_labels}; majority votes equal: {voting}; largest conf_score difference {gap:.2e}"


def main(args) -> None:
    query = make_query(args)
    model = make_model(args)
    if args.prepare_only:
        print(f"inputs ready: {query}, {model}")
        return
    print(f"query: {args.cells:,} cells x {args.genes:,} genes, CSR {csr_mib(query):,.0f} MiB; code {synth.code_version()}")
    if args.train:
        result = run(["annotate.py", "train", "--reference", str(query), "--label_key", "cell_type", "--save_model",
                      str(Path(args.out) / f"trained_{args.cells}.pt"), "--max_cells_per_type",
                      str(args.max_cells_per_type), "--device", args.device,
                      *(["--ft_epoch", str(args.ft_epoch)] if args.ft_epoch else [])])
        lines = [line for line in result.pop("log").splitlines() if "kept" in line or "trained in" in line
                 or "linear base" in line or "read" in line or "calibration" in line]
        print("\n".join(lines))
        print(result)
        return
    out = Path(args.out) / f"annotated_{args.cells}.h5ad"
    result = predict(args, query, model, out)
    result.update(predicted_line(result.pop("log")))
    result["cells_per_s_whole"] = round(args.cells / result["wall_s"])
    print(result, flush=True)
    if args.check_in_memory:
        whole = predict(args, query, model, Path(args.out) / f"annotated_{args.cells}_in_memory.h5ad", "--in_memory")
        whole.update(predicted_line(whole.pop("log")))
        print("in memory:", whole)
        print(compare(out.with_suffix(".csv"), Path(args.out) / f"annotated_{args.cells}_in_memory.csv"))


if __name__ == "__main__":
    main(parse_args())
