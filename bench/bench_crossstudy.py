"""Cross-study annotation, side by side (prints a table; not a test).

    python bench/bench_crossstudy.py                    # needs ../shared/data/real/ (see its README)
    python bench/bench_crossstudy.py --celltypist_python /tmp/ctenv/bin/python

Train on ``baron_human_pancreas.h5ad`` (``cell_type1``), annotate
``pancreas_4studies_cellxgene.h5ad`` (CELLxGENE layout, four studies, one single-nucleus) and
score against its ``cell_type`` through ``pancreas_label_map.csv`` (cells whose type has no
counterpart in the reference are left out; a prediction without a counterpart, or Unassigned,
counts as wrong). Methods, same reference, query and map:

- scPretrain (``annotate.py train``/``predict``) for each recipe (paper, plus) and each start:
  the demo pre-training (``--demo_model``), a pre-training on a collection that includes the
  query's cells, unlabelled (the paper's setting; made here once), and random init;
- logistic regression on log1p CP10k (C = 0.1, and C tuned on the reference's validation cells);
- CellTypist 1.x with its defaults, run with ``--celltypist_python`` (an interpreter where
  ``celltypist`` is installed; it needs scikit-learn < 1.7, so keep it out of the project's
  environment).

Each method reports accuracy and macro-F1 of its best label (``best``) and, for scPretrain, with
Unassigned below p = 0.5 and after majority voting; accuracy per study; the Unassigned share;
seconds. Outputs go to ``bench/out/crossstudy/``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import features as features_mod
import genes as gn
import splits

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT)]

REAL = ROOT.parent / "shared" / "data" / "real"
OUT = HERE / "out" / "crossstudy"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real_dir", default=str(REAL), help="folder of the real h5ad files (default: %(default)s)")
    p.add_argument("--demo_model", default=str(ROOT / "models" / "pretrained_phase2.pt"),
                   help="the demo recipe's encoder (default: %(default)s)")
    p.add_argument("--pt_epoch", type=int, default=50, help="epochs of the collection pre-training (default: 50)")
    p.add_argument("--recipes", nargs="+", default=["paper", "plus"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (default: 0)")
    p.add_argument("--celltypist_python", default=None, help="python with celltypist installed (default: skip it)")
    p.add_argument("--out", default=str(OUT))
    return p.parse_args(argv)


# --------------------------------------------------------------------------- scoring


def load_truth(real: Path):
    import anndata

    backed = anndata.read_h5ad(real / "pancreas_4studies_cellxgene.h5ad", backed="r")
    obs = backed.obs[["cell_type", "Dataset"]].astype(str).copy()
    backed.file.close()
    import annotate

    label_map = annotate.read_label_map(real / "pancreas_label_map.csv")
    return obs, label_map


def score(name: str, predicted, obs: pd.DataFrame, label_map: dict, seconds: float, unassigned=None) -> dict:
    import annotate

    predicted = np.asarray(predicted, dtype=object)
    given = obs["cell_type"].to_numpy()
    row = {"method": name, **annotate.mapped_scores(predicted, given, label_map), "seconds": round(seconds, 1),
           "unassigned": float(np.mean(predicted == annotate.UNASSIGNED)) if unassigned is None else unassigned}
    for study in sorted(obs["Dataset"].unique()):
        mask = (obs["Dataset"] == study).to_numpy()
        row[f"acc {study.split(' et al')[0]}"] = annotate.mapped_scores(predicted[mask], given[mask],
                                                                         label_map)["accuracy"]
    return row


# --------------------------------------------------------------------------- methods


def run(cmd: list[str]) -> float:
    t0 = time.time()
    proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.time() - t0


def collection_model(args, out: Path, recipe: str) -> Path:
    """Phase 1 on the demo collection plus both pancreas sets, labels unused (made once)."""
    path = out / f"pretrained_collection_{recipe}.pt"
    if not path.exists():
        real = Path(args.real_dir)
        seconds = run(["main.py", "--is_pretrain", "--kmeans", "--recipe", recipe, "--datasets", "demo",
                       str(real / "baron_human_pancreas.h5ad"), str(real / "pancreas_4studies_cellxgene.h5ad"),
                       "--pt_epoch", str(args.pt_epoch), "--save_model", str(path), "--log_level", "WARNING"])
        print(f"pre-trained {path.name} in {seconds:.0f}s", flush=True)
    return path


def scpretrain_rows(args, out: Path, recipe: str, start: str, model: Path | None, seed: int, obs, label_map):
    tag = f"{recipe}_{start}_s{seed}"
    clf = out / f"clf_{tag}.pt"
    annotated = out / f"query_{tag}.h5ad"
    seconds_file = out / f"seconds_{tag}.txt"
    if not (seconds_file.exists() and annotated.with_suffix(".probabilities.csv").exists()):
        seconds_file.write_text(str(train_and_predict(args, recipe, model, seed, clf, annotated)))
    table = pd.read_csv(annotated.with_suffix(".csv"))
    probs = pd.read_csv(annotated.with_suffix(".probabilities.csv"), index_col="cell")
    best = probs.columns.to_numpy()[probs.to_numpy().argmax(1)]
    name = f"scPretrain {recipe}, {start}"
    seconds = float(seconds_file.read_text())
    return [score(f"{name} (best)", best, obs, label_map, seconds, unassigned=0.0),
            score(f"{name} (p>=0.5)", table["predicted_labels"], obs, label_map, seconds),
            score(f"{name} (majority voting)", table["majority_voting"], obs, label_map, seconds)]


def train_and_predict(args, recipe: str, model: Path | None, seed: int, clf: Path, annotated: Path) -> float:
    """``annotate.py train`` then ``predict`` (made once; reruns reuse the outputs); their seconds."""
    real = Path(args.real_dir)
    t_train = run(["annotate.py", "train", "--reference", str(real / "baron_human_pancreas.h5ad"),
                   "--label_key", "cell_type1", "--recipe", recipe, "--seed", str(seed), "--save_model", str(clf),
                   "--log_level", "WARNING", *(["--pretrained_model", str(model)] if model else [])])
    t_predict = run(["annotate.py", "predict", "--model", str(clf), "--query",
                     str(real / "pancreas_4studies_cellxgene.h5ad"), "--out", str(annotated), "--majority_voting",
                     "--probabilities", "--log_level", "WARNING"])
    return t_train + t_predict


def default_input_options() -> argparse.Namespace:
    """The reading rules' defaults (values and symbols detected), as the scripts' flags give them."""
    import common

    opts = argparse.Namespace(**{k: None for k in common.INPUT_OPTIONS})
    opts.log_transformed = False
    return opts


def logistic_rows(args, seed: int, obs, label_map) -> list[dict]:
    """Plain logistic regression on log1p CP10k of the reference's genes."""
    from sklearn.linear_model import LogisticRegression

    import annotate
    import common
    import data

    real = Path(args.real_dir)
    opts = default_input_options()
    ref = data.labelled_cells(gn.map_dataset_genes(data.read_any(real / "baron_human_pancreas.h5ad", "cell_type1",
                                                                   **common.input_options(opts))))
    query = gn.map_dataset_genes(data.read_any(real / "pancreas_4studies_cellxgene.h5ad", None,
                                                 **common.input_options(opts)))
    X_ref = features_mod.features(ref, "cp10k")
    X_query = features_mod.features(gn.align_to_universe(query, ref.genes), "cp10k")
    codes, classes = splits.encode_labels(ref.labels)
    train_idx, val_idx = splits.validation_split(ref.n_cells, seed, 0.1)
    rows = []
    for label, grid in (("C=0.1", [0.1]), ("C tuned on validation", [0.01, 0.1, 1.0, 10.0])):
        t0 = time.time()
        fits = [LogisticRegression(C=c, max_iter=2000).fit(X_ref[train_idx], codes[train_idx]) for c in grid]
        accs = [float(np.mean(f.predict(X_ref[val_idx]) == codes[val_idx])) for f in fits]
        best = fits[int(np.argmax(accs))]
        predicted = classes[best.classes_[best.predict_proba(X_query).argmax(1)]]
        rows.append(score(f"logistic regression, {label}", predicted, obs, label_map, time.time() - t0,
                          unassigned=0.0))
    del annotate
    return rows


