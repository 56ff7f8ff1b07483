"""What every script shares: flags defined once, logging and progress bars, seeding, the device.

Importing does nothing; scripts call these from their ``parse_args`` and ``main``.
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import data
import results
from model import CheckpointError, Encoder, encoder_from_checkpoint, load_checkpoint, model_normalize, represent

log = logging.getLogger("scpretrain")

DEFAULT_MODEL = data.REPO_DIR / "models" / "pretrained.pt"
RESULTS_DIR = data.REPO_DIR / "results"
PRETRAIN_HINT = "run `python main.py --is_pretrain --kmeans` first, or pass --pretrained_model FILE"


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


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
positive_float = _number_type(float, lambda v: bool(np.isfinite(v)) and v > 0, "a finite number > 0")  # rates
fraction = _number_type(float, lambda v: 0 < v < 1, "a number strictly between 0 and 1")  # shares of cells
non_negative_fraction = _number_type(float, lambda v: 0 <= v < 1, "a number in [0, 1)")  # dropout rates
kmeans_tolerance = _number_type(float, lambda v: v == -1 or 0 <= v < 1,
                                "a share of cells in [0, 1), or -1 for no early stop")  # --kmeans_tol
non_negative_float = _number_type(float, lambda v: bool(np.isfinite(v)) and v >= 0, "a finite number >= 0")


def log_level(text: str) -> str:
    level = str(text).upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"unknown level '{text}'; choose one of {', '.join(LOG_LEVELS)}")
    return level


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags shared by main.py, rf_svm_lr.py and clus.py (help shows each default)."""
    g = parser.add_argument_group("data and run")
    g.add_argument("--datasets", nargs="+", default=None,
                   help="Cell BLAST names (downloaded if missing), .h5/.h5ad paths or numpy folders; "
                        "'demo' = the embedded demo collection, 'paper' = the paper's 66 datasets (default: demo)")
    g.add_argument("--dataset_dir", default=str(data.DATASET_DIR), help="where Cell BLAST files live (default: %(default)s)")
    g.add_argument("--url_template", default=data.DEFAULT_URL_TEMPLATE,
                   help="download URL of a missing dataset, {name} is replaced (default: %(default)s)")
    g.add_argument("--label_key", default=data.DEFAULT_LABEL_KEY, help="obs column with cell types (default: %(default)s)")
    add_input_args(g)
    g.add_argument("--seed", type=non_negative_int, default=0,
                   help="seeds numpy, torch, splits and K-means (default: %(default)s)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto = cuda when available (default: %(default)s)")
    g.add_argument("--cuda", action="store_true", help="the original's flag: same as --device cuda")
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


def add_input_args(g) -> None:
    """How input files are read (h5ad values and gene symbols)."""
    g.add_argument("--layer", default=None,
                   help="h5ad only: take values from this layer ('X', 'raw' = raw.X, or a layers key); "
                        "default: the first of X, raw.X, layers named like 'counts' that holds raw values")
    g.add_argument("--gene_symbols", default=None,
                   help="h5ad only: var column holding gene symbols (default: var_names, or var['feature_name'] "
                        "when var_names are Ensembl IDs)")
    g.add_argument("--log_transformed", action="store_true",
                   help="the values are already log-normalised: use them as they are, no log1p "
                        "(h5ad: X unless --layer) (default: off)")


INPUT_OPTIONS = ("layer", "gene_symbols", "log_transformed")

# Named recipes: the paper's (the default, every value the original's) and "plus", the best
# combination measured on the data at hand with validation cells only (bench/README.md, the
# accuracy protocol). A flag given on the command line overrides its recipe's value.
RECIPES = {
    "paper": {"normalize": "none", "ft_batch_size": 5000, "ft_dropout": 0.0, "ft_weight_decay": 0.0,
              "ft_early_stop": "accuracy", "ft_linear_base": "none"},
    "plus": {"normalize": "cp10k", "ft_batch_size": 256, "ft_dropout": 0.2, "ft_weight_decay": 0.01,
             "ft_early_stop": "accuracy_then_loss", "ft_linear_base": "blend"},
}


def add_recipe_args(parser) -> None:
    g = parser.add_argument_group("recipe")
    g.add_argument("--recipe", choices=sorted(RECIPES), default="paper",
                   help="'paper' = the original's recipe (scPretrain: the default); 'plus' = "
                        + ", ".join(f"{k} {v}" for k, v in RECIPES["plus"].items())
                        + "; any flag given overrides its recipe value (default: %(default)s)")
    g.add_argument("--normalize", choices=data.NORMALIZATIONS, default=None,
                   help="features: log1p of raw values ('none', scPretrain) or of counts per 10,000 "
                        "('cp10k'); saved in checkpoints (default: the recipe's)")


