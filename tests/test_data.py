from dataclasses import replace
"""data.py: readers, gene mapping, the gene universe, alignment, splits, labels, batches, bad inputs."""
import warnings

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import data
from data import DataError
from settings import ReadSettings
from helpers import gene_names, toy_collection, toy_counts, write_cellblast_h5
import features as features_mod
import genes as gn
import splits
import sparse
import values
import files


def make_cell_data(X, genes, species="human", labels=None, name="toy"):
    """A CellData built in memory, for the functions that do not read files."""
    X = sp.csr_matrix(X, dtype=np.float32)
    cells = np.array([f"c{i}" for i in range(X.shape[0])], dtype=object)
    return data.CellData(name, X, np.asarray(genes, dtype=object), cells, labels, species)


@pytest.fixture
def toy():
    """Counts, gene symbols and string labels of a small three-type dataset."""
    X, types = toy_counts(n_cells=40, n_genes=12, n_types=3, seed=1)
    return X, gene_names(12), np.array([f"type_{t}" for t in types])


# --------------------------------------------------------------------------- readers


def test_read_cellblast_h5_csr(tmp_path, toy):
    X, genes, labels = toy
    path = write_cellblast_h5(tmp_path / "toy.h5", X, genes, labels)
    d = data.read_cellblast_h5(path)
    assert sp.isspmatrix_csr(d.X) and d.X.dtype == np.float32
    np.testing.assert_array_equal(d.X.toarray(), X)
    assert list(d.genes) == genes
    assert list(d.labels) == list(labels)
    assert list(d.cells) == [f"c{i}" for i in range(len(X))]
    assert d.name == "toy" and d.species == "human" and d.is_labelled


def test_read_cellblast_h5_dense_equals_csr(tmp_path, toy):
    X, genes, labels = toy
    csr = data.read_cellblast_h5(write_cellblast_h5(tmp_path / "csr.h5", X, genes, labels))
    dense = data.read_cellblast_h5(write_cellblast_h5(tmp_path / "dense.h5", X, genes, labels, dense=True))
    assert sp.isspmatrix_csr(dense.X)
    assert (csr.X != dense.X).nnz == 0
    assert list(csr.genes) == list(dense.genes) and list(csr.labels) == list(dense.labels)


def test_read_cellblast_h5_other_label_key(tmp_path, toy):
    X, genes, labels = toy
    path = write_cellblast_h5(tmp_path / "toy.h5", X, genes, labels, label_key="cell_type")
    assert not data.read_cellblast_h5(path).is_labelled  # default key absent: unlabelled
    assert list(data.read_cellblast_h5(path, label_key="cell_type").labels) == list(labels)
    with pytest.raises(DataError, match="cell_type"):  # strict: the error lists what is there
        data.read_cellblast_h5(path, strict_label_key=True)


def write_h5ad(path, X, genes, obs, raw_X=None):
    import anndata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = anndata.AnnData(X=X, obs=pd.DataFrame(obs, index=[f"c{i}" for i in range(X.shape[0])]),
                                var=pd.DataFrame(index=list(genes)))
        if raw_X is not None:
            adata.raw = anndata.AnnData(X=raw_X, obs=adata.obs, var=adata.var)
        adata.write_h5ad(path)
    return path


def test_read_h5ad_uses_X_when_non_negative(tmp_path, toy):
    X, genes, labels = toy
    path = write_h5ad(tmp_path / "toy.h5ad", sp.csr_matrix(X), genes, {"cell_ontology_class": labels})
    d = data.read_h5ad(path)
    np.testing.assert_array_equal(d.X.toarray(), X)
    assert d.X.dtype == np.float32 and list(d.genes) == genes and list(d.labels) == list(labels)


def test_read_h5ad_uses_raw_when_X_is_scaled(tmp_path, toy):
    X, genes, labels = toy
    scaled = (X - X.mean(0)) / (X.std(0) + 1)  # negative entries: not counts
    path = write_h5ad(tmp_path / "toy.h5ad", scaled, genes, {"cell_ontology_class": labels}, raw_X=X)
    d = data.read_h5ad(path)
    np.testing.assert_array_equal(d.X.toarray(), X)


def test_read_h5ad_unknown_label_key_lists_columns(tmp_path, toy):
    X, genes, labels = toy
    path = write_h5ad(tmp_path / "toy.h5ad", X, genes, {"louvain": labels, "batch": ["b"] * len(X)})
    with pytest.raises(DataError) as err:
        data.read_h5ad(path, label_key="cell_type")
    msg = str(err.value)
    assert str(path) in msg and "cell_type" in msg and "louvain" in msg and "batch" in msg


def test_read_h5ad_label_key_choice(tmp_path, toy):
    X, genes, labels = toy
    path = write_h5ad(tmp_path / "toy.h5ad", X, genes, {"louvain": labels})
    assert list(data.read_h5ad(path, label_key="louvain").labels) == list(labels)


def test_read_numpy_dir(tmp_path, toy):
    X, genes, labels = toy
    np.save(tmp_path / "feature.npy", X)
    np.save(tmp_path / "label.npy", labels)
    np.save(tmp_path / "gene_list.npy", np.array(genes))
    d = data.read_numpy_dir(tmp_path)
    assert sp.isspmatrix_csr(d.X) and d.X.dtype == np.float32
    np.testing.assert_array_equal(d.X.toarray(), X)
    assert list(d.genes) == genes and list(d.labels) == list(labels) and d.n_cells == len(X)


def test_read_any_dispatches(tmp_path, toy):
    X, genes, labels = toy
    write_cellblast_h5(tmp_path / "a.h5", X, genes, labels)
    write_h5ad(tmp_path / "a.h5ad", X, genes, {"cell_ontology_class": labels})
    folder = tmp_path / "np"
    folder.mkdir()
    np.save(folder / "feature.npy", X)
    np.save(folder / "gene_list.npy", np.array(genes))
    for path in (tmp_path / "a.h5", tmp_path / "a.h5ad", folder):
        np.testing.assert_array_equal(data.read_any(path).X.toarray(), X)


def test_species_guessed_from_symbols(tmp_path, toy):
    X, _, labels = toy
    mouse = data.read_cellblast_h5(write_cellblast_h5(tmp_path / "m.h5", X, gene_names(12, "mouse"), labels))
    assert mouse.species == "mouse"
    assert data.read_cellblast_h5(tmp_path / "m.h5", species="human").species == "human"


# --------------------------------------------------------------------------- genes


