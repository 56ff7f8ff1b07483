"""The classes of defects a hostile probe found (issue 24), one table-driven test per class:
inputs never destroyed, write failures, values never logged twice, malformed matrices, checkpoints
validated completely, no stale results, edges, Ctrl-C in compiled code, concurrent writers."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import annotate
import checkpoints
import clus
import data
import fig
import main
import results
import rf_svm_lr
from helpers import gene_names, save_encoder, toy_counts, toy_dataset_file, write_cellblast_h5
from model import Encoder

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {"main": main, "annotate": annotate, "rf_svm_lr": rf_svm_lr, "clus": clus, "fig": fig}


def run_cli(script: str, argv: list) -> tuple[int, str]:
    """A script's ``main`` in this process: (exit status, 0 when it returned), with its stderr."""
    import io
    import logging

    module = SCRIPTS[script]
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    try:
        args = module.parse_args([str(a) for a in argv])
        real_setup = module.runtime.setup_logging
        module.runtime.setup_logging = lambda level: (real_setup(level), root.addHandler(handler))
        try:
            module.main(args)
            code = 0
        except SystemExit as exc:
            code = exc.code
        finally:
            module.runtime.setup_logging = real_setup
    finally:
        root.removeHandler(handler)
    return code, stream.getvalue()


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if " ERROR " in line or line.startswith("ERROR")]


