"""Annotate new datasets: train an scPretrain classifier on a labelled reference, label any query.

    python annotate.py train --reference REF.h5ad --label_key cell_type \\
        --pretrained_model models/pretrained.pt --save_model models/ref_classifier.pt
    python annotate.py predict --model models/ref_classifier.pt --query QUERY.h5ad \\
        --out results/QUERY_annotated.h5ad --majority_voting
    python annotate.py embed --pretrained_model models/pretrained.pt --query QUERY.h5ad --out results/QUERY_embedded.h5ad

``train`` fine-tunes the classifier exactly as the sweep of ``main.py --kmeans`` does (same
network, loss, optimiser, early stopping on validation accuracy), on every labelled reference
cell but a seeded validation set, and saves a self-describing classifier checkpoint.
``predict`` writes the query back with CellTypist's column names: ``obs['predicted_labels']``
(the best label, or ``Unassigned`` below ``--p_thres``), ``obs['conf_score']``, with
``--majority_voting`` also ``obs['over_clustering']`` and ``obs['majority_voting']``;
``obsm['X_scpretrain']`` (the representation) and ``uns['scpretrain']``; the query's own data are
left as they were. The query is read in chunks of cells and never densified. Importing does nothing.
"""
from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import checkpoints
import classifier
import cli
import data
import files
import genes
import kmeans
import metrics
import runtime
from checkpoints import Feeding
from errors import DataError
from features import features as feature_matrix
from h5ad import plain_string_frame
from model import Classifier, Encoder, encoder_on_genes, linear_on_genes
from sparse import inference_input, row_block
from splits import encode_labels, validation_split

log = logging.getLogger("scpretrain.annotate")

UNASSIGNED = "Unassigned"
HETEROGENEOUS = "Heterogeneous"
EMBEDDING_KEY = "X_scpretrain"
LOW_COVERAGE = 0.5  # below this share of the model's genes, predictions are warned about


