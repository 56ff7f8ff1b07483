"""Annotate new datasets: train an scPretrain classifier on a labelled reference, label any query.

From a terminal:

    python annotate.py transfer --reference REF.h5ad --label_key cell_type --query QUERY.h5ad \\
        --out results/QUERY_annotated.h5ad --majority_voting          # train for the query's genes, then label
    python annotate.py train --reference REF.h5ad --label_key cell_type --save_model models/ref.pt
    python annotate.py predict --model models/ref.pt --query QUERY.h5ad --majority_voting --plot
    python annotate.py embed --pretrained_model models/pretrained.pt --query QUERY.h5ad

From Python, on AnnData objects (the same code path):

    import annotate
    model = annotate.train(reference, label_key="cell_type", query=query)   # or pretrained="models/p.pt"
    labelled = annotate.annotate(query, model, majority_voting=True)       # obs, obsm['X_scpretrain'], uns
    model.save("models/ref.pt"); model = annotate.load("models/ref.pt")

``predict`` writes the query as it was plus CellTypist's columns: ``obs['predicted_labels']`` (the
best label; with ``--mode prob_match`` every label whose probability reaches ``--p_thres``, joined by
``|``, or ``Unassigned``), ``obs['conf_score']`` (the best label's calibrated probability), with
``--majority_voting`` ``obs['over_clustering']`` and ``obs['majority_voting']`` (each cluster's most
frequent best label); ``obsm['X_scpretrain']`` (the representation) and ``uns['scpretrain']``. An
h5ad query is read a block of cells at a time and copied, never loaded whole. Importing does nothing.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd

import annotation
import annotation_figures as figures
import checkpoints
import cli
import data
import files
import h5ad
import runtime
import scoring
from annotation import EMBEDDING_KEY, PROBABILITIES_KEY, UNS_KEY, AnnotationModel
from errors import DataError
from settings import AnnotateSettings, ClassifierSettings, PredictSettings, PretrainSettings, ReadSettings

log = logging.getLogger("scpretrain.annotate")

# annotate's default recipe has no paper to follow: what measured best across held-out studies
# (bench/README.md, "Transfer protocol"); the paper's and `plus` stay available
RECIPES = {**cli.RECIPES,
           "transfer": {"normalize": "cp10k", "ft_batch_size": 256, "ft_dropout": 0.2, "ft_weight_decay": 0.01,
                        "ft_early_stop": "accuracy_then_loss", "ft_linear_base": "blend",
                        "ft_linear_c": 0.3, "ft_blend_share": 0.75}}  # chosen on held-out studies (bench/README.md)
DEFAULT_RECIPE = "transfer"


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The command line (its --help states every default)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{transfer,train,predict,embed}")
    formatter = argparse.ArgumentDefaultsHelpFormatter
    transfer = commands.add_parser("transfer", formatter_class=formatter,
                                   help="train on a reference for the genes a query has, then label the query")
    train = commands.add_parser("train", formatter_class=formatter,
                                help="fine-tune a classifier on a labelled reference and save it")
    predict = commands.add_parser("predict", formatter_class=formatter, help="label a query with a trained classifier")
    embed = commands.add_parser("embed", formatter_class=formatter, help="write only the pretrained representation")
    for sub in (transfer, train):
        add_train_args(sub)
    train.add_argument("--save_model", required=True, help="where the classifier checkpoint is written")
    train.add_argument("--query", default=None,
                       help="a query to train for: the classifier uses only the genes reference and query share")
    transfer.add_argument("--query", required=True, help="the dataset to label (.h5ad, Cell BLAST .h5 or numpy folder)")
    transfer.add_argument("--save_model", default=None, help="also keep the classifier here")
    predict.add_argument("--model", required=True, help="classifier checkpoint written by `annotate.py train`")
    predict.add_argument("--query", required=True, help="the dataset to label (.h5ad, Cell BLAST .h5 or numpy folder)")
    embed.add_argument("--pretrained_model", required=True, help="scPretrain encoder checkpoint")
    embed.add_argument("--query", required=True, help="the dataset to embed (.h5ad, Cell BLAST .h5 or numpy folder)")
    for sub in (transfer, predict):
        add_predict_args(sub)
    for sub in (transfer, predict, embed):
        add_output_args(sub)
    for sub in (transfer, train, predict, embed):
        add_run_args(sub)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("train", "transfer"):
        # a pretrained encoder decides its features unless a recipe or --normalize is asked for
        args.features_chosen = args.normalize is not None or "--recipe" in (argv if argv is not None else sys.argv)
        cli.resolve_recipe(args, RECIPES)
    if args.command in ("predict", "transfer"):
        if args.label_map and not args.query_label_key:
            parser.error("--label_map scores predictions against the query's labels: give --query_label_key too")
        if args.over_clustering and not args.majority_voting:
            parser.error("--over_clustering names the clusters majority voting votes in: give --majority_voting too")
    if args.command in ("train", "transfer"):
        if args.pretrain_on_query and not args.query:
            parser.error("--pretrain_on_query pre-trains on the reference and the query: give --query")
        if args.pretrain_on_query and args.pretrained_model:
            parser.error("--pretrain_on_query makes the encoder: give it or --pretrained_model, not both")
        unused = [f for f, v in (("--pretrain_phases", args.pretrain_phases != 1), ("--save_pretrained",
                  args.save_pretrained)) if v and not args.pretrain_on_query]
        if unused:
            parser.error(f"{', '.join(unused)} only with --pretrain_on_query")
    return args


def add_train_args(sub) -> None:
    sub.add_argument("--reference", required=True, help="labelled reference (.h5ad, Cell BLAST .h5 or numpy folder)")
    sub.add_argument("--label_key", default=data.DEFAULT_LABEL_KEY, help="obs column with the reference's cell types")
    sub.add_argument("--pretrained_model", default=None,
                     help="scPretrain encoder checkpoint to start from (without it: random init, as the sweep's "
                          "'Without pretraining')")
    sub.add_argument("--hid", type=cli.positive_int, default=200,
                     help="encoder width without --pretrained_model (with one, the encoder's own)")
    sub.add_argument("--per_val", type=cli.fraction, default=0.1,
                     help="validation share of the reference (at most 1000 cells): early stopping, the linear base's "
                          "C and share, and the calibration")
    sub.add_argument("--max_cells_per_type", type=cli.non_negative_int, default=0,
                     help="train on a seeded sample of at most this many cells of each type (0 = every cell)")
    sub.add_argument("--no_calibration", action="store_true",
                     help="keep the softmax probabilities as they are (default: temperature-scaled on the validation "
                          "cells, so that conf_score means what it says)")
    cli.add_classifier_args(sub)
    cli.add_recipe_args(sub, DEFAULT_RECIPE, RECIPES)
    g = sub.add_argument_group("pre-training on the query (the paper's setting)")
    g.add_argument("--pretrain_on_query", action="store_true",
                   help="pre-train the encoder without labels on the reference and the query together, on the genes "
                        "they share (scPretrain's phase 1, with --pretrain_phases 2 phase 2 too), then fine-tune it on "
                        "the reference's labels; needs --query, which is read whole, and no --pretrained_model")
    g.add_argument("--pretrain_phases", type=int, choices=(1, 2), default=1, help="phases of that pre-training")
    g.add_argument("--pt_epoch", type=cli.positive_int, default=50, help="at most this many epochs a phase")
    g.add_argument("--save_pretrained", default=None, help="also keep that encoder here")


def add_predict_args(sub) -> None:
    sub.add_argument("--mode", choices=annotation.MODES, default="best_match",
                     help="best_match: every cell its most probable label; prob_match: every label whose probability "
                          "is at least --p_thres, joined by '|' from the most probable, or 'Unassigned' (CellTypist's)")
    sub.add_argument("--p_thres", type=cli.fraction, default=0.5, help="the probability --mode prob_match asks for")
    sub.add_argument("--majority_voting", action="store_true",
                     help="over-cluster the query and give each cluster the most frequent best label")
    sub.add_argument("--over_clustering", default=None,
                     help="obs column holding an over-clustering to vote in (default: K-means on the representation)")
    sub.add_argument("--n_clusters", type=cli.positive_int, default=None,
                     help="K-means clusters for the over-clustering (default: cells/30, between 2 and 500)")
    sub.add_argument("--min_prop", type=cli.unit_interval, default=0.0,
                     help="a cluster whose majority label has a smaller share is 'Heterogeneous'")
    sub.add_argument("--probabilities", action="store_true",
                     help="also write the cells x classes probabilities (OUT.probabilities.csv and "
                          f"obsm['{PROBABILITIES_KEY}'])")
    sub.add_argument("--query_label_key", default=None,
                     help="obs column with the query's own labels: writes a contingency table and figure")
    sub.add_argument("--label_map", default=None,
                     help="CSV of model label -> query label (two columns; empty: no counterpart): accuracy, macro-F1 "
                          "and kappa on the mapped cells, to OUT.scores.csv")
    sub.add_argument("--group_key", default=None, help="obs column (e.g. study): scores per group too")


def add_output_args(sub) -> None:
    sub.add_argument("--out", default=None, help="annotated .h5ad (default: results/<query>_annotated.h5ad)")
    sub.add_argument("--plot", action="store_true",
                     help="draw the query's UMAP of the representation coloured by the labels and conf_score "
                          "(OUT.umap.png, .pdf; a seeded sample above 200,000 cells)")
    sub.add_argument("--chunk_cells", type=cli.positive_int, default=8192,
                     help="cells per block: the query is read and processed this many cells at a time")
    sub.add_argument("--in_memory", action="store_true",
                     help="read an h5ad query whole instead of a block at a time from disk")


def add_run_args(sub) -> None:
    cli.add_seed_arg(sub, "seeds the split, init and K-means")
    cli.add_device_args(sub)
    cli.add_input_args(sub)
    cli.add_feeding_arg(sub)
    cli.add_log_level_arg(sub)


# --------------------------------------------------------------------------- settings from the command line


def training_settings(args, pretrained=None) -> tuple[ClassifierSettings, AnnotateSettings]:
    """The classifier's and the training's settings; with a pretrained encoder and neither
    --recipe nor --normalize given, the features the encoder was fed."""
    settings = cli.classifier_settings(args)
    if pretrained is not None and not args.features_chosen and settings.normalize != pretrained.fed.normalize:
        log.info("features as the pretrained encoder was fed: --normalize %s (the recipe's %s not used)",
                 pretrained.fed.normalize, settings.normalize)
        settings = settings.with_(normalize=pretrained.fed.normalize)
    return settings, AnnotateSettings.from_args(args, calibrate=not args.no_calibration)


def query_pretrain_settings(args, clf_settings: ClassifierSettings) -> PretrainSettings:
    """--pretrain_on_query's pre-training: the paper's, feeding the classifier's features."""
    return PretrainSettings(normalize=clf_settings.normalize, hid=clf_settings.hid, seed=args.seed,
                            pt_epoch=args.pt_epoch)


