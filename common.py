"""What every script shares: flags defined once, logging, seeding, the device, representations.

Importing does nothing; scripts call these from their ``parse_args`` and ``main``.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

import data
from model import CheckpointError, Encoder, encoder_from_checkpoint, load_checkpoint

log = logging.getLogger("scpretrain")

DEFAULT_MODEL = data.REPO_DIR / "models" / "pretrained.pt"
RESULTS_DIR = data.REPO_DIR / "results"
PRETRAIN_HINT = "run `python main.py --is_pretrain --kmeans` first, or pass --pretrained_model FILE"


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
    g.add_argument("--seed", type=int, default=0, help="seeds numpy, torch, splits and K-means (default: %(default)s)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="auto = cuda when available (default: %(default)s)")
    g.add_argument("--cuda", action="store_true", help="the original's flag: same as --device cuda")
    g.add_argument("--hid", type=int, default=200, help="encoder width (default: %(default)s)")
    g.add_argument("--fold1", type=int, default=1, help="outer repeats (default: %(default)s)")
    g.add_argument("--fold2", type=int, default=1, help="inner repeats; fold1 x fold2 seeded repeats (default: %(default)s)")
    g.add_argument("--per_train", type=float, default=0.6, help="training share of cells (default: %(default)s)")
    g.add_argument("--per_val", type=float, default=0.1, help="validation share of cells (default: %(default)s)")
    g.add_argument("--max_tr_num", type=int, default=1000, help="at most this many training cells (default: %(default)s)")
    g.add_argument("--log_level", default="INFO", help="logging level (default: %(default)s)")
    return parser


def run_script(run, args):
    """A script's ``main``: logging, seeds, then ``run(args)``; bad input or a bad checkpoint
    ends the program with its message and exit code 2 instead of a traceback."""
    setup_logging(getattr(args, "log_level", "INFO"))
    seed_everything(getattr(args, "seed", 0))
    flush_denormals()
    try:
        return run(args)
    except (data.DataError, CheckpointError) as exc:
        log.error("%s", exc)
        sys.exit(2)


def flush_denormals() -> None:
    """Treat subnormal floats as zero on the CPU, before any thread pool starts (threads inherit it).

    Saturated sigmoids make gradients subnormal (below 1.2e-38), and arithmetic on those runs
    tens of times slower on x86: fine-tuning on oligodendroglioma went 2-6x faster with this,
    with the same results. Values that small change no weight of float32 magnitude.
    """
    torch.set_flush_denormal(True)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, str(level).upper(), logging.INFO),
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
                                args.url_template, args.label_key)


def load_pretrained(path) -> tuple[Encoder, np.ndarray, dict]:
    """The encoder, its gene universe and the whole checkpoint."""
    ckpt = load_checkpoint(path)
    encoder, _ = encoder_from_checkpoint(ckpt)
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
    labelled = [data.labelled_cells(d) for d in datasets if d.is_labelled]
    if not labelled:
        raise data.DataError("none of the chosen datasets is labelled; nothing to classify or cluster")
    return labelled


@torch.no_grad()
def encode_cells(encoder: Encoder, X, batch_size: int = 4096, device="cpu", log1p: bool = True) -> np.ndarray:
    """``sigmoid(encoder(log1p x))`` for every row of a CSR matrix aligned to the encoder's genes."""
    encoder = encoder.to(device).eval()
    out = []
    for rows in data.iter_batches(X.shape[0], batch_size):
        batch = torch.from_numpy(data.densify_log1p(X, rows, log=log1p)).to(device, non_blocking=True)
        out.append(encoder(batch).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, encoder.linear.out_features), np.float32)


def representations(encoder: Encoder, universe: np.ndarray, dataset: data.CellData, device="cpu") -> np.ndarray:
    """Pretrained representation of a dataset whose genes are mapped; logs the coverage."""
    aligned = data.align_to_universe(dataset, universe)
    return encode_cells(encoder, aligned.X, device=device)


def args_to_dict(args) -> dict:
    """The run's arguments as JSON-able values (for checkpoints and result sidecars)."""
    out = {}
    for key, value in vars(args).items():
        out[key] = str(value) if isinstance(value, Path) else value
    return json.loads(json.dumps(out, default=str))


def write_args_json(args, csv_path) -> Path:
    path = Path(str(csv_path) + ".args.json")
    data.atomic_write(path, lambda fh: json.dump(args_to_dict(args), fh, indent=2, sort_keys=True))
    return path