@pytest.fixture(scope="module")
def ortholog_rows():
    """Rows of the shipped table where mouse and human symbols differ by more than case."""
    table = pd.read_csv(gn.ORTHOLOG_TABLE, usecols=["human__gene_name", "mouse__gene_name"]).dropna()
    differ = table[table["mouse__gene_name"].str.upper() != table["human__gene_name"].str.upper()]
    assert len(differ) > 100
    return differ.iloc[:: max(1, len(differ) // 8)].head(8)


def test_mouse_symbols_map_to_human_orthologs(ortholog_rows):
    mouse = list(ortholog_rows["mouse__gene_name"])  # e.g. Qars -> QARS1, Car8 -> CA8
    expected = [h.upper() for h in ortholog_rows["human__gene_name"]]
    assert list(gn.map_genes(mouse, "mouse")) == expected


def test_unmapped_symbols_are_only_upper_cased():
    genes = ["Notagene1", "fooBar", "Xyz-2"]
    assert list(gn.map_genes(genes, "mouse")) == ["NOTAGENE1", "FOOBAR", "XYZ-2"]


def test_human_symbols_are_not_mapped(ortholog_rows):
    mouse = list(ortholog_rows["mouse__gene_name"])  # as human symbols, these only get upper-cased
    assert list(gn.map_genes(mouse, "human")) == [g.upper() for g in mouse]


def test_mapping_collisions_are_summed(ortholog_rows):
    row = ortholog_rows.iloc[0]
    mouse_symbol, human_symbol = row["mouse__gene_name"], row["human__gene_name"].upper()
    # the mouse symbol maps onto the human one, which the dataset also carries (upper-cased): collision
    genes = [mouse_symbol, "Other1", human_symbol.capitalize()]
    X = np.array([[1, 2, 3], [4, 0, 5], [0, 7, 0]], dtype=np.float32)
    d = gn.map_dataset_genes(make_cell_data(X, genes, species="mouse"))
    assert sorted(d.genes) == sorted([human_symbol, "OTHER1"])
    col = {g: i for i, g in enumerate(d.genes)}
    np.testing.assert_array_equal(d.X.toarray()[:, col[human_symbol]], X[:, 0] + X[:, 2])
    np.testing.assert_array_equal(d.X.toarray()[:, col["OTHER1"]], X[:, 1])
    assert sp.isspmatrix_csr(d.X) and d.X.dtype == np.float32


def test_map_dataset_genes_without_collision_keeps_matrix(ortholog_rows):
    genes = list(ortholog_rows["mouse__gene_name"])
    X = np.arange(2 * len(genes), dtype=np.float32).reshape(2, -1)
    d = gn.map_dataset_genes(make_cell_data(X, genes, species="mouse"))
    assert list(d.genes) == [h.upper() for h in ortholog_rows["human__gene_name"]]
    np.testing.assert_array_equal(d.X.toarray(), X)


def test_gene_universe_intersects_species():
    human = make_cell_data(np.ones((2, 3)), ["B", "A", "C"], "human")
    human2 = make_cell_data(np.ones((2, 2)), ["D", "E"], "human")
    mouse = make_cell_data(np.ones((2, 3)), ["C", "D", "A"], "mouse")
    assert list(gn.build_gene_universe([human, human2, mouse])) == ["A", "C", "D"]


def test_gene_universe_one_species_is_union_sorted():
    a = make_cell_data(np.ones((2, 3)), ["Z", "B", "M"])
    b = make_cell_data(np.ones((2, 2)), ["A", "M"])
    assert list(gn.build_gene_universe([a, b])) == ["A", "B", "M", "Z"]


def test_gene_universe_disjoint_species_raises():
    with pytest.raises(DataError):
        gn.build_gene_universe([make_cell_data(np.ones((1, 1)), ["A"], "human"),
                                  make_cell_data(np.ones((1, 1)), ["B"], "mouse")])


# --------------------------------------------------------------------------- alignment


def naive_align(X_dense, genes, universe):
    """Reference: one loop over the universe's genes, copying the matching column (or zeros)."""
    out = np.zeros((X_dense.shape[0], len(universe)), dtype=np.float32)
    for j, g in enumerate(universe):
        if g in genes:
            out[:, j] = X_dense[:, genes.index(g)]
    return out


def test_align_matches_naive_reference():
    rng = np.random.default_rng(3)
    X = sp.random(50, 40, density=0.2, format="csr", dtype=np.float32, random_state=rng) * 10
    genes = [f"G{i}" for i in rng.permutation(40)]  # dataset order differs from the universe's
    universe = sorted(set(genes[:30]) | {f"NEW{i}" for i in range(8)})  # 10 genes dropped, 8 missing
    aligned = gn.align_to_universe(make_cell_data(X, genes), universe)
    assert sp.isspmatrix_csr(aligned.X) and aligned.X.dtype == np.float32
    assert aligned.X.shape == (50, len(universe)) and list(aligned.genes) == universe
    np.testing.assert_array_equal(aligned.X.toarray(), naive_align(X.toarray(), genes, universe))
    aligned.X.check_format(full_check=True)


def test_align_when_universe_holds_all_genes():
    rng = np.random.default_rng(4)
    X = sp.random(20, 10, density=0.3, format="csr", dtype=np.float32, random_state=rng)
    genes = [f"G{i}" for i in range(10)]
    universe = sorted(genes + ["EXTRA"])
    aligned = gn.align_to_universe(make_cell_data(X, genes), universe)
    np.testing.assert_array_equal(aligned.X.toarray(), naive_align(X.toarray(), genes, universe))


def rows_strictly_sorted(X):
    """Column indices increase within every row (canonical CSR, as torch and cuSPARSE expect)."""
    return all(np.all(np.diff(X.indices[X.indptr[i]:X.indptr[i + 1]]) > 0) for i in range(X.shape[0]))


@pytest.mark.parametrize("case", ["shuffled genes", "sorted genes", "all genes shared", "unsorted input"])
def test_align_output_is_canonical_copy(case):
    rng = np.random.default_rng(6)
    dense = rng.integers(1, 9, (30, 20)) * (rng.random((30, 20)) < 0.25) * (rng.random((30, 1)) < 0.8)
    dense[-1] = 0  # some empty rows, one of them last
    X = sp.csr_matrix(dense.astype(np.float32))
    genes = [f"G{i:02d}" for i in (range(20) if case == "sorted genes" else rng.permutation(20))]
    universe = sorted(genes if case == "all genes shared" else genes[:12] + ["NEW"])
    if case == "unsorted input":  # reverse each row's stored order
        for i in range(X.shape[0]):
            lo, hi = X.indptr[i], X.indptr[i + 1]
            X.indices[lo:hi], X.data[lo:hi] = X.indices[lo:hi][::-1].copy(), X.data[lo:hi][::-1].copy()
        X.has_sorted_indices = False
    expected = naive_align(X.toarray(), genes, universe)
    before = X.copy()
    aligned = gn.align_to_universe(make_cell_data(X, genes), universe).X
    np.testing.assert_array_equal(aligned.toarray(), expected)
    assert rows_strictly_sorted(aligned) and aligned.has_sorted_indices
    aligned.data[:] = -1  # the output owns its values: the input is untouched
    np.testing.assert_array_equal(X.toarray(), before.toarray())


def test_align_row_losing_all_its_genes():
    X = np.array([[0, 5, 0], [1, 0, 2], [0, 3, 0]], dtype=np.float32)
    aligned = gn.align_to_universe(make_cell_data(X, ["A", "B", "C"]), ["A", "C"]).X
    np.testing.assert_array_equal(aligned.toarray(), X[:, [0, 2]])
    assert list(aligned.indptr) == [0, 0, 2, 2]


def test_align_without_shared_gene_raises():
    with pytest.raises(DataError, match="no gene"):
        gn.align_to_universe(make_cell_data(np.ones((2, 2)), ["A", "B"]), ["C", "D"])


# --------------------------------------------------------------------------- labels, splits, batches


@pytest.mark.parametrize("n", [30, 500, 5000])
def test_split_sizes_disjoint_and_covering(n):
    train, val, test = splits.split_cells(n, seed=0)
    assert len(train) == min(int(0.6 * n), 1000) and len(val) == min(int(0.1 * n), 1000)
    assert len(train) + len(val) + len(test) == n
    assert np.array_equal(np.sort(np.concatenate([train, val, test])), np.arange(n))


def test_split_max_train():
    train, _, _ = splits.split_cells(400, seed=0, max_train=100)
    assert len(train) == min(int(0.6 * 400), 100)


def test_split_same_seed_same_split_other_seed_other_split():
    a, b = splits.split_cells(200, seed=7), splits.split_cells(200, seed=7)
    c = splits.split_cells(200, seed=8)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_split_too_few_cells_raises():
    with pytest.raises(DataError):
        splits.split_cells(3, seed=0)


def test_encode_labels_sorted_and_order_independent():
    labels = ["T cell", "B cell", "NK", "B cell"]
    codes, classes = splits.encode_labels(labels)
    assert list(classes) == ["B cell", "NK", "T cell"]
    assert list(codes) == [2, 0, 1, 0]
    codes_rev, classes_rev = splits.encode_labels(labels[::-1])
    assert list(classes_rev) == list(classes)
    assert list(classes[codes_rev]) == labels[::-1]


def test_features_and_dense_rows_equal_numpy():
    rng = np.random.default_rng(5)
    X = sp.random(30, 8, density=0.4, format="csr", dtype=np.float32, random_state=rng) * 50
    before = X.copy()
    rows = np.array([4, 0, 17, 4])
    d = data.CellData("toy", X, np.array([f"G{i}" for i in range(8)], dtype=object),
                      np.array([f"c{i}" for i in range(30)], dtype=object), None, "human")
    out = sparse.dense_rows(features_mod.features(d), rows)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, np.log1p(X.toarray()[rows]), rtol=1e-6)
    np.testing.assert_array_equal(sparse.dense_rows(X, rows), X.toarray()[rows])
    already = replace(d, values=values.LOG1P_VALUES)  # transformed by the user: fed as it is
    np.testing.assert_array_equal(features_mod.features(already).toarray(), X.toarray())
    assert (X != before).nnz == 0  # the source matrix is left untouched


@pytest.mark.parametrize("shuffle", [False, True])
def test_iter_batches_covers_every_row_once(shuffle):
    rng = np.random.default_rng(0) if shuffle else None
    batches = list(splits.iter_batches(23, 5, rng))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(23))


