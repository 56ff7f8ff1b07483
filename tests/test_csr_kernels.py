"""The CPU's gene-blocked sparse products (csr_kernels) against dense float64 arithmetic, and the
encoder on HostCSR batches against the dense encoder."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import csr_kernels
import sparse
from model import Classifier, Encoder
from sparse import HostCSR


def random_csr(n, genes, density, seed, index_dtype=np.int32):
    X = sp.random(n, genes, density=density, format="csr", dtype=np.float32, random_state=seed)
    X.indices, X.indptr = X.indices.astype(index_dtype), X.indptr.astype(index_dtype)
    return X


def brute_pointers(X, block):
    n_blocks = -(-X.shape[1] // block)
    ptr = np.empty((n_blocks + 1, X.shape[0]), np.int64)
    for i in range(X.shape[0]):
        cols = X.indices[X.indptr[i]:X.indptr[i + 1]]
        ptr[:, i] = X.indptr[i] + np.searchsorted(cols, np.arange(n_blocks + 1) * block)
    return ptr


def layouts(X, block=csr_kernels.BLOCK_GENES):
    """``(starts, ends, indices, data)`` of a CSR in both layouts the products read: its own arrays
    (``block_pointers``) and its rows copied block by block (``take_block_major_rows``)."""
    ptr = csr_kernels.block_pointers(X.indptr, X.indices, X.shape[1], block)
    return [(ptr[:-1], ptr[1:], X.indices, X.data),
            csr_kernels.take_block_major_rows(X.indptr, X.indices, X.data, np.arange(X.shape[0]), X.shape[1], block)]


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("block", [1, 4, 7, 30, 64])
def test_block_pointers_cut_every_row_at_each_block_start(block, index_dtype):
    X = random_csr(23, 30, 0.3, seed=block, index_dtype=index_dtype)
    X.data[X.indptr[3]:X.indptr[4]] = 0  # an empty row
    X.eliminate_zeros()
    assert X.indptr[3] == X.indptr[4]
    ptr = csr_kernels.block_pointers(X.indptr, X.indices, X.shape[1], block)
    np.testing.assert_array_equal(ptr, brute_pointers(X, block))


def test_block_pointers_refuse_unsorted_or_out_of_range_columns():
    indptr = np.array([0, 2, 3], np.int32)
    for indices in ([3, 1, 0], [0, 1, 5], [0, 1, -1]):  # unsorted row 0; column 5 of 5; negative column
        with pytest.raises(ValueError, match="sorted column indices"):
            csr_kernels.block_pointers(indptr, np.array(indices, np.int32), 5, 2)
    ptr = csr_kernels.block_pointers(indptr, np.array([1, 1, 4], np.int32), 5, 2)  # repeats are sorted
    assert ptr[:, 0].tolist() == [0, 2, 2, 2] and ptr[:, 1].tolist() == [2, 2, 2, 3]


@pytest.mark.parametrize("shape,density", [((0, 40), 0.1), ((9, 40), 0.0), ((37, 50), 0.2), ((300, 1100), 0.03)])
def test_both_products_equal_dense_float64_arithmetic(shape, density, monkeypatch):
    # small chunks, so that a few dozen cells cross chunk and block boundaries as a real step's do
    monkeypatch.setattr(csr_kernels, "FORWARD_ROWS", 5)
    monkeypatch.setattr(csr_kernels, "GRADIENT_ROWS", 7)
    rng = np.random.default_rng(0)
    X = random_csr(*shape, density, seed=1)
    weight = rng.standard_normal((shape[1], 6)).astype(np.float32)
    bias = rng.standard_normal(6).astype(np.float32)
    grad = rng.standard_normal((shape[0], 6)).astype(np.float32)
    dense = X.toarray().astype(np.float64)
    for block in (8, csr_kernels.BLOCK_GENES):
        for batch in layouts(X, block):  # the CSR's own arrays, and the rows copied block by block
            out = csr_kernels.times_dense(*batch, weight, bias)
            assert out.dtype == np.float32 and out.shape == (shape[0], 6)
            np.testing.assert_allclose(out, dense @ weight + bias, rtol=1e-5, atol=1e-5)
            grad_w = csr_kernels.transposed_times(*batch, grad, shape[1])
            assert grad_w.dtype == np.float32 and grad_w.shape == (shape[1], 6)
            np.testing.assert_allclose(grad_w, dense.T @ grad, rtol=1e-5, atol=1e-5)


def test_nan_and_infinity_propagate_as_in_dense_arithmetic():
    X = sp.csr_matrix(np.array([[1.0, 0, 2.0], [0, np.nan, 0], [np.inf, 0, 0]], np.float32))
    weight = np.ones((3, 2), np.float32)
    for batch in layouts(X):
        out = csr_kernels.times_dense(*batch, weight, np.zeros(2, np.float32))
        np.testing.assert_array_equal(out, [[3, 3], [np.nan, np.nan], [np.inf, np.inf]])
        grad = csr_kernels.transposed_times(*batch, np.ones((3, 2), np.float32), 3)
        np.testing.assert_array_equal(grad, [[np.inf, np.inf], [np.nan, np.nan], [2, 2]])


def test_products_do_not_depend_on_the_number_of_threads():
    X = random_csr(700, 3000, 0.05, seed=2)
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((3000, 16)).astype(np.float32)
    grad = rng.standard_normal((700, 16)).astype(np.float32)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for batch in layouts(X):
                outs.append((csr_kernels.times_dense(*batch, weight, np.zeros(16, np.float32)),
                             csr_kernels.transposed_times(*batch, grad, 3000)))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:  # either thread count, either layout: the same sums in the same order
        np.testing.assert_array_equal(other[0], outs[0][0])
        np.testing.assert_array_equal(other[1], outs[0][1])


def test_host_csr_sorts_unsorted_columns_and_refuses_columns_past_its_width():
    X = random_csr(12, 20, 0.4, seed=3)
    shuffled = X.copy()
    for i in range(12):  # reverse each row's stored order: the same matrix, unsorted
        lo, hi = shuffled.indptr[i], shuffled.indptr[i + 1]
        shuffled.indices[lo:hi] = shuffled.indices[lo:hi][::-1]
        shuffled.data[lo:hi] = shuffled.data[lo:hi][::-1]
    shuffled.has_sorted_indices = False
    batch = HostCSR(shuffled)
    np.testing.assert_array_equal(batch.csr().toarray(), X.toarray())
    np.testing.assert_array_equal(HostCSR(X.tocsc()).csr().toarray(), X.toarray())  # another format: made CSR
    bad = sp.csr_matrix((np.ones(2, np.float32), np.array([0, 25], np.int32), np.array([0, 2])), shape=(1, 20))
    with pytest.raises(ValueError, match="sorted column indices"):
        HostCSR(bad)


def test_encoder_on_host_csr_gives_the_dense_output_and_gradients():
    torch.manual_seed(0)
    X = sp.random(50, 1200, density=0.05, format="csr", dtype=np.float64, random_state=4)  # float64 in: cast once
    encoder = Encoder(1200, 7)
    weights = torch.arange(7.0)
    results = []
    for x in (HostCSR(X), torch.from_numpy(X.toarray().astype(np.float32))):
        encoder.zero_grad()
        out = encoder(x)
        (out * weights).sum().backward()
        results.append((out.detach(), encoder.linear.weight_t.grad.clone(), encoder.linear.bias.grad.clone()))
    for on_csr, dense in zip(*results):
        torch.testing.assert_close(on_csr, dense, rtol=1e-5, atol=1e-6)


def test_dropout_on_host_csr_values_is_dense_dropout_on_the_stored_values():
    X = random_csr(30, 100, 0.2, seed=5)
    batch = HostCSR(X)
    kept = np.where(np.arange(X.nnz) % 3 == 0, 0.0, X.data * 2).astype(np.float32)
    other = batch.with_values(kept)
    assert other.indices is batch.indices and other.starts is batch.starts and other.ends is batch.ends
    np.testing.assert_array_equal(other.csr().toarray(), sp.csr_matrix((kept, X.indices, X.indptr), X.shape).toarray())
    copied = HostCSR.of_rows(X, np.arange(30))  # the rows copied block by block: its values in its own order
    doubled = copied.with_values(copied.data * 2)
    np.testing.assert_array_equal(doubled.csr().toarray(), X.toarray() * 2)
    clf = Classifier(100, 4, hid=5, dropout=0.5).train()  # a HostCSR input gets no second dropout in the model
    torch.manual_seed(1)
    a = clf.network(batch)
    torch.manual_seed(1)
    b = clf.network(batch)
    torch.testing.assert_close(a, b)  # the same draws for the hidden layers' dropout
    with pytest.raises(TypeError, match="float32 layer on the CPU"):
        Encoder(100, 3).double()(batch)


def test_inference_on_csr_features_reads_host_csr_batches_and_gives_the_dense_representation(monkeypatch):
    import model

    X = sp.random(90, 300, density=0.1, format="csr", dtype=np.float32, random_state=6)
    encoder = Encoder(300, 4)
    seen = []
    real = sparse.inference_batch

    def spy(*a, **k):
        batch = real(*a, **k)
        seen.append((type(batch).__name__, tuple(batch.shape)))
        return batch

    monkeypatch.setattr(model, "inference_batch", spy)
    rows = np.array([5, 80, 3, 3, 41])
    on_csr = model.represent(encoder, X, rows, batch_size=2)
    assert seen == [("HostCSR", (2, 300)), ("HostCSR", (2, 300)), ("HostCSR", (1, 300))]  # never densified
    dense = model.represent(encoder, X.toarray(), rows)  # a dense matrix is batched dense
    assert seen[3:] == [("Tensor", (5, 300))]
    np.testing.assert_allclose(on_csr, dense, rtol=1e-5, atol=1e-6)


def test_a_host_built_step_sent_as_torch_csr_gives_the_dense_output_and_gradients():
    """The path a GPU takes for a step built on the host (the collection too large to hold there):
    a torch CSR batch with its transpose made where it is, run here on the CPU."""
    import data
    import model
    import pretrain

    X = sp.random(20, 700, density=0.1, format="csr", dtype=np.float32, random_state=7)
    coll = pretrain.Collection.of_stacked(["toy"], ["d"], *sparse.stack_csr([X]), [None], [f"G{i}" for i in range(700)])
    targets = [np.zeros((20, 3), np.int64)]
    host = pretrain.prepare_step(coll, targets, [np.arange(20)], True, torch.device("cpu"))
    x = sparse.device_sparse_batch(host.X.csr(), torch.device("cpu"))  # what prepare_step makes on such a GPU
    assert type(x).__name__ == "SparseBatch"
    np.testing.assert_array_equal(x.x_t.to_dense().numpy(), X.toarray().T)
    encoder = Encoder(700, 5)
    results = []
    for batch in (x, host.X, torch.from_numpy(X.toarray())):
        encoder.zero_grad()
        out = encoder(batch)
        (out * torch.arange(5.0)).sum().backward()
        results.append((out.detach(), encoder.linear.weight_t.grad.clone()))
    for other in results[1:]:
        torch.testing.assert_close(other[0], results[0][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(other[1], results[0][1], rtol=1e-5, atol=1e-6)


def one_by_one_forward(X, weight, bias):
    """The forward product summed as the kernel's one-value-at-a-time loop did: per row, the stored
    values in column order (the gene blocks in order), each added to the float32 output in turn."""
    out = np.tile(bias.astype(np.float32), (X.shape[0], 1))
    for i in range(X.shape[0]):
        for p in range(X.indptr[i], X.indptr[i + 1]):
            out[i] = (out[i] + np.float32(X.data[p]) * weight[X.indices[p]]).astype(np.float32)
    return out


@pytest.mark.parametrize("per_row", [0, 1, 3, 7, 8, 9, 15, 16, 17, 40])
def test_unrolled_forward_sums_in_the_one_by_one_order(per_row):
    """Rows of every length around the kernel's eight-value and four-value passes give the same
    float32 numbers as adding their values one by one (no reassociation)."""
    rng = np.random.default_rng(per_row)
    genes = 2 * csr_kernels.BLOCK_GENES + 100  # three gene blocks
    rows = [np.sort(rng.choice(genes, size=per_row, replace=False)) for _ in range(6)]
    indptr = np.cumsum([0] + [len(r) for r in rows])
    X = sp.csr_matrix((rng.standard_normal(indptr[-1]).astype(np.float32),
                       np.concatenate(rows).astype(np.int32), indptr), shape=(6, genes))
    weight = rng.standard_normal((genes, 13)).astype(np.float32)
    bias = rng.standard_normal(13).astype(np.float32)
    batch = HostCSR(X)
    np.testing.assert_allclose(batch.times(weight, bias), X.toarray().astype(np.float64) @ weight + bias,
                               rtol=1e-5, atol=1e-5)
    # with fused multiply-adds the kernel rounds once per value where numpy rounds twice: the
    # order is what is compared, within a few float32 steps of each value
    np.testing.assert_allclose(batch.times(weight, bias), one_by_one_forward(X, weight, bias), rtol=1e-6, atol=1e-6)
    grad = rng.standard_normal((6, 13)).astype(np.float32)
    np.testing.assert_allclose(batch.transposed_times(grad), X.toarray().T.astype(np.float64) @ grad,
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [[3, 1, 3, 0], [], [5], list(range(9))[::-1]])
def test_take_rows_equals_scipy_row_indexing(rows):
    X = random_csr(9, 30, 0.3, seed=5)
    X = sp.csr_matrix(sp.diags((np.arange(9) != 4).astype(np.float32)) @ X)  # row 4 empty
    got = sparse.take_rows(X, np.array(rows, dtype=np.int64))
    want = X[np.array(rows, dtype=np.int64)]
    assert got.shape == want.shape and got.indices.dtype == got.indptr.dtype
    np.testing.assert_array_equal(got.toarray(), want.toarray())
    np.testing.assert_array_equal(got.indptr, want.indptr)


@pytest.mark.parametrize("block", [1, 7, 30, 512])
@pytest.mark.parametrize("rows", [[3, 1, 3, 0], [], [4], list(range(9))[::-1]])
def test_rows_copied_block_by_block_hold_each_row_s_pieces_and_give_the_csr_s_products(rows, block):
    X = random_csr(9, 30, 0.3, seed=block)
    X = sp.csr_matrix(sp.diags((np.arange(9) != 4).astype(np.float32)) @ X).sorted_indices()  # row 4 empty
    rows = np.array(rows, dtype=np.int64)
    starts, ends, indices, data = csr_kernels.take_block_major_rows(X.indptr, X.indices, X.data, rows, X.shape[1],
                                                                    block)
    want = X[rows]
    ptr = brute_pointers(want, block)
    assert starts.shape == ends.shape == (ptr.shape[0] - 1, len(rows)) and len(indices) == want.nnz
    for b in range(starts.shape[0]):
        for q in range(len(rows)):  # row q's values of block b, where the row-major copy has them
            np.testing.assert_array_equal(indices[starts[b, q]:ends[b, q]], want.indices[ptr[b, q]:ptr[b + 1, q]])
            np.testing.assert_array_equal(data[starts[b, q]:ends[b, q]], want.data[ptr[b, q]:ptr[b + 1, q]])
        if len(rows):  # within a block the rows follow one another
            np.testing.assert_array_equal(starts[b, 1:], ends[b, :-1])
    if len(rows):
        assert starts[0, 0] == 0 and ends[-1, -1] == want.nnz
    table = csr_kernels.row_blocks(X.indptr, X.indices, X.shape[1], block)
    tabled = csr_kernels.take_block_major_rows(X.indptr, X.indices, X.data, rows, X.shape[1], block, table=table)
    for got, expected in zip(tabled, (starts, ends, indices, data)):  # one pass from the table: the same copy
        np.testing.assert_array_equal(got, expected)
    if block == csr_kernels.BLOCK_GENES:
        np.testing.assert_array_equal(HostCSR.of_rows(X, rows, sparse.row_blocks(X)).data, HostCSR.of_rows(X, rows).data)
    batch, row_major = HostCSR.of_rows(X, rows), HostCSR(want)
    assert batch.shape == row_major.shape == (len(rows), 30)
    np.testing.assert_array_equal(batch.csr().toarray(), want.toarray())
    np.testing.assert_array_equal(batch.csr().indptr, want.indptr)
    rng = np.random.default_rng(block)
    weight = rng.standard_normal((30, 5)).astype(np.float32)
    grad = rng.standard_normal((len(rows), 5)).astype(np.float32)
    bias = np.zeros(5, np.float32)
    np.testing.assert_array_equal(batch.times(weight, bias), row_major.times(weight, bias))  # the same order
    np.testing.assert_array_equal(batch.transposed_times(grad), row_major.transposed_times(grad))


def test_rows_copied_block_by_block_refuse_unsorted_wide_or_missing_rows_and_fall_back_for_unsorted():
    indptr = np.array([0, 2, 3], np.int32)
    for indices in ([3, 1, 0], [0, 1, 5], [0, 1, -1]):  # unsorted row 0; column 5 of 5; negative column
        with pytest.raises(ValueError, match="sorted column indices"):
            csr_kernels.take_block_major_rows(indptr, np.array(indices, np.int32), np.ones(3, np.float32),
                                              np.array([1, 0]), 5, 2)
    with pytest.raises(IndexError, match="outside a matrix of 2 rows"):
        csr_kernels.take_block_major_rows(indptr, np.array([0, 1, 2], np.int32), np.ones(3, np.float32), [2], 5, 2)
    unsorted = sp.csr_matrix((np.array([1, 2, 3], np.float32), np.array([3, 1, 0], np.int32), indptr), shape=(2, 5))
    np.testing.assert_array_equal(HostCSR.of_rows(unsorted, np.array([0, 1])).csr().toarray(), unsorted.toarray())
    float64 = random_csr(6, 12, 0.4, seed=3).astype(np.float64)
    batch = HostCSR.of_rows(float64, np.array([5, 2]))
    assert batch.data.dtype == np.float32
    np.testing.assert_array_equal(batch.csr().toarray(), float64[[5, 2]].toarray().astype(np.float32))


@pytest.mark.parametrize("block", [1, 7, 30, 512])
def test_row_blocks_counts_each_row_s_values_up_to_each_block(block):
    X = random_csr(9, 30, 0.3, seed=block, index_dtype=np.int64)
    X = sp.csr_matrix(sp.diags((np.arange(9) != 4).astype(np.float32)) @ X).sorted_indices()  # row 4 empty
    table = csr_kernels.row_blocks(X.indptr, X.indices, X.shape[1], block)
    ptr = brute_pointers(X, block)
    assert table.dtype == np.uint16 and table.shape == (9, ptr.shape[0] - 1)
    np.testing.assert_array_equal(table.T.astype(np.int64), ptr[1:] - X.indptr[:-1])
    assert sparse.row_blocks(X.astype(np.float64)) is None  # batches of such a matrix are converted first


def test_row_blocks_widens_its_counts_for_a_row_of_more_than_65535_values():
    genes = 70_000
    X = sp.csr_matrix(np.ones((2, genes), np.float32))
    table = csr_kernels.row_blocks(X.indptr, X.indices, genes, 512)
    assert table.dtype == np.uint32 and int(table[1, -1]) == genes
    got = csr_kernels.take_block_major_rows(X.indptr, X.indices, X.data, np.array([1]), genes, 512, table=table)
    np.testing.assert_array_equal(got[2], np.arange(genes))


def test_row_blocks_and_the_copy_from_it_refuse_what_is_not_the_matrix_s():
    indptr = np.array([0, 2, 3], np.int32)
    for indices in ([3, 1, 0], [0, 1, 5], [0, 1, -1]):  # unsorted row 0; column 5 of 5; negative column
        with pytest.raises(ValueError, match="sorted column indices"):
            csr_kernels.row_blocks(indptr, np.array(indices, np.int32), 5, 2)
        wide = sp.csr_matrix((np.ones(3, np.float32), np.array(indices, np.int32), indptr), shape=(2, 6))
        assert (sparse.row_blocks(wide) is None) == (indices != [0, 1, 5])  # column 5 is within 6 columns
    X = random_csr(6, 12, 0.4, seed=3)
    table = csr_kernels.row_blocks(X.indptr, X.indices, 12, 4)
    take = lambda t: csr_kernels.take_block_major_rows(X.indptr, X.indices, X.data, np.array([5, 2]), 12, 4, table=t)
    for wrong in (table[:5], table[:, :2], table.astype(np.int64)):  # another matrix's shape, or a signed table
        with pytest.raises(ValueError, match="row_blocks table of 6 rows x 3 blocks"):
            take(wrong)
    other = table.copy()
    other[2, -1] += 1  # row 2's total is not the matrix's
    with pytest.raises(ValueError, match="another matrix's"):
        take(other)
    with pytest.raises(ValueError, match="row_blocks table of 6 rows x 1 blocks"):  # cut for other blocks
        HostCSR.of_rows(X, np.array([2]), table)
    other = sparse.row_blocks(X)
    other[2, -1] -= 1
    with pytest.raises(ValueError, match="another matrix's"):  # a batch never falls back past a wrong table
        HostCSR.of_rows(X, np.array([2]), other)
    decreasing = table.copy()
    decreasing[5, 0] = decreasing[5, 1] + 1  # counts that fall: no row's table
    with pytest.raises(ValueError, match="another matrix's"):
        take(decreasing)


def test_take_rows_refuses_rows_outside_the_matrix():
    X = random_csr(5, 10, 0.3, seed=6)
    for rows in ([5], [-1], [0, 7]):
        with pytest.raises(IndexError, match="outside a matrix of 5 rows"):
            sparse.take_rows(X, np.array(rows))


def test_gene_blocks_keep_each_block_s_values_in_order_and_refuse_wide_columns():
    X = random_csr(12, 70, 0.3, seed=7)
    crow, base, col, val = csr_kernels.gene_blocks(X.indptr, X.indices, X.data, 70, 32)
    dense = X.toarray()
    assert crow.shape == (3, 13) and base[-1] == X.nnz
    for b in range(3):
        part = sp.csr_matrix((val[base[b]:base[b + 1]], col[base[b]:base[b + 1]], crow[b]), shape=(12, 32))
        np.testing.assert_array_equal(part.toarray()[:, :dense[:, 32 * b:32 * (b + 1)].shape[1]],
                                      dense[:, 32 * b:32 * (b + 1)])
    # a chunk of rows of a larger matrix: its indptr is a slice that does not start at 0
    crow2, base2, col2, val2 = csr_kernels.gene_blocks(X.indptr[4:9], X.indices, X.data, 70, 32)
    np.testing.assert_array_equal(val2, csr_kernels.gene_blocks(*(lambda Y: (Y.indptr, Y.indices, Y.data))(X[4:8]),
                                                                70, 32)[3])
    with pytest.raises(ValueError, match="outside"):
        csr_kernels.gene_blocks(X.indptr, X.indices, X.data, 60, 32)


@pytest.mark.parametrize("threads", [1, 2])
def test_cluster_sums_and_moves_equal_dense_sums_whatever_the_threads(threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # the kernels take torch's number
    X = random_csr(40, 25, 0.3, seed=8)
    labels = np.random.default_rng(0).integers(0, 70, 40)  # more clusters than CLUSTER_PARTS, some empty
    sums = np.zeros((70, 25), np.float32)
    csr_kernels.cluster_sums(X.indptr, X.indices, X.data, labels, sums)
    want = np.zeros((70, 25))
    np.add.at(want, labels, X.toarray())
    np.testing.assert_allclose(sums, want, rtol=1e-6, atol=1e-6)
    moved = np.array([0, 7, 39])
    new = np.array([69, 0, 3])
    csr_kernels.move_rows(X.indptr, X.indices, X.data, moved, labels[moved], new, sums)
    labels2 = labels.copy()
    labels2[moved] = new
    want2 = np.zeros((70, 25))
    np.add.at(want2, labels2, X.toarray())
    np.testing.assert_allclose(sums, want2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(csr_kernels.row_norms(X.indptr, X.data), (X.toarray() ** 2).sum(1), rtol=1e-6)


def test_a_one_thread_process_stays_one_thread_after_numba_starts(tmp_path):
    """Starting numba's threads set OpenMP's count, and torch's with it, to all the cores: a torchrun
    rank given one thread ran two (in a fresh process, where numba's threads are not yet started)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = ("import torch, numba, numpy as np, scipy.sparse as sp, csr_kernels\n"
              "torch.set_num_threads(1)\n"
              "X = sp.random(50, 40, density=0.2, format='csr', dtype=np.float32, random_state=0)\n"
              "csr_kernels.row_norms(X.indptr, X.data)\n"
              "print(torch.get_num_threads(), numba.get_num_threads())\n")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "NUMBA_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1"]
