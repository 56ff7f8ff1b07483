"""kmeans.py: the granularity formula, sparse = dense, inertia against scikit-learn, seeding, edge cases."""
import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

import torch

import data
import kmeans
from helpers import toy_counts
import features as features_mod
import sparse


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny matrices: one thread is fastest, and immune to OpenMP spin-waits when the cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def inertia_of(X, labels, k):
    """Sum of squared distances to the mean of each cluster, from the labels alone (numpy)."""
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    X = X.astype(np.float64)
    total = 0.0
    for c in range(k):
        members = X[labels == c]
        if len(members):
            total += float(((members - members.mean(0)) ** 2).sum())
    return total


@pytest.fixture(scope="module")
def blobs():
    X, _ = make_blobs(n_samples=600, n_features=20, centers=8, cluster_std=1.5, random_state=0)
    return X.astype(np.float32)


@pytest.fixture(scope="module")
def sparse_counts():
    """A small log1p count matrix, about 15 % non-zero, with cell-type structure."""
    counts, _ = toy_counts(n_cells=500, n_genes=200, n_types=5, seed=4)
    keep = np.random.default_rng(4).random(counts.shape) < 0.35
    X = features_mod.log1p_features(sp.csr_matrix(counts * keep))
    assert 0.05 < X.nnz / np.prod(X.shape) < 0.3
    return X


@pytest.mark.parametrize("n, a", [(0, 100), (1, 100), (150, 100), (199, 100), (1000, 100), (160796, 100),
                                  (3, 100), (500, 7), (500, 2), (500, 1), (12345, 37)])