def test_missing_labels_become_empty(tmp_path):
    X = np.ones((4, 2), dtype=np.float32)
    path = write_cellblast_h5(tmp_path / "t.h5", X, ["A", "B"], ["T", "na", "", "NA"])
    assert list(data.read_cellblast_h5(path, values="raw").labels) == ["T", "", "", ""]


def test_all_missing_labels_means_unlabelled(tmp_path):
    X = np.ones((3, 2), dtype=np.float32)
    path = write_cellblast_h5(tmp_path / "t.h5", X, ["A", "B"], ["na", "", "nan"])
    d = data.read_cellblast_h5(path, values="raw")
    assert d.labels is None and not d.is_labelled


def test_labelled_cells_drops_unlabelled():
    X = np.arange(8, dtype=np.float32).reshape(4, 2)
    d = make_cell_data(X, ["A", "B"], labels=np.array(["T", "", "B", ""], dtype=object))
    kept = data.labelled_cells(d)
    assert list(kept.labels) == ["T", "B"] and list(kept.cells) == ["c0", "c2"]
    np.testing.assert_array_equal(kept.X.toarray(), X[[0, 2]])
    with pytest.raises(DataError):
        data.labelled_cells(make_cell_data(X, ["A", "B"]))


# --------------------------------------------------------------------------- bad inputs


def write_raw_h5(path, **fields):
    """An .h5 written field by field; a dict value becomes a group."""
    with h5py.File(path, "w") as h5:
        for key, value in fields.items():
            if isinstance(value, dict):
                group = h5.create_group(key)
                for k, v in value.items():
                    group[k] = v
            else:
                h5[key] = value
    return path


def csr_group(X):
    X = sp.csr_matrix(X, dtype=np.float32)
    return {"data": X.data, "indices": X.indices, "indptr": X.indptr, "shape": np.array(X.shape)}


GOOD_X = np.array([[1, 0, 2], [0, 3, 0]], dtype=np.float32)
GOOD_GENES = np.array([b"A", b"B", b"C"])


