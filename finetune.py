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
import data
import genes
import metrics
import results
import runtime
from checkpoints import Feeding, LoadedEncoder, check_feeding
from errors import DataError
from features import features as feature_matrix, pca_features
from settings import ClassifierSettings, ReadSettings, SplitSettings, SweepSettings, identity
from splits import encode_labels, repeat_seeds, split_of

log = logging.getLogger("scpretrain.finetune")

METHODS = ("scPretrain", "Without pretraining")
RESULT_COLUMNS = ["dataset", "seed", "method", results.RUN_ID, *metrics.METRIC_NAMES]  # what makes a file ours
DONE_KEY = ["dataset", results.DATA_ID, "seed", "method", results.RUN_ID]  # a row already done


@dataclass
class Task:
    """One dataset x repeat of the sweep, with everything a worker process needs."""

    dataset: data.CellData
    seed: int
    repeat: int
    data_id: str  # data.dataset_digest of the dataset
    pretrained: classifier.PretrainedStart | None  # the encoder's weights and the dataset's genes in its universe


def finetune_datasets(names, read: ReadSettings, single_input=None) -> list[data.CellData]:
    """The labelled datasets of the sweep (``names``, or the one file ``single_input`` of
    ``--np_input`` / ``--ann_input``), genes mapped, unlabelled cells dropped."""
    if single_input:
        d = data.read_any(single_input, read.label_key, strict_label_key=True, **read.reader_options())
        d = genes.map_dataset_genes(d)
        if not d.is_labelled:
            raise DataError(f"{single_input}: has no labels to fine-tune on")
        datasets = data.with_two_classes([data.labelled_cells(d)])
        if not datasets:
            raise DataError(f"{single_input}: holds one cell type only; there is nothing to classify")
        return datasets
    return data.labelled_datasets(names, read)


@dataclass(frozen=True)
class SweepRun:
    """What every task of one sweep shares: how classifiers are trained, the split sizes, PCA
    inputs, the run identity and the device."""

    clf: ClassifierSettings
    split: SplitSettings
    sweep: SweepSettings
    run_id: str = results.NO_MODEL
    device: str = "cpu"


def run_task(task: Task, run: SweepRun) -> list[dict]:
    """Both methods on one dataset x repeat; one result row each. A dataset too small for the
    split is skipped with one line (no row)."""
    d = task.dataset
    codes, classes = encode_labels(d.labels)
    try:
        split = split_of(d.n_cells, task.seed, run.split, what=d.name)
    except DataError as exc:
        log.warning("%s; skipped", exc)
        return []
    features = feature_matrix(d, run.clf.normalize)
    pca = None
    if run.sweep.pca_ft:
        fit_rows = np.concatenate(split[:2])
        features, components, mean = pca_features(features, fit_rows, run.sweep.pca_dim, task.seed)
        pca = (components, mean)
    base = {"dataset": d.name, results.DATA_ID: task.data_id, "species": d.species, "n_cells": d.n_cells,
            "n_genes": d.n_genes, "n_classes": len(classes), "n_train": len(split[0]), "n_val": len(split[1]),
            "n_test": len(split[2]), "seed": task.seed, "repeat": task.repeat, "pca_ft": bool(run.sweep.pca_ft),
            results.RUN_ID: run.run_id}
    # both methods start from the same linear base (--ft_linear_base), fitted once
    linear_base = (classifier.fit_linear_base(features, codes, split, len(classes), run.device)
                   if run.clf.ft_linear_base != "none" else None)
    rows = []
    for method in METHODS:
        if method == "scPretrain" and task.pretrained is None:
            continue
        t0 = time.time()
        clf = classifier.build_classifier(len(classes), d.n_genes, run.clf, task.seed,
                                          task.pretrained if method == "scPretrain" else None, pca)
        clf, epochs, _ = classifier.train_classifier(clf, features, codes, split, run.clf, task.seed, run.device,
                                                     linear_base)
        scores = classifier.predict_proba(clf, features, split[2], run.device)
        result = metrics.classification_metrics(codes[split[2]], scores)
        rows.append({**base, "method": method, **result, "epochs": epochs, "seconds": round(time.time() - t0, 3)})
    return rows


