"""The fine-tuning sweep: pretrained vs randomly initialised classifiers on every labelled dataset.

For each dataset and repeat, one seeded split serves both methods; the classifiers start from
the same random init, scPretrain's encoder then takes the pretrained column of every gene the
gene universe holds. Early stopping on validation accuracy; the best model is scored on the
test cells. Rows go to a CSV written atomically after every dataset, so an interrupted sweep
resumes where it stopped. Importing does nothing.
"""
from __future__ import annotations

import copy
import logging
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from tqdm.auto import tqdm

import common
import data
import kmeans
import metrics
from model import Classifier, init_encoder_from_pretrained, make_adam

log = logging.getLogger("scpretrain.finetune")

METHODS = ("scPretrain", "Without pretraining")
RESULT_KEY = ["dataset", "seed", "method"]


def add_finetune_args(parser) -> None:
    g = parser.add_argument_group("fine-tuning sweep")
    g.add_argument("--ft_lr", type=float, default=0.002, help="Adam learning rate (default: %(default)s)")
    g.add_argument("--ft_batch_size", type=int, default=5000, help="mini-batch size (default: %(default)s)")
    g.add_argument("--ft_epoch", type=int, default=500, help="at most this many epochs (default: %(default)s)")
    g.add_argument("--patience", type=int, default=30, help="stop after this many epochs without a better "
                                                            "validation accuracy (default: %(default)s)")
    g.add_argument("--pca_ft", action="store_true", help="classify PCA features fitted on train+validation cells")
    g.add_argument("--pca_dim", type=int, default=500, help="PCA components for --pca_ft (default: %(default)s)")
    g.add_argument("--np_input", default=None, help="fine-tune on this numpy folder only")
    g.add_argument("--ann_input", default=None, help="fine-tune on this .h5ad only")
    g.add_argument("--save_result", default=str(common.RESULTS_DIR / "finetune.csv"),
                   help="CSV the rows are appended to (default: %(default)s)")
    g.add_argument("--jobs", type=int, default=1, help="datasets fine-tuned in parallel processes (default: %(default)s)")
    g.add_argument("--threads", type=int, default=0,
                   help="torch threads per job; 0 = cores / jobs (default: %(default)s)")


@dataclass
class Task:
    """One dataset x repeat of the sweep, with everything a worker process needs."""

    dataset: data.CellData
    seed: int
    repeat: int
    pretrained: dict | None  # {"state": encoder state, "universe": genes}


def finetune_datasets(args) -> list[data.CellData]:
    """The labelled datasets of the sweep, genes mapped, unlabelled cells dropped."""
    if args.np_input or args.ann_input:
        path = args.np_input or args.ann_input
        d = data.read_any(path, args.label_key)
        d = data.map_dataset_genes(d)
        if not d.is_labelled:
            raise data.DataError(f"{path}: has no labels to fine-tune on")
        return [data.labelled_cells(d)]
    return common.labelled_datasets(args)


def pca_features(X_log: sp.csr_matrix, fit_rows: np.ndarray, n_components: int, seed: int):
    """PCA fitted on ``fit_rows`` only; returns (features of all cells, components, mean)."""
    from sklearn.decomposition import PCA

    fit = X_log[fit_rows].toarray()
    n_components = int(min(n_components, fit.shape[0] - 1, fit.shape[1]))
    pca = PCA(n_components=n_components, random_state=seed).fit(fit)
    transformed = np.vstack([pca.transform(X_log[rows].toarray()) for rows in data.iter_batches(X_log.shape[0], 4096)])
    return transformed.astype(np.float32), pca.components_.astype(np.float32), pca.mean_.astype(np.float32)