def bad_h5_files():
    """name -> writer(path) of one defect each."""
    def with_value(value):
        X = GOOD_X.copy()
        X[0, 0] = value
        return lambda p: write_cellblast_h5(p, X, ["A", "B", "C"])

    def bad_indptr(p):
        g = csr_group(GOOD_X)
        g["indptr"] = g["indptr"][:-1]
        return write_raw_h5(p, exprs=g, var_names=GOOD_GENES)

    def bad_shape(p):
        g = csr_group(GOOD_X)
        g["shape"] = np.array([5, 3])
        return write_raw_h5(p, exprs=g, var_names=GOOD_GENES)

    def index_out_of_range(p):
        g = csr_group(GOOD_X)
        g["shape"] = np.array([2, 2])
        return write_raw_h5(p, exprs=g, var_names=GOOD_GENES[:2])

    def text_file(p):
        p.write_text("this is not hdf5\n")
        return p

    return {  # defect: (writer, what the message must say)
        "not hdf5": (text_file, "not an HDF5 file"),
        "missing exprs": (lambda p: write_raw_h5(p, var_names=GOOD_GENES), "no 'exprs'"),
        "missing var_names": (lambda p: write_raw_h5(p, exprs=csr_group(GOOD_X)), "no 'var_names'"),
        "exprs group lacks indptr": (lambda p: write_raw_h5(
            p, exprs={k: v for k, v in csr_group(GOOD_X).items() if k != "indptr"}, var_names=GOOD_GENES), "lacks"),
        "indptr too short": (bad_indptr, "indptr has 2 entries"),
        "shape disagrees with indptr": (bad_shape, "shape says 5 cells"),
        "gene index out of range": (index_out_of_range, "gene indices fall outside"),
        "gene names of wrong length": (lambda p: write_raw_h5(p, exprs=csr_group(GOOD_X), var_names=GOOD_GENES[:2]),
                                       "2 gene names for a matrix of 3 genes"),
        "negative": (with_value(-1.0), "negative"),
        "nan": (with_value(np.nan), "NaN"),
        "inf": (with_value(np.inf), "infinite"),
        "duplicate genes": (lambda p: write_cellblast_h5(p, GOOD_X, ["A", "B", "A"]), "duplicate gene names"),
        "labels of wrong length": (lambda p: _add_labels(write_cellblast_h5(p, GOOD_X, ["A", "B", "C"]), 3),
                                   "3 labels for 2 cells"),
        "empty csr": (lambda p: write_cellblast_h5(p, np.zeros((0, 3), np.float32), ["A", "B", "C"]), "empty"),
        "empty dense": (lambda p: write_cellblast_h5(p, np.zeros((0, 3), np.float32), ["A", "B", "C"], dense=True),
                        "empty"),
        "dense 1-D": (lambda p: write_raw_h5(p, exprs=np.ones(3, np.float32), var_names=GOOD_GENES), "2-D"),
        "dense 3-D": (lambda p: write_raw_h5(p, exprs=np.ones((2, 3, 1), np.float32), var_names=GOOD_GENES), "2-D"),
        "dense text": (lambda p: write_raw_h5(p, exprs=np.array([[b"a", b"b", b"c"]]), var_names=GOOD_GENES),
                       "not numeric"),
        "shape scalar": (lambda p: write_raw_h5(p, exprs={**csr_group(GOOD_X), "shape": 2}, var_names=GOOD_GENES),
                         "2 entries"),
        "shape float": (lambda p: write_raw_h5(p, exprs={**csr_group(GOOD_X), "shape": np.array([2.0, 3.0])},
                                               var_names=GOOD_GENES), "'exprs/shape' must be 2 integers"),
        "float indices": (with_csr(indices=lambda g: g["indices"].astype(np.float64)),
                          "CSR 'exprs/indices' holds float64 values; index arrays must be integers"),
        "float indptr": (with_csr(indptr=lambda g: g["indptr"].astype(np.float32)),
                         "CSR 'exprs/indptr' holds float32 values"),
        "data longer than indices": (with_csr(data=lambda g: np.append(g["data"], 1.0)),
                                     "data (4,) and indices (3) differ in length"),
        "dense exprs larger than stored": (lambda p: _with_h5(write_raw_h5(p, var_names=GOOD_GENES), lambda h5: (
            h5.create_dataset("exprs", shape=(10**6, 10**6), dtype="f4", chunks=(100, 100)))),
            "'exprs' declares shape (1000000, 1000000) (4,000,000,000,000 bytes) but the file stores 0 bytes"),
        "CSR data larger than stored": (with_csr(data=lambda g: None, indices=lambda g: None, post=lambda h5: [
            h5["exprs"].create_dataset(k, shape=(10**12,), dtype=t, chunks=(10**4,), compression="gzip")
            for k, t in (("data", "f4"), ("indices", "i4"))]), "'exprs/data' declares shape (1000000000000,)"),
        "absurd width, few values": (with_csr(shape=lambda g: np.array([2, 10**12])),
                                     "3 gene names for a matrix of 1000000000000 genes"),
        "dangling soft link": (lambda p: _with_h5(write_raw_h5(p, var_names=GOOD_GENES), lambda h5: h5.__setitem__(
            "exprs", h5py.SoftLink("/nowhere"))), "cannot read 'exprs' (KeyError"),
        "external link to a missing file": (lambda p: _with_h5(write_raw_h5(p, exprs=csr_group(GOOD_X)), lambda h5: (
            h5.__setitem__("var_names", h5py.ExternalLink("missing.h5", "/var_names")))),
            "'var_names' is an external link to"),
        "corrupt object header": (_corrupt_header("exprs/indices"), "the file is damaged or not in the expected layout"),
        "CSR member a group": (with_csr(data=lambda g: None, post=lambda h5: h5["exprs"].create_group("data")),
                               "'exprs/data' is a group, expected an array"),
        "var_names a group": (lambda p: _with_h5(write_raw_h5(p, exprs=csr_group(GOOD_X)), lambda h5: (
            h5.create_group("var_names"))), "'var_names' is a group"),
        "obs an array": (lambda p: write_raw_h5(p, exprs=csr_group(GOOD_X), var_names=GOOD_GENES, obs=np.ones(2)),
                         "cannot read 'obs' (AttributeError"),
        "labels 2-D": (lambda p: _with_h5(write_cellblast_h5(p, GOOD_X, ["A", "B", "C"]), lambda h5: (
            h5["obs"].__setitem__("cell_ontology_class", np.array([[b"T", b"B"]])))),
            "label column 'obs/cell_ontology_class' must be 1-D (one entry per cell or gene), got shape (1, 2)"),
        "var_names 2-D": (lambda p: write_raw_h5(p, exprs=csr_group(GOOD_X), var_names=GOOD_GENES.reshape(1, 3)),
                          "'var_names' must be 1-D"),
    }


def with_csr(post=None, **changes):
    """A writer of the good CSR file with some members replaced (None: left out) and ``post(h5)`` run after."""
    def write(p):
        g = csr_group(GOOD_X)
        for key, change in changes.items():
            g[key] = change(g)
        g = {k: v for k, v in g.items() if v is not None}
        write_raw_h5(p, exprs=g, var_names=GOOD_GENES)
        return _with_h5(p, post) if post else p
    return write


def _with_h5(path, edit):
    with h5py.File(path, "a") as h5:
        edit(h5)
    return path


def _corrupt_header(member):
    """A writer of a good file whose ``member``'s object header is overwritten with junk."""
    def write(p):
        write_cellblast_h5(p, GOOD_X, ["A", "B", "C"])
        with h5py.File(p, "r") as h5:
            address = h5py.h5o.get_info(h5[member].id).addr
        with open(p, "r+b") as fh:
            fh.seek(address)
            fh.write(b"\xff" * 64)
        return p
    return write


def _add_labels(path, n):
    with h5py.File(path, "a") as h5:
        h5["obs"]["cell_ontology_class"] = np.array([b"T"] * n)
    return path


def test_folder_given_as_h5_named(tmp_path):
    folder = tmp_path / "looks_like.h5"
    folder.mkdir()
    with pytest.raises(DataError) as err:
        data.read_cellblast_h5(folder)
    assert str(folder) in str(err.value)


def test_missing_file_named(tmp_path):
    for reader, name in ((data.read_cellblast_h5, "none.h5"), (data.read_h5ad, "none.h5ad"),
                         (data.read_numpy_dir, "none_dir"), (data.read_any, "none.h5")):
        with pytest.raises(DataError) as err:
            reader(tmp_path / name)
        assert str(tmp_path / name) in str(err.value)


@pytest.mark.parametrize("defect", ["negative", "nan", "labels", "duplicates", "1-D", "missing genes",
                                    "text features", "corrupt features", "object gene list"])
