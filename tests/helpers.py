"""Tiny fixtures the tests build themselves: toy counts and Cell BLAST .h5 files."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import scipy.sparse as sp


def toy_counts(n_cells: int = 120, n_genes: int = 60, n_types: int = 3, seed: int = 0):
    """Negative-binomial-like counts whose mean depends on the cell type; returns (X dense, type codes)."""
    rng = np.random.default_rng(seed)
    types = rng.integers(0, n_types, n_cells)
    profile = rng.gamma(0.6, 2.0, size=(n_types, n_genes))
    mean = profile[types] * rng.uniform(0.5, 1.5, size=(n_cells, 1))
    counts = rng.poisson(rng.gamma(2.0, mean / 2.0)).astype(np.float32)
    # real counts always reach past the largest log-normalised value somewhere (a highly expressed
    # gene); whole numbers that never do are ambiguous to the readers (values.value_kind)
    counts[0, 0] = max(counts[0, 0], 25.0)
    return counts, types


def gene_names(n: int, species: str = "human", prefix: str = "GENE") -> list[str]:
    names = [f"{prefix}{i}" for i in range(n)]
    return [g.capitalize() for g in names] if species == "mouse" else names


def write_cellblast_h5(path, X, genes, labels=None, cells=None, dense: bool = False, label_key: str = "cell_ontology_class"):
    """Write the Cell BLAST layout: exprs (CSR group or dense), byte-string var/obs names, obs columns."""
    path = Path(path)
    X = sp.csr_matrix(X, dtype=np.float32)
    cells = cells if cells is not None else [f"c{i}" for i in range(X.shape[0])]
    with h5py.File(path, "w") as h5:
        if dense:
            h5["exprs"] = X.toarray()
        else:
            g = h5.create_group("exprs")
            g["data"], g["indices"], g["indptr"] = X.data, X.indices.astype(np.int32), X.indptr.astype(np.int64)
            g["shape"] = np.array(X.shape, dtype=np.int64)
        h5["var_names"] = np.array([s.encode() for s in genes])
        h5["obs_names"] = np.array([str(s).encode() for s in cells])
        obs = h5.create_group("obs")
        if labels is not None:
            obs[label_key] = np.array([str(s).encode() for s in labels])
    return path


def toy_dataset_file(path, n_cells=120, n_genes=60, n_types=3, seed=0, species="human", labelled=True, **kw):
    X, types = toy_counts(n_cells, n_genes, n_types, seed)
    labels = np.array([f"type_{t}" for t in types]) if labelled else None
    return write_cellblast_h5(path, X, gene_names(n_genes, species), labels, **kw)


def toy_collection(root) -> list[str]:
    """Two labelled human datasets and an unlabelled mouse one, genes overlapping."""
    root = Path(root)
    paths = [
        toy_dataset_file(root / "alpha.h5", n_cells=150, n_genes=50, n_types=3, seed=1),
        toy_dataset_file(root / "beta.h5", n_cells=120, n_genes=40, n_types=4, seed=2),
        toy_dataset_file(root / "gamma.h5", n_cells=90, n_genes=45, seed=3, species="mouse", labelled=False),
    ]
    return [str(p) for p in paths]


def launched_vs_single(base: list, launcher: list, tmp_path, cwd, timeout: int = 300):
    """Pre-train once in one process and once under ``launcher`` (a torchrun command line);
    returns both checkpoints (one process first)."""
    import os
    import subprocess
    import sys

    from checkpoints import load as load_checkpoint

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, *base, "--save_model", str(Path(tmp_path) / "one.pt")], cwd=cwd,
                            env=env, capture_output=True, text=True, timeout=timeout)
    assert single.returncode == 0, single.stderr[-2000:]
    launched = subprocess.run([*launcher, *base, "--save_model", str(Path(tmp_path) / "launched.pt")], cwd=cwd,
                              env=env, capture_output=True, text=True, timeout=timeout)
    assert launched.returncode == 0, launched.stderr[-2000:]
    return load_checkpoint(Path(tmp_path) / "one.pt"), load_checkpoint(Path(tmp_path) / "launched.pt")


def save_encoder(path, encoder, universe, hid=None, fed=None, datasets=("toy",)):
    """An encoder checkpoint as pre-training writes it, for fixtures; returns the path."""
    import checkpoints
    from model import ModelConfig

    cfg = ModelConfig(n_genes=len(universe), hid=hid or encoder.linear.out_features)
    ckpt = checkpoints.encoder_checkpoint(encoder, cfg, list(universe), fed=fed or checkpoints.Feeding(), phase=1,
                                          epoch=1, losses=[1.0], datasets=list(datasets), config={})
    checkpoints.save(ckpt, path)
    return path
