"""Calibration of ``conf_score`` (prints figures; not a test): the expected calibration error (ECE,
15 equal-width bins of the best label's probability) before and after annotate's temperature
scaling, on the reference's validation cells (as the checkpoint records it) and on a query from
other studies (scored through a label map: a best label with no counterpart counts as wrong).

    python bench/bench_calibration.py                     # the embedded pair and the real baron -> 4-study pair
    python bench/bench_calibration.py --pairs demo

Each pair is trained with annotate's defaults (``annotate.train`` with the query, as ``transfer``)
and labelled twice: with the stored temperature, and with the temperature set to 1 (the softmax
as it is). The best labels are the same; only the confidence moves.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

REAL = ROOT.parent / "shared" / "data" / "real"
PAIRS = {
    "demo": (ROOT / "dataset" / "pancreas_reference.h5ad", "cell_type1", ROOT / "dataset" / "pancreas_query.h5ad",
             "cell_type", ROOT / "dataset" / "pancreas_label_map.csv"),
    "baron>pancreas4": (REAL / "baron_human_pancreas.h5ad", "cell_type1", REAL / "pancreas_4studies_cellxgene.h5ad",
                        "cell_type", REAL / "pancreas_label_map.csv"),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def query_rows(labelled, given: np.ndarray, label_map: dict) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, right) on the query cells whose given label some model label maps to."""
    scored = np.isin(given, list(set(label_map.values())))
    predicted = labelled.obs["predicted_labels"].astype(str).to_numpy()[scored]
    right = np.array([label_map.get(p) == g for p, g in zip(predicted, given[scored])])
    return labelled.obs["conf_score"].to_numpy(np.float64)[scored], right


def main(args) -> list[dict]:
    import anndata

    import annotate
    import runtime
    import scoring
    from annotation import calibration_error

    runtime.set_up_process("WARNING", args.seed)
    rows = []
    for name in args.pairs:
        ref_path, ref_key, query_path, query_key, map_path = PAIRS[name]
        reference, query = anndata.read_h5ad(ref_path), anndata.read_h5ad(query_path)
        model = annotate.train(reference, label_key=ref_key, query=query, seed=args.seed)
        given = query.obs[query_key].astype(str).to_numpy()
        label_map = scoring.read_label_map(map_path)
        calibration = dict(model.ckpt["calibration"])
        after = query_rows(annotate.annotate(query, model), given, label_map)
        model.ckpt["calibration"] = {**calibration, "temperature": 1.0}
        before = query_rows(annotate.annotate(query, model), given, label_map)
        row = {"pair": name, "temperature": round(calibration["temperature"], 3),
               "validation cells": calibration["n_cells"],
               "validation ECE before": round(calibration["ece_before"], 4),
               "validation ECE after": round(calibration["ece_after"], 4),
               "query cells scored": int(len(after[1])), "query accuracy": round(float(after[1].mean()), 4),
               "query mean conf before": round(float(before[0].mean()), 4),
               "query mean conf after": round(float(after[0].mean()), 4),
               "query ECE before": round(calibration_error(*before), 4),
               "query ECE after": round(calibration_error(*after), 4)}
        rows.append(row)
        print(row, flush=True)
    return rows


if __name__ == "__main__":
    main(parse_args())
