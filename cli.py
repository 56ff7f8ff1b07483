"""The command line the scripts share: flags defined once, their checks, recipes, the settings
objects built from a parsed command line, and the exit status. Only scripts import this module
(libraries take settings objects); importing it does nothing.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from tqdm.contrib.logging import logging_redirect_tqdm

import settings as st
from values import VALUE_CHOICES
from errors import ScpretrainError

log = logging.getLogger("scpretrain")

REPO_DIR = Path(__file__).resolve().parent
DATASET_DIR = REPO_DIR / "dataset"
MODELS_DIR = REPO_DIR / "models"
RESULTS_DIR = REPO_DIR / "results"
DEFAULT_MODEL = MODELS_DIR / "pretrained.pt"
PRETRAIN_HINT = "run `python main.py --is_pretrain --kmeans` first, or pass --pretrained_model FILE"
MAX_SEED = 2**32  # numpy's legacy generator and scikit-learn's random_state take seeds below this


def _number_type(convert, accept, wanted: str):
    """An argparse type: ``convert(text)`` that ``accept`` passes, else a message saying ``wanted``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got '{text}'") from None
        if not accept(value):
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    parse.__name__ = convert.__name__  # argparse names the type in its messages
    return parse


positive_int = _number_type(int, lambda v: v >= 1, "a whole number >= 1")  # counts: cells, epochs, batches, ...
non_negative_int = _number_type(int, lambda v: v >= 0, "a whole number >= 0")  # 0 = off or all, as each flag says
at_least_two = _number_type(int, lambda v: v >= 2, "a whole number >= 2")  # cells a fit needs
seed_int = _number_type(int, lambda v: 0 <= v < MAX_SEED, f"a whole number in [0, {MAX_SEED:,})")
positive_float = _number_type(float, lambda v: bool(np.isfinite(v)) and v > 0, "a finite number > 0")  # rates
fraction = _number_type(float, lambda v: 0 < v < 1, "a number strictly between 0 and 1")  # shares of cells
unit_interval = _number_type(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")  # shares that may be 0 or 1
non_negative_fraction = _number_type(float, lambda v: 0 <= v < 1, "a number in [0, 1)")  # dropout rates
kmeans_tolerance = _number_type(float, lambda v: v == -1 or 0 <= v < 1,
                                "a share of cells in [0, 1), or -1 for no early stop")  # --kmeans_tol
non_negative_float = _number_type(float, lambda v: bool(np.isfinite(v)) and v >= 0, "a finite number >= 0")


def log_level(text: str) -> str:
    from runtime import LOG_LEVELS

    level = str(text).upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"unknown level '{text}'; choose one of {', '.join(LOG_LEVELS)}")
    return level


