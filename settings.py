"""Small frozen settings objects: what each library function needs, built once from the command
line by each script (or by hand from Python), never the command line's ``args`` itself.

The fields that change a run's numbers are declared here once. Run identities (result CSVs) and
the resume check of pre-training derive their setting lists from these fields: a field made with
:func:`run_field` changes no number (where files are, the device's float rounding, how long a run
may go on) and is left out; every other field is in. Importing does nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

DEFAULT_LABEL_KEY = "cell_ontology_class"
NORMALIZATIONS = ("none", "cp10k")
BATCH_FORMATS = ("auto", "sparse", "dense")
EARLY_STOP = ("accuracy", "loss", "accuracy_then_loss")
LINEAR_BASES = ("none", "residual", "blend")
CHOSEN = -1.0  # a linear-base value chosen on the validation cells rather than fixed
KMEANS_INPUTS = ("log1p", "raw")


def run_field(default=None, **kwargs):
    """A setting that changes no number of the run (left out of its identity)."""
    return field(default=default, metadata={"identity": False}, **kwargs)


class Settings:
    """Mixin of the settings dataclasses: built from a namespace, and their identity."""

    @classmethod
    def from_args(cls, args, **overrides):
        """The settings whose fields are attributes of ``args`` (an argparse namespace or any
        object); fields ``args`` lacks keep their defaults; ``overrides`` win over both."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        values.update(overrides)
        return cls(**values)

    def identity(self) -> dict:
        """The fields that change the numbers, by name (see the module)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("identity", True)}

    def with_(self, **changes):
        return replace(self, **changes)


def identity(*settings: Settings, drop: tuple[str, ...] = ()) -> dict:
    """The merged identity of several settings objects (a name in two of them must agree)."""
    merged: dict = {}
    for s in settings:
        for name, value in s.identity().items():
            if name in drop:
                continue
            if name in merged and merged[name] != value:
                raise ValueError(f"setting '{name}' differs between {type(s).__name__} and another: "
                                 f"{merged[name]!r} vs {value!r}")
            merged[name] = value
    return merged


@dataclass(frozen=True)
class ReadSettings(Settings):
    """How input files are read (h5ad values and gene symbols; every format's values)."""

    label_key: str = DEFAULT_LABEL_KEY
    layer: str | None = None
    gene_symbols: str | None = None
    values: str = "auto"  # auto (from the evidence), raw or log1p (--values, --log_transformed)
    # where Cell BLAST names are found or downloaded to, and from where
    dataset_dir: str | None = run_field()
    url_template: str | None = run_field()

    def reader_options(self) -> dict:
        """Keyword arguments of ``data.read_any`` (besides the label key)."""
        return {"layer": self.layer, "gene_symbols": self.gene_symbols, "values": self.values}


@dataclass(frozen=True)
class SplitSettings(Settings):
    """scPretrain: the sweep's split sizes (0.6 n up to 1000 train, 0.1 n up to 1000 validation)."""

    per_train: float = 0.6
    per_val: float = 0.1
    max_tr_num: int = 1000
    max_val: int = run_field(1000)  # fixed by the paper; not a flag


@dataclass(frozen=True)
class PretrainSettings(Settings):
    """Phase 1 and phase 2 of K-means pseudo-label multi-task pre-training."""

    normalize: str = "none"
    hid: int = 200
    pt_lr: float = 1e-4
    batch_num: int = 30
    avg_cluster_num: int = 100
    kmeans_iter: int = 20
    kmeans_tol: float = 0.0
    kmeans_on: str = "log1p"
    kmeans_max_cells: int = 0
    sigmoid_logits: bool = True  # scPretrain: the heads' sigmoid(logits) go into cross-entropy
    seed: int = 0
    pretrain_output: bool = False  # phase 2: cluster the phase-1 encoder's output
    # may be extended on --resume
    pt_epoch: int = run_field(50)
    pt_patience: int = run_field(5)
    batch_format: str = run_field("auto")  # CSR or dense products: float rounding only

    @property
    def phase(self) -> int:
        return 2 if self.pretrain_output else 1

    @classmethod
    def from_args(cls, args, **overrides):
        if hasattr(args, "no_sigmoid_logits"):
            overrides.setdefault("sigmoid_logits", not args.no_sigmoid_logits)
        return super().from_args(args, **overrides)


@dataclass(frozen=True)
class ClassifierSettings(Settings):
    """The cell-type classifier's training (the sweep's and annotation's)."""

    hid: int = 200
    normalize: str = "none"
    ft_lr: float = 0.002
    ft_batch_size: int = 5000
    ft_epoch: int = 500
    patience: int = 30
    ft_dropout: float = 0.0
    ft_weight_decay: float = 0.0
    ft_early_stop: str = "accuracy"
    ft_linear_base: str = "none"
    ft_linear_c: float = CHOSEN  # the linear base's C; CHOSEN: from classifier.LINEAR_C_GRID on the validation cells
    ft_blend_share: float = CHOSEN  # the base's share in a blend; CHOSEN: from classifier.BLEND_SHARES likewise
    ft_batch_format: str = run_field("auto")  # CSR or dense products: float rounding (and dropout draws)

    def identity(self) -> dict:
        found = super().identity()
        for name in ("ft_linear_c", "ft_blend_share"):  # only where they are used and fixed
            if found[name] == CHOSEN or self.ft_linear_base == "none" or (
                    name == "ft_blend_share" and self.ft_linear_base != "blend"):
                found.pop(name)
        return found


@dataclass(frozen=True)
class SweepSettings(Settings):
    """The fine-tuning sweep: PCA inputs and repeats (each row carries its own seed)."""

    pca_ft: bool = False
    pca_dim: int = 500
    seed: int = run_field(0)
    fold1: int = run_field(1)
    fold2: int = run_field(1)

    def identity(self) -> dict:
        found = super().identity()
        if not self.pca_ft:
            found.pop("pca_dim")  # used only with --pca_ft
        return found


@dataclass(frozen=True)
class OffshelfSettings(Settings):
    """rf_svm_lr.py: PCA features against the pretrained representation (the classifier is a column)."""

    normalize: str = "none"
    pca_dim: int = 200
    clf: str = run_field("svm")


@dataclass(frozen=True)
class ClusterSettings(Settings):
    """clus.py: K-means on PCA features and on the pretrained representation."""

    normalize: str = "none"
    pca_dim: int = 50
    pca_fit_cells: int = 10000
    n_seeds: int = run_field(10)


@dataclass(frozen=True)
class AnnotateSettings(Settings):
    """Training a classifier for annotation, beyond the classifier's own settings."""

    per_val: float = 0.1  # validation share of the reference (at most 1000 cells)
    max_cells_per_type: int = 0  # 0: every cell; else a seeded sample of at most this many per type
    calibrate: bool = True  # temperature scaling of the probabilities on the validation cells
    seed: int = 0


MODES = ("best_match", "prob_match")


@dataclass(frozen=True)
class PredictSettings(Settings):
    """Labelling a query: CellTypist's modes and majority voting."""

    mode: str = "best_match"  # every cell its best label; prob_match: every label at or above p_thres
    p_thres: float = 0.5
    majority_voting: bool = False
    over_clustering: str | None = None  # an obs column to vote in (default: K-means on the representation)
    n_clusters: int | None = None
    min_prop: float = 0.0
    chunk_cells: int = 8192
    seed: int = 0