def predict_settings(args) -> PredictSettings:
    return PredictSettings.from_args(args)


# --------------------------------------------------------------------------- files in, files out


def read_reference(path, label_key: str, read: ReadSettings) -> data.CellData:
    """A labelled reference, genes mapped, cells without a label dropped, two types or more."""
    d = data.open_query(path, label_key, read, stream=False)
    if not d.is_labelled:
        raise DataError(f"{path}: no labels in '{label_key}'; pass --label_key COLUMN")
    kept = data.with_two_classes([data.labelled_cells(d)])
    if not kept:
        raise DataError(f"{path}: one cell type only; a classifier needs two or more")
    return kept[0]


def query_genes(path, read: ReadSettings) -> np.ndarray:
    """A query's mapped genes, its values left on disk where the format allows."""
    query = data.open_query(path, None, read)
    try:
        return np.asarray(query.genes, dtype=object)
    finally:
        if isinstance(query, data.StreamedData):
            query.close()


def output_path(args, suffix: str) -> Path:
    out = Path(args.out) if args.out else cli.RESULTS_DIR / f"{Path(args.query).stem}_{suffix}.h5ad"
    if out.suffix.lower() != ".h5ad":
        raise DataError(f"--out {out}: must end in .h5ad")
    return files.check_output_file(out, "--out")