# --------------------------------------------------------------------------- shared flags


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags shared by main.py, rf_svm_lr.py and clus.py (help shows each default)."""
    from download import DEFAULT_URL_TEMPLATE, LEGACY_URL_TEMPLATE

    g = parser.add_argument_group("data and run")
    g.add_argument("--datasets", nargs="+", default=None,
                   help="Cell BLAST names (downloaded if missing), .h5/.h5ad paths or numpy folders; "
                        "'demo' = the embedded demo collection, 'paper' = the paper's 66 datasets (default: demo)")
    g.add_argument("--dataset_dir", default=str(DATASET_DIR), help="where Cell BLAST files live (default: %(default)s)")
    g.add_argument("--url_template", default=DEFAULT_URL_TEMPLATE,
                   help="download URL of a missing dataset, {name} is replaced; Cell BLAST's legacy .h5 files: "
                        f"{LEGACY_URL_TEMPLATE} (default: %(default)s)")
    g.add_argument("--label_key", default=st.DEFAULT_LABEL_KEY, help="obs column with cell types (default: %(default)s)")
    add_input_args(g)
    add_seed_arg(g, "seeds numpy, torch, splits and K-means")
    add_device_args(g)
    g.add_argument("--hid", type=positive_int, default=200, help="encoder width (default: %(default)s)")
    g.add_argument("--fold1", type=positive_int, default=1, help="outer repeats (default: %(default)s)")
    g.add_argument("--fold2", type=positive_int, default=1,
                   help="inner repeats; fold1 x fold2 seeded repeats (default: %(default)s)")
    g.add_argument("--per_train", type=fraction, default=0.6, help="training share of cells (default: %(default)s)")
    g.add_argument("--per_val", type=fraction, default=0.1,
                   help="validation share of cells; per_train + per_val < 1 (default: %(default)s)")
    g.add_argument("--max_tr_num", type=positive_int, default=1000,
                   help="at most this many training cells (default: %(default)s)")
    add_log_level_arg(g)
    return parser


def add_seed_arg(g, what: str) -> None:
    g.add_argument("--seed", type=seed_int, default=0, help=f"{what} (default: %(default)s)")


def add_device_args(g) -> None:
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto = cuda when available (default: %(default)s)")
    g.add_argument("--cuda", action="store_true", help="the original's flag: same as --device cuda")


def add_input_args(g) -> None:
    """How input files are read (h5ad values and gene symbols)."""
    g.add_argument("--layer", default=None,
                   help="h5ad only: take values from this layer ('X', 'raw' = raw.X, or a layers key); "
                        "default: the first of X, raw.X, layers named like 'counts' that holds raw values")
    g.add_argument("--gene_symbols", default=None,
                   help="h5ad only: var column holding gene symbols (default: var_names, or var['feature_name'] "
                        "when var_names are Ensembl IDs)")
    g.add_argument("--values", choices=VALUE_CHOICES, default="auto",
                   help="what the input values are: 'raw' (counts, TPM: log1p is taken), 'log1p' (already "
                        "log-normalised: used as they are; h5ad: X unless --layer), or 'auto' = read from the "
                        "values themselves; values that could be either stop the run and say so "
                        "(default: %(default)s)")
    g.add_argument("--log_transformed", action="store_const", const="log1p", dest="values",
                   help="the same as --values log1p")


def add_log_level_arg(parser) -> None:
    from runtime import LOG_LEVELS

    parser.add_argument("--log_level", type=log_level, default="INFO",
                        help=f"one of {', '.join(LOG_LEVELS)} (default: %(default)s)")


def add_feeding_arg(parser) -> None:
    parser.add_argument("--allow_feature_mismatch", action="store_true",
                        help="feed a pretrained model other features (--normalize, values) than it was trained "
                             "on, on purpose (logged as a WARNING); without it such a run is refused")


def add_classifier_args(parser) -> None:
    from classifier import BLEND_SHARES, LINEAR_C_GRID

    g = parser.add_argument_group("classifier training")
    g.add_argument("--ft_lr", type=positive_float, default=0.002, help="Adam learning rate (default: %(default)s)")
    g.add_argument("--ft_batch_size", type=positive_int, default=None,
                   help="mini-batch size (default: the recipe's; paper 5000, i.e. one batch of its <= 1000 cells)")
    g.add_argument("--ft_epoch", type=positive_int, default=500, help="at most this many epochs (default: %(default)s)")
    g.add_argument("--patience", type=positive_int, default=30, help="stop after this many epochs without a better "
                                                                     "validation score (default: %(default)s)")
    g.add_argument("--ft_dropout", type=non_negative_fraction, default=None,
                   help="dropout on the classifier's input, representation and hidden layer while training "
                        "(default: the recipe's; paper 0)")
    g.add_argument("--ft_weight_decay", type=non_negative_float, default=None,
                   help="decoupled weight decay (AdamW) when > 0 (default: the recipe's; paper 0, plain Adam)")
    g.add_argument("--ft_batch_format", choices=st.BATCH_FORMATS, default="auto",
                   help="how cells reach the classifier: CSR products (only the non-zeros are multiplied) or "
                        "dense batches; auto = sparse on CPU, dense on GPU; changes only float rounding and "
                        "dropout's draws (default: %(default)s)")
    g.add_argument("--ft_early_stop", choices=st.EARLY_STOP, default=None,
                   help="validation score kept for early stopping: 'accuracy' (scPretrain), 'loss', or "
                        "'accuracy_then_loss' (accuracy, ties broken by a lower loss) (default: the recipe's)")
    g.add_argument("--ft_linear_base", choices=st.LINEAR_BASES, default=None,
                   help="a logistic regression beside the network (L2, C chosen from "
                        f"{', '.join(map(str, LINEAR_C_GRID))} on the validation cells, fitted on the training cells "
                        "and kept fixed): 'blend' = the network trains alone, then its log-probabilities are mixed "
                        f"with the regression's, the regression's share chosen from {', '.join(map(str, BLEND_SHARES))} "
                        "on the validation cells; 'residual' = the network trains as a correction added to the "
                        "regression's logits, from a zeroed output layer; 'none' (scPretrain): the network alone "
                        "(default: the recipe's)")
    g.add_argument("--ft_linear_c", type=chosen_or(positive_float), default=None,
                   help="the linear base's C instead of choosing it on the validation cells ('chosen') "
                        "(default: the recipe's)")
    g.add_argument("--ft_blend_share", type=chosen_or(unit_interval), default=None,
                   help="the regression's share in --ft_linear_base blend instead of choosing it on the validation "
                        "cells ('chosen') (default: the recipe's)")


def chosen_or(kind):
    """An argparse type: 'chosen' (the value is chosen on the validation cells) or a ``kind`` value."""
    def parse(text: str) -> float:
        return st.CHOSEN if text == "chosen" else kind(text)
    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def add_pretrain_args(parser) -> None:
    g = parser.add_argument_group("pre-training")
    g.add_argument("--pt_lr", type=positive_float, default=1e-4, help="Adam learning rate (default: %(default)s)")
    g.add_argument("--pt_epoch", type=positive_int, default=50, help="at most this many epochs (default: %(default)s)")
    g.add_argument("--pt_patience", type=positive_int, default=5,
                   help="stop after this many epochs without a lower loss (default: %(default)s)")
    g.add_argument("--batch_num", type=positive_int, default=30,
                   help="steps per epoch; batch of a dataset = n/batch_num (default: %(default)s)")
    g.add_argument("--avg_cluster_num", type=positive_int, default=100,
                   help="a in k = n//a, n//(a//2), n//(2a)+1 (default: %(default)s)")
    g.add_argument("--kmeans_iter", type=positive_int, default=20, help="K-means iterations (default: %(default)s)")
    g.add_argument("--kmeans_tol", type=kmeans_tolerance, default=0.0,
                   help="stop K-means once at most this share of cells changes cluster in an iteration; 0 = "
                        "when none changes (the same clusters as all --kmeans_iter iterations, sooner); -1 = "
                        "never stop early, exactly --kmeans_iter iterations as the original (default: %(default)s)")
    g.add_argument("--kmeans_on", choices=st.KMEANS_INPUTS, default="log1p",
                   help="phase-1 K-means input; 'raw' is the original's (default: %(default)s)")
    g.add_argument("--kmeans_max_cells", type=non_negative_int, default=0,
                   help="fit K-means centroids on at most this many sampled cells, then assign all "
                        "(0 = all cells, as the original; default: %(default)s)")
    g.add_argument("--no_sigmoid_logits", action="store_true",
                   help="plain cross-entropy on the heads' logits (the original applies a sigmoid first)")
    g.add_argument("--pretrain_output", action="store_true",
                   help="phase 2: cluster the --pretrained_model encoder's output and continue training it")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run from its last epoch checkpoint")
    g.add_argument("--pca_pt", action="store_true",
                   help="the original's PCA inputs for pre-training: not available in this version (it stops "
                        "with a message); --pca_ft is")
    g.add_argument("--batch_format", choices=st.BATCH_FORMATS, default="auto",
                   help="how a step's cells reach the encoder: CSR products (only the non-zeros are multiplied) "
                        "or a dense batch; auto = sparse on CPU, dense on GPU (default: %(default)s)")


def add_finetune_args(parser) -> None:
    add_classifier_args(parser)
    g = parser.add_argument_group("fine-tuning sweep")
    g.add_argument("--pca_ft", action="store_true", help="classify PCA features fitted on train+validation cells")
    g.add_argument("--pca_dim", type=positive_int, default=500, help="PCA components for --pca_ft (default: %(default)s)")
    g.add_argument("--np_input", default=None, help="fine-tune on this numpy folder only")
    g.add_argument("--ann_input", default=None, help="fine-tune on this .h5ad only")
    g.add_argument("--save_result", default=str(RESULTS_DIR / "finetune.csv"),
                   help="CSV the rows are appended to (default: %(default)s)")
    g.add_argument("--jobs", type=positive_int, default=1,
                   help="datasets fine-tuned in parallel processes (default: %(default)s)")
    g.add_argument("--threads", type=non_negative_int, default=0,
                   help="torch threads per job; 0 = cores / jobs (default: %(default)s)")


# Named recipes: the paper's (the default, every value the original's) and "plus", the best
# combination measured on the data at hand with validation cells only (bench/README.md, the
# accuracy protocol). A flag given on the command line overrides its recipe's value.
RECIPES = {
    "paper": {"normalize": "none", "ft_batch_size": 5000, "ft_dropout": 0.0, "ft_weight_decay": 0.0,
              "ft_early_stop": "accuracy", "ft_linear_base": "none", "ft_linear_c": st.CHOSEN,
              "ft_blend_share": st.CHOSEN},
    "plus": {"normalize": "cp10k", "ft_batch_size": 256, "ft_dropout": 0.2, "ft_weight_decay": 0.01,
             "ft_early_stop": "accuracy_then_loss", "ft_linear_base": "blend", "ft_linear_c": st.CHOSEN,
             "ft_blend_share": st.CHOSEN},
}


def add_recipe_args(parser, default: str = "paper", recipes: dict = RECIPES) -> None:
    g = parser.add_argument_group("recipe")
    described = "; ".join(f"'{name}' = " + ", ".join(f"{k} {'chosen' if v == st.CHOSEN else v}"
                                                      for k, v in values.items())
                          for name, values in recipes.items())
    g.add_argument("--recipe", choices=sorted(recipes), default=default,
                   help=f"{described}; 'paper' is the original's recipe; any flag given overrides its recipe "
                        "value (default: %(default)s)")
    g.add_argument("--normalize", choices=st.NORMALIZATIONS, default=None,
                   help="features: log1p of raw values ('none', scPretrain) or of counts per 10,000 "
                        "('cp10k'); saved in checkpoints (default: the recipe's)")


def resolve_recipe(args, recipes: dict = RECIPES) -> argparse.Namespace:
    """Fill every recipe-controlled flag left unset with the chosen recipe's value (at parse time)."""
    for key, value in recipes[args.recipe].items():
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, value)
    return args


