"""Transfer tasks for the annotation defaults: hold out a study, not only cells (prints tables; not a test).

    python bench/bench_transfer.py --list                          # the tasks, their cells and genes
    python bench/bench_transfer.py                                 # every task, the default methods
    python bench/bench_transfer.py --methods 'LR*' --tasks 'baron>pancreas4*'
    python bench/bench_transfer.py --celltypist_python /tmp/ctenv/bin/python   # CellTypist too
    python bench/bench_transfer.py --methods 'scPretrain*' --demo_encoder ENC.pt  # with an encoder of the demo

A *task* is a labelled reference, a labelled query from another study (or a simulated other
species), a map from the reference's labels to the query's (or the identity), and a query
column whose groups (studies, donors, samples) are scored apart. Every dataset is read by the
project's readers (``data.read_any`` then ``data.map_dataset_genes``), so genes are mapped as
``annotate.py`` maps them. Tasks (``TASKS``; add one with a function that returns ``Task``s):

- ``baron>pancreas4``: Baron (``cell_type1``, 14 types) -> the 4-study set (``cell_type``)
  through ``pancreas_label_map.csv``; per study;
- ``pancreas4-loso:STUDY``: the 4-study set, trained on three studies, tested on the fourth;
- ``pancreas4>baron``: the 4-study set -> Baron's ``cell_ontology_class`` (same Cell Ontology names);
- ``stewart-p1>p2`` and ``stewart-p2>p1``: Stewart's kidney immune cells, ``Project`` 1 <-> 2,
  scored per ``Experiment``;

and variants of them (``VARIANTS``):

- ``|dropout``: the query with a random 15-30 % of its genes removed (seeded per task);
- ``|cross-species``: the reference's human symbols renamed to their mouse orthologs with the
  one-to-one table (genes without one dropped), written as a mouse h5ad and read back, so that
  the tool maps them to human symbols again; then the query loses genes of the model at random
  until ~86 % of the model's genes are present. It SIMULATES ONLY THE GENE-SPACE MISMATCH of a
  mouse reference and a human query, not the biology of another species;
- ``|cross-species-ens``: the same with Ensembl 105's human -> mouse table (one-to-many included:
  a human gene's counts split over its mouse orthologs, INS -> Ins1 + Ins2), so that the model's
  genes missing from the query are the ones the tool's one-to-one table cannot map back (INS,
  the trypsins, granzymes...), not random ones: 81-91 % of the model's genes are then present,
  near the hidden mouse -> human task's 86 %. Also gene space only.

A *method* is anything with ``name`` and ``fit_predict(ref, query) -> (labels, probabilities or
None[, extras])``; ``ref`` is a :class:`Reference` (a ``CellData`` whose ``groups`` say which
study, donor or sample each cell comes from, or None), ``query`` a ``CellData`` whose labels
the method must not read. ``extras`` may hold further label sets (``{"labels": {name: labels}}``)
and what was chosen (``{"info": {...}}``). Methods here (``build_methods``):

- logistic regression (scikit-learn, lbfgs, multinomial, L2) on log1p CP10k with C in ``C_GRID``,
  on ALL the reference's genes (the query's missing genes zero) or on the genes reference and
  query SHARE (both cut to them before normalising), with or without per-gene scaling (unit
  variance on the reference, no centring, clipped at 10 as CellTypist clips);
- the same on the shared genes, unscaled, with C CHOSEN per task by a rule that sees only the
  reference: ``study`` = grouped K-fold over the reference's own studies/donors/samples (at most 4
  folds: leave one study out where it has 3-4), ``cells`` = 10 % random validation cells (as
  ``annotate.py`` holds out); ties go to the stronger penalty (``LogRegSelected`` takes other
  candidate sets: scaling, all genes);
- scPretrain: ``annotate.py transfer`` as a user runs it (``annotation.train`` on the reference
  cut to the query's genes, then ``annotation.predict``), annotate's defaults plus each variant's
  flags (``scpretrain_variants``: recipes, a fixed C and blend share, ``--pretrain_on_query``, a
  demo encoder); a run with a fixed ``--ft_blend_share`` also labels with every ``SHARE_SWEEP``
  share, from the same trained network (the network does not depend on the share);
- CellTypist 1.x with its defaults in its own interpreter (``--celltypist_python``).

Scoring: accuracy and macro-F1 (``scoring.mapped_scores``) on the query cells whose label some
reference label maps to; a prediction with no counterpart counts as wrong. Each method is scored
on its best labels (``best``) and after majority voting (``mv``) over one over-clustering of each
query shared by all methods (K-means with one cluster per 30 cells, ``--mv_cells``, on 50 PCs
of the query's 2,000 most variable log1p CP10k genes; ``tasks.csv`` gives its purity, the
ceiling of majority voting); scPretrain also by its own majority voting (``annotate.py mv``,
annotate's over-clustering rule, and ``mv n/K``: K-means of its representation with one cluster
per K cells, on its best labels), CellTypist also with its own majority voting. Predictions, inner validation
scores and CellTypist models are cached under ``bench/out/transfer/cache/`` (a rerun only
scores); tables go to ``bench/out/transfer/``. Importing this module does nothing.
"""
from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import subprocess
import sys
import time
import warnings
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT)]

import data  # noqa: E402  (the project's libraries: importing them does nothing)
import files  # noqa: E402
import values as values_mod  # noqa: E402
import genes as gn  # noqa: E402
import scoring  # noqa: E402
import splits  # noqa: E402
from features import features as feature_matrix  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "real"
ENSEMBL_TABLE = ROOT.parent / "shared" / "data" / "Ensembl105_Human2Mouse_Genes.csv"
OUT = HERE / "out" / "transfer"
C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 10.0)
LR_MAX_ITER = 2000
SCALE_MAX = 10.0
MAX_INNER_FOLDS = 4
CROSS_SPECIES_COVERAGE = 0.86
DROPOUT_RANGE = (0.15, 0.30)
SIMULATION_NOTE = ("cross-species tasks SIMULATE ONLY THE GENE-SPACE MISMATCH (human symbols renamed to mouse "
                   "orthologs and mapped back by the tool; '|cross-species' then removes model genes from the query "
                   "at random, '|cross-species-ens' loses those Ensembl's one-to-many orthologs cannot map back), "
                   "not the biology of another species")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real_dir", default=str(REAL), help="folder of the real h5ad files (default: %(default)s)")
    p.add_argument("--tasks", nargs="+", default=["*"],
                   help="task names or shell patterns, e.g. 'baron>pancreas4*' (default: all)")
    p.add_argument("--methods", nargs="+", default=["*"],
                   help="method names or shell patterns, e.g. 'LR shared*' 'scPretrain*' (default: all; CellTypist "
                        "only with --celltypist_python)")
    p.add_argument("--list", action="store_true", help="print the tasks and methods, then stop")
    p.add_argument("--report", action="store_true",
                   help="only write report.md again from transfer_long.csv and tasks.csv of --out")
    p.add_argument("--seed", type=int, default=0, help="seeds the splits, gene removals, inits and K-means (default: 0)")
    p.add_argument("--threads", type=int, default=1, help="BLAS / torch threads (default: %(default)s)")
    p.add_argument("--celltypist_python", default=None, help="python with celltypist installed (default: skip it)")
    p.add_argument("--demo_encoder", default=None,
                   help="an encoder pre-trained on the demo collection (main.py --is_pretrain --kmeans --normalize "
                        "cp10k) for the 'demo encoder' methods (default: skip them)")
    p.add_argument("--mv_cells", type=int, default=30,
                   help="cells per over-cluster of the majority voting shared by all methods (default: %(default)s)")
    p.add_argument("--coverage", type=float, default=CROSS_SPECIES_COVERAGE,
                   help="share of the model's genes left in the query of a cross-species task (default: %(default)s)")
    p.add_argument("--out", default=str(OUT), help="outputs (default: %(default)s)")
    p.add_argument("--cache", default=None, help="the cache folder (default: OUT/cache; processes may share one)")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- tasks


