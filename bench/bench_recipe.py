"""The accuracy protocol of the recipes (prints tables; not a test).

    python bench/bench_recipe.py                       # real sets of ../shared/data/real + the demo's labelled ones
    python bench/bench_recipe.py --seeds 0 1 2 --pt_epoch 50

For every labelled dataset and seed, one seeded split (``splits.split_of``: the sweep's sizes)
serves every method, each trained by the shipped code (``classifier.build_classifier`` /
``train_classifier`` with the settings ``main.py --recipe R`` resolves to, ``cli.RECIPES[R]``
over main.py's defaults):

- ``paper`` and ``plus`` recipes, each from random init and from an encoder pre-trained (phase
  1, ``main.py --is_pretrain --kmeans --recipe R``) on a collection of all the datasets here,
  labels unused (the paper's setting: the classified datasets are in the collection);
- logistic regression on log1p CP10k with C tuned on the same validation cells (the regression
  ``--ft_linear_base`` puts beside the network in ``plus``, ``classifier.fit_linear_base``).

Validation accuracy is what a recipe may be chosen on; test accuracy and macro-F1 are printed
for the record of the final choice. Rows go to ``bench/out/recipe/recipe.csv``.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT)]

import features as features_mod  # noqa: E402
import genes as gn  # noqa: E402
import runtime  # noqa: E402
import splits  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "real"
DATASETS = {  # name: (path, label key)
    "baron": (REAL / "baron_human_pancreas.h5ad", "cell_type1"),
    "darmanis": (REAL / "darmanis2015_brain.h5ad", "cell_type"),
    "stewart": (REAL / "stewart2019_kidney_immune.h5ad", "celltype"),
    "pancreas4": (REAL / "pancreas_4studies_cellxgene.h5ad", "cell_type"),
    "pbmc68k_reduced": (ROOT / "dataset" / "pbmc68k_reduced.h5", "cell_ontology_class"),
    "oligodendroglioma": (ROOT / "dataset" / "oligodendroglioma.h5", "cell_ontology_class"),
}
UNLABELLED = [ROOT / "dataset" / "pbmc3k.h5", ROOT / "dataset" / "celltypist_sample.h5"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--recipes", nargs="+", default=["paper", "plus"])
    p.add_argument("--pt_epoch", type=int, default=20, help="phase-1 epochs of the collection encoders (default: 20)")
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--out", default=str(HERE / "out" / "recipe"))
    return p.parse_args(argv)


def pretrain(recipe: str, out: Path, epochs: int) -> Path:
    """Phase 1 on every dataset here, labels unused (made once per recipe)."""
    path = out / f"collection_{recipe}.pt"
    if not path.exists():
        paths = [str(p) for p, _ in DATASETS.values()] + [str(p) for p in UNLABELLED]
        t0 = time.time()
        proc = subprocess.run([sys.executable, "main.py", "--is_pretrain", "--kmeans", "--recipe", recipe,
                               "--datasets", *paths, "--pt_epoch", str(epochs), "--save_model", str(path),
                               "--log_level", "WARNING"], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        print(f"pre-trained {path.name} in {time.time() - t0:.0f}s", flush=True)
    return path


def load(name: str):
    import data

    path, key = DATASETS[name]
    d = data.read_any(path, key, strict_label_key=True)
    return data.labelled_cells(gn.map_dataset_genes(d))


def network_row(d, codes, n_classes, split, recipe: str, ckpt, seed: int) -> dict:
    import torch

    import classifier
    import cli
    import metrics
    from settings import ClassifierSettings

    settings = ClassifierSettings(**cli.RECIPES[recipe])  # main.py --recipe R: the recipe over main.py's defaults
    pretrained = None
    if ckpt is not None:
        pretrained = classifier.PretrainedStart(ckpt["model"], gn.gene_lookup(d, ckpt["gene_universe"]))
    features = features_mod.features(d, settings.normalize)
    t0 = time.time()
    clf = classifier.build_classifier(n_classes, d.n_genes, settings, seed, pretrained)
    clf, epochs, val_acc = classifier.train_classifier(clf, features, codes, split, settings, seed,
                                                       torch.device("cpu"))
    probs = classifier.predict_proba(clf, features, split[2], torch.device("cpu"))
    return {"val_acc": val_acc, **test_scores(codes[split[2]], probs), "epochs": epochs,
            "seconds": time.time() - t0, "n_scored_classes": metrics.classification_metrics(
                codes[split[2]], probs)["n_scored_classes"]}


def logistic_row(d, codes, split, seed: int) -> dict:
    """Logistic regression on log1p CP10k, C tuned on the validation cells: the shipped
    ``classifier.fit_linear_base`` (the regression ``--ft_linear_base`` puts beside the network)."""
    import classifier

    X = features_mod.features(d, "cp10k")
    t0 = time.time()
    base = classifier.fit_linear_base(X, codes, split, int(codes.max()) + 1)
    logits = X[split[2]] @ base.weight.T + base.bias
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return {"val_acc": base.val_accuracy, **test_scores(codes[split[2]], probs), "C": base.C,
            "seconds": time.time() - t0}


def test_scores(truth, probs) -> dict:
    from sklearn.metrics import f1_score

    predicted = probs.argmax(1)
    return {"test_acc": float(np.mean(predicted == truth)),
            "test_macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0))}


def table(frame: pd.DataFrame, column: str) -> str:
    mean = frame.pivot_table(index="method", columns="dataset", values=column, aggfunc="mean")
    sd = frame.pivot_table(index="method", columns="dataset", values=column, aggfunc="std").fillna(0)
    text = mean.round(3).astype(str) + " +- " + sd.round(3).astype(str)
    text["MEAN"] = mean.mean(1).round(4)
    return text.loc[list(dict.fromkeys(frame["method"]))].to_string()


def main(args) -> pd.DataFrame:
    import checkpoints
    from settings import SplitSettings

    runtime.setup_logging("WARNING")
    runtime.flush_denormals()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    encoders = {r: checkpoints.load(pretrain(r, out, args.pt_epoch)) for r in args.recipes}
    rows = []
    for name in args.datasets:
        d = load(name)
        codes, classes = splits.encode_labels(d.labels)
        for seed in args.seeds:
            split = splits.split_of(d.n_cells, seed, SplitSettings())  # the sweep's sizes
            for recipe in args.recipes:
                for start, ckpt in (("random init", None), ("pretrained", encoders[recipe])):
                    row = network_row(d, codes, len(classes), split, recipe, ckpt, seed)
                    rows.append({"dataset": name, "seed": seed, "method": f"{recipe}, {start}", **row})
                    print(rows[-1], flush=True)
            rows.append({"dataset": name, "seed": seed, "method": "logistic regression, C tuned",
                         **logistic_row(d, codes, split, seed)})
            print(rows[-1], flush=True)
        pd.DataFrame(rows).to_csv(out / "recipe.csv", index=False)
    frame = pd.DataFrame(rows)
    for column in ("val_acc", "test_acc", "test_macro_f1"):
        print(f"\n{column} (mean +- sd over seeds)\n{table(frame, column)}")
    return frame


if __name__ == "__main__":
    main(parse_args())