def check_split_fractions(parser: argparse.ArgumentParser, args) -> None:
    """Train and validation shares must leave test cells."""
    if args.per_train + args.per_val >= 1:
        parser.error(f"--per_train {args.per_train} + --per_val {args.per_val} must be < 1 (the rest are test cells)")


def check_derived_seeds(parser: argparse.ArgumentParser, largest: int) -> None:
    """Seeds derived from --seed (repeats, K-means runs) must stay below ``MAX_SEED`` too."""
    if largest >= MAX_SEED:
        parser.error(f"--seed is too large: the seeds derived from it reach {largest:,}, and seeds must be below "
                     f"{MAX_SEED:,}; choose a smaller --seed")


# --------------------------------------------------------------------------- settings from args


def read_settings(args) -> st.ReadSettings:
    return st.ReadSettings.from_args(args)


def split_settings(args) -> st.SplitSettings:
    return st.SplitSettings.from_args(args)


def classifier_settings(args, **overrides) -> st.ClassifierSettings:
    return st.ClassifierSettings.from_args(args, **overrides)


def args_dict(args) -> dict:
    """The run's arguments as JSON-able values (recorded in checkpoints and result sidecars)."""
    out = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    return json.loads(json.dumps(out, default=str))


def device_wanted(args) -> str:
    return "cuda" if getattr(args, "cuda", False) else getattr(args, "device", "auto")