@dataclass
class Reference(data.CellData):
    """A labelled reference; ``groups`` (one per cell, or None) says which study, donor or sample a
    cell comes from, for choosing hyperparameters by holding a group out."""

    groups: np.ndarray | None = None
    group_key: str = ""


@dataclass
class Task:
    name: str
    kind: str  # "base", "dropout", "cross-species"
    ref: Reference
    query: data.CellData  # labelled: the truth (methods must not read query.labels)
    label_map: dict | None  # reference label -> query label; None = identity
    query_groups: np.ndarray
    query_group_key: str
    note: str = ""

    def scoring_map(self) -> dict:
        if self.label_map is not None:
            return self.label_map
        return {c: c for c in np.unique(self.ref.labels)}


def subset(d: data.CellData, rows: np.ndarray, name: str, cls=None, **extra):
    rows = np.asarray(rows)
    fields = dict(name=name, X=d.X[rows], cells=d.cells[rows], labels=None if d.labels is None else d.labels[rows])
    if cls is None:
        return replace(d, **fields)
    base = {k: getattr(d, k) for k in ("genes", "species", "source", "values")}
    return cls(**fields, **base, **extra)


class Loader:
    """The real datasets, each read once by the project's readers (genes mapped), with its obs."""

    def __init__(self, real_dir):
        self.real = Path(real_dir)
        self.cache: dict = {}

    def read(self, file: str, label_key: str, layer: str | None = None):
        key = (file, label_key, layer)
        if key not in self.cache:
            import anndata

            path = self.real / file
            d = gn.map_dataset_genes(data.read_any(path, label_key=label_key, layer=layer))
            backed = anndata.read_h5ad(path, backed="r")
            obs = backed.obs.copy()
            backed.file.close()
            if list(obs.index.astype(str)) != list(d.cells.astype(str)):
                raise data.DataError(f"{path}: obs and the cells read differ")
            self.cache[key] = (d, obs)
        return self.cache[key]

    def baron(self, label_key="cell_type1"):
        return self.read("baron_human_pancreas.h5ad", label_key)

    def pancreas4(self):
        return self.read("pancreas_4studies_cellxgene.h5ad", "cell_type", layer="raw")

    def stewart(self):
        return self.read("stewart2019_kidney_immune.h5ad", "celltype", layer="counts")


def study_names(values) -> np.ndarray:
    return np.array([str(v).replace(" et al.", "") for v in values], dtype=object)


def task_baron_pancreas4(loader: Loader) -> list[Task]:
    ref, ref_obs = loader.baron()
    query, q_obs = loader.pancreas4()
    ref = subset(ref, np.arange(ref.n_cells), "baron", Reference, groups=ref_obs["donor"].astype(str).to_numpy(),
                 group_key="donor")
    label_map = scoring.read_label_map(loader.real / "pancreas_label_map.csv")
    return [Task("baron>pancreas4", "base", ref, replace(query, name="pancreas4"), label_map,
                 study_names(q_obs["Dataset"]), "Dataset", "the issue's pair")]


def task_pancreas4_loso(loader: Loader) -> list[Task]:
    d, obs = loader.pancreas4()
    studies = study_names(obs["Dataset"])
    tasks = []
    for study in sorted(set(studies)):
        held = np.flatnonzero(studies == study)
        rest = np.flatnonzero(studies != study)
        short = study.split()[0]
        ref = subset(d, rest, f"pancreas4-minus-{short}", Reference, groups=studies[rest], group_key="Dataset")
        query = subset(d, held, f"pancreas4-{short}")
        tasks.append(Task(f"pancreas4-loso:{short}", "base", ref, query, None, studies[held], "Dataset",
                          f"train on the 3 other studies, test on {study}"))
    return tasks


def task_pancreas4_baron(loader: Loader) -> list[Task]:
    d, obs = loader.pancreas4()
    query, q_obs = loader.baron("cell_ontology_class")
    ref = subset(d, np.arange(d.n_cells), "pancreas4", Reference, groups=study_names(obs["Dataset"]),
                 group_key="Dataset")
    return [Task("pancreas4>baron", "base", ref, replace(query, name="baron-ontology"), None,
                 q_obs["donor"].astype(str).to_numpy(), "donor", "Baron's cell_ontology_class")]


def task_stewart(source: str, target: str) -> Callable[[Loader], list[Task]]:
    def build(loader: Loader) -> list[Task]:
        d, obs = loader.stewart()
        project = obs["Project"].astype(str).to_numpy()
        experiment = obs["Experiment"].astype(str).to_numpy()
        r, q = np.flatnonzero(project == source), np.flatnonzero(project == target)
        ref = subset(d, r, f"stewart-p{source}", Reference, groups=experiment[r], group_key="Experiment")
        return [Task(f"stewart-p{source}>p{target}", "base", ref, subset(d, q, f"stewart-p{target}"), None,
                     experiment[q], "Experiment", f"Project {source} -> Project {target}")]

    return build


TASKS: dict[str, Callable[[Loader], list[Task]]] = {
    "baron>pancreas4": task_baron_pancreas4,
    "pancreas4-loso": task_pancreas4_loso,
    "pancreas4>baron": task_pancreas4_baron,
    "stewart-p1>p2": task_stewart("1", "2"),
    "stewart-p2>p1": task_stewart("2", "1"),
}


def task_seed(seed: int, name: str) -> int:
    return seed * 1_000_003 + zlib.crc32(name.encode())


def drop_genes(d: data.CellData, drop: np.ndarray, name: str) -> data.CellData:
    keep = np.setdiff1d(np.arange(d.n_genes), drop)
    return replace(d, name=name, X=d.X[:, keep].tocsr(), genes=d.genes[keep])


def gene_dropout(task: Task, seed: int, out: Path, coverage: float) -> Task:
    """The query with a seeded random 15-30 % of its genes removed."""
    rng = np.random.default_rng(task_seed(seed, task.name))
    share = rng.uniform(*DROPOUT_RANGE)
    drop = rng.choice(task.query.n_genes, int(round(share * task.query.n_genes)), replace=False)
    query = drop_genes(task.query, drop, f"{task.query.name}-dropout{share:.3f}-s{seed}")
    return replace(task, name=f"{task.name}|dropout", kind="dropout", query=query,
                   note=f"{task.note}; query lost {len(drop)} of its {task.query.n_genes} genes ({share:.1%})")


