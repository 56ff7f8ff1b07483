"""Speed and memory of ``annotate.py predict`` on a large synthetic query (prints figures; not a test).

    python bench/bench_annotate.py                          # 1,000,000 cells x 17,000 genes, 5 % non-zero
    python bench/bench_annotate.py --cells 100000           # a smaller run
    python bench/bench_annotate.py --device cuda            # the forward pass on a GPU

Writes (once, reused) a Cell BLAST .h5 query with ``synth.py``'s count model, and a classifier
checkpoint over its genes (random weights: speed does not depend on them). Then, in a fresh
process, runs exactly the prediction path of ``annotate.py predict`` (read, map genes, look the
genes up in the model's, the chunked sparse forward pass, labels and confidence) and prints the
time of each part, cells/s, the query's CSR size and the peak resident memory.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

import synth  # noqa: E402
import values
import runtime


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=1_000_000, help="query cells (default: %(default)s)")
    p.add_argument("--genes", type=int, default=17000, help="query genes (default: %(default)s)")
    p.add_argument("--density", type=float, default=0.05, help="share of non-zeros (default: %(default)s)")
    p.add_argument("--classes", type=int, default=30, help="classifier classes (default: %(default)s)")
    p.add_argument("--chunk_cells", type=int, default=8192, help="annotate.py --chunk_cells (default: %(default)s)")
    p.add_argument("--out", default=str(synth.DEFAULT_OUT / "annotate"), help="where the query is kept")
    p.add_argument("--device", default="cpu", help="torch device of the forward pass, e.g. cuda (default: %(default)s)")
    p.add_argument("--prepare_only", action="store_true", help="write the query and the model, measure nothing")
    p.add_argument("--write_workers", type=int, default=1,
                   help="processes drawing the query's blocks; > 1 is another (equally distributed) draw, "
                        "kept in its own file (default: %(default)s)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_inputs(args) -> tuple[Path, Path]:
    import torch

    import data
    from model import Classifier, atomic_torch_save, classifier_checkpoint

    out = Path(args.out)
    spec = synth.DatasetSpec(f"query_{args.cells}", args.cells, args.classes, "human", 7, 1.0)
    query = out / f"{synth.file_stem(f'{spec.name}_{args.genes}', args.cells, args.chunk_cells, args.write_workers)}.h5"
    if not query.exists():
        t0 = time.time()
        row = synth.write_dataset(spec, query, synth.gene_pool(args.genes), args.density, args.chunk_cells,
                                  workers=args.write_workers)
        print(f"wrote {query}: {row['nnz']:,} non-zeros ({100 * row['density']:.2f} %) in {time.time() - t0:.0f}s",
              flush=True)
    model = out / f"classifier_{args.genes}_{args.classes}.pt"
    if not model.exists():
        torch.manual_seed(0)
        genes = [str(g) for g in synth.gene_pool(args.genes)]
        clf = Classifier(len(genes), args.classes)
        info = {"label_key": "cell_type", "values": values.RAW_VALUES, "reference": {"name": "random", "n_cells": 0}}
        atomic_torch_save(classifier_checkpoint(clf, genes, [f"type_{i:02d}" for i in range(args.classes)], info),
                          model)
    return query, model


def worker(args, query: Path, model: Path) -> dict:
    """The prediction path of annotate.py predict, part by part, in this process."""
    import torch

    import annotate
    import common

    runtime.flush_denormals()
    run_args = annotate.parse_args(["predict", "--model", str(model), "--query", str(query),
                                    "--chunk_cells", str(args.chunk_cells), "--log_level", "WARNING"])
    runtime.setup_logging("WARNING")
    device = torch.device(args.device)
    torch.zeros(1, device=device)  # CUDA starts before the clock does
    times = {}
    t0 = time.time()
    clf, ckpt = annotate.load_classifier(model)
    clf = clf.to(device)  # as annotate.py predict: the head runs where the encoder's output is
    query_data = annotate.read_dataset(query, run_args, None)
    times["read_and_map_s"] = time.time() - t0
    csr_mib = (query_data.X.data.nbytes + query_data.X.indices.nbytes + query_data.X.indptr.nbytes) / 2**20
    after_read = synth.memory_mib()
    t0 = time.time()
    lookup = annotate.query_lookup(query_data, ckpt["gene_universe"], query)
    representation, probs = annotate.run_chunks(query_data, lookup, clf, device, args.chunk_cells)
    labels, conf = annotate.assign_labels(probs, ckpt["classes"], 0.5)
    times["predict_s"] = time.time() - t0
    mem = synth.memory_mib()
    return {"cells": query_data.n_cells, "genes": query_data.n_genes, "nnz": int(query_data.X.nnz),
            "query_csr_mib": round(csr_mib, 1), "rss_after_read_mib": round(after_read["rss"], 1),
            "peak_mib": round(mem["peak"], 1), "peak_over_csr": round(mem["peak"] / csr_mib, 2),
            **{k: round(v, 2) for k, v in times.items()},
            "predict_cells_per_s": round(query_data.n_cells / times["predict_s"]),
            "total_s": round(sum(times.values()), 2), "device": args.device, "threads": torch.get_num_threads(),
            "representation": list(representation.shape), "labelled": int(len(labels))}


def main(args) -> dict:
    query, model = make_inputs(args)
    if args.prepare_only:
        print(f"inputs ready: {query}, {model}")
        return {"query": str(query), "model": str(model)}
    if args.worker:
        result = worker(args, query, model)
        print(json.dumps(result))
        return result
    proc = subprocess.run([sys.executable, __file__, "--worker", *sys.argv[1:]], capture_output=True, text=True,
                          env=synth.bench_env())
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        raise SystemExit(proc.returncode)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key, value in result.items():
        print(f"{key:>22}: {value}")
    return result


if __name__ == "__main__":
    main(parse_args())