def digest(path) -> str:
    path = Path(path)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def write_h5ad(path, counts, labels=None, genes=None, **kw):
    n_cells, n_genes = counts.shape
    obs = pd.DataFrame(index=[f"c{i}" for i in range(n_cells)])
    if labels is not None:
        obs["cell_type"] = labels
    adata = anndata.AnnData(X=sp.csr_matrix(counts, dtype=np.float32), obs=obs,
                            var=pd.DataFrame(index=genes or gene_names(n_genes)), **kw)
    adata.write_h5ad(path)
    return Path(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A reference and a query h5ad, two Cell BLAST datasets, an encoder and a classifier."""
    root = tmp_path_factory.mktemp("world")
    counts, types = toy_counts(150, 30, 3, 4)
    ref = write_h5ad(root / "ref.h5ad", counts, [f"type_{t}" for t in types])
    query = write_h5ad(root / "query.h5ad", toy_counts(60, 30, 3, 5)[0], [f"type_{t}" for t in toy_counts(60, 30, 3, 5)[1]])
    sets = [toy_dataset_file(root / "alpha.h5", n_cells=120, n_genes=30, seed=1),
            toy_dataset_file(root / "beta.h5", n_cells=100, n_genes=30, n_types=2, seed=2)]
    encoder = save_encoder(root / "enc.pt", Encoder(30, 8), gene_names(30))
    clf = root / "clf.pt"
    code, err = run_cli("annotate", ["train", "--reference", ref, "--label_key", "cell_type", "--save_model", clf,
                                     "--ft_epoch", "3", "--hid", "8", "--log_level", "WARNING"])
    assert code == 0, err
    label_map = root / "map.csv"
    label_map.write_text("model,query\n" + "".join(f"type_{t},type_{t}\n" for t in range(3)))
    return {"root": root, "ref": ref, "query": query, "sets": [str(s) for s in sets], "encoder": encoder,
            "clf": clf, "map": label_map}


# --------------------------------------------------------------------------- 1. never destroy an input


def clash_cases():
    """name: (script, build(world, tmp) -> (argv, the input that must be left as it was))."""
    def symlink_to(tmp, target):
        link = tmp / "link.h5ad"
        link.symlink_to(target)
        return link

    def resume_twin(w, tmp):  # a dataset at MODEL.resume, where pre-training writes its epoch checkpoint
        twin = tmp / "model.pt.resume"
        twin.write_bytes(Path(w["sets"][0]).read_bytes())
        return ["--is_pretrain", "--datasets", w["sets"][1], twin, "--save_model", tmp / "model.pt"], twin

    return {
        "train --save_model is the reference": ("annotate", lambda w, t: (
            ["train", "--reference", w["ref"], "--label_key", "cell_type", "--save_model", w["ref"]], w["ref"])),
        "train --save_model is the reference through '..'": ("annotate", lambda w, t: (
            ["train", "--reference", w["ref"], "--label_key", "cell_type", "--save_model",
             w["root"] / ".." / w["root"].name / "ref.h5ad"], w["ref"])),
        "pre-training --save_model is one of the datasets": ("main", lambda w, t: (
            ["--is_pretrain", "--datasets", *w["sets"], "--save_model", w["sets"][1]], w["sets"][1])),
        "pre-training's epoch checkpoint is a dataset": ("main", resume_twin),
        "predict --out is the query": ("annotate", lambda w, t: (
            ["predict", "--model", w["clf"], "--query", w["query"], "--out", w["query"]], w["query"])),
        "predict --out is the query through a symlink": ("annotate", lambda w, t: (
            ["predict", "--model", w["clf"], "--query", w["query"], "--out", symlink_to(t, w["query"])], w["query"])),
        "predict's CSV is the label map": ("annotate", lambda w, t: (
            ["predict", "--model", w["clf"], "--query", w["query"], "--out", w["map"].with_suffix(".h5ad"),
             "--query_label_key", "cell_type", "--label_map", w["map"]], w["map"])),
        "predict --out is the model": ("annotate", lambda w, t: (
            ["predict", "--model", w["clf"], "--query", w["query"], "--out", symlink_to(t, w["clf"])], w["clf"])),
        "embed --out is the query": ("annotate", lambda w, t: (
            ["embed", "--pretrained_model", w["encoder"], "--query", w["query"], "--out", w["query"]], w["query"])),
        "transfer --save_model is the reference": ("annotate", lambda w, t: (
            ["transfer", "--reference", w["ref"], "--query", w["query"], "--label_key", "cell_type",
             "--out", t / "o.h5ad", "--save_model", w["ref"]], w["ref"])),
        "sweep --save_result is a dataset": ("main", lambda w, t: (
            ["--kmeans", "--datasets", *w["sets"], "--save_result", w["sets"][0]], w["sets"][0])),
        "rf_svm_lr --save_result is the encoder": ("rf_svm_lr", lambda w, t: (
            ["--datasets", *w["sets"], "--pretrained_model", w["encoder"], "--save_result", w["encoder"]], w["encoder"])),
        "clus --save_result is a dataset": ("clus", lambda w, t: (
            ["--datasets", *w["sets"], "--pretrained_model", w["encoder"], "--save_result", w["sets"][1]], w["sets"][1])),
    }


@pytest.mark.parametrize("case", list(clash_cases()))
def test_no_command_writes_over_one_of_its_inputs(world, tmp_path, case):
    script, build = clash_cases()[case]
    argv, victim = build(world, tmp_path)
    before = digest(victim)
    code, err = run_cli(script, [*argv, "--log_level", "WARNING"])
    assert code == 1 and digest(victim) == before
    (line,) = error_lines(err)
    assert "is the same file as" in line and "never overwritten" in line


# --------------------------------------------------------------------------- 2. write failures


@pytest.fixture
def full_disk(tmp_path):
    """A 4 MiB tmpfs filled to ~90 %: writes there fail for want of space."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not allowed here ({done.stderr.decode().strip()[:80]})")
    try:
        (mount / "filler").write_bytes(b"\0" * (3600 * 1024))
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def full_disk_cases():
    """name: (script, argv(world, disk), the earlier result that must survive)."""
    return {
        "predict's h5ad": ("annotate", lambda w, d: ["predict", "--model", w["clf"], "--query", w["query"],
                                                     "--out", d / "out.h5ad"], "out.h5ad"),
        "train's checkpoint": ("annotate", lambda w, d: ["train", "--reference", w["ref"], "--label_key", "cell_type",
                                                         "--save_model", d / "clf.pt", "--ft_epoch", "2"], "clf.pt"),
        "pre-training's checkpoint": ("main", lambda w, d: ["--is_pretrain", "--datasets", *w["sets"], "--pt_epoch", "1",
                                                            "--save_model", d / "p.pt"], "p.pt.resume"),
        "the sweep's CSV": ("main", lambda w, d: ["--kmeans", "--datasets", *w["sets"], "--pretrained_model", w["encoder"],
                                                  "--hid", "8", "--ft_epoch", "2", "--save_result", d / "ft.csv"],
                            "ft.csv"),
    }