def side_file(out: Path, extension: str) -> Path:
    return figures.with_extension(out.with_suffix(""), extension)


def planned_outputs(args, out: Path | None) -> dict:
    """Every file the command may write, by what it is: checked against its inputs before any work."""
    found = {}
    for flag in ("save_model", "save_pretrained"):
        if getattr(args, flag, None):
            found[f"--{flag}"] = Path(getattr(args, flag))
    if out is None:
        return found
    found.update({"--out": out, "--out (its CSV)": side_file(out, ".csv")})
    if getattr(args, "probabilities", False):
        found["--out (probabilities)"] = side_file(out, ".probabilities.csv")
    if getattr(args, "query_label_key", None):
        found["--out (contingency tables, figures)"] = [
            side_file(out, f".contingency_{column}{ext}")
            for column in ("predicted_labels", "majority_voting") for ext in (".csv", ".png", ".pdf")]
        found["--out (scores)"] = side_file(out, ".scores.csv")
    if args.plot:
        found["--out (UMAP figure)"] = figures.figure_paths(side_file(out, ".umap"))
    return found


def input_paths(args) -> dict:
    return {flag: getattr(args, name) for flag, name in (("--reference", "reference"), ("--query", "query"),
                                                          ("--model", "model"), ("--pretrained_model", "pretrained_model"),
                                                          ("--label_map", "label_map")) if getattr(args, name, None)}