# --------------------------------------------------------------------------- command line


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{train,predict,embed}")
    train = commands.add_parser("train", help="fine-tune a classifier on a labelled reference and save it",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--reference", required=True, help="labelled reference (.h5ad, Cell BLAST .h5 or numpy folder)")
    train.add_argument("--label_key", default=data.DEFAULT_LABEL_KEY, help="obs column with the reference's cell types")
    train.add_argument("--pretrained_model", default=None,
                       help="scPretrain encoder checkpoint to start from (without it: random init, as the "
                            "sweep's 'Without pretraining')")
    train.add_argument("--save_model", required=True, help="where the classifier checkpoint is written")
    train.add_argument("--hid", type=cli.positive_int, default=200,
                       help="encoder width without --pretrained_model (with one, the encoder's own)")
    train.add_argument("--per_val", type=cli.fraction, default=0.1,
                       help="validation share of the reference (at most 1000 cells), for early stopping")
    cli.add_classifier_args(train)
    cli.add_recipe_args(train)
    cli.add_feeding_arg(train)
    predict = commands.add_parser("predict", help="label a query with a trained classifier",
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    predict.add_argument("--model", required=True, help="classifier checkpoint written by `annotate.py train`")
    add_query_args(predict)
    cli.add_feeding_arg(predict)
    predict.add_argument("--p_thres", type=cli.fraction, default=0.5,
                         help="a cell whose best class probability is below this is 'Unassigned'")
    predict.add_argument("--majority_voting", action="store_true",
                         help="over-cluster the query on its representation and give each cluster its majority label")
    predict.add_argument("--over_clustering", default=None,
                         help="obs column holding an over-clustering to vote in (default: K-means on the representation)")
    predict.add_argument("--n_clusters", type=cli.positive_int, default=None,
                         help="K-means clusters for the over-clustering (default: cells/100, between 2 and 500)")
    predict.add_argument("--min_prop", type=float, default=0.0,
                         help="a cluster whose majority label has a smaller share is 'Heterogeneous'")
    predict.add_argument("--probabilities", action="store_true",
                         help="also write the cells x classes probability matrix (OUT.probabilities.csv and "
                              "obsm['scpretrain_probabilities'])")
    predict.add_argument("--query_label_key", default=None,
                         help="obs column with the query's own labels: writes a contingency table and figure")
    predict.add_argument("--label_map", default=None,
                         help="CSV of model label -> query label (two columns; empty: no counterpart): "
                              "accuracy, macro-F1 and kappa on the mapped cells")
    predict.add_argument("--group_key", default=None, help="obs column (e.g. study): scores per group too")
    embed = commands.add_parser("embed", help="write only the pretrained representation of a query",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    embed.add_argument("--pretrained_model", required=True, help="scPretrain encoder checkpoint")
    add_query_args(embed)
    cli.add_feeding_arg(embed)
    for sub in (train, predict, embed):
        add_run_args(sub)
    args = parser.parse_args(argv)
    if args.command == "train":
        cli.resolve_recipe(args)
    if args.command == "predict" and not 0 <= args.min_prop <= 1:
        parser.error(f"--min_prop must lie in [0, 1], got {args.min_prop}")
    if args.command == "predict" and args.label_map and not args.query_label_key:
        parser.error("--label_map scores predictions against the query's labels: give --query_label_key too")
    return args


def add_query_args(parser) -> None:
    parser.add_argument("--query", required=True, help="dataset to annotate (.h5ad, Cell BLAST .h5 or numpy folder)")
    parser.add_argument("--out", default=None, help="annotated .h5ad (default: results/<query>_annotated.h5ad)")
    parser.add_argument("--chunk_cells", type=cli.positive_int, default=8192,
                        help="cells per chunk: the query is processed this many cells at a time")


def add_run_args(parser) -> None:
    cli.add_seed_arg(parser, "seeds the split, init and K-means")
    cli.add_device_args(parser)
    cli.add_input_args(parser)
    cli.add_log_level_arg(parser)


# --------------------------------------------------------------------------- reading


def read_dataset(path, args, label_key: str | None) -> data.CellData:
    """A reference or query as the data layer reads it (h5ad values and gene-symbol rules
    included), genes mapped to human symbols."""
    read = cli.read_settings(args)
    d = data.read_any(path, label_key=label_key, strict_label_key=label_key is not None, **read.reader_options())
    return genes.map_dataset_genes(d)


def read_reference(args) -> data.CellData:
    d = read_dataset(args.reference, args, args.label_key)
    if not d.is_labelled:
        raise DataError(f"{args.reference}: no labels in '{args.label_key}'; pass --label_key COLUMN")
    (d,) = data.with_two_classes([data.labelled_cells(d)]) or [None]
    if d is None:
        raise DataError(f"{args.reference}: one cell type only; a classifier needs two or more")
    return d


# --------------------------------------------------------------------------- train


def run_train(args) -> dict:
    save_path = files.check_output_file(args.save_model, "--save_model")
    files.refuse_clashes({"--save_model": save_path},
                         {"--reference": args.reference, "--pretrained_model": args.pretrained_model})
    device = runtime.resolve_device(cli.device_wanted(args))
    reference = read_reference(args)
    pretrained, digest, hid = None, checkpoints.NO_MODEL, args.hid
    fed = Feeding(reference.values, args.normalize)
    if args.pretrained_model:
        loaded = checkpoints.load_encoder(args.pretrained_model, cli.PRETRAIN_HINT)
        hid, digest = int(loaded.ckpt["model_args"]["hid"]), loaded.digest
        checkpoints.check_feeding(loaded.fed, fed, args.pretrained_model, args.allow_feature_mismatch)
        lookup = genes.gene_lookup(reference, loaded.gene_universe, whose="the pretrained model's")
        pretrained = classifier.PretrainedStart(loaded.ckpt["model"], lookup)
    else:
        log.warning("no --pretrained_model: the classifier starts from random init ('Without pretraining')")
    codes, classes = encode_labels(reference.labels)
    train_idx, val_idx = validation_split(reference.n_cells, args.seed, args.per_val, what=reference.name)
    log.info("%s: %d cells, %d types; %d train, %d validate", reference.name, reference.n_cells, len(classes),
             len(train_idx), len(val_idx))
    settings = cli.classifier_settings(args, hid=hid)
    t0 = time.time()
    clf = classifier.build_classifier(len(classes), reference.n_genes, settings, args.seed, pretrained)
    clf, epochs, val_accuracy = classifier.train_classifier(clf, feature_matrix(reference, args.normalize), codes,
                                                            (train_idx, val_idx, None), settings, args.seed, device)
    log.info("trained in %.1fs, %d epochs; validation accuracy %.4f", time.time() - t0, epochs, val_accuracy)
    info = {"reference": {"name": reference.name, "path": str(args.reference), "n_cells": reference.n_cells,
                          "n_genes": reference.n_genes, "species": reference.species,
                          "class_counts": {str(c): int(n) for c, n in zip(classes, np.bincount(codes))}},
            "validation_accuracy": float(val_accuracy), "epochs": int(epochs), "n_train": len(train_idx),
            "n_val": len(val_idx), "pretrained_model": args.pretrained_model, "pretrained_digest": digest,
            "config": cli.args_dict(args)}
    ckpt = checkpoints.classifier_checkpoint(clf.cpu(), reference.genes, classes, fed=fed, label_key=args.label_key,
                                             info=info)
    checkpoints.save(ckpt, save_path)
    log.info("classifier saved to %s (%d classes, %d genes)", save_path, len(classes), reference.n_genes)
    return ckpt


# --------------------------------------------------------------------------- predict


def query_lookup(query: data.CellData, model_genes, path) -> data.GeneLookup:
    """The query's genes on the model's, with a warning when the model sees under half its genes."""
    lookup = genes.gene_lookup(query, model_genes, whose="the model's")
    if lookup.n_found < LOW_COVERAGE * lookup.n_universe:
        log.warning("%s: the query has only %d of the model's %d genes (%.0f%%); predictions rest on the rest "
                    "being zero: check the species, --gene_symbols and the reference", path, lookup.n_found,
                    lookup.n_universe, 100.0 * lookup.n_found / lookup.n_universe)
    return lookup


@torch.no_grad()
def run_chunks(query: data.CellData, lookup: genes.GeneLookup, model: Encoder | Classifier, device, chunk_cells: int,
               normalize: str = "none"):
    """Representations of every query cell (``model``: an encoder), and class probabilities too
    (``model``: a classifier, its linear base included), a chunk of cells at a time. The encoder
    and the base are re-expressed on the query's own genes (``encoder_on_genes``,
    ``linear_on_genes``), so each chunk is used as it is stored: only its values are transformed,
    only its non-zeros are multiplied, and the query is never densified or reordered."""
    clf = model if isinstance(model, Classifier) else None
    on_query = encoder_on_genes(clf.encoder if clf is not None else model, lookup).to(device)
    base = clf.base if clf is not None else None
    base_on_query = linear_on_genes(base, lookup).to(device) if base is not None else None
    reps, probs = [], []
    starts = range(0, query.n_cells, chunk_cells)
    for start in runtime.progress(starts, desc="cells", unit="chunk"):
        block = row_block(query.X, start, min(start + chunk_cells, query.n_cells))
        x = inference_input(feature_matrix(replace(query, X=block), normalize), device)
        z = on_query(x)
        reps.append(z.cpu().numpy())
        if clf is not None:
            logits = clf.combine(clf.classify(z), base_on_query(x) if base_on_query is not None else None)
            probs.append(torch.softmax(logits, 1).cpu().numpy())
    return np.concatenate(reps), (np.concatenate(probs) if clf is not None else None)


def assign_labels(probs: np.ndarray, classes, p_thres: float) -> tuple[np.ndarray, np.ndarray]:
    """Best label and its probability per cell; ``Unassigned`` below ``p_thres``."""
    best = probs.argmax(1)
    conf = probs[np.arange(len(best)), best]
    labels = np.asarray(classes, dtype=object)[best]
    labels[conf < p_thres] = UNASSIGNED
    return labels, conf


def default_n_clusters(n_cells: int) -> int:
    """Over-clusters for majority voting: about 100 cells each, between 2 and 500 (and at most n)."""
    return int(min(max(2, n_cells // 100), 500, n_cells))


def over_cluster(representation: np.ndarray, n_clusters: int | None, seed: int, device) -> np.ndarray:
    k = n_clusters or default_n_clusters(len(representation))
    result = kmeans.kmeans(representation, min(k, len(representation)), n_iter=20, seed=seed, device=device)
    log.info("over-clustering: K-means on the representation, k=%d", k)
    return result.labels


def majority_vote(predicted: np.ndarray, clusters: np.ndarray, min_prop: float = 0.0) -> np.ndarray:
    """Each cluster's most frequent predicted label (ties: the first in sorted order); a cluster
    whose majority share is below ``min_prop`` is 'Heterogeneous'."""
    table = pd.crosstab(pd.Series(clusters, name="cluster"), pd.Series(predicted, name="label"))
    winner = table.idxmax(axis=1)
    share = table.max(axis=1) / table.sum(axis=1)
    winner[share < min_prop] = HETEROGENEOUS
    return winner.loc[clusters].to_numpy(dtype=object)


def run_predict(args) -> pd.DataFrame:
    out = output_path(args, "annotated")
    files.refuse_clashes(predict_outputs(args, out), {"--model": args.model, "--query": args.query,
                                                      "--label_map": args.label_map})
    device = runtime.resolve_device(cli.device_wanted(args))
    clf, ckpt = checkpoints.load_classifier(args.model)
    query = read_dataset(args.query, args, args.query_label_key)
    check_values(query, ckpt, args.model, args.allow_feature_mismatch)
    lookup = query_lookup(query, ckpt["gene_universe"], args.query)
    t0 = time.time()
    clf = clf.to(device)
    representation, probs = run_chunks(query, lookup, clf, device, args.chunk_cells, checkpoints.feeding(ckpt).normalize)
    log.info("%d cells predicted in %.1fs (%.0f cells/s)", query.n_cells, time.time() - t0,
             query.n_cells / max(time.time() - t0, 1e-9))
    predicted, conf = assign_labels(probs, ckpt["classes"], args.p_thres)
    table = pd.DataFrame({"cell": query.cells, "predicted_labels": predicted, "conf_score": conf})
    # the query's own obs is read only when a column of it is used
    obs = load_obs(args.query, query) if args.over_clustering or args.query_label_key else None
    if args.majority_voting:
        clusters = (obs_column(obs, args.over_clustering, args.query).astype(str).to_numpy()
                    if args.over_clustering else over_cluster(representation, args.n_clusters, args.seed, device))
        table["over_clustering"] = pd.Series(clusters).astype(str).to_numpy()
        table["majority_voting"] = majority_vote(predicted, table["over_clustering"].to_numpy(), args.min_prop)
    log.info("labels: %s; Unassigned %.1f%%", summary_counts(table["predicted_labels"]),
             100.0 * float(np.mean(predicted == UNASSIGNED)))
    uns = {"model": str(args.model), "model_digest": checkpoints.model_digest(ckpt),
           "reference": ckpt["reference"]["name"], "normalize": checkpoints.feeding(ckpt).normalize,
           "n_model_genes": lookup.n_universe, "n_model_genes_found": lookup.n_found,
           "gene_coverage": lookup.n_found / lookup.n_universe, "p_thres": args.p_thres,
           "classes": list(ckpt["classes"]), "majority_voting": bool(args.majority_voting)}
    extra_obsm = {"scpretrain_probabilities": probs.astype(np.float32)} if args.probabilities else {}
    write_outputs(args, out, query, table, representation, uns, extra_obsm)
    if args.probabilities:
        frame = pd.DataFrame(probs, columns=ckpt["classes"]).assign(cell=query.cells).set_index("cell")
        files.atomic_write(with_extension(out.with_suffix(""), ".probabilities.csv"), lambda fh: frame.to_csv(fh))
    if args.query_label_key:
        evaluate_against_labels(args, out, table, obs)
    return table


def check_values(query: data.CellData, ckpt: dict, model_path, allow: bool = False) -> None:
    """The query must be fed what the model was: refused otherwise, unless ``allow``."""
    fed = checkpoints.feeding(ckpt)
    checkpoints.check_feeding(fed, Feeding(query.values, fed.normalize), model_path, allow)


def summary_counts(labels: pd.Series, top: int = 8) -> str:
    counts = labels.value_counts()
    text = ", ".join(f"{k} {v}" for k, v in counts.head(top).items())
    return text + (f", ... ({len(counts) - top} more)" if len(counts) > top else "")


# --------------------------------------------------------------------------- writing


def output_path(args, suffix: str) -> Path:
    out = Path(args.out) if args.out else cli.RESULTS_DIR / f"{Path(args.query).stem}_{suffix}.h5ad"
    if out.suffix.lower() != ".h5ad":
        raise DataError(f"--out {out}: must end in .h5ad")
    return files.check_output_file(out, "--out")


def predict_outputs(args, out: Path) -> dict:
    """Every file predict may write, by what it is: checked against its inputs before any work."""
    stem = out.with_suffix("")
    found = {"--out": out, "--out (its CSV)": with_extension(stem, ".csv")}
    if args.probabilities:
        found["--out (probabilities)"] = with_extension(stem, ".probabilities.csv")
    if args.query_label_key:
        found["--out (contingency tables, figures)"] = [
            with_extension(out.with_name(f"{stem.name}.contingency_{column}"), ext)
            for column in ("predicted_labels", "majority_voting") for ext in (".csv", ".png", ".pdf")]
        found["--out (scores)"] = with_extension(stem, ".scores.csv")
    return found


def load_obs(path, query: data.CellData) -> pd.DataFrame:
    """The query's own obs table (h5ad), or one built from what the data layer read."""
    path = Path(path)
    if path.suffix == ".h5ad":
        import anndata

        backed = anndata.read_h5ad(path, backed="r")
        obs = backed.obs.copy()
        backed.file.close()
        if len(obs) != query.n_cells:
            raise DataError(f"{path}: obs has {len(obs)} rows for {query.n_cells} cells")
        return obs
    obs = pd.DataFrame(index=pd.Index(query.cells.astype(str), name="cell"))
    if query.labels is not None:
        obs[data.DEFAULT_LABEL_KEY] = query.labels
    return obs


def obs_column(obs: pd.DataFrame, key: str, path) -> pd.Series:
    if key not in obs.columns:
        raise DataError(f"{path}: no obs column '{key}'; available columns: {list(obs.columns)}")
    return obs[key]


def write_outputs(args, out: Path, query: data.CellData, table: pd.DataFrame, representation: np.ndarray,
                  uns: dict, extra_obsm: dict | None = None) -> None:
    """The query as an h5ad with the new obs columns, obsm and uns (its own X, var, layers and obs
    untouched; text held as plain strings, which every anndata reads), and the per-cell columns as
    CSV beside it."""
    import anndata

    adata = query_anndata(args.query, query)
    for column in table.columns.drop("cell"):
        if column in adata.obs.columns:
            log.warning("obs['%s'] of the query is replaced by the prediction", column)
        values = table[column].to_numpy()
        adata.obs[column] = pd.Categorical(values) if values.dtype == object else values
    adata.obsm[EMBEDDING_KEY] = representation.astype(np.float32)
    for key, value in (extra_obsm or {}).items():
        adata.obsm[key] = value
    adata.uns["scpretrain"] = uns
    adata.obs, adata.var = plain_string_frame(adata.obs), plain_string_frame(adata.var)
    if adata.raw is not None:
        adata.raw = anndata.AnnData(X=adata.raw.X, var=plain_string_frame(adata.raw.var),
                                    varm=dict(adata.raw.varm), obs=adata.obs[[]])
    files.atomic_write_path(out, adata.write_h5ad)
    csv_path = with_extension(out.with_suffix(""), ".csv")
    files.atomic_write(csv_path, lambda fh: table.to_csv(fh, index=False))
    log.info("wrote %s and %s", out, csv_path)


def query_anndata(path, query: data.CellData):
    """The query's own AnnData, read again in full for writing back (the data layer's copy has
    been used and may be freed); a Cell BLAST or numpy query becomes one as it was read."""
    import anndata

    path = Path(path)
    if path.suffix == ".h5ad":
        return anndata.read_h5ad(path)
    obs = pd.DataFrame(index=pd.Index(query.cells.astype(str)))
    if query.labels is not None:
        obs[data.DEFAULT_LABEL_KEY] = query.labels
    return anndata.AnnData(X=query.X, obs=obs, var=pd.DataFrame(index=pd.Index(query.genes.astype(str))))


# --------------------------------------------------------------------------- scoring against the query's labels


def with_extension(stem: Path, extension: str) -> Path:
    """``stem`` + ``extension`` (``Path.with_suffix`` would replace a dotted part of the stem)."""
    return stem.with_name(stem.name + extension)


def read_label_map(path) -> dict:
    """Model label -> query label from a two-column CSV; empty targets have no counterpart."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot be read as a two-column CSV ({exc})") from None
    if frame.shape[1] != 2:
        raise DataError(f"{path}: needs two columns (model label, query label), found {list(frame.columns)}")
    source, target = frame.columns
    return {s.strip(): t.strip() for s, t in zip(frame[source], frame[target]) if t.strip()}


def mapped_scores(predicted: np.ndarray, given: np.ndarray, label_map: dict) -> dict:
    """Accuracy, macro-F1 and kappa on the cells whose given label some model label maps to;
    a prediction that maps to nothing (or Unassigned) counts as wrong."""
    from sklearn.metrics import f1_score

    targets = set(label_map.values())
    scored = np.isin(given, list(targets))
    mapped = np.array([label_map.get(p, f"(no counterpart: {p})") for p in predicted[scored]], dtype=object)
    truth = given[scored].astype(object)
    if not len(truth):
        return {"n_scored": 0, "accuracy": float("nan"), "macro_f1": float("nan"), "kappa": float("nan")}
    return {"n_scored": int(scored.sum()), "accuracy": metrics.accuracy(truth, mapped),
            "macro_f1": float(f1_score(truth, mapped, labels=sorted(set(truth)), average="macro", zero_division=0)),
            "kappa": metrics.cohen_kappa(truth.astype(str), mapped.astype(str))}


def evaluate_against_labels(args, out: Path, table: pd.DataFrame, obs: pd.DataFrame) -> None:
    given = obs_column(obs, args.query_label_key, args.query).astype(str).to_numpy()
    columns = ["predicted_labels"] + (["majority_voting"] if "majority_voting" in table else [])
    for column in columns:
        contingency = pd.crosstab(pd.Series(given, name=args.query_label_key),
                                  pd.Series(table[column].to_numpy(), name=column))
        stem = out.with_name(f"{out.stem}.contingency_{column}")
        files.atomic_write(with_extension(stem, ".csv"), lambda fh: contingency.to_csv(fh))
        draw_contingency(contingency, stem, f"{Path(args.query).stem}: {args.query_label_key} vs {column}")
        log.info("contingency of %s vs %s in %s.csv/.png/.pdf", args.query_label_key, column, stem)
    if not args.label_map:
        return
    label_map = read_label_map(args.label_map)
    rows = []
    groups = [("all", np.ones(len(given), bool))]
    if args.group_key:
        group = obs_column(obs, args.group_key, args.query).astype(str).to_numpy()
        groups += [(g, group == g) for g in sorted(set(group))]
    for column in columns:
        for name, mask in groups:
            scores = mapped_scores(table[column].to_numpy()[mask], given[mask], label_map)
            rows.append({"labels": column, "group": name, **scores})
            log.info("%s (%s): accuracy %.4f macro-F1 %.4f kappa %.4f on %d mapped cells", column, name,
                     scores["accuracy"], scores["macro_f1"], scores["kappa"], scores["n_scored"])
    frame = pd.DataFrame(rows)
    files.atomic_write(out.with_name(f"{out.stem}.scores.csv"), lambda fh: frame.to_csv(fh, index=False))


def draw_contingency(contingency: pd.DataFrame, stem: Path, title: str) -> list[Path]:
    """Row-normalised heatmap: each given label's cells spread over the predicted labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shares = contingency.div(contingency.sum(axis=1), axis=0)
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * shares.shape[1], 1.5 + 0.4 * shares.shape[0]))
    image = ax.imshow(shares.to_numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(shares.shape[1]), [str(c) for c in shares.columns], rotation=60, ha="right")
    ax.set_yticks(range(shares.shape[0]), [f"{r} ({int(n)})" for r, n in zip(shares.index, contingency.sum(axis=1))])
    ax.set_xlabel(contingency.columns.name)
    ax.set_ylabel(f"{contingency.index.name} (cells)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of the row's cells")
    paths = [with_extension(stem, ".png"), with_extension(stem, ".pdf")]
    try:
        for path in paths:
            files.save_figure(fig, path, dpi=150, bbox_inches="tight")
    finally:
        plt.close(fig)
    return paths


# --------------------------------------------------------------------------- embed


def run_embed(args):
    out = output_path(args, "embedded")
    files.refuse_clashes({"--out": out, "--out (its CSV)": with_extension(out.with_suffix(""), ".csv")},
                         {"--pretrained_model": args.pretrained_model, "--query": args.query})
    device = runtime.resolve_device(cli.device_wanted(args))
    loaded = checkpoints.load_encoder(args.pretrained_model, cli.PRETRAIN_HINT)
    query = read_dataset(args.query, args, None)
    checkpoints.check_feeding(loaded.fed, Feeding(query.values, loaded.fed.normalize), args.pretrained_model,
                              args.allow_feature_mismatch)
    lookup = query_lookup(query, loaded.gene_universe, args.query)
    representation, _ = run_chunks(query, lookup, loaded.encoder.to(device), device, args.chunk_cells,
                                   loaded.fed.normalize)
    table = pd.DataFrame({"cell": query.cells})
    uns = {"model": str(args.pretrained_model), "model_digest": loaded.digest,
           "n_model_genes": lookup.n_universe, "n_model_genes_found": lookup.n_found,
           "gene_coverage": lookup.n_found / lookup.n_universe}
    write_outputs(args, out, query, table, representation, uns)
    return representation


def run(args):
    return {"train": run_train, "predict": run_predict, "embed": run_embed}[args.command](args)


def main(args):
    runtime.setup_logging(args.log_level)
    runtime.seed_everything(args.seed)
    runtime.flush_denormals()
    runtime.return_freed_memory()
    return cli.exit_on_error(run, args)


if __name__ == "__main__":
    main(parse_args())