def test_bad_numpy_dir_gives_data_error_naming_folder(tmp_path, defect):
    X, genes, labels = GOOD_X.copy(), np.array(["A", "B", "C"]), np.array(["T", "B"])
    if defect == "negative":
        X[1, 1] = -2
    elif defect == "nan":
        X[1, 1] = np.nan
    elif defect == "labels":
        labels = labels[:1]
    elif defect == "duplicates":
        genes = np.array(["A", "A", "C"])
    elif defect == "1-D":
        X = X[0]
    elif defect == "text features":
        X = X.astype(str)
    elif defect == "object gene list":
        genes = genes.astype(object)  # needs pickle to load: refused
    np.save(tmp_path / "feature.npy", X)
    np.save(tmp_path / "label.npy", labels)
    if defect != "missing genes":
        np.save(tmp_path / "gene_list.npy", genes)
    if defect == "corrupt features":
        (tmp_path / "feature.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError) as err:
        data.read_numpy_dir(tmp_path)
    assert str(tmp_path) in str(err.value)


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
@pytest.mark.parametrize("defect", ["negative without raw", "nan", "duplicates", "empty", "not h5ad"])
def test_bad_h5ad_gives_data_error_naming_file(tmp_path, defect):
    path = tmp_path / "bad.h5ad"
    X, genes, obs = GOOD_X.copy(), ["A", "B", "C"], {"cell_ontology_class": ["T", "B"]}
    if defect == "negative without raw":
        X[0, 0] = -1
    elif defect == "nan":
        X[0, 0] = np.nan
    elif defect == "duplicates":
        genes = ["A", "B", "A"]
    elif defect == "empty":
        X, obs = X[:0], {"cell_ontology_class": []}
    if defect == "not h5ad":
        path.write_text("plain text")
    else:
        write_h5ad(path, X, genes, obs)
    with pytest.raises(DataError) as err:
        data.read_h5ad(path)
    assert str(path) in str(err.value)


def test_h5ad_nan_in_X_is_rejected_not_replaced_by_raw(tmp_path):
    """A NaN in X is bad data, not a sign that X is scaled: raw.X must not be used silently."""
    X = GOOD_X.copy()
    X[0, 0] = np.nan
    path = write_h5ad(tmp_path / "nan.h5ad", X, ["A", "B", "C"], {"cell_ontology_class": ["T", "B"]}, raw_X=GOOD_X)
    with pytest.raises(DataError, match="NaN"):
        data.read_h5ad(path)


# --------------------------------------------------------------------------- the embedded demo


def test_load_collection_demo():
    datasets = data.load_collection()
    assert [d.name for d in datasets] == list(data.DEMO_DATASETS)
    assert sum(d.is_labelled for d in datasets) == 2
    assert {d.species for d in datasets} == {"human"}
    for d in datasets:
        assert sp.isspmatrix_csr(d.X) and d.X.dtype == np.float32 and d.n_cells > 0
        assert not pd.Index(d.genes).duplicated().any()


# --------------------------------------------------------------------------- h5ad layouts users have


def counts_matrix(n_cells=30, n_genes=8, seed=2):
    """Integer counts with no empty row (every cell has a library size)."""
    X, _ = toy_counts(n_cells, n_genes, n_types=3, seed=seed)
    X[:, 0] += 1
    return X


def log1p_cp10k(counts):
    """What scanpy's normalize_total(target_sum=1e4) + log1p makes of counts."""
    return np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32)


def tpm_like(counts):
    gene_length = np.linspace(0.5, 4.0, counts.shape[1])
    rate = counts / gene_length
    return (rate / rate.sum(1, keepdims=True) * 1e6).astype(np.float32)


def with_entry(X, value):
    """``X`` with one stored entry set to ``value`` (an outlier)."""
    X = np.array(X, dtype=np.float32)
    X[3, 2] = value
    return X


VALUE_FIXTURES = {  # name: (build from counts, what value_kind must say)
    "integer counts": (lambda c: c, values.RAW_VALUES),
    "small integer counts (max 1): could be rounded logs": (lambda c: (c > 2).astype(np.float32),
                                                            values.AMBIGUOUS_VALUES),
    "log1p CP10k rounded to integers": (lambda c: np.round(log1p_cp10k(c)), values.AMBIGUOUS_VALUES),
    "log1p CP10k with one entry above 20": (lambda c: with_entry(log1p_cp10k(c), 25.0), values.LOG1P_VALUES),
    "log1p of counts with one entry above 20": (lambda c: with_entry(np.log1p(c + 0.5).astype(np.float32), 23.0),
                                                values.AMBIGUOUS_VALUES),
    "TPM-like, non-integer and large": (tpm_like, values.RAW_VALUES),
    "normalised to 10 per cell, not logged": (lambda c: (c / c.sum(1, keepdims=True) * 10).astype(np.float32),
                                             values.RAW_VALUES),
    "log1p CP10k": (log1p_cp10k, values.LOG1P_VALUES),
    "log1p of counts, no normalisation": (lambda c: np.log1p(c + 0.5).astype(np.float32), values.LOG1P_VALUES),
    "scaled": (lambda c: ((c - c.mean(0)) / (c.std(0) + 1)).astype(np.float32), values.SCALED_VALUES),
    "NaN": (lambda c: np.where(c > 5, np.nan, c).astype(np.float32), values.BAD_VALUES),
}


@pytest.mark.parametrize("fixture", list(VALUE_FIXTURES))
@pytest.mark.parametrize("layout", ["dense", "sparse"])
def test_value_kind_of_each_layout(fixture, layout):
    build, expected = VALUE_FIXTURES[fixture]
    X = build(counts_matrix())
    kind, why = values.value_kind(sp.csr_matrix(X) if layout == "sparse" else X)
    assert kind == expected, why


def test_value_kind_names_the_log1p_signature():
    _, why = values.value_kind(sp.csr_matrix(log1p_cp10k(counts_matrix())))
    assert "expm1" in why and "1e+04" in why


