"""The fine-tuning sweep: pretrained vs randomly initialised classifiers on every labelled dataset.

For each dataset and repeat, one seeded split serves both methods; the classifiers start from
the same random init, scPretrain's encoder then takes the pretrained column of every gene the
gene universe holds. Early stopping on validation accuracy; the best model is scored on the
test cells. Rows go to a CSV written atomically after every dataset, so an interrupted sweep
resumes where it stopped. Importing does nothing.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import classifier
import common
import data
import metrics
import results

log = logging.getLogger("scpretrain.finetune")

METHODS = ("scPretrain", "Without pretraining")
RESULT_KEY = ["dataset", "seed", "method", results.RUN_ID]
RESULT_COLUMNS = [*RESULT_KEY, *metrics.METRIC_NAMES]
# the arguments that change the sweep's numbers (with the pretrained model, the run identity)
RESULT_SETTINGS = ("label_key", *common.INPUT_OPTIONS, "normalize", "hid", "per_train", "per_val", "max_tr_num",
                   "ft_lr", "ft_batch_size", "ft_epoch", "patience", "ft_dropout", "ft_weight_decay", "ft_early_stop",
                   "ft_linear_base",
                   "pca_ft", "pca_dim")


def add_finetune_args(parser) -> None:
    classifier.add_classifier_args(parser)
    g = parser.add_argument_group("fine-tuning sweep")
    g.add_argument("--pca_ft", action="store_true", help="classify PCA features fitted on train+validation cells")
    g.add_argument("--pca_dim", type=common.positive_int, default=500, help="PCA components for --pca_ft (default: %(default)s)")
    g.add_argument("--np_input", default=None, help="fine-tune on this numpy folder only")
    g.add_argument("--ann_input", default=None, help="fine-tune on this .h5ad only")
    g.add_argument("--save_result", default=str(common.RESULTS_DIR / "finetune.csv"),
                   help="CSV the rows are appended to (default: %(default)s)")
    g.add_argument("--jobs", type=common.positive_int, default=1, help="datasets fine-tuned in parallel processes (default: %(default)s)")
    g.add_argument("--threads", type=common.non_negative_int, default=0,
                   help="torch threads per job; 0 = cores / jobs (default: %(default)s)")


@dataclass
class Task:
    """One dataset x repeat of the sweep, with everything a worker process needs."""

    dataset: data.CellData
    seed: int
    repeat: int
    pretrained: dict | None  # {"state": encoder state, "lookup": the dataset's genes in its universe}


def finetune_datasets(args) -> list[data.CellData]:
    """The labelled datasets of the sweep, genes mapped, unlabelled cells dropped."""
    if args.np_input or args.ann_input:
        path = args.np_input or args.ann_input
        d = data.read_any(path, args.label_key, strict_label_key=True, **common.input_options(args))
        d = data.map_dataset_genes(d)
        if not d.is_labelled:
            raise data.DataError(f"{path}: has no labels to fine-tune on")
        datasets = common.with_two_classes([data.labelled_cells(d)])
        if not datasets:
            raise data.DataError(f"{path}: holds one cell type only; there is nothing to classify")
        return datasets
    return common.labelled_datasets(args)


def run_task(task: Task, args, device, run_id: str = results.NO_MODEL) -> list[dict]:
    """Both methods on one dataset x repeat; one result row each."""
    d = task.dataset
    codes, classes = data.encode_labels(d.labels)
    split = common.split_for(d, task.seed, args)
    features = data.features(d, args.normalize)
    pca = None
    if args.pca_ft:
        fit_rows = np.concatenate(split[:2])
        features, components, mean = data.pca_features(features, fit_rows, args.pca_dim, task.seed)
        pca = (components, mean)
    base = {"dataset": d.name, "species": d.species, "n_cells": d.n_cells, "n_genes": d.n_genes,
            "n_classes": len(classes), "n_train": len(split[0]), "n_val": len(split[1]), "n_test": len(split[2]),
            "seed": task.seed, "repeat": task.repeat, "pca_ft": bool(args.pca_ft), results.RUN_ID: run_id}
    # both methods start from the same linear base (--ft_linear_base), fitted once
    linear_base = (classifier.fit_linear_base(features, codes, split, len(classes))
                   if args.ft_linear_base != "none" else None)
    rows = []
    for method in METHODS:
        if method == "scPretrain" and task.pretrained is None:
            continue
        t0 = time.time()
        clf = classifier.build_classifier(len(classes), task.seed, args,
                                          task.pretrained if method == "scPretrain" else None, d.n_genes, pca)
        clf, epochs, _ = classifier.train_classifier(clf, features, codes, split, args, task.seed, device,
                                                     linear_base)
        scores = classifier.predict_proba(clf, features, split[2], device)
        result = metrics.classification_metrics(codes[split[2]], scores)
        rows.append({**base, "method": method, **result, "epochs": epochs, "seconds": round(time.time() - t0, 3)})
    return rows


def _worker(task: Task, args, threads: int, run_id: str) -> list[dict]:
    common.flush_denormals()
    torch.set_num_threads(threads)
    common.setup_logging(args.log_level)
    return run_task(task, args, common.resolve_device(args), run_id)


def summarise(frame: pd.DataFrame) -> str:
    """Mean of each metric per method, and the datasets where scPretrain beats the baseline."""
    names = list(metrics.METRIC_NAMES)
    table = frame.groupby("method")[names].mean()
    lines = ["mean over datasets and repeats:", table.to_string(float_format=lambda v: f"{v:.4f}")]
    if set(METHODS) <= set(frame["method"]):
        per = frame.groupby(["dataset", "method"])[names].mean().unstack("method")
        wins = {m: int((per[m]["scPretrain"] > per[m]["Without pretraining"]).sum()) for m in names}
        lines.append("scPretrain wins over 'Without pretraining' (of %d datasets): %s"
                     % (len(per), ", ".join(f"{m} {w}" for m, w in wins.items())))
    return "\n".join(lines)


def result_settings(args) -> dict:
    settings = results.settings_of(args, RESULT_SETTINGS)
    if not args.pca_ft:
        settings.pop("pca_dim")  # used only with --pca_ft
    return settings


def sweep_tasks(args, datasets, pretrained_ckpt, run_id: str, finished: set) -> list[Task]:
    """One task per dataset and repeat not yet in the results under this run identity."""
    seeds = common.repeat_seeds(args.seed, args.fold1, args.fold2)
    methods = METHODS if pretrained_ckpt is not None else METHODS[1:]
    tasks = []
    for d in datasets:
        pretrained = None
        if pretrained_ckpt is not None:  # the one gene lookup of this dataset; logs its coverage
            lookup = data.gene_lookup(d, pretrained_ckpt["gene_universe"], whose="the pretrained model's")
            pretrained = {"state": pretrained_ckpt["model"], "lookup": lookup}
        tasks += [Task(d, s, r, pretrained) for r, s in enumerate(seeds)
                  if not all((d.name, str(s), m, run_id) in finished for m in methods)]
    return tasks


def run_sweep(args, device) -> pd.DataFrame:
    datasets = finetune_datasets(args)
    ckpt = None
    if args.pretrained_model:
        _, _, ckpt = common.load_pretrained_or_explain(args.pretrained_model)
    else:
        log.warning("no --pretrained_model: running the 'Without pretraining' baseline only")
    out = Path(args.save_result)
    run_id, finished = results.start_run_with(out, args, result_settings(args), results.model_digest(ckpt),
                                              RESULT_COLUMNS, RESULT_KEY)
    tasks = sweep_tasks(args, datasets, ckpt, run_id, finished)
    skipped = len(datasets) * args.fold1 * args.fold2 - len(tasks)
    if skipped:
        log.info("%d dataset x repeat runs of run identity %s already in %s; not redone", skipped, run_id, out)
    for rows in common.progress(_run_tasks(tasks, args, device, run_id), total=len(tasks), desc="datasets"):
        results.append_results(out, rows, RESULT_COLUMNS)
        for r in rows:
            log.info("%s seed %s %s: accuracy %.4f kappa %.4f auprc %.4f auroc %.4f (%d epochs)", r["dataset"],
                     r["seed"], r["method"], r["accuracy"], r["kappa"], r["auprc"], r["auroc"], r["epochs"])
    frame = results.read_results(out, RESULT_COLUMNS)
    if not frame.empty:
        mine, _ = results.choose_identity(frame, run_id, out)
        log.info("results in %s (run identity %s)\n%s", out, run_id, summarise(mine))
    return frame


def _run_tasks(tasks, args, device, run_id: str):
    """Rows of each task, in task order; in ``--jobs`` worker processes when asked."""
    jobs = max(1, int(args.jobs))
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    if jobs == 1 or len(tasks) <= 1:
        torch.set_num_threads(threads)
        for task in tasks:
            yield run_task(task, args, device, run_id)
        return
    import multiprocessing

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_worker, task, args, threads, run_id) for task in tasks]
        for future in futures:
            yield future.result()