def build_classifier(n_classes: int, seed: int, args, pretrained: dict | None, genes,
                     pca=None) -> Classifier:
    """Same random init for both methods; scPretrain then copies pretrained columns by gene name."""
    torch.manual_seed(seed)
    clf = Classifier(len(genes), n_classes, args.hid)
    if pretrained is not None:
        init_encoder_from_pretrained(clf.encoder, pretrained["state"], pretrained["universe"], genes)
    if pca is not None:  # the gene-space encoder on PCA inputs: W x + b = (W C^T) x_pca + (W mean + b)
        components, mean = (torch.from_numpy(a) for a in pca)
        with torch.no_grad():
            weight, bias = clf.encoder.linear.weight.clone(), clf.encoder.linear.bias.clone()
            clf.encoder.linear = torch.nn.Linear(components.shape[0], args.hid)
            clf.encoder.linear.weight.copy_(weight @ components.T)
            clf.encoder.linear.bias.copy_(bias + weight @ mean)
    return clf


def _rows(features, rows) -> torch.Tensor:
    if sp.issparse(features):
        return torch.from_numpy(data.densify_log1p(features, rows, log=False))
    return torch.from_numpy(features[rows])


@torch.no_grad()
def predict_proba(clf: Classifier, features, rows: np.ndarray, device, batch_size: int = 4096) -> np.ndarray:
    clf.eval()
    out = [torch.softmax(clf(_rows(features, r).to(device)), 1).cpu().numpy()
           for r in np.array_split(rows, max(1, int(np.ceil(len(rows) / batch_size))))]
    return np.concatenate(out)