def resolve_recipe(args) -> argparse.Namespace:
    """Fill every recipe-controlled flag left unset with the chosen recipe's value."""
    for key, value in RECIPES[args.recipe].items():
        if hasattr(args, key) and getattr(args, key) is None:
            setattr(args, key, value)
    return args


def input_options(args) -> dict:
    """The reading options of ``add_input_args`` as keyword arguments of ``data.read_any``."""
    return {key: getattr(args, key) for key in INPUT_OPTIONS}


def add_log_level_arg(parser) -> None:
    parser.add_argument("--log_level", type=log_level, default="INFO",
                        help=f"one of {', '.join(LOG_LEVELS)} (default: %(default)s)")


def check_split_fractions(parser: argparse.ArgumentParser, args) -> None:
    """Train and validation shares must leave test cells."""
    if args.per_train + args.per_val >= 1:
        parser.error(f"--per_train {args.per_train} + --per_val {args.per_val} must be < 1 (the rest are test cells)")


def check_output_file(path, flag: str) -> Path:
    """Before any data is read: ``path`` can be written as a file (not a folder; its folder exists
    or can be made, and takes a new file). Errors name the flag."""
    path = Path(path)
    if path.is_dir():
        raise data.DataError(f"{flag} {path}: is a folder; give a file path")
    check_output_dir(path.parent, flag, path)
    return path


def check_output_dir(folder, flag: str, shown=None) -> Path:
    """``folder`` exists or can be made, and a file can be created in it."""
    folder, shown = Path(folder), shown or folder
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as exc:
        raise data.DataError(f"{flag} {shown}: cannot write there ({exc.strerror or exc}); "
                             "choose a writable path") from None
    return folder


def run_script(run, args):
    """A script's ``main``: logging, seeds, then ``run(args)``. Exit status by convention: bad
    input or a bad checkpoint ends with its message and 1, Ctrl-C with one line and 130
    (argparse has already used 2 for a bad command line)."""
    setup_logging(getattr(args, "log_level", "INFO"))
    seed_everything(getattr(args, "seed", 0))
    flush_denormals()
    return_freed_memory()
    try:
        with logging_redirect_tqdm():
            return run(args)
    except (data.DataError, CheckpointError) as exc:
        log.error("%s", exc)
        sys.exit(1)
    except KeyboardInterrupt:
        log.error("interrupted; run the same command again to continue (finished results are kept%s)",
                  ", pre-training with --resume" if getattr(args, "is_pretrain", False) else "")
        sys.exit(130)


def progress(iterable=None, disable: bool = False, **kwargs):
    """A tqdm bar on a terminal only: on a log file, CI or nohup (stderr not a TTY) no bar frames
    are written, only the log lines."""
    return tqdm(iterable, disable=True if disable else None, **kwargs)


def peak_memory_mib() -> float | None:
    """This process's peak resident memory so far in MiB (None where the OS does not say)."""
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """glibc only: allocate blocks of ``threshold`` bytes and more with mmap, so that freeing one
    returns it to the system at once. Datasets are read whole and freed one by one as they are
    aligned; with glibc's default (a threshold that grows up to 32 MB as blocks are freed) about
    half of the freed memory stayed with the process and raised phase 1's peak (figures in
    bench/README.md). For reading: computing under it is slow (``reuse_freed_memory``). False
    (and nothing done) where there is no glibc."""
    return set_malloc_thresholds(mmap=threshold)


def reuse_freed_memory(threshold: int = 256 << 20) -> bool:
    """glibc only: from here on, let the process keep and reuse freed blocks below ``threshold``
    bytes (and up to twice that free at the top of its heap). Pre-training steps allocate and free
    the same tens of megabytes per dataset head again and again; under the reading threshold each
    came fresh from the system and was faulted in page by page. On the whole-collection benchmark
    (bench/README.md) a step took 1.57 s under 256 MiB and 1.96 s under 16 MiB (peaks 7,976 and
    7,691 MiB), and 2.4-3.9 s over its first steps under 1 MiB. False (and nothing done) where
    there is no glibc."""
    return set_malloc_thresholds(mmap=threshold, trim=2 * threshold)


def set_malloc_thresholds(mmap: int, trim: int | None = None) -> bool:
    libc = _libc()
    if libc is None:
        return False
    ok = bool(libc.mallopt(-3, int(mmap)))  # -3: M_MMAP_THRESHOLD
    return ok and (trim is None or bool(libc.mallopt(-1, int(trim))))  # -1: M_TRIM_THRESHOLD