# --------------------------------------------------------------------------- exit status


def interrupted_in_compiled_code(exc: BaseException) -> bool:
    """A Ctrl-C that arrived inside a numba or C extension call surfaces as a SystemError whose
    cause is the KeyboardInterrupt."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def exit_on_error(run, args, resume_hint: str = ""):
    """Run ``run(args)`` with the exit-status convention of every script: bad input, a bad output
    path or a bad checkpoint ends with its one-line message and 1; Ctrl-C with one line and 130
    (argparse has already used 2 for a bad command line)."""
    try:
        with logging_redirect_tqdm():
            return run(args)
    except ScpretrainError as exc:
        log.error("%s", exc)
        sys.exit(1)
    except KeyboardInterrupt:
        _interrupted(resume_hint)
    except SystemError as exc:
        if not interrupted_in_compiled_code(exc):
            raise
        _interrupted(resume_hint)


def _interrupted(resume_hint: str):
    log.error("interrupted; run the same command again to continue (finished results are kept%s)", resume_hint)
    sys.exit(130)


# --------------------------------------------------------------------------- what the analysis scripts start from


def analysis_inputs(args, result_columns, extra_outputs: dict | None = None):
    """What rf_svm_lr.py and clus.py start from, in order: the result path (checked writable, not
    one of the inputs, and refused if it is a file that is not one of ours with
    ``result_columns``, before any data is read), the device, the pretrained encoder and the
    labelled datasets."""
    import checkpoints
    import data
    import files
    import results
    import runtime

    out = files.check_output_file(args.save_result, "--save_result")
    read = read_settings(args)
    files.refuse_clashes({"--save_result": out, "--save_result (its sidecar)": results.sidecar_path(out),
                          **(extra_outputs or {})},
                         {"--datasets": data.dataset_files(args.datasets, read), "--pretrained_model": args.pretrained_model})
    results.read_results(out, result_columns)
    device = runtime.resolve_device(device_wanted(args))
    pretrained = checkpoints.load_encoder(args.pretrained_model, PRETRAIN_HINT)
    return out, device, pretrained, data.labelled_datasets(args.datasets, read)