def test_granularities_formula(n, a):
    ks = kmeans.granularities(n, a) if n else None
    if n == 0:
        return  # no cells, nothing to cluster (the formula's clamp is [2, n])
    expected = [n // a, n // (a // 2) if a // 2 else n, n // (2 * a) + 1]
    assert ks == [min(max(k, 2), n) for k in expected]


def test_granularities_paper_default():
    assert kmeans.granularities(20000) == [200, 400, 101]
    assert kmeans.granularities(870) == [8, 17, 5]
    assert kmeans.granularities(150) == [2, 3, 2]  # clamped up to 2
    assert kmeans.granularities(1) == [1, 1, 1]  # and down to n


@pytest.mark.parametrize("k", [3, 8, 20])
def test_sparse_and_dense_input_give_the_same_labels(sparse_counts, k):
    on_sparse = kmeans.kmeans(sparse_counts, k, seed=1)
    on_dense = kmeans.kmeans(sparse_counts.toarray(), k, seed=1)
    np.testing.assert_array_equal(on_sparse.labels, on_dense.labels)
    assert on_sparse.inertia == pytest.approx(on_dense.inertia, rel=1e-5)


def test_chunking_does_not_change_the_labels(sparse_counts):
    whole = kmeans.kmeans(sparse_counts, 6, seed=2)
    chunked = kmeans.kmeans(sparse_counts, 6, seed=2, chunk_rows=37)
    np.testing.assert_array_equal(whole.labels, chunked.labels)


@pytest.mark.parametrize("matrix, k", [("blobs", 4), ("blobs", 8), ("blobs", 12),
                                       ("sparse_counts", 5), ("sparse_counts", 10), ("sparse_counts", 20)])
def test_inertia_close_to_sklearn(matrix, k, request):
    X = request.getfixturevalue(matrix)
    ours = kmeans.kmeans(X, k, n_iter=20, seed=0)
    assert ours.inertia == pytest.approx(inertia_of(X, ours.labels, k), rel=1e-4)
    theirs = KMeans(k, n_init=1, max_iter=20, random_state=0).fit(X)
    assert ours.inertia <= 1.05 * theirs.inertia_


@pytest.fixture(scope="module")
def separated_blobs():
    """Eight tight, far-apart blobs: Lloyd's loop settles in a few iterations."""
    X, _ = make_blobs(n_samples=800, n_features=10, centers=8, cluster_std=0.3, center_box=(-20, 20), random_state=1)
    return X.astype(np.float32)


def test_early_stop_gives_the_fixed_iteration_clusters_sooner(separated_blobs):
    fixed = kmeans.kmeans(separated_blobs, 8, n_iter=20, seed=0, tol=-1)
    early = kmeans.kmeans(separated_blobs, 8, n_iter=20, seed=0)  # the default: stop once no cell moves
    assert kmeans.DEFAULT_TOL == 0
    assert fixed.n_iter_run == 20 and 2 <= early.n_iter_run < 20
    np.testing.assert_array_equal(early.labels, fixed.labels)
    np.testing.assert_allclose(early.centroids, fixed.centroids, rtol=1e-6, atol=1e-6)
    assert early.inertia == pytest.approx(fixed.inertia, rel=1e-6)


@pytest.mark.parametrize("k", [5, 10, 20])
@pytest.mark.parametrize("tol", [kmeans.DEFAULT_TOL, 0.01])
def test_early_stop_inertia_close_to_sklearn(sparse_counts, k, tol):
    ours = kmeans.kmeans(sparse_counts, k, n_iter=20, seed=0, tol=tol)
    assert 1 <= ours.n_iter_run <= 20
    if tol == 0 and ours.n_iter_run < 20:  # settled: the centroids are the means of the final clusters
        assert ours.inertia == pytest.approx(inertia_of(sparse_counts, ours.labels, k), rel=1e-4)
    theirs = KMeans(k, n_init=1, max_iter=20, random_state=0).fit(sparse_counts)
    assert ours.inertia <= 1.05 * theirs.inertia_


@pytest.mark.parametrize("n_iter", [1, 3, 20])
def test_negative_tol_runs_exactly_n_iter(sparse_counts, separated_blobs, n_iter):
    for X in (sparse_counts, separated_blobs):
        assert kmeans.kmeans(X, 6, n_iter=n_iter, seed=0, tol=-1).n_iter_run == n_iter


def test_kmeans_tol_flag_default_and_fixed_iterations():
    import main

    assert main.parse_args([]).kmeans_tol == kmeans.DEFAULT_TOL
    assert main.parse_args(["--kmeans_tol", "-1"]).kmeans_tol == -1
    assert main.parse_args(["--kmeans_tol", "0.001"]).kmeans_tol == 0.001


def test_result_shapes_and_label_range(sparse_counts):
    res = kmeans.kmeans(sparse_counts, 7, seed=0)
    assert res.labels.shape == (sparse_counts.shape[0],) and res.labels.dtype == np.int64
    assert res.labels.min() >= 0 and res.labels.max() < 7
    assert res.centroids.shape == (7, sparse_counts.shape[1])


def test_same_seed_gives_identical_labels(sparse_counts):
    a = kmeans.kmeans(sparse_counts, 10, seed=3)
    b = kmeans.kmeans(sparse_counts, 10, seed=3)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.inertia == b.inertia


def test_different_seed_is_allowed_to_differ(sparse_counts):
    a = kmeans.kmeans(sparse_counts, 10, seed=3)
    c = kmeans.kmeans(sparse_counts, 10, seed=4)
    # a different seed may or may not find another partition; either must be a valid clustering
    assert c.labels.shape == a.labels.shape and c.labels.max() < 10
    assert c.inertia == pytest.approx(inertia_of(sparse_counts, c.labels, 10), rel=1e-4)


def test_k_at_least_n_puts_every_cell_alone():
    X = np.random.default_rng(0).normal(size=(12, 5)).astype(np.float32)
    for k in (12, 20):
        res = kmeans.kmeans(X, k, seed=0)
        assert sorted(res.labels.tolist()) == list(range(12))
        assert res.inertia == pytest.approx(0.0, abs=1e-4)
        assert res.centroids.shape == (12, 5)


def test_k_at_least_n_on_sparse_input():
    X = sp.random(9, 30, density=0.3, format="csr", random_state=0, dtype=np.float32)
    res = kmeans.kmeans(X, 50, seed=0)
    assert len(res.labels) == 9 and res.labels.max() < 9


def test_empty_clusters_are_handled():
    """Only three distinct points but k = 6: some clusters must go empty and be re-seeded."""
    X = np.repeat(np.array([[0, 0], [10, 0], [0, 10]], dtype=np.float32), 20, axis=0)
    res = kmeans.kmeans(X, 6, n_iter=5, seed=0)
    assert res.labels.shape == (60,) and 0 <= res.labels.min() and res.labels.max() < 6
    assert np.isfinite(res.centroids).all()
    assert res.inertia == pytest.approx(0.0, abs=1e-4)  # every cell sits on a centroid
    # cells at the same point share a cluster
    for block in res.labels.reshape(3, 20):
        assert len(set(block.tolist())) == 1


def test_all_rows_identical_does_not_crash():
    X = sp.csr_matrix(np.ones((30, 4), dtype=np.float32))
    res = kmeans.kmeans(X, 3, seed=0)
    assert res.labels.shape == (30,) and res.inertia == pytest.approx(0.0, abs=1e-4)


def test_pseudo_labels_gives_three_label_arrays(sparse_counts):
    out = kmeans.pseudo_labels(sparse_counts, avg_cluster_num=50, n_iter=5, seed=0)
    ks = kmeans.granularities(sparse_counts.shape[0], 50)
    assert ks == [10, 20, 6]
    assert len(out) == 3
    for labels, k in zip(out, ks):
        assert labels.shape == (sparse_counts.shape[0],)
        assert labels.min() >= 0 and labels.max() < k
    again = kmeans.pseudo_labels(sparse_counts, avg_cluster_num=50, n_iter=5, seed=0)
    for a, b in zip(out, again):
        np.testing.assert_array_equal(a, b)


def test_log1p_features_share_structure():
    X = sp.csr_matrix(np.array([[0, 3, 0], [1, 0, 7]], dtype=np.float32))
    L = features_mod.log1p_features(X)
    np.testing.assert_allclose(L.toarray(), np.log1p(X.toarray()))
    np.testing.assert_array_equal(X.data, [3, 1, 7])  # input untouched


def test_gene_blocked_product_equals_the_plain_one():
    """More genes than one GENE_BLOCK and more columns than one CENTROID_BLOCK; empty rows too."""
    X = sp.random(70, 2 * sparse.GENE_BLOCK + 37, density=0.02, format="csr", dtype=np.float32, random_state=2)
    X = sp.csr_matrix(sp.diags((np.arange(70) != 5).astype(np.float32)) @ X)  # row 5 empty
    X.eliminate_zeros()
    X.sort_indices()
    assert X[5].nnz == 0
    block = sparse.GeneBlockedCSR(X.indptr, X.indices, X.data, X.shape[1])
    assert len(block.parts) == 3
    # MKL's blocks (narrow), csr_kernels' (wide: one column block, and several with a short last one)
    for width in (sparse.WIDE_COLUMNS - 1, sparse.WIDE_COLUMNS, sparse.CENTROID_BLOCK + 9, 2 * sparse.WIDE_BLOCK + 5):
        right = torch.randn(X.shape[1], width, dtype=torch.float32)
        prepared = sparse.GeneBlockedCSR.prepare(right)
        assert isinstance(prepared, sparse.WideRight) == (width >= sparse.WIDE_COLUMNS)
        got = block.times(prepared)
        assert got.shape == (70, width)
        np.testing.assert_allclose(got.numpy(), X.toarray() @ right.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(block.to_dense().numpy(), X.toarray())


def test_kmeans_takes_unsorted_column_indices_without_reordering_them():
    """A CSR whose rows' columns are out of order clusters as its sorted copy does; the caller's
    matrix keeps its order (the wide products need sorted rows, taken from a copy)."""
    rng = np.random.default_rng(4)
    X = sp.random(300, 90, density=0.2, format="csr", dtype=np.float32, random_state=5)
    X.data[:] = rng.random(X.nnz).astype(np.float32) * 5
    shuffled = X.copy()
    for i in range(X.shape[0]):  # each row's entries reversed
        lo, hi = shuffled.indptr[i], shuffled.indptr[i + 1]
        shuffled.indices[lo:hi] = shuffled.indices[lo:hi][::-1].copy()
        shuffled.data[lo:hi] = shuffled.data[lo:hi][::-1].copy()
    shuffled.has_sorted_indices = False
    before = shuffled.indices.copy()
    a = kmeans.kmeans(shuffled, 70, seed=0)  # 70 centroids: the first passes take the wide products
    b = kmeans.kmeans(X, 70, seed=0)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(shuffled.indices, before)


def test_kmeans_on_many_genes_matches_dense_input():
    """The gene-blocked sparse path clusters as the dense path does (same seed, same data)."""
    rng = np.random.default_rng(3)
    centers = rng.random((4, sparse.GENE_BLOCK + 500)) * (rng.random((4, sparse.GENE_BLOCK + 500)) < 0.05) * 20
    dense = (centers[rng.integers(4, size=200)] * (rng.random((200, centers.shape[1])) < 0.8)).astype(np.float32)
    a = kmeans.kmeans(sp.csr_matrix(dense), 4, seed=0)
    b = kmeans.kmeans(dense, 4, seed=0)
    assert a.inertia == pytest.approx(b.inertia, rel=1e-4)
    np.testing.assert_array_equal(a.labels, b.labels)


# --------------------------------------------------------------------------- pruned passes


def brute_distances(X, centroids):
    """|c|^2 - 2 x.c for every cell and centroid, in float64 (what a pass ranks)."""
    X = X.toarray() if sp.issparse(X) else np.asarray(X)
    C = centroids.double().numpy()
    return (C * C).sum(1)[None, :] - 2 * X.astype(np.float64) @ C.T


def check_nearest(nearest, X, centroids):
    """The pass's listed centroids are exact, its first is the nearest, and nothing unlisted is
    nearer than its bound."""
    full = brute_distances(X, centroids)
    scale = 1e-4 * (1 + np.abs(full).max())
    index, dist, bound = nearest.index.numpy(), nearest.dist.double().numpy(), nearest.bound.double().numpy()
    finite = np.isfinite(dist)
    rows = np.nonzero(finite)[0]
    np.testing.assert_allclose(dist[finite], full[rows, index[finite]], atol=scale)
    np.testing.assert_allclose(dist[:, 0], full.min(1), atol=scale)
    unlisted = np.ones_like(full, dtype=bool)
    unlisted[np.repeat(np.arange(len(full)), index.shape[1])[finite.ravel()], index[finite]] = False
    assert (np.where(unlisted, full, np.inf).min(1) >= bound - scale).all()


def test_pruned_pass_finds_what_all_distances_find(sparse_counts, caplog):
    """Passes that compute only the moved centroids' distances, over rounds of small and far moves
    (a far move of every listed centroid forces cells to be recomputed in full)."""
    X, k = sparse_counts, 12
    rows = sparse.RowChunks(X, torch.device("cpu"), cache=True)
    rng = np.random.default_rng(0)
    centroids = rows.rows_dense(rng.choice(X.shape[0], size=k, replace=False))
    known = kmeans._assign(rows, centroids, 64)
    check_nearest(known, X, centroids)
    recomputed = 0
    for round_ in range(6):
        moved = torch.zeros(k, dtype=torch.bool)
        moved[torch.as_tensor(rng.choice(k, size=int(rng.integers(1, k // 2 + 1)), replace=False))] = True
        step = 5.0 if round_ % 2 else 0.05  # far moves, then small ones
        centroids = centroids.clone()
        centroids[moved] += step * torch.rand(int(moved.sum()), X.shape[1])
        with caplog.at_level("DEBUG", logger="scpretrain.kmeans"):
            caplog.clear()
            known = kmeans._assign(rows, centroids, 64, known, moved)
        recomputed += sum(int(r.getMessage().split(", ")[1].split()[0]) for r in caplog.records
                          if r.getMessage().startswith("pass:"))
        check_nearest(known, X, centroids)
    assert recomputed > 0  # the full recomputation of cells ran


def test_cluster_sums_followed_through_moves_equal_fresh_sums(sparse_counts):
    rows = sparse.RowChunks(sparse_counts, torch.device("cpu"))
    rng = np.random.default_rng(1)
    labels = torch.as_tensor(rng.integers(7, size=rows.n_rows))
    sums = kmeans._cluster_sums(rows, labels, 7, 50)
    for _ in range(3):
        new = labels.clone()
        changed = torch.as_tensor(np.sort(rng.choice(rows.n_rows, size=60, replace=False)))
        new[changed] = torch.as_tensor(rng.integers(7, size=60))
        kmeans._move_cells(rows, sums, changed, labels[changed], new[changed], 16)
        labels = new
    np.testing.assert_allclose(sums.numpy(), kmeans._cluster_sums(rows, labels, 7, 50).numpy(), atol=1e-4)
    dense = np.zeros((7, rows.n_cols))
    np.add.at(dense, labels.numpy(), sparse_counts.toarray())
    np.testing.assert_allclose(sums.numpy(), dense, atol=1e-4)


@pytest.mark.parametrize("k", [6, 40])
def test_pruned_lloyd_matches_computing_every_distance(sparse_counts, blobs, k):
    for X in (sparse_counts, blobs):
        pruned = kmeans.kmeans(X, k, seed=0, tol=-1)
        every = kmeans.kmeans(X, k, seed=0, tol=-1, prune=False)
        assert pruned.inertia == pytest.approx(every.inertia, rel=1e-5)
        assert (pruned.labels == every.labels).mean() >= 0.99
    separated = kmeans.kmeans(blobs, 8, seed=0, tol=-1), kmeans.kmeans(blobs, 8, seed=0, tol=-1, prune=False)
    np.testing.assert_array_equal(separated[0].labels, separated[1].labels)


def test_kmeans_rows_share_a_view_of_a_larger_matrix():
    """A dataset's rows in the stacked collection are a view of much larger arrays; scipy's
    constructor copies such views (K-means then held a second copy of the dataset)."""
    big = sp.random(400, 30, density=0.3, format="csr", dtype=np.float32, random_state=4)
    view = sparse.row_block(big, 0, 40)  # a tenth of the arrays
    rows = sparse.RowChunks(view, torch.device("cpu"))
    assert np.shares_memory(rows.store.data.numpy(), big.data)
    assert np.shares_memory(rows.store.indices.numpy(), big.indices)
    np.testing.assert_array_equal(kmeans.kmeans(view, 3, seed=0).labels,
                                  kmeans.kmeans(big[:40].copy(), 3, seed=0).labels)