def _libc():
    """glibc, or None where there is none (mallopt is glibc's)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 (must exist)
        return libc
    except (OSError, AttributeError):
        return None


def flush_denormals() -> None:
    """Treat subnormal floats as zero on the CPU, before any thread pool starts (threads inherit it).

    Saturated sigmoids make gradients subnormal (below 1.2e-38), and x86 arithmetic on those is
    many times slower; values that small change no weight of float32 magnitude, so results stay
    the same (figures in bench/README.md).
    """
    torch.set_flush_denormal(True)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, log_level(level)),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)


def resolve_device(args) -> torch.device:
    """cpu/cuda from ``--device``/``--cuda``; asking for cuda without a GPU warns and uses the CPU.

    Scripts call this once per run, so the warning is said once.
    """
    wanted = "cuda" if getattr(args, "cuda", False) else getattr(args, "device", "auto")
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if wanted == "cuda" and not torch.cuda.is_available():
        log.warning("--cuda/--device cuda asked for, but no CUDA GPU is available: running on the CPU")
        return torch.device("cpu")
    return torch.device(wanted)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def repeat_seeds(seed: int, fold1: int, fold2: int) -> list[int]:
    """One seed per repeat of the fold1 x fold2 grid, derived from ``--seed``."""
    return [seed * 1000 + i * fold2 + j for i in range(fold1) for j in range(fold2)]


def split_for(data_obj: data.CellData, seed: int, args):
    return data.split_cells(data_obj.n_cells, seed, args.per_train, args.per_val, args.max_tr_num, 1000)


def load_datasets(args, names: Sequence[str] | None = None) -> list[data.CellData]:
    return data.load_collection(names if names is not None else args.datasets, args.dataset_dir,
                                args.url_template, args.label_key, **input_options(args))


def load_pretrained(path) -> tuple[Encoder, np.ndarray, dict]:
    """The encoder, its gene universe and the whole checkpoint."""
    ckpt = load_checkpoint(path)
    encoder, _ = encoder_from_checkpoint(ckpt, path)
    return encoder.eval(), np.asarray(ckpt["gene_universe"], dtype=object), ckpt


def load_pretrained_or_explain(path):
    """``common.load_pretrained``, with the way to make a model when there is none."""
    if not Path(path).exists():
        raise CheckpointError(f"{path}: no pretrained model there; {PRETRAIN_HINT}")
    return load_pretrained(path)


def labelled_datasets(args) -> list[data.CellData]:
    """The labelled datasets of ``--datasets``, genes mapped, cells without a label dropped."""
    datasets = load_datasets(args)
    skipped = [d.name for d in datasets if not d.is_labelled]
    if skipped:
        log.info("unlabelled, left out: %s", ", ".join(skipped))
    labelled = with_two_classes([data.labelled_cells(d) for d in datasets if d.is_labelled])
    if not labelled:
        raise data.DataError("none of the chosen datasets is labelled with two or more cell types; "
                             "nothing to classify or cluster")
    return labelled


def with_two_classes(datasets: list[data.CellData]) -> list[data.CellData]:
    """The datasets with at least two cell types; the others are left out with a warning (one
    class gives no classification or clustering score worth a row)."""
    kept = []
    for d in datasets:
        n_types = len(np.unique(d.labels))
        if n_types < 2:
            log.warning("%s: one cell type only (%s); left out", d.name, d.labels[0])
            continue
        kept.append(d)
    return kept


def analysis_inputs(args, result_columns):
    """What rf_svm_lr.py and clus.py start from, in order: the result path (checked writable,
    and refused if it is a file that is not one of ours with ``result_columns``, before any data
    is read), the device, the pretrained encoder and its checkpoint, and the labelled datasets."""
    out = check_output_file(args.save_result, "--save_result")
    results.read_results(out, result_columns)
    device = resolve_device(args)
    encoder, _, ckpt = load_pretrained_or_explain(args.pretrained_model)
    return out, device, encoder, ckpt, labelled_datasets(args)


def dataset_representation(encoder: Encoder, ckpt: dict, dataset: data.CellData, device="cpu") -> np.ndarray:
    """The pretrained representation of every cell of a dataset whose genes are mapped (aligned
    to the encoder's gene universe, which logs the coverage), fed the features it was trained on."""
    aligned = data.align_to_universe(dataset, ckpt["gene_universe"])
    return represent(encoder, data.features(aligned, model_normalize(ckpt)), device=device)