def ortholog_renaming(path=gn.ORTHOLOG_TABLE) -> dict[str, str]:
    """Human symbol (upper-case) -> mouse symbol, one-to-one both ways in the table."""
    table = pd.read_csv(path, usecols=["human__gene_name", "mouse__gene_name"]).dropna()
    human, mouse = table["human__gene_name"].str.upper(), table["mouse__gene_name"]
    keep = ~human.duplicated(keep=False) & ~mouse.str.upper().duplicated(keep=False)
    return dict(zip(human[keep], mouse[keep]))


def cross_species(task: Task, seed: int, out: Path, coverage: float) -> Task:
    """The reference as a mouse dataset (renamed, written, read back and mapped by the tool), and a
    query missing model genes at random until ``coverage`` of the model's genes are present."""
    import anndata

    rename = ortholog_renaming()
    ref = task.ref
    keep = np.flatnonzero([g in rename for g in ref.genes])
    mouse_genes = np.array([rename[g] for g in ref.genes[keep]], dtype=object)
    path = out / "cache" / f"{ref.name}_as_mouse.h5ad"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        ad = anndata.AnnData(X=ref.X[:, keep].tocsr(), var=pd.DataFrame(index=pd.Index(mouse_genes, dtype=object)),
                             obs=pd.DataFrame({"label": ref.labels.astype(object)},
                                              index=pd.Index(ref.cells.astype(str), dtype=object)))
        files.atomic_write_path(path, ad.write_h5ad)
    mouse = data.read_any(path, label_key="label")
    if mouse.species != "mouse":
        raise data.DataError(f"{path}: read as {mouse.species}, expected mouse")
    mapped = gn.map_dataset_genes(mouse)
    new_ref = Reference(**{k: getattr(mapped, k) for k in ("X", "genes", "cells", "labels", "species", "source",
                                                           "values")},
                        name=f"{ref.name}-as-mouse", groups=ref.groups, group_key=ref.group_key)
    present = np.flatnonzero(pd.Index(task.query.genes).isin(pd.Index(new_ref.genes)))
    n_model = new_ref.n_genes
    n_remove = max(0, len(present) - int(round(coverage * n_model)))
    rng = np.random.default_rng(task_seed(seed, task.name + "|cross-species"))
    drop = rng.choice(present, n_remove, replace=False)
    query = drop_genes(task.query, drop, f"{task.query.name}-xs{coverage:g}-s{seed}")
    found = int(pd.Index(query.genes).isin(pd.Index(new_ref.genes)).sum())
    note = (f"{task.note}; reference {ref.n_genes} human genes -> {len(keep)} with a one-to-one mouse ortholog -> "
            f"{n_model} after the tool maps them back; query holds {found} of them ({found / n_model:.1%}); "
            "simulates the gene-space mismatch only")
    return replace(task, name=f"{task.name}|cross-species", kind="cross-species", ref=new_ref, query=query,
                   note=note)


def ensembl_orthologs(path=None) -> pd.DataFrame:
    """Ensembl 105's human -> mouse symbol pairs (one-to-many included), human upper-case."""
    table = pd.read_csv(path or ENSEMBL_TABLE, header=None, names=["human", "mouse"], dtype=str,
                        keep_default_na=False)
    table = table[(table["mouse"] != "") & (table["human"] != "")]
    return table.assign(human=table["human"].str.upper()).drop_duplicates()


def cross_species_ensembl(task: Task, seed: int, out: Path, coverage: float) -> Task:
    """The reference as a mouse dataset renamed with Ensembl 105's table, one-to-many included: a human
    gene's counts are split evenly over its mouse orthologs (INS -> Ins1, Ins2), a mouse gene several
    human genes map to gets their sum, genes without a mouse ortholog are dropped; written, read back
    as mouse and mapped by the tool's one-to-one table. The model's genes the tool cannot map back
    (INS1, INS2, the trypsins, ...) are the ones a human query lacks; nothing is removed at random."""
    import anndata
    import scipy.sparse as sp

    ref = task.ref
    pairs = ensembl_orthologs()
    pairs = pairs[pairs["human"].isin(set(ref.genes))]
    rows = pd.Index(ref.genes).get_indexer(pairs["human"])
    mouse_names, cols = np.unique(pairs["mouse"].to_numpy(dtype=object), return_inverse=True)
    share = 1.0 / pairs.groupby("human")["mouse"].transform("size").to_numpy()
    M = sp.csr_matrix((share.astype(np.float32), (rows, cols)), shape=(ref.n_genes, len(mouse_names)))
    path = out / "cache" / f"{ref.name}_as_mouse_ensembl.h5ad"
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        X = sp.csr_matrix(ref.X @ M, dtype=np.float32)
        ad = anndata.AnnData(X=X, var=pd.DataFrame(index=pd.Index(mouse_names, dtype=object)),
                             obs=pd.DataFrame({"label": ref.labels.astype(object)},
                                              index=pd.Index(ref.cells.astype(str), dtype=object)))
        files.atomic_write_path(path, ad.write_h5ad)
    mouse = data.read_any(path, label_key="label")
    if mouse.species != "mouse" or mouse.values != values_mod.RAW_VALUES:
        raise data.DataError(f"{path}: read as {mouse.species} {mouse.values}, expected mouse raw values")
    mapped = gn.map_dataset_genes(mouse)
    new_ref = Reference(**{k: getattr(mapped, k) for k in ("X", "genes", "cells", "labels", "species", "source",
                                                           "values")},
                        name=f"{ref.name}-as-mouse-ensembl", groups=ref.groups, group_key=ref.group_key)
    found = int(pd.Index(task.query.genes).isin(pd.Index(new_ref.genes)).sum())
    lost = [g for g in ("INS", "PRSS1", "GZMB", "GCG", "SST") if g in set(ref.genes) and g not in set(new_ref.genes)]
    note = (f"{task.note}; reference {ref.n_genes} human genes -> {len(mouse_names)} mouse genes (Ensembl 105) -> "
            f"{new_ref.n_genes} after the tool maps them back; the query holds {found} of them "
            f"({found / new_ref.n_genes:.1%}); markers no longer matched: {', '.join(lost) or 'none'}; "
            "simulates the gene-space mismatch only")
    return replace(task, name=f"{task.name}|cross-species-ens", kind="cross-species-ens", ref=new_ref,
                   query=replace(task.query, name=f"{task.query.name}-for-ensembl-mouse"), note=note)


VARIANTS = {"dropout": gene_dropout, "cross-species": cross_species, "cross-species-ens": cross_species_ensembl}
# which base tasks get which variants (patterns over task names)
CROSS_SPECIES_TASKS = ["baron>pancreas4", "pancreas4>baron", "stewart-p1>p2"]
DEFAULT_VARIANTS = {"dropout": ["*"], "cross-species": CROSS_SPECIES_TASKS, "cross-species-ens": CROSS_SPECIES_TASKS}


def build_tasks(args, loader: Loader) -> list[Task]:
    out = Path(args.out)
    tasks = []
    for builder in TASKS.values():
        for task in builder(loader):
            tasks.append(task)
            for variant, patterns in DEFAULT_VARIANTS.items():
                if any(fnmatch.fnmatchcase(task.name, p) for p in patterns):
                    tasks.append(VARIANTS[variant](task, args.seed, out, args.coverage))
    return [t for t in tasks if any(fnmatch.fnmatchcase(t.name, p) for p in args.tasks)]


