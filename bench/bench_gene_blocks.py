"""What gene-blocked encoder products would save in a pre-training epoch (prints figures; not a test).

    python bench/bench_gene_blocks.py --scale 0.05            # the collection bench_pretrain.py writes
    python bench/bench_gene_blocks.py --scale 0.05 --block 2048

On the steps of one epoch of a synthetic collection (``bench/synth.py``), per epoch:

- today: one row gather from the stacked CSR, the forward product ``X W`` whole, and the
  transposes the weight gradient uses (``model.transposed_pieces``) with their product;
- blocks cut per step: the step's cells cut into blocks of ``--block`` genes from a per-row
  index of where each block starts (numpy gathers), then ``sum_b X_b W_b``;
- a collection stored as gene blocks: one scipy row gather per block, the same blocked forward,
  and the transposes and gradient products per block.

The blocked forward keeps a block of the weight in cache; the figures say whether the blocks
can be had for less than that saves. Nothing here is used by the pipeline.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=0.05, help="synthetic collection scale (default: %(default)s)")
    p.add_argument("--block", type=int, default=1024, help="genes per block (default: %(default)s)")
    p.add_argument("--hid", type=int, default=200, help="(default: %(default)s)")
    p.add_argument("--batch_num", type=int, default=30, help="steps per epoch (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=2, help="epochs timed; the last is printed (default: %(default)s)")
    p.add_argument("--data_dir", default=None, help="collection folder (default: bench/out/synth_s{scale})")
    return p.parse_args(argv)


def block_index(X, block: int) -> np.ndarray:
    """Per row, where each gene block's values start within the row (rows x blocks+1, int32);
    column indices are sorted within rows, so a block's values are one run."""
    n, n_genes = X.shape
    n_blocks = -(-n_genes // block)
    bounds = np.zeros((n, n_blocks + 1), np.int32)
    for start in range(0, n, 20000):
        stop = min(start + 20000, n)
        ptr = X.indptr[start:stop + 1]
        rows = np.repeat(np.arange(stop - start), np.diff(ptr))
        counts = np.bincount(rows * n_blocks + X.indices[ptr[0]:ptr[-1]] // block, minlength=(stop - start) * n_blocks)
        np.cumsum(counts.reshape(stop - start, n_blocks), axis=1, out=bounds[start:stop, 1:])
    return bounds


def cut_blocks(X, bounds: np.ndarray, rows: np.ndarray, block: int):
    """The chosen rows' gene blocks as torch CSR tensors, by numpy gathers through ``bounds``."""
    import torch

    m, n_blocks = len(rows), bounds.shape[1] - 1
    lo = bounds[rows]
    lengths = np.diff(lo, axis=1).T.astype(np.int64).ravel()  # block-major
    starts = (X.indptr[rows][None, :] + lo[:, :-1].T).astype(np.int64).ravel()
    ptr = np.zeros(lengths.size + 1, np.int64)
    np.cumsum(lengths, out=ptr[1:])
    take = np.repeat(starts - ptr[:-1], lengths) + np.arange(ptr[-1])
    values = X.data[take]
    columns = X.indices[take] - np.repeat(np.arange(n_blocks, dtype=np.int32) * block,
                                          lengths.reshape(n_blocks, m).sum(1))
    out = []
    for b in range(n_blocks):
        p = ptr[b * m:(b + 1) * m + 1]
        out.append(torch.sparse_csr_tensor(torch.from_numpy(p - p[0]), torch.from_numpy(columns[p[0]:p[-1]]),
                                           torch.from_numpy(values[p[0]:p[-1]]),
                                           size=(m, min(block, X.shape[1] - b * block))))
    return out


def blocked_forward(blocks, weight_blocks, m: int, hid: int):
    import torch

    out = torch.zeros(m, hid)
    for x, w in zip(blocks, weight_blocks):
        out.addmm_(x, w)
    return out


def main(args) -> dict:
    import scipy.sparse as sp
    import torch

    import bench_pretrain
    import common
    import pretrain
    from model import torch_csr, transposed_pieces, transposed_times

    warnings.simplefilter("ignore")  # torch's "sparse CSR support is in beta"
    common.flush_denormals()
    folder = Path(args.data_dir or HERE / "out" / f"synth_s{args.scale}")
    paths = sorted(folder.glob("*.h5"))
    if not paths:
        raise SystemExit(f"no collection in {folder}: python bench/bench_pretrain.py --scale {args.scale} --prepare_only")
    coll = pretrain.build_collection(bench_pretrain.load(paths))
    X, cpu = coll.stacked, torch.device("cpu")
    n_cells = [x.shape[0] for x in coll.features]
    steps = pretrain.epoch_batches(n_cells, args.batch_num, 0, 1, 1)
    step_rows = [coll.rows_of(list(range(len(rows))), rows) for rows in steps]
    t0 = time.perf_counter()
    bounds = block_index(X, args.block)
    print(f"{X.shape[0]:,} cells, {X.nnz:,} values; block index {time.perf_counter() - t0:.2f} s, "
          f"{bounds.nbytes / 2**20:.0f} MiB")
    t0 = time.perf_counter()
    stored = [X[:, s:s + args.block].tocsr() for s in range(0, X.shape[1], args.block)]
    print(f"collection stored as {len(stored)} gene blocks: {time.perf_counter() - t0:.1f} s to make")
    weight = torch.randn(X.shape[1], args.hid)
    weight_blocks = [weight[s:s + args.block] for s in range(0, X.shape[1], args.block)]
    for _ in range(args.repeats):
        t = dict.fromkeys(["gather", "forward", "transpose", "gradient", "cut blocks", "blocked forward (cut)",
                           "gather blocks", "blocked forward (stored)", "transpose blocks", "gradient blocks"], 0.0)
        error = 0.0
        for rows in step_rows:
            clock = [time.perf_counter()]

            def lap(name):
                now = time.perf_counter()
                t[name] += now - clock[0]
                clock[0] = now

            Xs = X[rows]
            lap("gather")
            whole = torch.sparse.mm(torch_csr(Xs, cpu), weight)
            lap("forward")
            x_t = transposed_pieces(Xs)
            x_t = torch_csr(x_t, cpu) if sp.issparse(x_t) else tuple(torch_csr(p, cpu) for p in x_t)
            lap("transpose")
            grad = torch.randn(len(rows), args.hid)
            clock[0] = time.perf_counter()
            reference = transposed_times(x_t, grad)
            lap("gradient")
            cut = cut_blocks(X, bounds, rows, args.block)
            lap("cut blocks")
            blocked_forward(cut, weight_blocks, len(rows), args.hid)
            lap("blocked forward (cut)")
            parts = [b[rows] for b in stored]
            gathered = [torch_csr(b, cpu) for b in parts]
            lap("gather blocks")
            out = blocked_forward(gathered, weight_blocks, len(rows), args.hid)
            lap("blocked forward (stored)")
            parts_t = [torch_csr(b.T.tocsr(), cpu) for b in parts]
            lap("transpose blocks")
            blocked_grad = torch.cat([torch.sparse.mm(b, grad) for b in parts_t])
            lap("gradient blocks")
            error = max(error, float((out - whole).abs().max()), float((blocked_grad - reference).abs().max()))
    today = t["gather"] + t["forward"] + t["transpose"] + t["gradient"]
    stored_sum = t["gather blocks"] + t["blocked forward (stored)"] + t["transpose blocks"] + t["gradient blocks"]
    for name, seconds in t.items():
        print(f"{name:28s} {seconds:6.3f} s/epoch")
    print(f"today: gather + forward + transpose + gradient = {today:.2f} s/epoch; stored gene blocks: "
          f"{stored_sum:.2f} s/epoch ({stored_sum / today:.2f}x); blocks cut per step: "
          f"{t['gather'] + t['cut blocks'] + t['blocked forward (cut)'] + t['transpose'] + t['gradient']:.2f} s/epoch; "
          f"largest difference of the products {error:.1e}")
    return t


if __name__ == "__main__":
    main(parse_args())