@pytest.mark.parametrize("case", list(full_disk_cases()))
def test_a_failed_write_is_one_error_line_leaves_no_temporary_file_and_keeps_the_earlier_result(world, full_disk, case):
    script, argv, kept = full_disk_cases()[case]
    earlier = full_disk / kept
    earlier.write_text("an earlier result")
    code, err = run_cli(script, [*argv(world, full_disk), "--log_level", "WARNING"])
    assert code == 1, err
    (line,) = error_lines(err)
    assert str(full_disk) in line and "Traceback" not in err
    assert earlier.read_text() == "an earlier result"
    assert sorted(p.name for p in full_disk.iterdir()) == sorted(["filler", kept])  # no temporary file left


def test_a_write_that_fails_midway_keeps_the_earlier_file(tmp_path):
    import files
    from errors import OutputError

    target = tmp_path / "r.csv"
    target.write_text("earlier")

    def fails(fh):
        fh.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OutputError, match=r"no space left on the device\); the earlier file is kept"):
        files.atomic_write(target, fails)
    assert target.read_text() == "earlier" and [p.name for p in tmp_path.iterdir()] == ["r.csv"]


# --------------------------------------------------------------------------- 3. values never logged twice


def log1p_cp10k(c):
    return np.log1p(c / c.sum(1, keepdims=True) * 1e4).astype(np.float32)


def value_cases():
    """name: (values from counts, what is read without a flag: 'raw', 'log1p' or the refusal's words)."""
    def with_outlier(v, x):
        v = v.copy()
        v[3, 2] = x
        return v
    return {
        "counts": (lambda c: c, "raw"),
        "log1p CP10k": (log1p_cp10k, "--values log1p"),
        "log1p CP10k with one entry above 20": (lambda c: with_outlier(log1p_cp10k(c), 25.0), "--values log1p"),
        "log1p CP10k rounded to integers": (lambda c: np.round(log1p_cp10k(c)), "--values raw if they are raw"),
        "binary (0/1) values": (lambda c: (c > 3).astype(np.float32), "--values raw if they are raw"),
    }


def write_in_format(fmt, path: Path, X):
    genes = gene_names(X.shape[1])
    labels = [f"t{i % 3}" for i in range(X.shape[0])]
    if fmt == "h5ad":
        return write_h5ad(path.with_suffix(".h5ad"), X, labels, genes)
    if fmt == "h5ad layer":
        adata = anndata.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame({"cell_type": labels}, index=[f"c{i}" for i in range(len(X))]),
                                var=pd.DataFrame(index=genes), layers={"counts": sp.csr_matrix(X)})
        adata.write_h5ad(path.with_suffix(".h5ad"))
        return path.with_suffix(".h5ad")
    if fmt == "cellblast":
        return write_cellblast_h5(path.with_suffix(".h5"), X, genes, labels)
    folder = path.with_suffix("")
    folder.mkdir()
    np.save(folder / "feature.npy", X)
    np.save(folder / "gene_list.npy", np.array(genes))
    return folder