def describe_task(task: Task) -> dict:
    found = int(pd.Index(task.query.genes).isin(pd.Index(task.ref.genes)).sum())
    scored = np.isin(task.query.labels, list(set(task.scoring_map().values())))
    groups = "" if task.ref.groups is None else f"{len(set(task.ref.groups))} {task.ref.group_key}"
    return {"task": task.name, "kind": task.kind, "ref cells": task.ref.n_cells, "ref genes": task.ref.n_genes,
            "ref types": len(set(task.ref.labels)), "ref groups": groups, "query cells": task.query.n_cells,
            "scored": int(scored.sum()), "query genes": task.query.n_genes,
            "model genes in query": round(found / task.ref.n_genes, 3), "note": task.note}


# --------------------------------------------------------------------------- cache


def digest(*parts) -> str:
    h = hashlib.sha1()
    for part in parts:
        if isinstance(part, data.CellData):
            h.update(cell_digest(part).encode())
        elif isinstance(part, np.ndarray):
            h.update(np.ascontiguousarray(part).tobytes() if part.dtype != object else "\x1f".join(map(str, part)).encode())
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x1e")
    return h.hexdigest()[:20]


_CELL_DIGESTS: dict[int, tuple[object, str]] = {}


def project_code() -> str:
    """A digest of the project's own modules: a cached scPretrain result is one of this code."""
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(ROOT.glob("*.py")))).hexdigest()[:16]


def cell_digest(d: data.CellData) -> str:
    cached = _CELL_DIGESTS.get(id(d))
    if cached is not None and cached[0] is d:
        return cached[1]
    h = hashlib.sha1()
    for arr in (d.X.data, d.X.indices, d.X.indptr):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update("\x1f".join(map(str, d.genes)).encode())
    h.update("\x1f".join(map(str, d.labels)).encode() if d.labels is not None else b"-")
    h.update(d.values.encode())
    value = h.hexdigest()[:20]
    _CELL_DIGESTS[id(d)] = (d, value)
    return value


class Cache:
    """Results on disk by key: npz of arrays plus a JSON of the rest."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, kind: str, key: str) -> Path:
        return self.folder / kind / f"{key}.npz"

    def get(self, kind: str, key: str):
        path = self.path(kind, key)
        if not path.exists():
            return None
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k != "_meta"}
            meta = json.loads(str(z["_meta"]))
        for k, v in arrays.items():
            if v.dtype.kind == "U":
                arrays[k] = v.astype(object)
        return arrays, meta

    def put(self, kind: str, key: str, arrays: dict, meta: dict) -> None:
        path = self.path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {k: (np.asarray(v, dtype=str) if np.asarray(v).dtype == object else np.asarray(v))
                  for k, v in arrays.items()}

        def write(tmp):
            with open(tmp, "wb") as fh:
                np.savez_compressed(fh, _meta=np.array(json.dumps(meta, default=str)), **arrays)

        files.atomic_write_path(path, write)


# --------------------------------------------------------------------------- features


def shared_genes(ref: data.CellData, query: data.CellData) -> np.ndarray:
    """The reference's genes that the query also has, in the reference's order."""
    return ref.genes[pd.Index(ref.genes).isin(pd.Index(query.genes))]


def cut(d: data.CellData, genes: np.ndarray) -> data.CellData:
    """``d`` on these genes (missing ones zero), quietly."""
    import logging

    logger = logging.getLogger("scpretrain.data")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        return gn.align_to_universe(d, genes)
    finally:
        logger.setLevel(level)


def lr_features(d: data.CellData, genes: np.ndarray):
    """log1p CP10k of ``d`` on ``genes`` (normalised after the cut, as bench_crossstudy.py does)."""
    return feature_matrix(cut(d, genes), "cp10k")


def scale_fit(X):
    """Per-gene standard deviation on the reference (no centring); genes without variance keep 1."""
    from sklearn.preprocessing import StandardScaler

    return StandardScaler(with_mean=False).fit(X)


def scale_apply(scaler, X):
    Y = scaler.transform(X).tocsr()
    np.minimum(Y.data, SCALE_MAX, out=Y.data)
    return Y


# --------------------------------------------------------------------------- over-clustering for majority voting


def query_clusters(query: data.CellData, seed: int, cache: Cache, cells_per_cluster: int) -> np.ndarray:
    """K-means (one cluster per ``cells_per_cluster`` cells) on 50 PCs of the query's 2,000 most
    variable log1p CP10k genes, centred: one over-clustering per query, shared by every method's
    majority voting (``mv``)."""
    key = digest("clusters", query, seed, cells_per_cluster)
    hit = cache.get("clusters", key)
    if hit is not None:
        return hit[0]["clusters"]
    import kmeans
    from sklearn.decomposition import PCA

    X = feature_matrix(query, "cp10k")
    mean = np.asarray(X.mean(0)).ravel()
    var = np.asarray(X.multiply(X).mean(0)).ravel() - mean ** 2
    top = np.sort(np.argsort(var)[-2000:])
    D = X[:, top].toarray().astype(np.float64)
    D -= D.mean(0)
    Z = PCA(n_components=min(50, D.shape[0] - 1), random_state=seed).fit_transform(D).astype(np.float32)
    k = int(min(max(2, query.n_cells // cells_per_cluster), query.n_cells))
    clusters = np.asarray(kmeans.kmeans(Z, k, n_iter=20, seed=seed).labels)
    cache.put("clusters", key, {"clusters": clusters}, {"query": query.name, "k": k})
    return clusters


def cluster_purity(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Share of cells whose label is their cluster's most frequent one: majority voting's ceiling."""
    table = pd.crosstab(pd.Series(clusters), pd.Series(labels))
    return float(table.max(axis=1).sum() / len(labels))


# --------------------------------------------------------------------------- methods


class Method:
    name = "method"

    def fit_predict(self, ref: Reference, query: data.CellData):
        raise NotImplementedError


@dataclass(frozen=True)
class LRConfig:
    C: float
    scale: bool = False

    def label(self) -> str:
        return f"C={self.C:g}" + (" scaled" if self.scale else "")