def write_adata(path, X, var_names, obs=None, raw_X=None, raw_var=None, layers=None, var=None):
    """An h5ad built with anndata: X, an optional raw (its own var), layers and var columns."""
    import anndata

    n_cells = X.shape[0]
    obs = obs if obs is not None else {"cell_ontology_class": [f"type_{i % 3}" for i in range(n_cells)]}
    var_frame = pd.DataFrame(var or {}, index=list(var_names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adata = anndata.AnnData(X=X, obs=pd.DataFrame(obs, index=[f"c{i}" for i in range(n_cells)]), var=var_frame)
        for key, value in (layers or {}).items():
            adata.layers[key] = value
        if raw_X is not None:
            raw_var = raw_var if raw_var is not None else var_frame
            adata.raw = anndata.AnnData(X=raw_X, obs=adata.obs, var=raw_var)
        adata.write_h5ad(path)
    return path


ENSEMBL = [f"ENSG{i:011d}" for i in range(8)]
SYMBOLS = ["INS", "GCG", "SST", "PPY", "KRT19", "CPA1", "GHRL", "PRSS1"]


def h5ad_layouts():
    """name: (write(path, counts), where the counts must be read from, the genes expected)."""
    def cellxgene(p, c):  # Ensembl IDs, symbols in feature_name, counts in raw.X, log-normalised X
        var = {"feature_name": SYMBOLS, "feature_biotype": ["gene"] * 8}
        return write_adata(p, sp.csr_matrix(log1p_cp10k(c)), ENSEMBL, raw_X=sp.csr_matrix(c), var=var)

    return {
        "counts in X": (lambda p, c: write_adata(p, sp.csr_matrix(c), SYMBOLS), "X", SYMBOLS),
        "dense counts in X, log1p in a layer": (
            lambda p, c: write_adata(p, c, SYMBOLS, layers={"log1p": log1p_cp10k(c)}), "X", SYMBOLS),
        "scaled X, counts in raw.X": (lambda p, c: write_adata(
            p, VALUE_FIXTURES["scaled"][0](c), SYMBOLS, raw_X=c), "raw.X", SYMBOLS),
        "CELLxGENE": (cellxgene, "raw.X", SYMBOLS),
        "log1p X, counts in layers['counts']": (lambda p, c: write_adata(
            p, sp.csr_matrix(log1p_cp10k(c)), SYMBOLS, layers={"counts": sp.csr_matrix(c)}),
            "layers['counts']", SYMBOLS),
        "log1p X and raw.X, counts in layers['UMI']": (lambda p, c: write_adata(
            p, log1p_cp10k(c), SYMBOLS, raw_X=log1p_cp10k(c), layers={"other": log1p_cp10k(c), "UMI": c}),
            "layers['UMI']", SYMBOLS),
    }


@pytest.mark.parametrize("layout", list(h5ad_layouts()))
def test_read_h5ad_finds_the_counts_and_says_where(tmp_path, caplog, layout):
    write, where, genes = h5ad_layouts()[layout]
    counts = counts_matrix()
    path = write(tmp_path / "cells.h5ad", counts)
    with caplog.at_level("INFO", logger="scpretrain.data"):
        d = data.read_h5ad(path)
    np.testing.assert_array_equal(d.X.toarray(), counts)
    assert list(d.genes) == genes and d.values == values.RAW_VALUES
    assert f"cells.h5ad: values from {where} (raw counts)" in caplog.text


def test_read_h5ad_tpm_in_X_counts_as_raw(tmp_path, caplog):
    tpm = tpm_like(counts_matrix())
    path = write_adata(tmp_path / "tpm.h5ad", tpm, SYMBOLS, layers={"counts": counts_matrix()})
    with caplog.at_level("INFO", logger="scpretrain.data"):
        d = data.read_h5ad(path)
    np.testing.assert_allclose(d.X.toarray(), tpm)
    assert "values from X (TPM-like values" in caplog.text


def test_cellxgene_symbols_logged(tmp_path, caplog):
    write, _, _ = h5ad_layouts()["CELLxGENE"]
    path = write(tmp_path / "cxg.h5ad", counts_matrix())
    with caplog.at_level("INFO", logger="scpretrain.data"):
        data.read_h5ad(path)
    assert "gene symbols from var['feature_name']" in caplog.text


def pbmc68k_like(path, counts):
    """Scaled X and log-normalised raw.X, as scanpy's pbmc68k_reduced: no counts anywhere."""
    logn = log1p_cp10k(counts)
    return write_adata(path, ((logn - logn.mean(0)) / (logn.std(0) + 1e-3)).astype(np.float32), SYMBOLS, raw_X=logn)


LOG_ONLY_FILES = {  # name: write(path, counts)
    "log1p X only": lambda p, c: write_adata(p, sp.csr_matrix(log1p_cp10k(c)), SYMBOLS),
    "log1p X and raw.X": lambda p, c: write_adata(p, log1p_cp10k(c), SYMBOLS, raw_X=log1p_cp10k(c)),
    "scaled X, log1p raw.X": pbmc68k_like,
}


@pytest.mark.parametrize("layout", list(LOG_ONLY_FILES))
def test_only_log_normalised_values_refused_naming_the_flag(tmp_path, layout):
    path = LOG_ONLY_FILES[layout](tmp_path / "logn.h5ad", counts_matrix())
    with pytest.raises(DataError) as err:
        data.read_h5ad(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: no raw counts, only log-normalised values") and "--log_transformed" in msg
    assert "\n" not in msg


def test_log_transformed_values_are_fed_as_they_are(tmp_path):
    counts = counts_matrix()
    path = pbmc68k_like(tmp_path / "pbmc.h5ad", counts)
    d = data.read_h5ad(path, layer="raw", values="log1p")
    assert d.values == values.LOG1P_VALUES
    np.testing.assert_allclose(d.X.toarray(), log1p_cp10k(counts), rtol=1e-6)
    np.testing.assert_allclose(features_mod.features(d).toarray(), log1p_cp10k(counts), rtol=1e-6)  # no second log1p
    x_only = LOG_ONLY_FILES["log1p X only"](tmp_path / "x.h5ad", counts)
    d = data.read_h5ad(x_only, values="log1p")  # no --layer: X
    np.testing.assert_allclose(features_mod.features(d).toarray(), log1p_cp10k(counts), rtol=1e-6)


def test_log_transformed_on_raw_counts_warns(tmp_path, caplog):
    path = write_adata(tmp_path / "c.h5ad", counts_matrix(), SYMBOLS)
    with caplog.at_level("WARNING", logger="scpretrain.data"):
        assert data.read_h5ad(path, values="log1p").values == values.LOG1P_VALUES
    assert "looks like raw values" in caplog.text


def test_layer_option_picks_the_matrix(tmp_path):
    counts = counts_matrix()
    path = write_adata(tmp_path / "l.h5ad", counts * 2, SYMBOLS, raw_X=counts * 3, layers={"spliced": counts})
    for layer, factor in (("X", 2), ("raw", 3), ("spliced", 1), (None, 2)):
        np.testing.assert_array_equal(data.read_h5ad(path, layer=layer).X.toarray(), counts * factor)


def bad_layer_choices():
    """name: (write(path, counts), read options, the one-line message expected after the path)."""
    counts_with_log_layer = lambda p, c: write_adata(p, c, SYMBOLS, layers={"logn": log1p_cp10k(c)})  # noqa: E731
    return {
        "unknown layer": (counts_with_log_layer, {"layer": "counts"},
                          "no layer 'counts'; available: ['X', 'logn'] (pass one of them to --layer)"),
        "log layer without the flag": (counts_with_log_layer, {"layer": "logn"},
                                       "layers['logn'] holds log-normalised values"),
        "scaled layer": (pbmc68k_like, {"layer": "X", "values": "log1p"}, "X holds scaled or centred values"),
        "scaled X with the flag": (pbmc68k_like, {"values": "log1p"}, "choose another matrix with --layer"),
        "NaN in the chosen layer": (lambda p, c: write_adata(p, c, SYMBOLS, layers={"n": np.full_like(c, np.nan)}),
                                    {"layer": "n"}, "layers['n'] holds NaN or infinite values"),
        "missing symbol column": (lambda p, c: write_adata(p, c, ENSEMBL, var={"gene_ids": ENSEMBL}),
                                  {"gene_symbols": "symbol"},
                                  "no column 'symbol' in var for --gene_symbols; available columns: ['gene_ids']"),
    }


@pytest.mark.parametrize("case", list(bad_layer_choices()))
def test_bad_layer_or_symbol_choice_is_one_line(tmp_path, case):
    write, options, expected = bad_layer_choices()[case]
    path = write(tmp_path / "f.h5ad", counts_matrix())
    with pytest.raises(DataError) as err:
        data.read_h5ad(path, **options)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and expected in msg and "\n" not in msg


def test_gene_symbols_column_and_duplicates_summed(tmp_path, caplog):
    counts = counts_matrix()
    symbols = ["INS", "GCG", "INS", "PPY", "", "CPA1", "GCG", "PRSS1"]  # INS and GCG twice; one missing
    path = write_adata(tmp_path / "s.h5ad", counts, ENSEMBL, var={"symbol": symbols})
    with caplog.at_level("WARNING", logger="scpretrain.data"):
        d = data.read_h5ad(path, gene_symbols="symbol")
    expected = {"INS": counts[:, 0] + counts[:, 2], "GCG": counts[:, 1] + counts[:, 6], "PPY": counts[:, 3],
                ENSEMBL[4]: counts[:, 4], "CPA1": counts[:, 5], "PRSS1": counts[:, 7]}
    assert sorted(d.genes) == sorted(expected)
    for j, gene in enumerate(d.genes):
        np.testing.assert_array_equal(d.X[:, j].toarray().ravel(), expected[gene])
    assert "2 gene columns share a symbol" in caplog.text


def test_gene_symbols_from_raw_var_when_values_come_from_raw(tmp_path):
    counts = counts_matrix()
    raw_var = pd.DataFrame({"symbol": SYMBOLS}, index=ENSEMBL)
    var = {"symbol": [s.lower() for s in SYMBOLS]}  # differs, so the test sees which one is used
    path = write_adata(tmp_path / "r.h5ad", log1p_cp10k(counts), ENSEMBL, raw_X=counts, raw_var=raw_var, var=var)
    assert list(data.read_h5ad(path, gene_symbols="symbol").genes) == SYMBOLS
    no_symbols = pd.DataFrame(index=ENSEMBL[::-1])  # raw.var without the column, genes in another order
    path = write_adata(tmp_path / "v.h5ad", log1p_cp10k(counts), ENSEMBL, raw_X=counts[:, ::-1], raw_var=no_symbols,
                       var=var)
    assert list(data.read_h5ad(path, gene_symbols="symbol").genes) == var["symbol"][::-1]  # var's, matched by ID


def test_ensembl_ids_without_symbols_warn(tmp_path, caplog):
    path = write_adata(tmp_path / "e.h5ad", counts_matrix(), ENSEMBL, var={"gene_ids": ENSEMBL})
    with caplog.at_level("WARNING", logger="scpretrain.data"):
        d = data.read_h5ad(path)
    assert list(d.genes) == ENSEMBL and "pass --gene_symbols COLUMN" in caplog.text


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_duplicate_var_names_still_refused(tmp_path):
    path = write_adata(tmp_path / "d.h5ad", counts_matrix(), SYMBOLS[:7] + ["INS"])
    with pytest.raises(DataError, match="duplicate gene names"):
        data.read_h5ad(path)


def test_options_reach_every_reader(tmp_path):
    counts = counts_matrix()
    h5ad = write_adata(tmp_path / "a.h5ad", log1p_cp10k(counts), ENSEMBL, layers={"counts": counts},
                       var={"symbol": SYMBOLS})
    d = data.read_any(h5ad, layer="counts", gene_symbols="symbol")
    assert list(d.genes) == SYMBOLS and d.values == values.RAW_VALUES
    np.testing.assert_array_equal(d.X.toarray(), counts)
    h5 = write_cellblast_h5(tmp_path / "b.h5", counts, SYMBOLS, ["T"] * len(counts))
    folder = tmp_path / "np"
    folder.mkdir()
    np.save(folder / "feature.npy", counts)
    np.save(folder / "gene_list.npy", np.array(SYMBOLS))
    for path in (h5, folder):  # layer and gene_symbols do not apply; log_transformed does
        assert data.read_any(path, layer="nope", gene_symbols="nope").values == values.RAW_VALUES
        assert data.read_any(path, log_transformed=True).values == values.LOG1P_VALUES
    loaded = data.load_collection([str(h5ad)], ReadSettings(layer="X", values="log1p"))
    assert loaded[0].values == values.LOG1P_VALUES and loaded[0].n_genes == 8


def test_flags_reach_load_datasets_and_ann_input(tmp_path):
    import cli
    import finetune
    import main

    counts = counts_matrix()
    path = write_adata(tmp_path / "a.h5ad", log1p_cp10k(counts), ENSEMBL, layers={"umis": counts},
                       var={"symbol": SYMBOLS})
    args = main.parse_args(["--datasets", str(path), "--layer", "X", "--gene_symbols", "symbol", "--log_transformed"])
    (d,) = data.load_collection(args.datasets, cli.read_settings(args))
    assert d.values == values.LOG1P_VALUES and list(d.genes) == SYMBOLS
    np.testing.assert_allclose(d.X.toarray(), log1p_cp10k(counts), rtol=1e-6)
    args = main.parse_args(["--ann_input", str(path), "--gene_symbols", "symbol"])
    (d,) = finetune.finetune_datasets(args.datasets, cli.read_settings(args), args.ann_input)
    assert d.values == values.RAW_VALUES and list(d.genes) == SYMBOLS
    np.testing.assert_array_equal(d.X.toarray(), counts)
    defaults = main.parse_args([])
    assert (defaults.layer, defaults.gene_symbols, defaults.values) == (None, None, "auto")


# --------------------------------------------------------------------------- more bad files: h5ad, .npy


def bad_h5ad_files():
    """name: (write(path), the one-line message expected after the path)."""
    def huge_member(p):  # a tiny file whose uns declares 4 TB
        write_adata(p, counts_matrix(), SYMBOLS)
        return _with_h5(p, lambda h5: h5["uns"].create_dataset("big", shape=(10**6, 10**6), dtype="f4",
                                                                chunks=(100, 100)))

    def dangling_X(p):
        write_adata(p, counts_matrix(), SYMBOLS)

        def relink(h5):
            del h5["X"]
            h5["X"] = h5py.SoftLink("/nowhere")
        return _with_h5(p, relink)

    def corrupt_header(p):
        write_adata(p, counts_matrix(), SYMBOLS)
        with h5py.File(p, "r") as h5:
            address = h5py.h5o.get_info(h5["obs"].id).addr
        with open(p, "r+b") as fh:
            fh.seek(address)
            fh.write(b"\xff" * 64)
        return p

    return {
        "declared size beyond storage": (huge_member, "'uns/big' declares shape (1000000, 1000000)"),
        "X a dangling link": (dangling_X, "cannot read 'X'"),
        "corrupt object header": (corrupt_header, "cannot read"),
        "folder": (lambda p: p.mkdir() or p, "is a folder, not an h5ad file"),
        "text": (lambda p: written(p, b"plain text"), "not an HDF5 file (expected an h5ad)"),
    }


BAD_FILE_CASES = [(table, reader, suffix, defect) for table, reader, suffix in
                  ((bad_h5_files, data.read_cellblast_h5, ".h5"), (bad_h5ad_files, data.read_h5ad, ".h5ad"))
                  for defect in table()]


@pytest.mark.parametrize("table, reader, suffix, defect", BAD_FILE_CASES,
                         ids=[f"{suffix[1:]}-{defect}" for _, _, suffix, defect in BAD_FILE_CASES])
def test_bad_file_is_one_line_naming_it(tmp_path, table, reader, suffix, defect):
    write, expected = table()[defect]
    path = write(tmp_path / f"bad{suffix}")
    with pytest.raises(DataError) as err:
        reader(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and expected in msg and "\n" not in msg


def written(path, content: bytes):
    path.write_bytes(content)
    return path


def npy_with_header(path, shape, dtype="<f4", payload=b"\0" * 16):
    """A .npy whose header declares ``shape`` followed by ``payload`` bytes of data."""
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, {"descr": dtype, "fortran_order": False, "shape": shape})
        fh.write(payload)
    return path


def bad_npy_folders():
    """name: (write(folder): the bad file, the one-line message expected after that file's path)."""
    def good(folder, **arrays):
        arrays = {"feature": GOOD_X, "gene_list": np.array(["A", "B", "C"]), "label": np.array(["T", "B"]), **arrays}
        for key, value in arrays.items():
            np.save(folder / f"{key}.npy", value)

    def truncated(folder):
        good(folder)
        raw = (folder / "feature.npy").read_bytes()
        (folder / "feature.npy").write_bytes(raw[:-4])
        return folder / "feature.npy"

    return {
        "header asks for terabytes": (lambda f: good(f) or npy_with_header(f / "feature.npy", (10**6, 10**6)),
                                      "header declares shape (1000000, 1000000) of float32 (4,000,000,000,000 bytes)"
                                      " but the file holds 16 bytes of data"),
        "truncated": (truncated, "header declares shape (2, 3) of float32 (24 bytes) but the file holds 20 bytes"),
        "not npy": (lambda f: good(f) or written(f / "feature.npy", b"plain text"),
                    "not a readable .npy file"),
        "labels 2-D": (lambda f: good(f, label=np.array([["T", "B"]])) or f / "label.npy",
                       "the labels must be 1-D (one entry per cell or gene), got shape (1, 2)"),
        "gene list 2-D": (lambda f: good(f, gene_list=np.array([["A", "B", "C"]])) or f / "gene_list.npy",
                          "the gene list must be 1-D"),
    }


@pytest.mark.parametrize("defect", list(bad_npy_folders()))
def test_bad_npy_file_is_one_line_naming_it(tmp_path, defect):
    write, expected = bad_npy_folders()[defect]
    bad_file = write(tmp_path)
    with pytest.raises(DataError) as err:
        data.read_numpy_dir(tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{bad_file}: ") and expected in msg and "\n" not in msg


def test_h5ad_without_the_label_column_is_pretraining_data_in_a_collection(tmp_path):
    import anndata

    counts, _ = toy_counts(20, 8, 2, 0)
    anndata.AnnData(X=sp.csr_matrix(counts), var=pd.DataFrame(index=gene_names(8)),
                    obs=pd.DataFrame({"other": ["x"] * 20}, index=[f"c{i}" for i in range(20)])).write_h5ad(tmp_path / "u.h5ad")
    (d,) = data.load_collection([str(tmp_path / "u.h5ad")])
    assert not d.is_labelled and d.n_cells == 20
    with pytest.raises(DataError, match="no label column 'cell_ontology_class' in obs; available columns: \\['other'\\]"):
        data.read_any(tmp_path / "u.h5ad", strict_label_key=True)


# --------------------------------------------------------------------------- datasets read several at a time


def test_map_in_order_keeps_the_order_and_takes_items_lazily():
    import threading
    import time

    taken, lock = [], threading.Lock()

    def items():
        for i in range(12):
            with lock:
                taken.append(i)
            yield i

    def slow_square(i):
        time.sleep(0.01 * (5 - i % 5))  # later items finish first
        return i * i

    out = data.map_in_order(slow_square, items(), threads=3)
    assert next(out) == 0
    assert len(taken) <= 4  # three in hand, one more taken as the first is handed out
    assert [0] + list(out) == [i * i for i in range(12)]


def test_map_in_order_raises_at_the_failing_item_and_starts_no_more():
    started = []

    def work(i):
        started.append(i)
        if i == 2:
            raise DataError(f"dataset {i} is broken")
        return i

    with pytest.raises(DataError, match="dataset 2"):
        list(data.map_in_order(work, range(50), threads=2))
    assert max(started) <= 4  # the reading stopped near the failure, not at the end of the list


def test_load_entries_in_threads_equals_one_at_a_time(tmp_path):
    paths = toy_collection(tmp_path)
    entries = data.dataset_entries(paths)
    one = data.load_entries(entries, threads=1)
    several = data.load_entries(entries, threads=3)
    assert [d.name for d in several] == [d.name for d in one] == ["alpha", "beta", "gamma"]
    for a, b in zip(one, several):
        assert (a.X != b.X).nnz == 0 and list(a.genes) == list(b.genes)
    assert data.dataset_digests(several, threads=3) == [data.dataset_digest(d) for d in one]


def test_dataset_digest_hashes_the_values_as_one_converted_copy(monkeypatch, toy):
    import hashlib

    d = make_cell_data(sp.csr_matrix(toy[0]), toy[1])
    X = d.X
    h = hashlib.blake2b(digest_size=8)  # the digest as its definition says, from whole converted copies
    h.update(repr((X.shape, d.values, d.species)).encode())
    for array in (X.indptr.astype(np.int64), X.indices.astype(np.int64), X.data.astype(np.float32)):
        h.update(array.tobytes())
    h.update("\n".join(map(str, d.genes)).encode())
    if d.labels is not None:
        h.update("\n".join(map(str, d.labels)).encode())
    monkeypatch.setattr(data, "DIGEST_CHUNK", 7)  # many chunks, the last one short
    assert data.dataset_digest(d) == h.hexdigest()


def test_value_kind_of_float32_counts_and_log_values_in_any_dtype():
    X, _ = toy_counts(200, 40)
    for dtype in (np.float32, np.float64, np.int32):
        assert values.value_kind(sp.csr_matrix(X.astype(dtype)))[0] == values.RAW_VALUES
    logged = sp.csr_matrix(np.log1p(X / X.sum(1, keepdims=True) * 1e4))
    for dtype in (np.float32, np.float64):
        assert values.value_kind(logged.astype(dtype))[0] == values.LOG1P_VALUES