@pytest.mark.parametrize("fmt", ["h5ad", "h5ad layer", "cellblast", "numpy"])
@pytest.mark.parametrize("case", list(value_cases()))
def test_no_reader_takes_log_values_for_raw_ones(tmp_path, case, fmt):
    build, expected = value_cases()[case]
    counts, _ = toy_counts(40, 12, 3, 3)
    X = build(counts + 1)
    path = write_in_format(fmt, tmp_path / "d", X)
    if expected == "raw":
        assert data.read_any(path, label_key="cell_type").values == "raw"
        return
    with pytest.raises(data.DataError) as err:
        data.read_any(path, label_key="cell_type")
    message = str(err.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message
    # the flag settles it, either way, and the values are then read as said (never logged again)
    import features

    settled = data.read_any(path, label_key="cell_type", values="log1p")
    assert settled.values == "log1p"
    np.testing.assert_allclose(features.features(settled).toarray(), X, rtol=1e-6)  # as given, no second log1p
    assert data.read_any(path, label_key="cell_type", values="raw").values == "raw"


# --------------------------------------------------------------------------- 4. every matrix checked


def csr_group(h5, name, data, indices, indptr, shape, encoding="csr_matrix"):
    g = h5.create_group(name)
    g.attrs["encoding-type"], g.attrs["encoding-version"] = encoding, "0.1.0"
    g.attrs["shape"] = np.array(shape)
    g["data"], g["indices"], g["indptr"] = data, indices, indptr
    return g


def h5ad_with(path, edit):
    """A valid small h5ad whose X group is then edited by ``edit(h5)``."""
    counts, _ = toy_counts(6, 5, 2, 1)
    write_h5ad(path, counts, [f"t{i % 2}" for i in range(6)])
    with h5py.File(path, "r+") as h5:
        edit(h5)
    return path


def replace_x(**edits):
    """An edit of X's CSR arrays: each keyword a function of the good array (``shape`` of the good shape)."""
    def edit(h5):
        X = h5["X"]
        good = {k: X[k][()] for k in ("data", "indices", "indptr")}
        shape = tuple(X.attrs["shape"])
        del h5["X"]
        parts = {k: edits[k](v) if k in edits else v for k, v in good.items()}
        csr_group(h5, "X", parts["data"], parts["indices"], parts["indptr"], edits.get("shape", lambda s: s)(shape))
    return edit


def _decreasing(indptr):
    out = indptr.copy()
    out[2], out[3] = out[3], out[2] - 1
    return out


def matrix_cases():
    """name: (edit of a good h5ad, the words of the one-line refusal)."""
    return {
        "indptr decreasing": (replace_x(indptr=_decreasing), "indptr is not a non-decreasing"),
        "indptr of the wrong length": (replace_x(indptr=lambda p: p[:4]), "indptr has 4 entries"),
        "float indices": (replace_x(indices=lambda i: i.astype(np.float64)), "holds float64 values; index arrays"),
        "indices out of range": (replace_x(indices=lambda i: np.full_like(i, 7)), "gene indices fall outside 0..4"),
        "data of another length": (replace_x(data=lambda d: d[:-1]), "differ in length"),
        "text values": (replace_x(data=lambda d: np.array([b"x"] * len(d))), "expected numbers"),
        "NaN values": (replace_x(data=lambda d: np.where(np.arange(len(d)) == 4, np.nan, d).astype(np.float32)),
                       "NaN or infinite values"),
        "string-typed dense X": (lambda h5: (h5.__delitem__("X"), h5.create_dataset("X", data=np.full((6, 5), b"a"))),
                                 "not numbers"),
        "virtual X whose source is missing": (lambda h5: _virtual_x(h5), "virtual dataset whose source"),
        "external link whose file is missing": (lambda h5: h5.__setitem__("layers/gone", h5py.ExternalLink("gone.h5", "/x")),
                                                "external link to"),
        "cell names that are not UTF-8": (lambda h5: _bad_names(h5), "not UTF-8"),
    }


def _virtual_x(h5):
    layout = h5py.VirtualLayout(shape=(6, 5), dtype="f4")
    layout[:] = h5py.VirtualSource("missing_source.h5", "x", shape=(6, 5))
    del h5["X"]
    h5.create_virtual_dataset("X", layout, fillvalue=0)


def _bad_names(h5):
    index = h5["obs"].attrs["_index"]
    del h5["obs"][index]
    h5["obs"].create_dataset(index, data=np.array([b"\xff\xfe" + bytes([48 + i]) for i in range(6)]))
    h5["obs"][index].attrs["encoding-type"], h5["obs"][index].attrs["encoding-version"] = "string-array", "0.2.0"


@pytest.mark.parametrize("case", list(matrix_cases()))
def test_every_h5ad_matrix_is_checked_and_a_defect_is_one_line_naming_the_file(tmp_path, case):
    edit, expected = matrix_cases()[case]
    path = h5ad_with(tmp_path / "bad.h5ad", edit)
    for stream in (False, True):
        with pytest.raises(data.DataError) as err:
            d = data.open_query(path, "cell_type", stream=stream)
            if stream:
                list(d.blocks(2))
        message = str(err.value)
        assert message.startswith(str(path)) and expected in message and "\n" not in message, message


def test_entries_stored_twice_in_a_row_are_summed_and_said(tmp_path, caplog):
    path = h5ad_with(tmp_path / "dup.h5ad", replace_x(
        data=lambda d: np.ones(12, np.float32) * 30, indices=lambda i: np.array([0, 0, 1, 2, 2, 3, 4, 4, 4, 0, 1, 1]),
        indptr=lambda p: np.array([0, 3, 5, 6, 9, 10, 12])))
    with caplog.at_level("WARNING", logger="scpretrain.data"):
        d = data.read_any(path, label_key="cell_type")
    assert "entries twice or more" in caplog.text
    assert d.X.has_canonical_format and d.X[0, 0] == 60 and d.X[3, 4] == 90 and d.X.nnz == 7


# --------------------------------------------------------------------------- 5. checkpoints validated completely


def classifier_defects():
    """name: (edit of a good classifier checkpoint, the words of the refusal)."""
    def genes(edit):
        return lambda c: c.__setitem__("gene_universe", edit(list(c["gene_universe"])))
    return {
        "ten genes too few": (genes(lambda g: g[:-10]), "its gene list has 20 genes but its weights 30"),
        "a repeated gene": (genes(lambda g: [g[1]] + g[1:]), "repeats genes"),
        "NaN weights": (lambda c: c["model"]["out.weight"].__setitem__((0, 0), float("nan")), "NaN or infinite"),
        "classes repeated": (lambda c: c.__setitem__("classes", ["type_0", "type_0", "type_2"]), "3 classes (2 distinct)"),
        "classes not text": (lambda c: c.__setitem__("classes", [0, 1, 2]), "'classes' must be a list of class names"),
        "a class named Unassigned": (lambda c: c.__setitem__("classes", ["type_0", "Unassigned", "type_2"]),
                                     "predict uses for its own labels"),
        "unknown normalize": (lambda c: c.__setitem__("normalize", "scran"), "'normalize' is 'scran'"),
        "unknown values": (lambda c: c.__setitem__("values", "z-scores"), "'values' is 'z-scores'"),
        "no label key": (lambda c: c.pop("label_key"), "lacks ['label_key']"),
        "no reference": (lambda c: c.pop("reference"), "lacks ['reference']"),
        "a negative temperature": (lambda c: c.__setitem__("calibration", {"temperature": -1.0}), "temperature"),
        "gene means of another length": (lambda c: c.__setitem__("gene_means", torch.zeros(3)), "'gene_means'"),
    }


@pytest.mark.parametrize("case", list(classifier_defects()))
def test_a_damaged_classifier_is_refused_naming_it_before_the_query_is_read(world, tmp_path, case):
    edit, expected = classifier_defects()[case]
    ckpt = torch.load(world["clf"], weights_only=True)
    edit(ckpt)
    bad = tmp_path / "bad.pt"
    torch.save(ckpt, bad)
    code, err = run_cli("annotate", ["predict", "--model", bad, "--query", tmp_path / "never_read.h5ad",
                                     "--out", tmp_path / "o.h5ad", "--log_level", "WARNING"])
    (line,) = error_lines(err)
    assert code == 1 and str(bad) in line and expected in line and "never_read" not in line
    assert not (tmp_path / "o.h5ad").exists()


def test_a_diverged_encoder_writes_no_sweep_row(world, tmp_path):
    ckpt = torch.load(world["encoder"], weights_only=True)
    ckpt["model"]["linear.weight"][:] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(ckpt, bad)
    code, err = run_cli("main", ["--kmeans", "--datasets", *world["sets"], "--pretrained_model", bad,
                                 "--save_result", tmp_path / "ft.csv", "--hid", "8", "--log_level", "WARNING"])
    assert code == 1 and "NaN or infinite" in err and not (tmp_path / "ft.csv").exists()


# --------------------------------------------------------------------------- 6. no stale results


def sweep(world, datasets, out, *extra):
    return run_cli("main", ["--kmeans", "--datasets", *datasets, "--pretrained_model", world["encoder"], "--hid", "8",
                            "--ft_epoch", "3", "--patience", "2", "--save_result", out, "--log_level", "WARNING", *extra])


def test_a_sweep_redoes_a_dataset_whose_labels_changed(world, tmp_path):
    path = Path(toy_dataset_file(tmp_path / "d.h5", n_cells=80, n_genes=30, seed=7))
    out = tmp_path / "ft.csv"
    assert sweep(world, [path], out)[0] == 0
    assert sweep(world, [path], out)[0] == 0
    assert len(pd.read_csv(out)) == 2  # unchanged: already done
    with h5py.File(path, "r+") as h5:
        labels = h5["obs/cell_ontology_class"][()]
        del h5["obs/cell_ontology_class"]
        h5["obs/cell_ontology_class"] = labels[::-1]
    assert sweep(world, [path], out)[0] == 0
    rows = pd.read_csv(out)
    assert len(rows) == 4 and rows["data_id"].nunique() == 2 and rows["run_id"].nunique() == 1


def test_datasets_of_one_file_name_in_two_folders_get_names_of_their_own(world, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    paths = [toy_dataset_file(a / "data.h5", n_cells=80, n_genes=30, seed=3),
             toy_dataset_file(b / "data.h5", n_cells=80, n_genes=30, seed=4)]
    out = tmp_path / "ft.csv"
    assert sweep(world, paths, out)[0] == 0
    rows = pd.read_csv(out)
    assert sorted(rows["dataset"].unique()) == ["a/data", "b/data"]


def test_the_same_file_given_twice_is_used_once(world, tmp_path):
    path = world["sets"][0]
    spelled = str(Path(path).parent / ".." / Path(path).parent.name / Path(path).name)
    out = tmp_path / "ft.csv"
    code, err = sweep(world, [path, spelled], out)
    assert code == 0 and len(pd.read_csv(out)) == 2  # one dataset x (scPretrain, baseline)


def test_resume_after_a_dataset_changed_is_refused(world, tmp_path, monkeypatch):
    import pretrain

    sets = [str(toy_dataset_file(tmp_path / f"{n}.h5", n_cells=90, n_genes=30, seed=s)) for n, s in (("x", 1), ("y", 2))]
    real_epoch = pretrain.train_epoch
    monkeypatch.setattr(pretrain, "train_epoch",
                        lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt) if a[-1] == 2 else real_epoch(*a, **k))
    argv = ["--is_pretrain", "--datasets", *sets, "--save_model", tmp_path / "p.pt", "--pt_epoch", "3", "--batch_num",
            "2", "--avg_cluster_num", "20", "--hid", "8", "--log_level", "WARNING"]
    assert run_cli("main", argv)[0] == 130
    monkeypatch.setattr(pretrain, "train_epoch", real_epoch)
    toy_dataset_file(tmp_path / "y.h5", n_cells=90, n_genes=30, seed=9)  # the file changes under the run
    code, err = run_cli("main", [*argv, "--resume"])
    assert code == 1 and "dataset_digests" in err


# --------------------------------------------------------------------------- 7. edges


def edge_cases():
    """name: (script, argv(world, tmp), exit status, words of the message)."""
    def tiny(tmp):
        return toy_dataset_file(tmp / "tiny.h5", n_cells=6, n_genes=30, seed=2)

    def inf_csv(tmp):
        results_dir = tmp / "res"
        results_dir.mkdir()
        pd.DataFrame({"dataset": ["a", "a"], "method": ["scPretrain", "Without pretraining"], "run_id": ["r", "r"],
                      "accuracy": [np.inf, 0.5], "kappa": [0.1, 0.2], "auprc": [0.3, 0.3],
                      "auroc": [0.5, 0.5]}).to_csv(results_dir / "finetune.csv", index=False)
        return results_dir

    return {
        "a seed of 2**32": ("main", lambda w, t: ["--seed", str(2**32)], 2, "--seed"),
        "a seed whose repeats pass 2**32": ("main", lambda w, t: ["--seed", str(2**32 // 1000 + 1)], 2, "too large"),
        "--pca_fit_cells 1": ("clus", lambda w, t: ["--pca_fit_cells", "1"], 2, "--pca_fit_cells"),
        "a results folder that does not exist": ("fig", lambda w, t: ["--results_dir", t / "nowhere"], 1, "no such folder"),
        "an infinite metric": ("fig", lambda w, t: ["--results_dir", inf_csv(t)], 1, "infinite values"),
        "a label map mapping one label two ways": (
            "annotate", lambda w, t: ["predict", "--model", w["clf"], "--query", w["query"], "--out", t / "o.h5ad",
                                      "--query_label_key", "cell_type", "--label_map",
                                      _written(t / "m.csv", "a,b\ntype_0,type_0\ntype_0,type_1\n")], 1, "more than one"),
        "a label map that matches nothing": (
            "annotate", lambda w, t: ["predict", "--model", w["clf"], "--query", w["query"], "--out", t / "o.h5ad",
                                      "--query_label_key", "cell_type", "--label_map",
                                      _written(t / "m.csv", "a,b\nalpha,beta\n")], 1, "none of its model labels"),
        "a reference class named Unassigned": (
            "annotate", lambda w, t: ["train", "--reference", write_h5ad(t / "r.h5ad", toy_counts(40, 30, 2, 1)[0],
                                                                        ["Unassigned", "b"] * 20),
                                      "--label_key", "cell_type", "--save_model", t / "c.pt"], 1, "rename that class"),
        "reference and query sharing no gene": (
            "annotate", lambda w, t: ["transfer", "--reference", w["ref"], "--label_key", "cell_type", "--query",
                                      write_h5ad(t / "q.h5ad", toy_counts(20, 5, 2, 1)[0], None,
                                                 [f"OTHER{i}" for i in range(5)]), "--out", t / "o.h5ad"], 1,
            "share no gene"),
        "a dataset too small to split, beside one that is not": (
            "main", lambda w, t: ["--kmeans", "--datasets", tiny(t), w["sets"][0], "--pretrained_model", w["encoder"],
                                  "--hid", "8", "--ft_epoch", "2", "--save_result", t / "ft.csv"], 0, ""),
    }


def _written(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize("case", list(edge_cases()))
def test_edges_end_with_one_clear_line(world, tmp_path, case, capsys):
    script, argv, status, words = edge_cases()[case]
    if status == 2:  # refused when the command line is parsed
        with pytest.raises(SystemExit) as exc:
            SCRIPTS[script].parse_args([str(a) for a in argv(world, tmp_path)])
        assert exc.value.code == 2 and words in capsys.readouterr().err
        return
    code, err = run_cli(script, [*argv(world, tmp_path), "--log_level", "WARNING"])
    assert code == status and "Traceback" not in err
    if status:
        (line,) = error_lines(err)
        assert words in line
    else:  # the tiny dataset is skipped with a line naming it; the other one has its rows
        assert "tiny: 6 cells are too few" in err and "skipped" in err
        assert set(pd.read_csv(tmp_path / "ft.csv")["dataset"]) == {"alpha"}


def test_upper_case_suffixes_and_misnamed_files_are_read_by_their_content(tmp_path):
    counts, types = toy_counts(30, 12, 3, 1)
    shouting = write_h5ad(tmp_path / "q.H5AD", counts, [f"t{t}" for t in types])
    misnamed = tmp_path / "really_h5ad.h5"
    misnamed.write_bytes(shouting.read_bytes())
    for path in (shouting, misnamed):
        d = data.read_any(path, label_key="cell_type")
        assert d.n_cells == 30 and d.is_labelled and data.file_format(path) == "h5ad"


def test_the_readme_lists_the_spellings_read_as_no_label():
    text = (ROOT / "docs" / "formats.md").read_text()
    for spelling in data.MISSING_LABELS:
        if spelling:
            assert f"`{spelling}`" in text


# --------------------------------------------------------------------------- 8. Ctrl-C inside compiled code


def test_ctrl_c_inside_a_compiled_kernel_is_one_line_and_130(world, tmp_path, monkeypatch):
    import csr_kernels

    def interrupted(*a, **k):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise SystemError("<built-in function _take_tabled_rows> returned a result with an exception set") from exc

    for name in ("_take_tabled_rows", "_take_block_major_rows"):  # a step's gather, with its table or without
        monkeypatch.setattr(csr_kernels, name, interrupted)
    code, err = run_cli("main", ["--is_pretrain", "--datasets", *world["sets"], "--save_model", tmp_path / "p.pt",
                                 "--pt_epoch", "1", "--log_level", "WARNING"])
    assert code == 130 and "Traceback" not in err and "SystemError" not in err
    (line,) = error_lines(err)
    assert "interrupted" in line


# --------------------------------------------------------------------------- 9. concurrent writers


def _append_rows(path, worker: int, n: int) -> None:
    sys.path[:0] = [str(ROOT)]
    import results as r

    for i in range(n):
        r.append_results(path, [{"dataset": f"w{worker}", "seed": i, "method": "m", "run_id": "x", "accuracy": 0.5}])


def test_two_runs_appending_to_one_results_file_lose_no_row(tmp_path):
    import multiprocessing

    out = tmp_path / "rows.csv"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_rows, args=(out, w, 25)) for w in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(120)
    assert all(w.exitcode == 0 for w in workers)
    rows = pd.read_csv(out)
    assert len(rows) == 50 and sorted(rows.groupby("dataset").size()) == [25, 25]