class LREngine:
    """Logistic regressions, fitted once per (reference, genes, config) and cached: in memory
    (the last few fits) and, for query predictions and inner validation scores, on disk."""

    def __init__(self, cache: Cache, seed: int, memory: int = 48):
        self.cache, self.seed, self.memory = cache, seed, memory
        self.fits: OrderedDict = OrderedDict()
        self.seconds_fitting = 0.0

    def fit(self, X, y, config: LRConfig):
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        # genes no training cell expresses get no gradient, so their weights stay zero: leaving them
        # out gives the same model in fewer parameters (L-BFGS's cost grows with genes x classes)
        used = np.flatnonzero(X.getnnz(axis=0) > 0)
        X = X[:, used]
        scaler = scale_fit(X) if config.scale else None
        Xs = scale_apply(scaler, X) if scaler is not None else X
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model = LogisticRegression(C=config.C, max_iter=LR_MAX_ITER).fit(Xs, y)
        self.seconds_fitting += time.perf_counter() - t0
        converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
        return model, scaler, converged, used

    @staticmethod
    def predict(fitted, X) -> np.ndarray:
        model, scaler, _, used = fitted
        X = X[:, used]
        return model.predict_proba(scale_apply(scaler, X) if scaler is not None else X)

    def reference_fit(self, ref: data.CellData, genes: np.ndarray, config: LRConfig):
        key = (cell_digest(ref), digest(genes), config)
        if key in self.fits:
            self.fits.move_to_end(key)
            return self.fits[key]
        codes, classes = splits.encode_labels(ref.labels)
        t0 = time.perf_counter()
        fitted = self.fit(lr_features(ref, genes), codes, config)
        entry = (fitted, classes, time.perf_counter() - t0)
        self.fits[key] = entry
        while len(self.fits) > self.memory:
            self.fits.popitem(last=False)
        return entry

    def query_prediction(self, ref: data.CellData, query: data.CellData, genes: np.ndarray, config: LRConfig):
        """(labels, probabilities, seconds of the fit, converged) of ``config`` fitted on ``ref``."""
        key = digest("lr-predict", ref, query, genes, config.C, config.scale, LR_MAX_ITER)
        hit = self.cache.get("lr", key)
        if hit is not None:
            arrays, meta = hit
            return arrays["labels"], arrays["probs"], meta["seconds"], meta["converged"]
        (fitted, classes, seconds) = self.reference_fit(ref, genes, config)
        t0 = time.perf_counter()
        probs = self.predict(fitted, lr_features(query, genes))
        seconds += time.perf_counter() - t0
        labels = classes[fitted[0].classes_[probs.argmax(1)]]
        self.cache.put("lr", key, {"labels": labels, "probs": probs.astype(np.float32)},
                       {"seconds": seconds, "converged": fitted[2], "ref": ref.name, "query": query.name})
        return labels, probs, seconds, fitted[2]

    def inner_scores(self, ref: Reference, genes: np.ndarray, configs: list[LRConfig], rule: str) -> dict:
        """Each config's accuracy on the reference's held-out cells under ``rule``: ``study`` =
        grouped K-fold over ``ref.groups`` (at most MAX_INNER_FOLDS folds; pooled over the folds,
        cells of a type absent from a fold's training part left out), ``cells`` = 10 % random
        validation cells (``data.validation_split``, the split annotate.py makes)."""
        folds = self.folds(ref, rule)
        codes, classes = splits.encode_labels(ref.labels)
        X = None
        scores = {}
        for config in configs:
            key = digest("inner", ref, genes, config.C, config.scale, LR_MAX_ITER, rule, self.seed, MAX_INNER_FOLDS)
            hit = self.cache.get("inner", key)
            if hit is not None:
                scores[config] = hit[1]["accuracy"]
                continue
            if X is None:
                X = lr_features(ref, genes)
            right = total = 0
            for train, val in folds:
                seen = np.isin(codes[val], codes[train])
                val = val[seen]
                if not len(val) or len(np.unique(codes[train])) < 2:
                    continue
                fitted = self.fit(X[train], codes[train], config)
                predicted = fitted[0].classes_[self.predict(fitted, X[val]).argmax(1)]
                right += int(np.sum(predicted == codes[val]))
                total += len(val)
            scores[config] = right / max(total, 1)
            self.cache.put("inner", key, {}, {"accuracy": scores[config], "cells": total, "folds": len(folds),
                                              "ref": ref.name, "rule": rule})
        return scores

    def folds(self, ref: Reference, rule: str) -> list[tuple[np.ndarray, np.ndarray]]:
        if rule == "study" and ref.groups is not None and len(set(ref.groups)) >= 2:
            from sklearn.model_selection import GroupKFold

            n = min(MAX_INNER_FOLDS, len(set(ref.groups)))
            return list(GroupKFold(n_splits=n).split(np.zeros(ref.n_cells), groups=ref.groups))
        train, val = splits.validation_split(ref.n_cells, self.seed, 0.1)
        return [(np.sort(train), np.sort(val))]


class LogReg(Method):
    """One fixed logistic regression: features ``all`` (the reference's genes, the query aligned to
    them, missing ones zero) or ``shared`` (both cut to the genes they share)."""

    def __init__(self, engine: LREngine, features: str, config: LRConfig):
        self.engine, self.features, self.config = engine, features, config
        self.name = f"LR {features} {config.label()}"

    def genes(self, ref, query):
        return ref.genes if self.features == "all" else shared_genes(ref, query)

    def fit_predict(self, ref, query):
        labels, probs, seconds, converged = self.engine.query_prediction(ref, query, self.genes(ref, query),
                                                                         self.config)
        return labels, probs, {"info": {"converged": converged}, "seconds": seconds}


class LogRegSelected(LogReg):
    """Logistic regression whose C (and scaling, when ``scales`` holds both) is chosen per task by
    ``rule`` on the reference alone; ties go to the stronger penalty (then to no scaling)."""

    def __init__(self, engine: LREngine, features: str, rule: str, scales=(False, True), grid=C_GRID):
        self.engine, self.features, self.rule = engine, features, rule
        self.configs = [LRConfig(C, s) for s in scales for C in grid]
        what = "C" if len(scales) == 1 else "C+scaling"
        self.name = f"LR {features}{' scaled' if scales == (True,) else ''}, {what} by {rule}"

    def fit_predict(self, ref, query):
        genes = self.genes(ref, query)
        t0 = time.perf_counter()
        scores = self.engine.inner_scores(ref, genes, self.configs, self.rule)
        order = sorted(self.configs, key=lambda c: (-scores[c], c.scale, c.C))
        chosen = order[0]
        labels, probs, seconds, converged = self.engine.query_prediction(ref, query, genes, chosen)
        return labels, probs, {"info": {"chosen": chosen.label(), "inner accuracy": round(scores[chosen], 4),
                                        "rule": self.rule},
                               "seconds": seconds + time.perf_counter() - t0}


