"""Phase-1 epochs of two checkouts of this code on the same CPU, alternating: what a change saves
where the CPU differs from the one of an earlier measurement.

Each round runs every tree once, in a fresh subprocess: it reads the collection of
``--paths_file`` (as ``bench_pretrain.py``'s ours: seeded random pseudo-labels with the K-means
numbers of clusters, since an epoch's cost does not depend on their values), builds the model as
``pretrain.run_pretraining`` does with the paper's defaults (hid 200, 30 batches an epoch, seed 0)
and runs ``--epochs`` epochs of ``pretrain.train_epoch``. The
first epoch of a process compiles numba's kernels when a tree's files changed and is left out of
the means. Epoch checkpoints are not written (``run_epochs`` writes them; ``train_epoch`` does
not). The losses printed must be equal across trees.

    git worktree add /tmp/base 6f325c5
    python bench/bench_epoch_ab.py --trees /tmp/base . --paths_file bench/out/synth_s0.5/paths.txt
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import synth

WORKER = r"""
import json, sys, time
tree, paths_json, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.path[:0] = [tree, tree + "/bench"]
import torch
import bench_pretrain, pretrain, runtime
from settings import PretrainSettings
paths = json.loads(paths_json)
coll = pretrain.build_collection(bench_pretrain.load(paths))
n_cells = [X.shape[0] for X in coll.features]
targets, counts = bench_pretrain.pseudo_targets(n_cells, 0, coll, False)
runtime.reuse_freed_memory()
cpu = torch.device("cpu")
model, step_module, optimizer = bench_pretrain.build_model(len(coll.gene_universe), counts, 200, 0, cpu)
settings = PretrainSettings(hid=200, batch_num=30, seed=0)
source = pretrain.step_source(coll, cpu)
seconds, loss = [], None
for epoch in range(1, epochs + 1):
    t = time.perf_counter()
    loss = pretrain.train_epoch(step_module, optimizer, coll, targets, settings, cpu, 1, epoch, source)
    seconds.append(time.perf_counter() - t)
print(json.dumps({"seconds": seconds, "loss": float(loss)}))
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trees", nargs="+", required=True, help="checkouts of this repository to compare")
    p.add_argument("--paths_file", type=Path, required=True, help="one dataset path a line (bench/synth.py's)")
    p.add_argument("--epochs", type=int, default=3, help="epochs a run; the first is left out (default: 3)")
    p.add_argument("--rounds", type=int, default=2, help="runs of every tree, alternating (default: 2)")
    return p.parse_args(argv)


def run_tree(tree: Path, paths: list[str], epochs: int) -> dict:
    proc = subprocess.run([sys.executable, "-c", WORKER, str(tree), json.dumps(paths), str(epochs)],
                          capture_output=True, text=True, env=synth.bench_env())
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(args) -> dict:
    if args.epochs < 2:
        raise SystemExit("--epochs must be at least 2: the first epoch of a run is left out")
    paths = [str(Path(p).resolve()) for p in args.paths_file.read_text().split()]
    trees = [Path(t).resolve() for t in args.trees]
    kept: dict[str, list[float]] = {str(t): [] for t in trees}
    losses: dict[str, float] = {}
    for r in range(1, args.rounds + 1):
        for tree in trees:
            out = run_tree(tree, paths, args.epochs)
            kept[str(tree)] += out["seconds"][1:]
            losses[str(tree)] = out["loss"]
            print(f"round {r} {tree}: epochs {', '.join(f'{s:.2f}' for s in out['seconds'])} s, "
                  f"loss {out['loss']:.4f}", flush=True)
    base = statistics.mean(kept[str(trees[0])])
    for tree in trees:
        mean = statistics.mean(kept[str(tree)])
        print(f"{tree}: mean {mean:.2f} s an epoch over {len(kept[str(tree)])} ({mean / base:.3f} of the first tree)")
    if len(set(losses.values())) > 1:
        print("WARNING: the trees' losses differ:", losses)
    return {"seconds": kept, "losses": losses}


if __name__ == "__main__":
    main(parse_args())