def check_paths(args, out: Path | None) -> None:
    if getattr(args, "save_pretrained", None):
        files.check_output_file(args.save_pretrained, "--save_pretrained")
    files.refuse_clashes(planned_outputs(args, out), input_paths(args))


def write_outputs(query_path, query, result: annotation.Annotation, out: Path, uns: dict) -> None:
    """The query as it was plus the annotation (an h5ad query copied, never loaded whole; other
    formats written anew), and the per-cell columns as CSV beside it."""
    obsm = {EMBEDDING_KEY: result.representation}
    if result.probabilities is not None:
        obsm[PROBABILITIES_KEY] = result.probabilities.astype(np.float32)
    if data.file_format(query_path) == "h5ad":
        h5ad.write_annotated_copy(query_path, out, result.table, obsm, {UNS_KEY: uns})
    else:
        h5ad.write_anndata(out, anndata_of(query), result.table, obsm, {UNS_KEY: uns})
    csv_path = side_file(out, ".csv")
    files.atomic_write(csv_path, lambda fh: result.table.reset_index().to_csv(fh, index=False))
    log.info("wrote %s and %s", out, csv_path)


def anndata_of(query: data.CellData):
    """A Cell BLAST or numpy query as an AnnData, as it was read."""
    import anndata

    obs = pd.DataFrame(index=pd.Index(np.asarray(query.cells, dtype=object).astype(str)))
    if query.labels is not None:
        obs[data.DEFAULT_LABEL_KEY] = query.labels
    return anndata.AnnData(X=query.X, obs=obs, var=pd.DataFrame(index=pd.Index(query.genes.astype(str))))


def query_obs(query) -> pd.DataFrame:
    """The query's own obs table (an h5ad's), or one built from what was read."""
    if isinstance(query, data.StreamedData):
        return query.obs()
    if data.file_format(query.source) == "h5ad":
        with h5ad.open_h5ad(query.source, None) as f:
            return f.obs()
    obs = pd.DataFrame(index=pd.Index(np.asarray(query.cells, dtype=object).astype(str), name="cell"))
    if query.labels is not None:
        obs[data.DEFAULT_LABEL_KEY] = query.labels
    return obs


def obs_column(obs: pd.DataFrame, key: str, where) -> np.ndarray:
    if key not in obs.columns:
        raise DataError(f"{where}: no obs column '{key}'; available columns: {list(obs.columns)}")
    return obs[key].astype(str).to_numpy(dtype=object)


def evaluate(args, out: Path, table: pd.DataFrame, obs: pd.DataFrame, model: AnnotationModel) -> None:
    """Contingency tables (CSV, figure) of the query's labels against each label column, and with
    --label_map their scores (per --group_key group too)."""
    given = obs_column(obs, args.query_label_key, args.query)
    label_map = scoring.read_label_map(args.label_map, model.classes, given) if args.label_map else None
    columns = ["predicted_labels"] + (["majority_voting"] if "majority_voting" in table else [])
    for column in columns:
        table_of = scoring.contingency(given, table[column].to_numpy(), args.query_label_key, column)
        stem = side_file(out, f".contingency_{column}")
        files.atomic_write(figures.with_extension(stem, ".csv"), lambda fh: table_of.to_csv(fh))
        figures.draw_contingency(table_of, stem, f"{Path(args.query).stem}: {args.query_label_key} vs {column}")
        log.info("contingency of %s vs %s in %s.csv/.png/.pdf", args.query_label_key, column, stem)
    if label_map is not None:
        groups = obs_column(obs, args.group_key, args.query) if args.group_key else None
        frame = scoring.scores_table(table, columns, given, label_map, groups)
        files.atomic_write(side_file(out, ".scores.csv"), lambda fh: frame.to_csv(fh, index=False))