CELLTYPIST_SCRIPT = r"""
import sys, time, anndata, celltypist, numpy as np, pandas as pd, scipy.sparse as sp
ref, query, out = sys.argv[1:4]
t0 = time.time()
r = anndata.read_h5ad(ref)
model = celltypist.train(r, labels="cell_type1")
q = anndata.read_h5ad(query)
best = celltypist.annotate(q, model=model)
mv = celltypist.annotate(q, model=model, majority_voting=True)
pd.DataFrame({"best": best.predicted_labels["predicted_labels"].astype(str).to_numpy(),
              "majority_voting": mv.predicted_labels["majority_voting"].astype(str).to_numpy(),
              "seconds": time.time() - t0}).to_csv(out, index=False)
"""


def celltypist_rows(args, out: Path, obs, label_map) -> list[dict]:
    """CellTypist with its defaults; it expects log1p CP10k in X with symbols as var_names."""
    import anndata

    import common
    import data

    real = Path(args.real_dir)
    opts = default_input_options()
    paths = {}
    for name, path, key in (("ref", real / "baron_human_pancreas.h5ad", "cell_type1"),
                            ("query", real / "pancreas_4studies_cellxgene.h5ad", None)):
        d = data.read_any(path, key, **common.input_options(opts))
        ad = anndata.AnnData(X=features_mod.features(d, "cp10k"), var=pd.DataFrame(index=d.genes.astype(str)),
                             obs=pd.DataFrame({"cell_type1": d.labels} if key else {}, index=d.cells.astype(str)))
        paths[name] = out / f"celltypist_{name}.h5ad"
        ad.write_h5ad(paths[name])
    script = out / "celltypist_run.py"
    script.write_text(CELLTYPIST_SCRIPT)
    result = out / "celltypist_predictions.csv"
    proc = subprocess.run([args.celltypist_python, str(script), str(paths["ref"]), str(paths["query"]), str(result)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"CellTypist failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return []
    frame = pd.read_csv(result)
    seconds = float(frame["seconds"].iloc[0])
    return [score("CellTypist defaults (best match)", frame["best"], obs, label_map, seconds, unassigned=0.0),
            score("CellTypist defaults (majority voting)", frame["majority_voting"], obs, label_map, seconds,
                  unassigned=0.0)]


def main(args) -> pd.DataFrame:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    obs, label_map = load_truth(Path(args.real_dir))
    rows = []
    for seed in args.seeds:
        for recipe in args.recipes:
            starts = {"demo pre-training": Path(args.demo_model) if Path(args.demo_model).exists() else None,
                      "collection pre-training": collection_model(args, out, recipe), "random init": None}
            for start, model in starts.items():
                if start == "demo pre-training" and model is None:
                    print(f"skipped: {args.demo_model} not found (run the README's demo recipe)", file=sys.stderr)
                    continue
                rows += scpretrain_rows(args, out, recipe, start, model, seed, obs, label_map)
                print(json.dumps(rows[-3]), flush=True)
        rows += logistic_rows(args, seed, obs, label_map)
    if args.celltypist_python:
        rows += celltypist_rows(args, out, obs, label_map)
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "crossstudy.csv", index=False)
    pd.set_option("display.width", 250)
    summary = frame.groupby("method", sort=False).mean(numeric_only=True)
    print(summary.round(3).to_string())
    return frame


if __name__ == "__main__":
    main(parse_args())
