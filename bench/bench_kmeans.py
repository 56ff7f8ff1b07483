"""K-means at scPretrain's three granularities: our chunked sparse K-means vs faiss vs scikit-learn.

One synthetic log1p count matrix (default 20,000 cells x 17,000 genes, 5 % non-zero, CSR), the
three numbers of clusters k = n//100, n//50, n//200+1, 20 iterations each. Every method x k runs
in a fresh subprocess that loads the same matrix, resets its memory high-water mark, runs the
method and reads the new mark from /proc/self/status (tracemalloc cannot see torch or faiss).

- ours:    ``kmeans.kmeans`` on the CSR matrix (k-means++ on a sample, Lloyd over row chunks;
           after two iterations only the distances to centroids that moved are computed)
- ours_every: the same computing every distance in every iteration (``prune=False``)
- faiss:   ``faiss.Kmeans(niter=20, seed)`` on the densified float32 matrix (the original's
           choice; densifying is part of its time and memory), labels from ``index.search``
- sklearn: ``KMeans(n_init=1, max_iter=20)`` on the CSR matrix (k-means++ on all cells)

Inertia is recomputed the same way for all three, from their labels and centroids (float64).
Ours stops early once the assignments settle (``--tol``, kmeans.py's default); the rows say how
many Lloyd iterations ran. ``--device cuda`` runs ours on a GPU (the others stay on the CPU).

``--iteration_cost`` measures instead, in one process, one Lloyd iteration of ours (assignment
with per-cluster sums, then the centroid update) against its limit, the sparse cells x centroids
product alone on a ready torch CSR tensor, at each k.

    python bench/bench_kmeans.py                         # 20,000 x 17,000
    python bench/bench_kmeans.py --cells 5000 --genes 5000 --methods ours faiss
    python bench/bench_kmeans.py --methods ours --tol -1 # ours with exactly --iters iterations
    python bench/bench_kmeans.py --iteration_cost --ks 400
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR.parent), str(BENCH_DIR)]

import synth  # noqa: E402

METHODS = ("ours", "ours_every", "faiss", "sklearn")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cells", type=int, default=20000, help="(default: %(default)s)")
    p.add_argument("--genes", type=int, default=17000, help="(default: %(default)s)")
    p.add_argument("--density", type=float, default=0.05, help="share of non-zeros (default: %(default)s)")
    p.add_argument("--types", type=int, default=30, help="cell types in the synthetic counts (default: %(default)s)")
    p.add_argument("--avg_cluster_num", type=int, default=100, help="a of the granularities (default: %(default)s)")
    p.add_argument("--iters", type=int, default=20, help="Lloyd iterations (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--tol", type=float, default=None,
                   help="ours: kmeans.kmeans's tol, -1 = exactly --iters iterations (default: kmeans.DEFAULT_TOL)")
    p.add_argument("--device", default="cpu", help="torch device of ours, e.g. cuda (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="--iteration_cost: best of this many (default: %(default)s)")
    p.add_argument("--prepare_only", action="store_true", help="write the matrix, measure nothing")
    p.add_argument("--iteration_cost", action="store_true",
                   help="time one Lloyd iteration of ours vs the sparse cells x centroids product alone")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="(default: all)")
    p.add_argument("--ks", type=int, nargs="+", default=None, help="numbers of clusters (default: the three granularities)")
    p.add_argument("--out", default=str(BENCH_DIR / "out"), help="where the matrix is cached (default: %(default)s)")
    p.add_argument("--omp_wait_policy", default="",
                   help="OMP_WAIT_POLICY of the measured runs; unset ('') is what users run with; PASSIVE "
                        "stops idle OpenMP threads spin-waiting when other work shares the cores, at a cost "
                        "to short parallel regions (default: unset)")
    p.add_argument("--worker", nargs=3, metavar=("METHOD", "K", "NPZ"), help=argparse.SUPPRESS)
    p.add_argument("--cost_worker", metavar="NPZ", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- one method in its own process


def run_method(method: str, X: sp.csr_matrix, k: int, iters: int, seed: int, tol=None, device: str = "cpu"):
    """(labels, centroids, Lloyd iterations run) of one method; everything inside is timed and counted."""
    if method in ("ours", "ours_every"):
        import kmeans

        res = kmeans.kmeans(X, k, n_iter=iters, seed=seed, device=device,
                            tol=kmeans.DEFAULT_TOL if tol is None else tol, prune=method == "ours")
        return res.labels, res.centroids, res.n_iter_run
    if method == "faiss":
        import faiss

        dense = X.toarray()  # faiss needs dense float32 rows
        km = faiss.Kmeans(dense.shape[1], k, niter=iters, seed=seed, verbose=False)
        km.train(dense)
        _, assign = km.index.search(dense, 1)
        return assign[:, 0].astype(np.int64), km.centroids, iters
    if method == "sklearn":
        from sklearn.cluster import KMeans

        km = KMeans(k, n_init=1, max_iter=iters, random_state=seed).fit(X)
        return km.labels_.astype(np.int64), km.cluster_centers_, int(km.n_iter_)
    raise ValueError(method)


def inertia(X: sp.csr_matrix, labels: np.ndarray, centroids: np.ndarray, chunk: int = 2048) -> float:
    """Sum of squared distances of the rows to their assigned centroid, in float64, chunk by chunk."""
    C = np.asarray(centroids, dtype=np.float64)
    c_sq = (C * C).sum(1)
    total = 0.0
    for s in range(0, X.shape[0], chunk):
        block = X[s:s + chunk].astype(np.float64)
        lab = labels[s:s + chunk]
        x_sq = np.asarray(block.multiply(block).sum(1)).ravel()
        cross = np.asarray(block.multiply(C[lab]).sum(1)).ravel()
        total += float(np.maximum(x_sq - 2 * cross + c_sq[lab], 0).sum())
    return total


def worker(method: str, k: int, npz: str, iters: int, seed: int, tol=None, device: str = "cpu") -> dict:
    # libraries are imported before the clock starts and before the memory mark is reset
    __import__({"ours": "kmeans", "ours_every": "kmeans", "faiss": "faiss", "sklearn": "sklearn.cluster"}[method])
    X = sp.load_npz(npz).tocsr()
    X.data = X.data.astype(np.float32, copy=False)
    exact = synth.reset_peak_memory()
    before = synth.memory_mib()
    t0 = time.perf_counter()
    labels, centroids, n_iter_run = run_method(method, X, k, iters, seed, tol, device)
    seconds = time.perf_counter() - t0
    after = synth.memory_mib()
    return {"method": method, "k": k, "seconds": seconds, "iterations": n_iter_run,
            "device": device if method.startswith("ours") else "cpu", "peak_mib": after["peak"],
            "extra_mib": after["peak"] - before["rss"], "data_mib": before["rss"], "peak_exact": exact,
            "inertia": inertia(X, labels, centroids), "clusters_used": int(len(np.unique(labels)))}


# --------------------------------------------------------------------------- driver


def matrix_file(args) -> Path:
    """The log1p CSR matrix of the run, generated once and cached under ``--out``."""
    path = Path(args.out) / f"kmeans_{args.cells}x{args.genes}_d{args.density}_t{args.types}_s{args.seed}.npz"
    if not path.exists():
        t0 = time.time()
        counts, _ = synth.synth_counts(args.cells, args.genes, args.types, args.density, args.seed)
        counts.data = np.log1p(counts.data)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        sp.save_npz(tmp, counts, compressed=False)
        tmp.replace(path)
        print(f"generated {args.cells} x {args.genes} ({counts.nnz / counts.shape[0] / counts.shape[1]:.2%} non-zero)"
              f" in {time.time() - t0:.1f}s -> {path}", flush=True)
    return path


def iteration_cost(npz: str, ks: list[int], seed: int, device: str, repeats: int = 3) -> list[dict]:
    """Per k: one Lloyd iteration of kmeans.kmeans (assign with sums, update) vs the cells x centroids
    product alone, as the iteration computes it on its ready chunks (CPU: gene-blocked CSR; GPU:
    dense chunks), and vs the plain product of the whole matrix as one torch CSR tensor (best of
    ``repeats``)."""
    import torch

    import kmeans
    from sparse import RowChunks, torch_csr

    X = sp.load_npz(npz).tocsr()
    X.data = X.data.astype(np.float32, copy=False)
    dev = torch.device(device)
    rows = RowChunks(X, dev, cache=True)  # as kmeans.kmeans holds the rows it iterates over
    whole = torch_csr(X, dev)

    def best(fn):
        times = []
        for _ in range(repeats):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return min(times)

    out = []
    for k in ks:
        gen = np.random.default_rng(seed)
        centroids = rows.rows_dense(np.sort(gen.choice(rows.n_rows, size=k, replace=False)))

        def lloyd():  # an iteration that computes every distance (the first two of a run; later ones prune)
            labels = kmeans._assign(rows, centroids, 8192).labels
            sums = kmeans._cluster_sums(rows, labels, k, 8192)
            counts = torch.bincount(labels, minlength=k)
            kmeans._update(centroids.clone(), sums, counts, torch.ones(k, dtype=torch.bool), rows, gen)

        lloyd()  # the first pass builds the chunks the next ones reuse (kmeans.kmeans pays it once)
        lloyd_s = best(lloyd)

        ready = [rows.chunk(start, min(start + 8192, rows.n_rows)) for start in range(0, rows.n_rows, 8192)]

        def chunked_product():  # what the iteration multiplies, as it multiplies it, on ready chunks
            right = rows.prepare_product(centroids.T)
            for block in ready:
                rows.times(block, right)

        product_s = best(chunked_product)
        del ready
        plain_s = best(lambda: whole @ centroids.T)
        out.append({"k": k, "device": device, "lloyd_iteration_s": lloyd_s, "product_s": product_s,
                    "plain_product_s": plain_s, "ratio": lloyd_s / product_s, "ratio_to_plain": lloyd_s / plain_s,
                    "threads": torch.get_num_threads()})
    return out


def run_in_subprocess(method: str, k: int, npz: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", method, str(k), str(npz), "--iters", str(args.iters),
           "--seed", str(args.seed), "--device", args.device] + ([] if args.tol is None else [f"--tol={args.tol}"])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=synth.bench_env(args.omp_wait_policy))
    if proc.returncode != 0:
        return {"method": method, "k": k, "error": proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict]) -> str:
    lines = [f"{'k':>6} {'method':>8} {'seconds':>9} {'iters':>5} {'peak MiB':>9} {'+MiB':>8} {'inertia':>14} "
             f"{'vs best':>8}"]
    for k in dict.fromkeys(r["k"] for r in rows):
        group = [r for r in rows if r["k"] == k]
        best = min((r["inertia"] for r in group if "inertia" in r), default=float("nan"))
        for r in group:
            if "error" in r:
                lines.append(f"{k:>6} {r['method']:>8}  failed: {r['error']}")
                continue
            lines.append(f"{k:>6} {r['method']:>8} {r['seconds']:>9.2f} {r['iterations']:>5} {r['peak_mib']:>9.0f} {r['extra_mib']:>8.0f} "
                         f"{r['inertia']:>14.1f} {r['inertia'] / best - 1:>+8.2%}")
    return "\n".join(lines)


def main(args) -> list[dict]:
    if args.worker:
        method, k, npz = args.worker
        print(json.dumps(worker(method, int(k), npz, args.iters, args.seed, args.tol, args.device)))
        return []
    if args.cost_worker:
        print(json.dumps(iteration_cost(args.cost_worker, args.ks, args.seed, args.device, args.repeats)))
        return []
    import kmeans

    npz = matrix_file(args)
    if args.prepare_only:
        print(f"matrix ready: {npz}")
        return []
    ks = args.ks or kmeans.granularities(args.cells, args.avg_cluster_num)
    print(f"code: {synth.code_version()}", flush=True)
    if args.iteration_cost:
        cmd = [sys.executable, __file__, "--cost_worker", str(npz), "--ks", *map(str, ks), "--seed", str(args.seed),
               "--device", args.device, "--repeats", str(args.repeats)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=synth.bench_env(args.omp_wait_policy))
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        rows = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{args.cells} cells x {args.genes} genes, {args.density:.0%} non-zero; best of {args.repeats} on "
              f"{args.device}")
        for r in rows:
            print(f"k={r['k']}: one Lloyd iteration {r['lloyd_iteration_s']:.2f} s; its cells x centroids product "
                  f"alone {r['product_s']:.2f} s -> {r['ratio']:.2f}x the limit; the plain product (one torch "
                  f"CSR x dense) {r['plain_product_s']:.2f} s -> {r['ratio_to_plain']:.2f}x "
                  f"(torch threads {r['threads']})")
        return rows
    tol = kmeans.DEFAULT_TOL if args.tol is None else args.tol
    print(f"ours on {args.device}, tol {tol} ({'exactly --iters iterations' if tol < 0 else 'stops when settled'})",
          flush=True)
    print(f"{args.cells} cells x {args.genes} genes, {args.density:.0%} non-zero, log1p; k = {ks}; "
          f"{args.iters} iterations; one subprocess per run; torch threads {synth.torch_threads()}, "
          f"OMP_WAIT_POLICY={args.omp_wait_policy or 'unset'}", flush=True)
    rows = []
    for k in ks:
        for method in args.methods:
            row = run_in_subprocess(method, k, npz, args)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("peak MiB = the run's resident high-water mark (loaded matrix included); "
          "+MiB = above the loaded matrix")
    print(format_table(rows))
    return rows


if __name__ == "__main__":
    main(parse_args())