def plot_outputs(out: Path, result: annotation.Annotation, title: str, seed: int) -> None:
    paths = figures.draw_annotation_umap(result.representation, result.table, side_file(out, ".umap"), title, seed)
    if paths:
        log.info("UMAP of the representation in %s", ", ".join(map(str, paths)))


# --------------------------------------------------------------------------- the commands


def run_train(args) -> AnnotationModel:
    save_path = files.check_output_file(args.save_model, "--save_model")
    check_paths(args, None)
    model = trained_model(args, runtime.resolve_device(cli.device_wanted(args)))
    model.save(save_path)
    log.info("classifier saved to %s (%d classes, %d genes)", save_path, len(model.classes), len(model.genes))
    return model


def trained_model(args, device) -> AnnotationModel:
    """The classifier ``train`` and ``transfer`` train: on the reference, for the query's genes when
    there is a query, from --pretrained_model, an encoder pre-trained on reference and query
    (--pretrain_on_query) or random init."""
    read = cli.read_settings(args)
    reference = read_reference(args.reference, args.label_key, read)
    pretrained = checkpoints.load_encoder(args.pretrained_model, cli.PRETRAIN_HINT) if args.pretrained_model else None
    clf_settings, training = training_settings(args, pretrained)
    shared = None
    if args.pretrain_on_query:
        query = data.open_query(args.query, None, read, stream=False)
        shared = np.asarray(query.genes, dtype=object)
        pretrained = annotation.pretrain_with_query(reference, query, query_pretrain_settings(args, clf_settings),
                                                    device, args.pretrain_phases, args.save_pretrained)
        del query
    elif args.query:
        shared = query_genes(args.query, read)
    return annotation.train(reference, clf_settings, training, args.label_key, pretrained, shared,
                            Path(args.query).name if args.query else "the query", device, cli.args_dict(args),
                            args.allow_feature_mismatch)


def predict_files(args, model: AnnotationModel, out: Path, device) -> pd.DataFrame:
    """Label ``args.query`` with ``model`` and write every output of predict."""
    settings = predict_settings(args)
    query = data.open_query(args.query, args.query_label_key, cli.read_settings(args), stream=not args.in_memory)
    try:
        obs = query_obs(query) if (settings.over_clustering or args.query_label_key) else None
        result = annotation.predict(model, query, settings, device, obs, keep_probabilities=args.probabilities,
                                    allow_mismatch=args.allow_feature_mismatch, where=args.query)
        uns = {"model": str(model.path) if model.path else None, **result.uns}
        write_outputs(args.query, query, result, out, uns)
    finally:
        if isinstance(query, data.StreamedData):
            query.close()
    if args.probabilities:
        frame = pd.DataFrame(result.probabilities, columns=model.classes, index=result.table.index)
        files.atomic_write(side_file(out, ".probabilities.csv"), lambda fh: frame.to_csv(fh))
    if args.query_label_key:
        evaluate(args, out, result.table, obs, model)
    if args.plot:
        plot_outputs(out, result, Path(args.query).stem, args.seed)
    return result.table


def run_predict(args) -> pd.DataFrame:
    out = output_path(args, "annotated")
    check_paths(args, out)
    device = runtime.resolve_device(cli.device_wanted(args))
    return predict_files(args, AnnotationModel.load(args.model), out, device)


def run_transfer(args) -> pd.DataFrame:
    """``train --query`` followed by ``predict``, in one command."""
    out = output_path(args, "annotated")
    if args.save_model:
        files.check_output_file(args.save_model, "--save_model")
    check_paths(args, out)
    device = runtime.resolve_device(cli.device_wanted(args))
    model = trained_model(args, device)
    if args.save_model:
        model.save(args.save_model)
        log.info("classifier saved to %s", args.save_model)
    return predict_files(args, model, out, device)


def run_embed(args) -> np.ndarray:
    out = output_path(args, "embedded")
    check_paths(args, out)
    device = runtime.resolve_device(cli.device_wanted(args))
    encoder = checkpoints.load_encoder(args.pretrained_model, cli.PRETRAIN_HINT)
    query = data.open_query(args.query, None, cli.read_settings(args), stream=not args.in_memory)
    try:
        result = annotation.embed(encoder, query, args.chunk_cells, device, args.allow_feature_mismatch, args.query)
        write_outputs(args.query, query, result, out, {"model": str(args.pretrained_model), **result.uns})
    finally:
        if isinstance(query, data.StreamedData):
            query.close()
    if args.plot:
        log.info("--plot: embed has no labels to colour by; the UMAP is drawn by predict and transfer")
    return result.representation


