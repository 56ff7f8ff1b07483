"""Build the small cross-study pancreas pair shipped in dataset/ for the README's annotation quick
start, from the real files of ../shared/data/real/ (see its README for sources and licences).

    python bench/make_demo_pair.py            # writes dataset/pancreas_{reference,query}.h5ad and the label map

Reference: Baron et al. 2016 (inDrop), every cell, integer counts in X, labels ``cell_type1``.
Query: the four-study CELLxGENE file (Tosti 2021 single-nucleus, Fasolino 2022, Tritschler 2022,
Muraro 2016), a seeded sample of 300 cells per study (every cell of a smaller one), in its own
layout: Ensembl IDs in var_names, symbols in var['feature_name'], counts in raw.X, log-normalised
values in X, study in obs['Dataset'], Cell Ontology names in obs['cell_type']. Both keep the same
genes: the 4,000 most variable (by the reference's log1p CP10k dispersion) of the symbols both
hold, so the files stay small while the pair remains a cross-study task.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT.parent / "shared" / "data" / "real"
N_GENES, PER_STUDY, SEED = 4000, 300, 0


def variable_symbols(ref, shared: list[str], n: int) -> list[str]:
    X = sp.csr_matrix(ref[:, shared].X, dtype=np.float64)
    totals = np.asarray(ref.X.sum(1)).ravel()
    X = sp.diags(1e4 / np.maximum(totals, 1)) @ X
    X.data = np.log1p(X.data)
    mean = np.asarray(X.mean(0)).ravel()
    var = np.asarray(X.multiply(X).mean(0)).ravel() - mean ** 2
    dispersion = np.divide(var, mean, out=np.zeros_like(var), where=mean > 0)
    keep = np.argsort(-dispersion, kind="stable")[:n]
    return [shared[i] for i in sorted(keep)]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--real_dir", default=str(REAL))
    p.add_argument("--out_dir", default=str(ROOT / "dataset"))
    args = p.parse_args(argv)
    real, out = Path(args.real_dir), Path(args.out_dir)
    ref = anndata.read_h5ad(real / "baron_human_pancreas.h5ad")
    query = anndata.read_h5ad(real / "pancreas_4studies_cellxgene.h5ad")
    symbols = pd.Series(query.var["feature_name"].astype(str).to_numpy(), index=query.var_names)
    unique = symbols[~symbols.duplicated(keep=False)]
    shared = sorted(set(ref.var_names) & set(unique))
    genes = variable_symbols(ref, shared, N_GENES)
    by_symbol = pd.Series(unique.index, index=unique.to_numpy())
    ids = by_symbol.loc[genes].to_numpy()
    rng = np.random.default_rng(SEED)
    cells = np.concatenate([rng.choice(np.flatnonzero(query.obs["Dataset"] == study),
                                       min(PER_STUDY, int((query.obs["Dataset"] == study).sum())), replace=False)
                            for study in sorted(query.obs["Dataset"].unique())])
    small_ref = ref[:, genes].copy()
    small_ref.obs = small_ref.obs[["cell_type1", "cell_ontology_class", "donor"]]
    small_ref.X = sp.csr_matrix(small_ref.X, dtype=np.float32)
    small_ref.write_h5ad(out / "pancreas_reference.h5ad", compression="gzip")
    keep_ids = query.var_names.get_indexer(ids)
    raw = anndata.AnnData(X=sp.csr_matrix(query.raw.X[np.sort(cells)][:, keep_ids], dtype=np.float32),
                          var=query.raw.var.iloc[keep_ids].copy())
    small = query[np.sort(cells), ids].copy()
    small.obs = small.obs[["Dataset", "cell_type", "suspension_type", "assay"]]
    small.var = small.var[["feature_name"]]
    small.uns = {k: small.uns[k] for k in ("title", "schema_version") if k in small.uns}
    small.obsm = {}
    small.raw = raw
    small.write_h5ad(out / "pancreas_query.h5ad", compression="gzip")
    shutil.copyfile(real / "pancreas_label_map.csv", out / "pancreas_label_map.csv")
    print(f"reference {small_ref.shape}, query {small.shape} ({', '.join(f'{s}: {n}' for s, n in small.obs['Dataset'].value_counts().sort_index().items())})")


if __name__ == "__main__":
    main()