def _worker(task: Task, run: SweepRun, threads: int, log_level: str) -> list[dict]:
    runtime.flush_denormals()
    torch.set_num_threads(threads)
    runtime.setup_logging(log_level)
    return run_task(task, run)


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


def sweep_tasks(datasets, pretrained: LoadedEncoder | None, sweep: SweepSettings, run_id: str, finished: set,
                normalize: str, allow_mismatch: bool = False) -> list[Task]:
    """One task per dataset and repeat not yet in the results under this run identity and data."""
    seeds = repeat_seeds(sweep.seed, sweep.fold1, sweep.fold2)
    methods = METHODS if pretrained is not None else METHODS[1:]
    tasks = []
    for d in datasets:
        start = None
        if pretrained is not None:  # the one gene lookup of this dataset; logs its coverage
            check_feeding(pretrained.fed, Feeding(d.values, normalize), pretrained.path, allow_mismatch)
            lookup = genes.gene_lookup(d, pretrained.gene_universe, whose="the pretrained model's")
            start = classifier.PretrainedStart(pretrained.ckpt["model"], lookup)
        data_id = data.dataset_digest(d)
        tasks += [Task(d, s, r, data_id, start) for r, s in enumerate(seeds)
                  if not all((d.name, data_id, str(s), m, run_id) in finished for m in methods)]
    return tasks


def run_sweep(datasets: list[data.CellData], pretrained: LoadedEncoder | None, clf: ClassifierSettings,
              split: SplitSettings, sweep: SweepSettings, read: ReadSettings, out, device, config: dict,
              jobs: int = 1, threads: int = 0, log_level: str = "INFO", allow_mismatch: bool = False) -> pd.DataFrame:
    """Both methods on every dataset and repeat; rows appended to ``out`` after every dataset."""
    if pretrained is None:
        log.warning("no --pretrained_model: running the 'Without pretraining' baseline only")
    out = Path(out)
    settings = identity(read, split, clf, sweep)
    run_id, finished = results.start_run(out, settings, pretrained.digest if pretrained else results.NO_MODEL,
                                         config, RESULT_COLUMNS, DONE_KEY)
    tasks = sweep_tasks(datasets, pretrained, sweep, run_id, finished, clf.normalize, allow_mismatch)
    skipped = len(datasets) * sweep.fold1 * sweep.fold2 - len(tasks)
    if skipped:
        log.info("%d dataset x repeat runs of run identity %s already in %s; not redone", skipped, run_id, out)
    run = SweepRun(clf, split, sweep, run_id, str(device))
    for rows in runtime.progress(_run_tasks(tasks, run, jobs, threads, log_level), total=len(tasks), desc="datasets"):
        if not rows:
            continue
        results.append_results(out, rows, RESULT_COLUMNS)
        for r in rows:
            log.info("%s seed %s %s: accuracy %.4f kappa %.4f auprc %.4f auroc %.4f (%d epochs)", r["dataset"],
                     r["seed"], r["method"], r["accuracy"], r["kappa"], r["auprc"], r["auroc"], r["epochs"])
    frame = results.read_results(out, RESULT_COLUMNS)
    if not frame.empty and run_id in set(frame[results.RUN_ID].astype(str)):
        mine, _ = results.choose_identity(frame, run_id, out)
        log.info("results in %s (run identity %s)\n%s", out, run_id, summarise(mine))
    return frame


def _run_tasks(tasks, run: SweepRun, jobs: int, threads: int, log_level: str):
    """Rows of each task, in task order; in ``jobs`` worker processes when asked."""
    jobs = max(1, int(jobs))
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    if jobs == 1 or len(tasks) <= 1:
        torch.set_num_threads(threads)
        for task in tasks:
            yield run_task(task, run)
        return
    import multiprocessing

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_worker, task, run, threads, log_level) for task in tasks]
        for future in futures:
            yield future.result()