def run(args):
    return {"train": run_train, "predict": run_predict, "transfer": run_transfer, "embed": run_embed}[args.command](args)


def main(args):
    runtime.set_up_process(args.log_level, args.seed)  # logging, seeds, float mode, allocator
    return cli.exit_on_error(run, args)


# --------------------------------------------------------------------------- the Python API


def _read(layer, gene_symbols, values) -> ReadSettings:
    return ReadSettings(layer=layer, gene_symbols=gene_symbols, values=values)


def _classifier_settings(recipe: str | None, hid: int, options: dict, encoder=None) -> ClassifierSettings:
    """The recipe's values (default: annotate's), then ``options``; with a pretrained encoder and
    neither a recipe nor ``normalize`` asked for, the features the encoder was fed."""
    if recipe is not None and recipe not in RECIPES:
        raise ValueError(f"unknown recipe '{recipe}'; choose one of {sorted(RECIPES)}")
    values = {**RECIPES[recipe or DEFAULT_RECIPE], "hid": hid, **options}
    if encoder is not None and recipe is None and "normalize" not in options:
        values["normalize"] = encoder.fed.normalize
    unknown = set(values) - set(ClassifierSettings.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown classifier options {sorted(unknown)}; see settings.ClassifierSettings")
    return ClassifierSettings(**values)


def train(adata, label_key: str = data.DEFAULT_LABEL_KEY, pretrained=None, query=None, recipe: str | None = None,
          hid: int = 200, per_val: float = 0.1, max_cells_per_type: int = 0, calibrate: bool = True, seed: int = 0,
          device: str = "auto", layer=None, gene_symbols=None, values: str = "auto",
          allow_feature_mismatch: bool = False, pretrain_on_query: bool = False, pretrain_phases: int = 1,
          pt_epoch: int = 50, **classifier_options) -> AnnotationModel:
    """A classifier trained on the labelled AnnData ``adata`` (``obs[label_key]``), as
    ``annotate.py train`` trains one: from the encoder checkpoint ``pretrained`` (a path), from an
    encoder pre-trained on ``adata`` and ``query`` together (``pretrain_on_query``, as
    ``--pretrain_on_query``), or at random; for the genes ``query`` (an AnnData) shares with it
    when given. ``recipe`` (default: annotate's, or the features a pretrained encoder was fed) and
    any ``ClassifierSettings`` field (``ft_lr=...``) choose the training; ``layer``,
    ``gene_symbols`` and ``values`` how the AnnData is read (as the command line's flags)."""
    if pretrain_on_query and (query is None or pretrained is not None):
        raise ValueError("pretrain_on_query pre-trains on adata and query: give query, and no pretrained")
    runtime.seed_everything(seed)
    read = _read(layer, gene_symbols, values)
    reference = data.from_anndata(adata, label_key, read, name="reference")
    reference = data.with_two_classes([data.labelled_cells(reference)])
    if not reference:
        raise DataError(f"the reference has one cell type only in obs['{label_key}']; a classifier needs two or more")
    encoder = checkpoints.load_encoder(pretrained, cli.PRETRAIN_HINT) if pretrained is not None else None
    settings = _classifier_settings(recipe, hid, classifier_options, encoder)
    device = runtime.resolve_device(device)
    query_data = data.from_anndata(query, None, read, name="query") if query is not None else None
    if pretrain_on_query:
        encoder = annotation.pretrain_with_query(
            reference[0], query_data, PretrainSettings(normalize=settings.normalize, hid=settings.hid, seed=seed,
                                                       pt_epoch=pt_epoch), device, pretrain_phases)
    return annotation.train(reference[0], settings,
                            AnnotateSettings(per_val=per_val, max_cells_per_type=max_cells_per_type,
                                             calibrate=calibrate, seed=seed),
                            label_key, encoder, query_data.genes if query_data is not None else None, "the query",
                            device, {"api": "annotate.train", "recipe": recipe or DEFAULT_RECIPE,
                                     "pretrain_on_query": pretrain_on_query}, allow_feature_mismatch)


def load(path) -> AnnotationModel:
    """A classifier saved by ``model.save`` or ``annotate.py train``, validated."""
    return AnnotationModel.load(path)


def _attached(adata, result: annotation.Annotation, uns: dict, copy: bool):
    out = adata.copy() if copy else adata
    for column in result.table.columns:
        if column in out.obs.columns:
            log.warning("obs['%s'] is replaced by the prediction", column)
        values = result.table[column].to_numpy()
        out.obs[column] = pd.Categorical(values) if values.dtype == object else values
    out.obsm[EMBEDDING_KEY] = result.representation
    if result.probabilities is not None:
        out.obsm[PROBABILITIES_KEY] = result.probabilities.astype(np.float32)
    out.uns[UNS_KEY] = uns
    return out


def annotate(adata, model: AnnotationModel, mode: str = "best_match", p_thres: float = 0.5,
             majority_voting: bool = False, over_clustering: str | None = None, n_clusters: int | None = None,
             min_prop: float = 0.0, probabilities: bool = False, copy: bool = True, seed: int = 0,
             device: str = "auto", chunk_cells: int = 8192, layer=None, gene_symbols=None, values: str = "auto",
             allow_feature_mismatch: bool = False):
    """The AnnData ``adata`` labelled by ``model``, with the same ``obs`` columns,
    ``obsm['X_scpretrain']`` (and ``obsm['scpretrain_probabilities']`` with ``probabilities``) and
    ``uns['scpretrain']`` as ``annotate.py predict`` writes; a copy, or ``adata`` itself with
    ``copy=False``."""
    if mode not in annotation.MODES:
        raise ValueError(f"unknown mode '{mode}'; choose one of {annotation.MODES}")
    query = data.from_anndata(adata, None, _read(layer, gene_symbols, values), name="query")
    settings = PredictSettings(mode, p_thres, majority_voting, over_clustering, n_clusters, min_prop, chunk_cells, seed)
    result = annotation.predict(model, query, settings, runtime.resolve_device(device), adata.obs,
                                keep_probabilities=probabilities, allow_mismatch=allow_feature_mismatch, where="query")
    uns = {"model": str(model.path) if model.path else None, **result.uns}
    return _attached(adata, result, uns, copy)


def embed(adata, encoder, copy: bool = True, device: str = "auto", chunk_cells: int = 8192, layer=None,
          gene_symbols=None, values: str = "auto", allow_feature_mismatch: bool = False):
    """The AnnData with ``obsm['X_scpretrain']``, the representation of the encoder checkpoint
    ``encoder`` (a path), as ``annotate.py embed`` writes it."""
    loaded = checkpoints.load_encoder(encoder, cli.PRETRAIN_HINT)
    query = data.from_anndata(adata, None, _read(layer, gene_symbols, values), name="query")
    result = annotation.embed(loaded, query, chunk_cells, runtime.resolve_device(device), allow_feature_mismatch,
                              "query")
    return _attached(adata, result, {"model": str(encoder), **result.uns}, copy)


def transfer(reference, query, label_key: str = data.DEFAULT_LABEL_KEY, pretrained=None, majority_voting: bool = False,
             mode: str = "best_match", p_thres: float = 0.5, copy: bool = True, seed: int = 0, device: str = "auto",
             **train_options):
    """``train(reference, query=query, ...)`` then ``annotate(query, model, ...)``: the query labelled
    by a classifier trained for its genes."""
    model = train(reference, label_key, pretrained, query, seed=seed, device=device, **train_options)
    read = {k: train_options[k] for k in ("layer", "gene_symbols", "values") if k in train_options}
    return annotate(query, model, mode=mode, p_thres=p_thres, majority_voting=majority_voting, copy=copy, seed=seed,
                    device=device, **read)


def plot(adata, stem, seed: int = 0) -> list[Path]:
    """The UMAP figure of an annotated AnnData (``annotate``'s output) at ``stem``.png/.pdf."""
    if EMBEDDING_KEY not in adata.obsm or "predicted_labels" not in adata.obs:
        raise DataError(f"the AnnData holds no annotation (obsm['{EMBEDDING_KEY}'], obs['predicted_labels']); "
                        "annotate it first")
    columns = [c for c in ("predicted_labels", "conf_score", "majority_voting") if c in adata.obs]
    table = adata.obs[columns].copy()
    return figures.draw_annotation_umap(np.asarray(adata.obsm[EMBEDDING_KEY]), table, stem, "query", seed)


if __name__ == "__main__":
    main(parse_args())