class ScPretrain(Method):
    """``annotate.py transfer`` as a user runs it (``annotation.train`` for the query's genes, then
    ``annotation.predict``), with the flags ``flags`` on top of annotate's defaults: the recipe, the
    classifier's options, ``--pretrained_model`` (a demo encoder) or ``--pretrain_on_query``.
    Besides its best labels, the labels of majority voting with annotate's over-clustering at each
    ``VOTING_CLUSTERS`` rule (``--n_clusters``), trained once."""

    def __init__(self, name: str, flags: list[str], cache: Cache, seed: int, features: str = "shared"):
        self.flags, self.cache, self.seed, self.features = list(flags), cache, seed, features
        self.name = name

    def args(self):
        import annotate

        argv = ["transfer", "--reference", "-", "--query", "-", "--seed", str(self.seed), "--device", "cpu",
                "--majority_voting", *self.flags]
        return annotate.parse_args(argv)

    def key(self, ref, query, flags) -> str:
        return digest("scpretrain-annotate", ref, query, flags, self.features, self.seed, VOTING_CLUSTERS,
                      project_code())

    def fit_predict(self, ref, query):
        key = self.key(ref, query, self.flags)
        hit = self.cache.get("scpretrain", key)
        if hit is None:
            hit = self.run(ref, query, key)
        arrays, meta = hit
        labels = {f"mv {rule}": arrays[f"mv {rule}"] for rule in VOTING_CLUSTERS}
        labels["annotate.py mv"] = arrays["mv default"]
        return arrays["labels"], arrays["probs"], {"labels": labels, "info": meta["info"], "seconds": meta["seconds"]}

    def run(self, ref, query, key):
        import annotate
        import annotation
        import checkpoints
        import cli
        import runtime
        from settings import PredictSettings

        args = self.args()
        runtime.seed_everything(self.seed)
        t0 = time.perf_counter()
        reference = data.with_two_classes([data.labelled_cells(ref)])[0]
        pretrained = checkpoints.load_encoder(args.pretrained_model) if args.pretrained_model else None
        clf_settings, training = annotate.training_settings(args, pretrained)
        shared = np.asarray(query.genes, dtype=object) if self.features == "shared" else None
        if args.pretrain_on_query:
            pretrained = annotation.pretrain_with_query(reference, query, annotate.query_pretrain_settings(
                args, clf_settings), "cpu", args.pretrain_phases)
        t_pre = time.perf_counter() - t0
        model = annotation.train(reference, clf_settings, training, "label", pretrained, shared, query.name, "cpu",
                                 cli.args_dict(args))
        t_train = time.perf_counter() - t0
        settings = annotate.predict_settings(args)
        info = {"epochs": model.ckpt["epochs"], "val_accuracy": round(model.ckpt["validation_accuracy"], 4),
                "linear_base": model.ckpt["linear_base"],
                "temperature": model.ckpt["calibration"]["temperature"], "n_genes": len(model.genes),
                "pretrain_seconds": round(t_pre, 1), "train_seconds": round(t_train, 1)}
        arrays = self.labels(model, query, settings)
        self.cache.put("scpretrain", key, arrays, {"seconds": time.perf_counter() - t0, "info": info,
                                                   "ref": ref.name, "query": query.name, "flags": self.flags})
        if "--ft_blend_share" in self.flags:  # the network does not depend on the share: the others' labels
            at = self.flags.index("--ft_blend_share") + 1
            for share in SHARE_SWEEP:
                flags = [*self.flags[:at], share, *self.flags[at + 1:]]
                other = self.key(ref, query, flags)
                if other != key and self.cache.get("scpretrain", other) is None:
                    model.clf.base_share.fill_(float(share))
                    shared = {**info, "linear_base": {**info["linear_base"], "share": float(share)},
                              "note": "the network trained once for every share; temperature of the first"}
                    self.cache.put("scpretrain", other, self.labels(model, query, settings),
                                   {"seconds": time.perf_counter() - t0, "info": shared, "ref": ref.name,
                                    "query": query.name, "flags": flags})
        return self.cache.get("scpretrain", key)

    @staticmethod
    def labels(model, query, settings) -> dict:
        """Best labels, probabilities and majority voting (annotate's own over-clustering and each
        ``VOTING_CLUSTERS`` rule) of ``model`` on ``query``."""
        import annotation

        result = annotation.predict(model, query, settings, "cpu")
        arrays = {"labels": result.table["predicted_labels"].to_numpy(dtype=object),
                  "probs": result.probabilities if result.probabilities is not None else np.zeros((0,)),
                  "mv default": result.table["majority_voting"].to_numpy(dtype=object)}
        for rule, per in VOTING_CLUSTERS.items():
            k = int(min(max(2, query.n_cells // per), 1000))
            voted = annotation.predict(model, query, replace(settings, n_clusters=k), "cpu")
            arrays[f"mv {rule}"] = voted.table["majority_voting"].to_numpy(dtype=object)
        return arrays


# majority voting's over-clusters in annotate's K-means on the representation: one per this many cells
VOTING_CLUSTERS = {"n/100": 100, "n/50": 50, "n/30": 30}
# the shares a run with a fixed --ft_blend_share also labels with (its network is the same)
SHARE_SWEEP = ("0.5", "0.6", "0.75", "0.9", "1")


CELLTYPIST_SCRIPT = r"""
import os, sys, time, json, anndata, celltypist, numpy as np, pandas as pd
ref, label_key, model_path, query, out = sys.argv[1:6]
t0 = time.time()
if os.path.exists(model_path):
    model = celltypist.models.Model.load(model_path)
    trained = 0.0
else:
    model = celltypist.train(anndata.read_h5ad(ref), labels=label_key)
    model.write(model_path)
    trained = time.time() - t0
t1 = time.time()
result = celltypist.annotate(anndata.read_h5ad(query), model=model, majority_voting=True)
table = result.predicted_labels
probs = result.probability_matrix
frame = pd.DataFrame({"best": table["predicted_labels"].astype(str).to_numpy(),
                      "majority_voting": table["majority_voting"].astype(str).to_numpy()})
for c in probs.columns:
    frame["p:" + str(c)] = probs[c].to_numpy()
frame.to_csv(out, index=False)
json.dump({"train_seconds": trained, "annotate_seconds": time.time() - t1}, open(out + ".json", "w"))
"""


class CellTypist(Method):
    """CellTypist with its defaults (``celltypist.train`` then ``annotate`` with majority voting) in
    its own interpreter, trained once per reference on log1p CP10k of the reference's genes and
    given the query's log1p CP10k on its own genes (CellTypist uses the genes it shares)."""

    name = "CellTypist defaults"

    def __init__(self, python: str, cache: Cache, threads: int):
        self.python, self.cache, self.threads = python, cache, threads

    @staticmethod
    def write_h5ad(d: data.CellData, path: Path, with_labels: bool) -> None:
        import anndata

        obs = pd.DataFrame({"label": d.labels.astype(object)} if with_labels else {},
                           index=pd.Index(d.cells.astype(str), dtype=object))
        ad = anndata.AnnData(X=feature_matrix(d, "cp10k"), obs=obs,
                             var=pd.DataFrame(index=pd.Index(d.genes.astype(str), dtype=object)))
        files.atomic_write_path(path, ad.write_h5ad)

    def fit_predict(self, ref, query):
        import os

        key = digest("celltypist-predict", ref, query)
        hit = self.cache.get("celltypist", key)
        if hit is None:
            folder = self.cache.folder / "celltypist"
            folder.mkdir(parents=True, exist_ok=True)
            ref_key = digest("celltypist-ref", ref)
            ref_path, model_path = folder / f"ref_{ref_key}.h5ad", folder / f"model_{ref_key}.pkl"
            if not model_path.exists():
                self.write_h5ad(ref, ref_path, True)
            query_path, result = folder / f"query_{key}.h5ad", folder / f"result_{key}.csv"
            self.write_h5ad(query, query_path, False)
            script = folder / "run_celltypist.py"
            script.write_text(CELLTYPIST_SCRIPT)
            env = {**os.environ, **{v: str(self.threads) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                                    "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}}
            proc = subprocess.run([self.python, str(script), str(ref_path), "label", str(model_path),
                                   str(query_path), str(result)], capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                raise RuntimeError(f"CellTypist failed:\n{proc.stderr[-3000:]}")
            frame = pd.read_csv(result, dtype={"best": str, "majority_voting": str}, keep_default_na=False)
            timing = json.loads(Path(str(result) + ".json").read_text())
            prob_cols = [c for c in frame.columns if c.startswith("p:")]
            self.cache.put("celltypist", key, {"labels": frame["best"].to_numpy(dtype=object),
                                               "voted": frame["majority_voting"].to_numpy(dtype=object),
                                               "probs": frame[prob_cols].to_numpy(np.float32)},
                           {"seconds": timing["train_seconds"] + timing["annotate_seconds"], **timing,
                            "ref": ref.name, "query": query.name})
            for path in (query_path, result, Path(str(result) + ".json")):
                path.unlink(missing_ok=True)
            hit = self.cache.get("celltypist", key)
        arrays, meta = hit
        return arrays["labels"], arrays["probs"], {"labels": {"own mv": arrays["voted"]}, "seconds": meta["seconds"]}


def scpretrain_variants(args) -> dict[str, list[str]]:
    """``annotate.py transfer`` with its defaults and with the flags each candidate default changes."""
    found = {"scPretrain defaults": [], "scPretrain paper": ["--recipe", "paper"],
             "scPretrain plus": ["--recipe", "plus"]}
    for C in ("0.1", "0.3", "1"):
        found[f"scPretrain C={C}"] = ["--ft_linear_c", C]
        for share in SHARE_SWEEP:
            found[f"scPretrain C={C} share={share}"] = ["--ft_linear_c", C, "--ft_blend_share", share]
    found["scPretrain pretrained on query"] = ["--pretrain_on_query"]
    found["scPretrain pretrained on query, phases 1+2"] = ["--pretrain_on_query", "--pretrain_phases", "2"]
    if args.demo_encoder:
        found["scPretrain demo encoder"] = ["--pretrained_model", str(args.demo_encoder), "--recipe", "transfer"]
    return found


def build_methods(args, cache: Cache) -> list[Method]:
    engine = LREngine(cache, args.seed)
    methods: list[Method] = []
    for features in ("all", "shared"):
        for scale in (False, True):
            methods += [LogReg(engine, features, LRConfig(C, scale)) for C in C_GRID]
    # the rules choose C for the shared genes, unscaled: the inner folds share the reference's genes, so
    # they cannot see a gene-space mismatch (all vs shared is settled by the fixed grid), and scaling
    # lost at almost every fixed C (README); each candidate costs a fit per fold on a 2-core machine
    for rule in ("study", "cells"):
        methods.append(LogRegSelected(engine, "shared", rule, (False,)))
    for name, flags in scpretrain_variants(args).items():
        methods.append(ScPretrain(name, flags, cache, args.seed))
    methods.append(ScPretrain("scPretrain defaults, all genes", [], cache, args.seed, features="all"))
    if args.celltypist_python:
        methods.append(CellTypist(args.celltypist_python, cache, args.threads))
    return [m for m in methods if any(fnmatch.fnmatchcase(m.name, p) for p in args.methods)]


# --------------------------------------------------------------------------- scoring


def score_rows(task: Task, method: str, kind: str, predicted, seconds: float, info: dict) -> list[dict]:
    predicted = np.asarray(predicted, dtype=object)
    given = task.query.labels.astype(object)
    label_map = task.scoring_map()
    rows = []
    groups = [("all", np.ones(len(given), bool))] + [(g, task.query_groups == g)
                                                     for g in sorted(set(task.query_groups))]
    for group, mask in groups:
        s = scoring.mapped_scores(predicted[mask], given[mask], label_map)
        if group != "all" and s["n_scored"] == 0:
            continue
        rows.append({"task": task.name, "kind": task.kind, "method": method, "labels": kind, "group": group,
                     "accuracy": s["accuracy"], "macro_f1": s["macro_f1"], "kappa": s["kappa"],
                     "n_scored": s["n_scored"], "seconds": round(float(seconds), 2),
                     "info": json.dumps(info, default=str) if group == "all" else ""})
    return rows


def run_method(task: Task, method: Method, blind: data.CellData, clusters: np.ndarray) -> list[dict]:
    """``method`` on ``task`` (``blind``: its query without labels), scored."""
    import annotation

    t0 = time.perf_counter()
    result = method.fit_predict(task.ref, blind)
    labels, probs = result[0], result[1]
    extras = result[2] if len(result) > 2 else {}
    seconds = extras.get("seconds", time.perf_counter() - t0)
    info = extras.get("info", {})
    labels = np.asarray(labels, dtype=object)
    rows = score_rows(task, method.name, "best", labels, seconds, info)
    rows += score_rows(task, method.name, "mv", annotation.majority_vote(labels, clusters), seconds, info)
    for kind, other in extras.get("labels", {}).items():
        rows += score_rows(task, method.name, kind, other, seconds, info)
    return rows


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """Per method and label set: mean accuracy and macro-F1 over tasks, the worst task, the mean per
    kind of task, and each task's accuracy."""
    overall = frame[frame["group"] == "all"]
    out = []
    for (method, labels), rows in overall.groupby(["method", "labels"], sort=False):
        acc = rows.set_index("task")["accuracy"]
        worst = acc.idxmin()
        row = {"method": method, "labels": labels, "tasks": len(rows), "mean acc": acc.mean(),
               "mean F1": rows["macro_f1"].mean(), "worst acc": acc.min(), "worst task": worst}
        for kind, part in rows.groupby("kind", sort=False):
            row[f"mean {kind}"] = part["accuracy"].mean()
        row["seconds"] = rows["seconds"].sum()
        row.update({f"acc {t}": a for t, a in acc.items()})
        out.append(row)
    return pd.DataFrame(out)


KEY_METHODS = ("LR all C=0.1", "LR all C=0.01", "LR shared C=0.01", "LR shared C=0.03", "LR shared C=0.1",
               "LR shared C=1", "LR shared, C by study", "LR shared, C by cells", "LR all, C by study",
               "LR all, C by cells", "CellTypist defaults", "scPretrain paper all", "scPretrain paper shared",
               "scPretrain plus all", "scPretrain plus shared")
KINDS = ("base", "dropout", "cross-species", "cross-species-ens")


def lr_grid(overall: pd.DataFrame, stat: str) -> pd.DataFrame:
    """Fixed regressions' best labels: features x C, the mean (or worst) accuracy over tasks."""
    best = overall[(overall["labels"] == "best") & overall["method"].str.match(r"LR (all|shared) C=")]
    parsed = best["method"].str.extract(r"LR (?P<features>all|shared) C=(?P<C>[0-9.e-]+)(?P<scaled> scaled)?")
    best = best.assign(features=parsed["features"] + parsed["scaled"].fillna(""), C=parsed["C"].astype(float))
    table = best.groupby(["features", "C"])["accuracy"].agg(stat).unstack("C")
    table.columns = [f"C={c:g}" for c in table.columns]
    return table.reset_index()


def selection_table(overall: pd.DataFrame) -> pd.DataFrame:
    """Each selection rule against the best of its candidates per task (chosen on the query: the
    oracle), and the fixed default of the same candidates that is best on average."""
    best = overall[overall["labels"] == "best"].set_index(["method", "task"])["accuracy"]
    rows = []
    selected = overall[(overall["labels"] == "best") & overall["method"].str.contains(" by ")]
    for method, part in selected.groupby("method", sort=False):
        features = method.split()[1].rstrip(",")
        scales = [" scaled"] if " scaled," in method else ([""] if ", C by" in method else ["", " scaled"])
        candidates = [f"LR {features} C={c:g}{s}" for s in scales for c in C_GRID]
        tasks = list(part["task"])
        grid = pd.DataFrame({c: [best.get((c, t), np.nan) for t in tasks] for c in candidates}, index=tasks)
        acc = part.set_index("task")["accuracy"]
        chosen = [json.loads(i).get("chosen", "?") for i in part["info"]]
        fixed = grid.mean().idxmax()
        rows.append({"rule": method, "mean acc": acc.mean(), "worst acc": acc.min(), "worst task": acc.idxmin(),
                     "oracle mean": grid.max(axis=1).mean(), "regret": (grid.max(axis=1) - acc).mean(),
                     "best fixed": fixed.replace(f"LR {features} ", ""), "its mean": grid[fixed].mean(),
                     "chosen": ", ".join(f"{k} x{v}" for k, v in pd.Series(chosen).value_counts().items())})
    return pd.DataFrame(rows)


def method_table(overall: pd.DataFrame, methods) -> pd.DataFrame:
    rows = []
    for method in methods:
        for labels, part in overall[overall["method"] == method].groupby("labels", sort=False):
            acc = part.set_index("task")["accuracy"]
            row = {"method": method, "labels": labels, "mean acc": acc.mean(), "mean F1": part["macro_f1"].mean(),
                   "worst acc": acc.min(), "worst task": acc.idxmin()}
            for kind in KINDS:
                row[f"mean {kind}"] = part.loc[part["kind"] == kind, "accuracy"].mean()
            row["seconds"] = round(part["seconds"].sum())
            rows.append(row)
    return pd.DataFrame(rows)


def per_task_table(overall: pd.DataFrame, methods, labels: str = "best") -> pd.DataFrame:
    part = overall[(overall["labels"] == labels) & overall["method"].isin(methods)]
    table = part.pivot_table(index="task", columns="method", values="accuracy", sort=False)
    return table[[m for m in methods if m in table.columns]].reset_index()


def per_group_table(frame: pd.DataFrame, task: str, methods) -> pd.DataFrame:
    part = frame[(frame["task"] == task) & frame["method"].isin(methods)]
    if part.empty:
        return part
    acc = part.pivot_table(index=["method", "labels"], columns="group", values="accuracy", sort=False)
    f1 = part.pivot_table(index=["method", "labels"], columns="group", values="macro_f1", sort=False)
    table = acc.join(f1, lsuffix=" acc", rsuffix=" F1")
    order = {m: i for i, m in enumerate(methods)}
    table = table.reset_index()
    return table.sort_values("method", key=lambda s: s.map(order), kind="stable")


def report(frame: pd.DataFrame, tasks: pd.DataFrame | None, seed: int) -> str:
    """The README's tables, as markdown."""
    overall = frame[frame["group"] == "all"]
    methods = [m for m in KEY_METHODS if m in set(overall["method"])]
    parts = [f"bench_transfer.py, seed {seed}. NOTE: {SIMULATION_NOTE}.", ""]
    if tasks is not None:
        parts += ["### Tasks", "", markdown(tasks.drop(columns="note", errors="ignore")), ""]
    if overall["method"].str.match(r"LR (all|shared) C=").any():
        parts += ["### Fixed logistic regressions, best labels: mean accuracy over tasks", "",
                  markdown(lr_grid(overall, "mean")), "",
                  "### Fixed logistic regressions, best labels: worst task's accuracy", "",
                  markdown(lr_grid(overall, "min")), ""]
        for kind in KINDS:
            sub = overall[overall["kind"] == kind]
            if len(sub):
                parts += [f"### Fixed logistic regressions, best labels: mean accuracy over the {kind} tasks", "",
                          markdown(lr_grid(sub, "mean")), ""]
    if overall["method"].str.contains(" by ").any():
        parts += ["### Choosing C (and scaling) on the reference alone", "", markdown(selection_table(overall)), ""]
    if methods:
        parts += ["### Methods", "", markdown(method_table(overall, methods)), "",
                  "### Per task, best labels (accuracy)", "", markdown(per_task_table(overall, methods)), "",
                  "### Per task, majority voting over the shared over-clustering (accuracy)", "",
                  markdown(per_task_table(overall, methods, "mv")), ""]
        for task in ("baron>pancreas4", "baron>pancreas4|cross-species"):
            table = per_group_table(frame, task, methods)
            if len(table):
                parts += [f"### {task}, per study (accuracy, then macro-F1)", "", markdown(table), ""]
    return "\n".join(parts)


def markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in frame.iterrows():
        cells = [f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in r]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args) -> pd.DataFrame:
    import logging

    from threadpoolctl import threadpool_limits

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    import torch

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report:
        text = report(pd.read_csv(out / "transfer_long.csv", keep_default_na=False, na_values=[""]),
                      pd.read_csv(out / "tasks.csv"), args.seed)
        (out / "report.md").write_text(text)
        print(text)
        return None
    cache = Cache(Path(args.cache) if args.cache else out / "cache")
    t_start = time.time()
    with threadpool_limits(args.threads):
        loader = Loader(args.real_dir)
        tasks = build_tasks(args, loader)
        methods = build_methods(args, cache)
        clusters = {t.name: query_clusters(t.query, args.seed, cache, args.mv_cells) for t in tasks}
        described = pd.DataFrame([{**describe_task(t), "mv purity": round(cluster_purity(clusters[t.name],
                                                                                          t.query.labels), 3)}
                                  for t in tasks])
        described.to_csv(out / "tasks.csv", index=False)
        print(SIMULATION_NOTE)
        print(markdown(described.drop(columns="note", errors="ignore")), flush=True)
        if args.list:
            print("\n".join(m.name for m in methods))
            return described
        rows = []
        for task in tasks:
            blind = replace(task.query, labels=None)
            for method in methods:
                t0 = time.time()
                new = run_method(task, method, blind, clusters[task.name])
                rows += new
                best = next(r for r in new if r["labels"] == "best" and r["group"] == "all")
                print(f"{time.time() - t_start:7.0f}s {task.name:34s} {method.name:40s} acc {best['accuracy']:.3f} "
                      f"F1 {best['macro_f1']:.3f} ({time.time() - t0:.1f}s) {best['info']}", flush=True)
            pd.DataFrame(rows).to_csv(out / "transfer_long.csv", index=False)
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "transfer_long.csv", index=False)
    summary = summarise(frame)
    summary.to_csv(out / "summary.csv", index=False)
    (out / "report.md").write_text(report(frame, described, args.seed))
    pd.set_option("display.width", 250)
    pd.set_option("display.max_rows", 500)
    print(summary[["method", "labels", "mean acc", "mean F1", "worst acc", "worst task"]].round(3).to_string())
    print(f"total {time.time() - t_start:.0f}s")
    return frame


if __name__ == "__main__":
    main(parse_args())
