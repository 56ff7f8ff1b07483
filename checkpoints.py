"""Checkpoints: the one writer and the one reader of every kind (encoder, classifier, resume).

A checkpoint is a dict of tensors, str, numbers, lists and dicts (``torch.load(...,
weights_only=True)`` reads it) that describes itself: ``kind``, ``format_version``, ``model``
(weights), ``model_args``, ``gene_universe`` (its genes in order), what it was fed (``values``,
``normalize``), and the run's ``config``. Every load validates the whole file before any data is
read: kind and version, required keys, model arguments, the gene list (as long as the weights,
unique), the weights (shapes, finite), classes and feeding; each error names the checkpoint.
What a model was fed is read here only (:func:`feeding`). Importing does nothing.
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from errors import CheckpointError
from files import atomic_write
from model import LINEAR_BASE_MODES, Classifier, Encoder, ModelConfig
from settings import NORMALIZATIONS
from values import LOG1P_VALUES, RAW_VALUES

log = logging.getLogger("scpretrain.checkpoints")

ENCODER_KIND = "scpretrain-encoder"
CLASSIFIER_KIND = "scpretrain-classifier"
RESUME_KIND = "scpretrain-resume"
FORMAT_VERSION = 1
NO_MODEL = "none"
RESERVED_LABELS = ("Unassigned", "Heterogeneous")  # annotate's own labels: never a class's
TRAIN_HINT = ("python annotate.py train --reference REF --label_key KEY --pretrained_model {path} "
              "--save_model models/NAME.pt")


# --------------------------------------------------------------------------- what a model was fed


@dataclass(frozen=True)
class Feeding:
    """What a model's input was made of: the values read (``raw``, turned into features by
    ``normalize``: log1p of raw values or of counts per 10,000) or ``log1p`` (fed as they are)."""

    values: str = RAW_VALUES
    normalize: str = "none"

    def describe(self) -> str:
        if self.values == LOG1P_VALUES:
            return "log-normalised values as given (--values log1p)"
        return "log1p of raw values (--normalize none)" if self.normalize == "none" else \
            f"log1p of raw values per 10,000 (--normalize {self.normalize})"


def feeding(ckpt: dict) -> Feeding:
    """What a checkpoint's model was fed (older checkpoints: raw values, the paper's none)."""
    return Feeding(str(ckpt.get("values", RAW_VALUES)), str(ckpt.get("normalize", "none")))


def check_feeding(model: Feeding, run: Feeding, model_path, allow: bool = False) -> None:
    """Refuse to feed a model other features than it was trained on, naming both; with ``allow``
    (``--allow_feature_mismatch``) go on with a WARNING."""
    if model == run:
        return
    message = (f"{model_path} was trained on {model.describe()}, but this run would feed it "
               f"{run.describe()}")
    if allow:
        log.warning("%s (allowed by --allow_feature_mismatch)", message)
        return
    raise CheckpointError(f"{message}; give the same --normalize (and values: --values, --layer), or pass "
                          "--allow_feature_mismatch to do so on purpose")


# --------------------------------------------------------------------------- writing


def _state(module: nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save(ckpt: dict, path) -> Path:
    """``torch.save`` to a temporary file renamed over ``path``: never a half-written checkpoint;
    a failed write is one OutputError and keeps the earlier file."""
    size = sum(t.numel() * t.element_size() for t in _tensors(ckpt))
    return atomic_write(path, lambda fh: torch.save(ckpt, fh), mode="wb", expected_bytes=size)


class BackgroundWriter:
    """Writes checkpoints with :func:`save` in a thread of their own, one at a time, so that
    training goes on while an epoch checkpoint is serialised and synced to disk (0.5-0.8 s an
    epoch on a local disk for the whole collection's 140 MB; more on a network file system).

    The checkpoint handed over must not change afterwards (tensors cloned, lists fresh).
    ``submit`` first waits for the write before it and raises that write's error; ``finish``
    waits for the last one and raises its error; ``finish(quiet=True)`` logs the error instead
    (for a run already stopping with another)."""

    def __init__(self):
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, ckpt: dict, path) -> None:
        self.finish()
        self._thread = threading.Thread(target=self._write, args=(ckpt, Path(path)), name="checkpoint-writer")
        self._thread.start()

    def _write(self, ckpt: dict, path: Path) -> None:
        try:
            save(ckpt, path)
        except BaseException as exc:  # raised by the next submit or finish, in the caller's thread
            self._error = exc

    def finish(self, quiet: bool = False) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None and quiet:
            log.error("%s", error)
        elif error is not None:
            raise error


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def encoder_checkpoint(encoder: Encoder, cfg: ModelConfig, gene_universe: Sequence[str], *, fed: Feeding,
                       phase: int, epoch: int, losses: Sequence[float], datasets: Sequence[str],
                       config: dict) -> dict:
    """The self-describing encoder checkpoint of a pre-training run."""
    losses = [float(v) for v in losses]
    return {
        "kind": ENCODER_KIND,
        "format_version": FORMAT_VERSION,
        "model": _state(encoder),
        "model_args": asdict(cfg),
        "gene_universe": [str(g) for g in gene_universe],
        "values": fed.values,
        "normalize": fed.normalize,
        "phase": int(phase),
        "epoch": int(epoch),
        "loss": losses[-1] if losses else float("nan"),
        "losses": losses,
        "datasets": [str(d) for d in datasets],
        "config": config,
    }


def classifier_checkpoint(clf: Classifier, genes: Sequence[str], classes: Sequence[str], *, fed: Feeding,
                          label_key: str, info: dict) -> dict:
    """A trained classifier, self-describing: weights, its genes in order, its classes in order,
    what it was fed, and ``info`` (reference, validation, calibration, training settings, ...)."""
    return {
        **info,
        "kind": CLASSIFIER_KIND,
        "format_version": FORMAT_VERSION,
        "model": _state(clf),
        "model_args": {"n_genes": clf.encoder.linear.in_features, "hid": clf.encoder.linear.out_features,
                       "n_classes": clf.out.out_features, "linear_base": clf.base_mode or "none"},
        "gene_universe": [str(g) for g in genes],
        "classes": [str(c) for c in classes],
        "label_key": str(label_key),
        "values": fed.values,
        "normalize": fed.normalize,
    }


def resume_checkpoint(weights: dict, optimizer: dict, progress: dict, labels, datasets: Sequence[str],
                      gene_universe: Sequence[str], settings: dict, phase: int) -> dict:
    """Everything an interrupted pre-training run needs to go on as if it had not stopped: every
    parameter and its optimiser state by name, in the whole collection's layout (heads named by
    their dataset's place in it), whatever the number of ranks that wrote it."""
    return {
        "kind": RESUME_KIND,
        "format_version": FORMAT_VERSION,
        "model": weights,
        "optimizer": optimizer,
        **progress,
        "pseudo_labels": [[torch.as_tensor(lab) for lab in per_d] for per_d in labels],
        "datasets": list(datasets),
        "gene_universe": [str(g) for g in gene_universe],
        "phase": int(phase),
        "settings": settings,
    }


# --------------------------------------------------------------------------- reading and checking


def load(path, kind: str = ENCODER_KIND) -> dict:
    """A checkpoint of ``kind``, read with ``weights_only=True`` and validated completely."""
    ckpt = _read(path)
    found = ckpt.get("kind") if isinstance(ckpt, dict) else type(ckpt).__name__
    if found != kind:
        if kind == CLASSIFIER_KIND and found == ENCODER_KIND:
            raise CheckpointError(f"{path}: is a pretrained encoder, not a classifier; train one first: "
                                  + TRAIN_HINT.format(path=path))
        raise CheckpointError(f"{path}: expected a '{kind}' checkpoint, found '{found}'")
    version = ckpt.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer version (format {version}); update scPretrain")
    if kind == ENCODER_KIND:
        validate_encoder(ckpt, path)
    elif kind == CLASSIFIER_KIND:
        validate_classifier(ckpt, path)
    else:
        validate_resume(ckpt, path)
    return ckpt


def _read(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint not found")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt files and refused payloads
        raise CheckpointError(f"{path}: not a readable scPretrain checkpoint ({type(exc).__name__}: "
                              f"{str(exc)[:300]})") from None


def _require(ckpt: dict, keys: Sequence[str], path) -> None:
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: lacks {missing}; the checkpoint is damaged or not from scPretrain; "
                              "make it again")


def _positive_int(args: dict, key: str, path) -> int:
    value = args.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise CheckpointError(f"{path}: model_args['{key}'] must be a whole number >= 1, got {value!r}; the "
                              "checkpoint is damaged; make it again")
    return int(value)


def _check_gene_list(genes, n_genes: int, path) -> None:
    if not isinstance(genes, (list, tuple)) or not all(isinstance(g, str) and g for g in genes):
        raise CheckpointError(f"{path}: 'gene_universe' must be a list of gene symbols; the checkpoint is damaged")
    if len(genes) != n_genes:
        raise CheckpointError(f"{path}: its gene list has {len(genes)} genes but its weights {n_genes}; every "
                              "gene would take another's weights: the checkpoint is damaged; make it again")
    if len(set(genes)) != len(genes):
        repeated = [g for g in dict.fromkeys(genes) if genes.count(g) > 1][:3]
        raise CheckpointError(f"{path}: its gene list repeats genes (e.g. {repeated}); the checkpoint is damaged")


def _check_feeding_keys(ckpt: dict, path) -> None:
    fed = feeding(ckpt)
    if fed.values not in (RAW_VALUES, LOG1P_VALUES):
        raise CheckpointError(f"{path}: 'values' is {fed.values!r}, not one of {RAW_VALUES}, {LOG1P_VALUES}")
    if fed.normalize not in NORMALIZATIONS:
        raise CheckpointError(f"{path}: 'normalize' is {fed.normalize!r}, not one of {list(NORMALIZATIONS)}")


def check_weights(module: nn.Module, state, source) -> None:
    """Load a checkpoint's weights into ``module`` (built from its ``model_args``); missing,
    unexpected, wrongly shaped and non-finite weights are one CheckpointError naming ``source``."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source}: no 'model' weights in the checkpoint; make it again")
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    problems = [f"missing {sorted(set(expected) - set(found))}"] if set(expected) - set(found) else []
    problems += [f"unexpected {sorted(set(found) - set(expected))}"] if set(found) - set(expected) else []
    problems += [f"'{k}' has shape {found[k]}, its model_args need {shape}"
                 for k, shape in expected.items() if k in found and found[k] != shape]
    if problems:
        raise CheckpointError(f"{source}: weights do not match the checkpoint's model_args: {'; '.join(problems)}; "
                              "the checkpoint is damaged; make it again")
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source}: weights {bad} hold NaN or infinite values (a diverged or damaged "
                              "model); make it again")
    try:
        module.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{source}: weights cannot be loaded ({exc}); the checkpoint is damaged; "
                              "make it again") from None


def encoder_from(ckpt: dict, source="checkpoint") -> tuple[Encoder, ModelConfig]:
    """The encoder a (validated) checkpoint describes, its weights loaded and checked."""
    args = ckpt.get("model_args")
    try:
        cfg = ModelConfig(**args)
        if not isinstance(cfg.sigmoid_logits, bool):
            raise TypeError(f"sigmoid_logits must be true or false, got {cfg.sigmoid_logits!r}")
        encoder = Encoder(_positive_int(args, "n_genes", source), _positive_int(args, "hid", source))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{source}: 'model_args' missing or not valid ({type(exc).__name__}: {exc}); "
                              "the checkpoint is damaged or not from scPretrain; make it again") from None
    check_weights(encoder, ckpt.get("model"), source)
    return encoder.eval(), cfg


def validate_encoder(ckpt: dict, path) -> None:
    _require(ckpt, ("model", "model_args", "gene_universe"), path)
    if not isinstance(ckpt["model_args"], dict):
        raise CheckpointError(f"{path}: 'model_args' must be a dict; the checkpoint is damaged")
    n_genes = _positive_int(ckpt["model_args"], "n_genes", path)
    _check_gene_list(ckpt["gene_universe"], n_genes, path)
    _check_feeding_keys(ckpt, path)
    encoder_from(ckpt, path)


def classifier_from(ckpt: dict, source="checkpoint") -> Classifier:
    """The classifier a (validated) checkpoint describes, its weights loaded and checked."""
    args = ckpt.get("model_args")
    base = str(args.get("linear_base", "none")) if isinstance(args, dict) else "none"
    if base != "none" and base not in LINEAR_BASE_MODES:
        raise CheckpointError(f"{source}: model_args['linear_base'] is {base!r}, not one of none, "
                              f"{', '.join(LINEAR_BASE_MODES)}")
    try:
        clf = Classifier(_positive_int(args, "n_genes", source), _positive_int(args, "n_classes", source),
                         _positive_int(args, "hid", source), linear_base=None if base == "none" else base)
    except (AttributeError, TypeError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{source}: 'model_args' missing or not valid ({type(exc).__name__}: {exc}); "
                              "the checkpoint is damaged or not from scPretrain; train it again") from None
    check_weights(clf, ckpt.get("model"), source)
    if clf.base is not None and not 0 <= float(clf.base_share) <= 1:
        raise CheckpointError(f"{source}: its linear base's share {float(clf.base_share)} is not in [0, 1]")
    return clf.eval()


def validate_classifier(ckpt: dict, path) -> None:
    _require(ckpt, ("model", "model_args", "gene_universe", "classes", "label_key", "reference"), path)
    if not isinstance(ckpt["model_args"], dict):
        raise CheckpointError(f"{path}: 'model_args' must be a dict; the checkpoint is damaged")
    n_genes = _positive_int(ckpt["model_args"], "n_genes", path)
    n_classes = _positive_int(ckpt["model_args"], "n_classes", path)
    _check_gene_list(ckpt["gene_universe"], n_genes, path)
    classes = ckpt["classes"]
    if not isinstance(classes, (list, tuple)) or not all(isinstance(c, str) and c for c in classes):
        raise CheckpointError(f"{path}: 'classes' must be a list of class names; the checkpoint is damaged")
    if len(classes) != n_classes or len(set(classes)) != len(classes):
        raise CheckpointError(f"{path}: its {len(classes)} classes ({len(set(classes))} distinct) disagree with "
                              f"its {n_classes} outputs; the checkpoint is damaged")
    reserved = sorted(set(classes) & set(RESERVED_LABELS))
    if reserved:
        raise CheckpointError(f"{path}: has a class named {reserved}, which predict uses for its own labels")
    if not isinstance(ckpt["reference"], dict) or "name" not in ckpt["reference"]:
        raise CheckpointError(f"{path}: 'reference' must describe the reference (name, cells, ...)")
    temperature = ckpt.get("calibration", {}).get("temperature", 1.0) if isinstance(ckpt.get("calibration", {}), dict) \
        else None
    if not isinstance(temperature, (int, float)) or not np.isfinite(temperature) or temperature <= 0:
        raise CheckpointError(f"{path}: its calibration temperature {temperature!r} is not a finite number > 0")
    means = ckpt.get("gene_means")
    if means is not None and (not isinstance(means, torch.Tensor) or means.shape != (n_genes,)
                              or not bool(torch.isfinite(means).all())):
        raise CheckpointError(f"{path}: 'gene_means' must be {n_genes} finite numbers, one per gene")
    _check_feeding_keys(ckpt, path)
    classifier_from(ckpt, path)


def validate_resume(ckpt: dict, path) -> None:
    _require(ckpt, ("model", "optimizer", "pseudo_labels", "settings", "phase", "epoch", "losses"), path)
    if not isinstance(ckpt["settings"], dict):
        raise CheckpointError(f"{path}: written by an older version without its settings; delete it or run "
                              "without --resume")


@dataclass
class LoadedEncoder:
    """A pretrained encoder with its gene universe and whole (validated) checkpoint."""

    encoder: Encoder
    gene_universe: np.ndarray
    ckpt: dict
    path: Path

    @property
    def fed(self) -> Feeding:
        return feeding(self.ckpt)

    @property
    def digest(self) -> str:
        return model_digest(self.ckpt)


def load_encoder(path, hint: str = "") -> LoadedEncoder:
    """An encoder checkpoint, validated; a missing file says how to make one (``hint``)."""
    path = Path(path)
    if hint and not path.exists():
        raise CheckpointError(f"{path}: no pretrained model there; {hint}")
    return loaded_encoder(load(path, ENCODER_KIND), path)


def loaded_encoder(ckpt: dict, path) -> LoadedEncoder:
    """An encoder checkpoint already in memory (validated by ``load``, or just made by pre-training)
    as a ``LoadedEncoder``; ``path`` names it in messages."""
    encoder, _ = encoder_from(ckpt, path)
    return LoadedEncoder(encoder, np.asarray(ckpt["gene_universe"], dtype=object), ckpt, Path(path))


def load_classifier(path) -> tuple[Classifier, dict]:
    """A classifier checkpoint, validated; an encoder checkpoint gets the way to make a classifier."""
    ckpt = load(path, CLASSIFIER_KIND)
    return classifier_from(ckpt, path), ckpt


def model_digest(ckpt: dict | None) -> str:
    """Digest of what a checkpoint computes: its weights, gene universe, model arguments, classes
    and normalisation (not where it was saved or how long it took), or "none" without one."""
    if ckpt is None:
        return NO_MODEL
    h = hashlib.sha256()
    for key in sorted(ckpt["model"]):
        tensor = ckpt["model"][key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.to(torch.float32).numpy().tobytes())
    h.update(json.dumps([list(ckpt.get("gene_universe", [])), ckpt.get("model_args", {}),
                         ckpt.get("classes", []), ckpt.get("normalize", "none")], sort_keys=True, default=str).encode())
    return h.hexdigest()[:12]