def train_classifier(clf: Classifier, features, codes, split, args, seed: int, device) -> tuple[Classifier, int]:
    """Adam with early stopping on validation accuracy; returns the best model and epochs run."""
    train_idx, val_idx, _ = split
    clf = clf.to(device)
    optimizer = make_adam(clf.parameters(), args.ft_lr)
    x_train, y_train = _rows(features, train_idx).to(device), torch.as_tensor(codes[train_idx]).to(device)
    x_val, y_val = _rows(features, val_idx).to(device), torch.as_tensor(codes[val_idx]).to(device)
    rng = np.random.default_rng(seed)
    best_acc, best_state, wait, epoch = -1.0, None, 0, 0
    for epoch in range(1, args.ft_epoch + 1):
        clf.train()
        for batch in data.iter_batches(len(train_idx), args.ft_batch_size, rng):
            batch = torch.as_tensor(batch, device=device)
            loss = torch.nn.functional.cross_entropy(clf(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        clf.eval()
        with torch.no_grad():
            acc = float((clf(x_val).argmax(1) == y_val).float().mean())
        if acc > best_acc:
            best_acc, best_state, wait = acc, copy.deepcopy(clf.state_dict()), 0
        else:
            wait += 1
            if wait >= args.patience:
                break
    clf.load_state_dict(best_state)
    return clf, epoch


def run_task(task: Task, args, device) -> list[dict]:
    """Both methods on one dataset x repeat; one result row each."""
    d = task.dataset
    codes, classes = data.encode_labels(d.labels)
    split = common.split_for(d, task.seed, args)
    features = kmeans.log1p_csr(d.X)
    pca = None
    if args.pca_ft:
        fit_rows = np.concatenate(split[:2])
        features, components, mean = pca_features(features, fit_rows, args.pca_dim, task.seed)
        pca = (components, mean)
    base = {"dataset": d.name, "species": d.species, "n_cells": d.n_cells, "n_genes": d.n_genes,
            "n_classes": len(classes), "n_train": len(split[0]), "n_val": len(split[1]), "n_test": len(split[2]),
            "seed": task.seed, "repeat": task.repeat, "pca_ft": bool(args.pca_ft)}
    rows = []
    for method in METHODS:
        if method == "scPretrain" and task.pretrained is None:
            continue
        t0 = time.time()
        clf = build_classifier(len(classes), task.seed, args,
                               task.pretrained if method == "scPretrain" else None, d.genes, pca)
        clf, epochs = train_classifier(clf, features, codes, split, args, task.seed, device)
        scores = predict_proba(clf, features, split[2], device)
        result = metrics.classification_metrics(codes[split[2]], scores)
        rows.append({**base, "method": method, **result, "epochs": epochs, "seconds": round(time.time() - t0, 3)})
    return rows


def _worker(task: Task, args, threads: int) -> list[dict]:
    common.flush_denormals()
    torch.set_num_threads(threads)
    common.setup_logging(args.log_level)
    return run_task(task, args, common.resolve_device(args))


def check_coverage(d: data.CellData, universe) -> int:
    covered = int(pd.Index(universe).get_indexer(pd.Index(d.genes)).__ge__(0).sum())
    log.info("%s: the pretrained gene universe covers %d of its %d genes (%.1f%%)", d.name, covered, d.n_genes,
             100.0 * covered / d.n_genes)
    if covered == 0:
        raise data.DataError(f"{d.source or d.name}: none of its genes is in the pretrained model's gene universe; "
                             "fine-tuning would start from a random encoder. Check the species and gene symbols.")
    return covered


def read_results(path: Path) -> pd.DataFrame:
    if not path.exists():
        return pd.DataFrame()
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise data.DataError(f"{path}: existing results cannot be read ({exc}); move it away") from None


def append_results(path: Path, rows: list[dict]) -> pd.DataFrame:
    """Existing rows plus ``rows``, rewritten atomically."""
    frame = pd.concat([read_results(path), pd.DataFrame(rows)], ignore_index=True)
    data.atomic_write(path, lambda fh: frame.to_csv(fh, index=False))
    return frame


def done_keys(frame: pd.DataFrame) -> set:
    if frame.empty or not set(RESULT_KEY) <= set(frame.columns):
        return set()
    return set(map(tuple, frame[RESULT_KEY].astype(str).values))


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


def run_sweep(args, device) -> pd.DataFrame:
    datasets = finetune_datasets(args)
    pretrained = None
    if args.pretrained_model:
        encoder, universe, _ = common.load_pretrained_or_explain(args.pretrained_model)
        pretrained = {"state": encoder.state_dict(), "universe": universe}
        for d in datasets:
            check_coverage(d, universe)
    else:
        log.warning("no --pretrained_model: running the 'Without pretraining' baseline only")
    out = Path(args.save_result)
    finished = done_keys(read_results(out))
    seeds = common.repeat_seeds(args.seed, args.fold1, args.fold2)
    tasks = [Task(d, s, r, pretrained) for d in datasets for r, s in enumerate(seeds)
             if not all((d.name, str(s), m) in finished for m in METHODS[pretrained is None:])]
    skipped = len(datasets) * len(seeds) - len(tasks)
    if skipped:
        log.info("%d dataset x repeat runs already in %s; not redone", skipped, out)
    common.write_args_json(args, out)
    for rows in tqdm(_run_tasks(tasks, args, device), total=len(tasks), desc="datasets"):
        append_results(out, rows)
        for r in rows:
            log.info("%s seed %s %s: accuracy %.4f kappa %.4f auprc %.4f auroc %.4f (%d epochs)", r["dataset"],
                     r["seed"], r["method"], r["accuracy"], r["kappa"], r["auprc"], r["auroc"], r["epochs"])
    frame = read_results(out)
    if not frame.empty:
        log.info("results in %s\n%s", out, summarise(frame))
    return frame


def _run_tasks(tasks, args, device):
    """Rows of each task, in task order; in ``--jobs`` worker processes when asked."""
    jobs = max(1, int(args.jobs))
    threads = args.threads or max(1, (os.cpu_count() or 1) // jobs)
    if jobs == 1 or len(tasks) <= 1:
        torch.set_num_threads(threads)
        for task in tasks:
            yield run_task(task, args, device)
        return
    import multiprocessing

    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_worker, task, args, threads) for task in tasks]
        for future in futures:
            yield future.result()
