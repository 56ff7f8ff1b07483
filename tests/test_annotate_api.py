"""Annotation where users work (issues 23, 26): trained for the query's genes, transfer in one step,
calibrated confidence, the Python API equal to the command line, queries streamed from disk equal
to queries read whole, outputs that keep the query as it was, figures, and large references."""
import hashlib
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import annotate
import annotation
import data
from helpers import gene_names, toy_counts

TRAIN = ["--ft_epoch", "8", "--patience", "4", "--hid", "8", "--log_level", "WARNING"]
API_TRAIN = {"ft_epoch": 8, "patience": 4, "hid": 8}


def adata_of(counts, types, genes, prefix="c", **obs):
    frame = pd.DataFrame({"cell_type": [f"type_{t}" for t in types], **obs},
                         index=[f"{prefix}{i}" for i in range(len(counts))])
    return anndata.AnnData(X=sp.csr_matrix(counts, dtype=np.float32), obs=frame, var=pd.DataFrame(index=genes))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A reference of 40 genes and a query holding 30 of them (shuffled) plus 5 of its own."""
    root = tmp_path_factory.mktemp("pair")
    counts, types = toy_counts(180, 40, 3, 11)
    genes = gene_names(40)
    reference = adata_of(counts, types, genes)
    q_counts, q_types = toy_counts(90, 40, 3, 12)
    rng = np.random.default_rng(3)
    kept = rng.permutation(40)[:30]
    extra = rng.poisson(2.0, size=(90, 5)).astype(np.float32)
    query = adata_of(np.hstack([q_counts[:, kept], extra]), q_types, [genes[i] for i in kept] + [f"NEW{i}" for i in range(5)],
                     prefix="q", study=np.where(np.arange(90) % 2, "s1", "s2"))
    reference.write_h5ad(root / "ref.h5ad")
    query.write_h5ad(root / "query.h5ad")
    return {"root": root, "ref": root / "ref.h5ad", "query": root / "query.h5ad", "kept": sorted(genes[i] for i in kept),
            "genes": genes}


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- trained for the query's genes


@pytest.mark.parametrize("recipe", ["transfer", "paper"])
def test_a_model_trained_for_a_query_is_the_model_trained_on_the_reference_cut_to_the_shared_genes(pair, tmp_path, recipe):
    flags = [*TRAIN, "--recipe", recipe]
    annotate.main(annotate.parse_args(["train", "--reference", str(pair["ref"]), "--label_key", "cell_type",
                                       "--query", str(pair["query"]), "--save_model", str(tmp_path / "q.pt"), *flags]))
    ref = anndata.read_h5ad(pair["ref"])
    ref[:, [g for g in ref.var_names if g in set(pair["kept"])]].copy().write_h5ad(tmp_path / "cut.h5ad")
    annotate.main(annotate.parse_args(["train", "--reference", str(tmp_path / "cut.h5ad"), "--label_key", "cell_type",
                                       "--save_model", str(tmp_path / "cut.pt"), *flags]))
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("q", "cut"))
    assert sorted(a["gene_universe"]) == pair["kept"] and a["gene_universe"] == b["gene_universe"]
    assert a["trained_on_shared_genes"] and not b["trained_on_shared_genes"]
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key])
    for name in ("q", "cut"):
        annotate.main(annotate.parse_args(["predict", "--model", str(tmp_path / f"{name}.pt"), "--query",
                                           str(pair["query"]), "--out", str(tmp_path / f"{name}.h5ad"),
                                           "--log_level", "WARNING"]))
    x, y = (pd.read_csv(tmp_path / f"{n}.csv") for n in ("q", "cut"))
    assert (x["predicted_labels"] == y["predicted_labels"]).all()
    np.testing.assert_allclose(x["conf_score"], y["conf_score"], atol=1e-6)


def test_transfer_equals_train_with_the_query_then_predict(pair, tmp_path):
    annotate.main(annotate.parse_args(["transfer", "--reference", str(pair["ref"]), "--label_key", "cell_type",
                                       "--query", str(pair["query"]), "--out", str(tmp_path / "t.h5ad"),
                                       "--majority_voting", *TRAIN]))
    annotate.main(annotate.parse_args(["train", "--reference", str(pair["ref"]), "--label_key", "cell_type",
                                       "--query", str(pair["query"]), "--save_model", str(tmp_path / "m.pt"), *TRAIN]))
    annotate.main(annotate.parse_args(["predict", "--model", str(tmp_path / "m.pt"), "--query", str(pair["query"]),
                                       "--out", str(tmp_path / "p.h5ad"), "--majority_voting", "--log_level", "WARNING"]))
    t, p = pd.read_csv(tmp_path / "t.csv"), pd.read_csv(tmp_path / "p.csv")
    pd.testing.assert_frame_equal(t, p)
    a, b = anndata.read_h5ad(tmp_path / "t.h5ad"), anndata.read_h5ad(tmp_path / "p.h5ad")
    np.testing.assert_array_equal(a.obsm["X_scpretrain"], b.obsm["X_scpretrain"])


def test_a_model_trained_without_the_query_warns_when_missing_genes_carry_much_of_its_input(pair, tmp_path, capsys):
    annotate.main(annotate.parse_args(["train", "--reference", str(pair["ref"]), "--label_key", "cell_type",
                                       "--save_model", str(tmp_path / "all.pt"), *TRAIN]))
    capsys.readouterr()
    annotate.main(annotate.parse_args(["predict", "--model", str(tmp_path / "all.pt"), "--query",
                                       str(pair["query"]), "--out", str(tmp_path / "o.h5ad"), "--log_level", "WARNING"]))
    err = capsys.readouterr().err
    model = annotation.AnnotationModel.load(tmp_path / "all.pt")
    share = anndata.read_h5ad(tmp_path / "o.h5ad").uns["scpretrain"]["missing_input_share"]
    # independent: mean feature value x weight size of the 10 missing genes, over all 40
    means = model.ckpt["gene_means"].double().numpy()
    size = model.clf.encoder.linear.weight_t.detach().norm(dim=1).double().numpy()
    if model.clf.base is not None:
        size = size + model.clf.base.weight_t.detach().norm(dim=1).double().numpy()
    missing = ~np.isin(model.genes, pair["kept"])
    assert share == pytest.approx((means * size)[missing].sum() / (means * size).sum(), rel=1e-6)
    assert share > annotation.MISSING_INPUT_WARNING
    assert f"carry {100 * share:.0f}% of its input" in err and "annotate.py transfer" in err


# --------------------------------------------------------------------------- calibration


def test_calibration_is_stored_applied_and_lowers_an_overconfident_models_calibration_error():
    rng = np.random.default_rng(0)
    n, k = 4000, 3
    targets = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), targets] += 1.0
    logits *= 6.0  # overconfident: right ~75 % of the time, sure ~100 % of the time
    before = annotation.expected_calibration_error(annotation.softmax(logits), targets)
    temperature = annotation.fit_temperature(logits, targets)
    after = annotation.expected_calibration_error(annotation.softmax(logits, temperature), targets)
    assert temperature > 2 and after < before / 3
    # independent ECE: numpy digitize of the confidences into 15 bins
    conf = annotation.softmax(logits).max(1)
    right = annotation.softmax(logits).argmax(1) == targets
    bins = np.minimum((conf * 15).astype(int), 14)
    ece = sum((bins == b).mean() * abs(right[bins == b].mean() - conf[bins == b].mean()) for b in range(15) if (bins == b).any())
    assert before == pytest.approx(ece, abs=1e-9)


def test_the_checkpoint_holds_its_temperature_and_predict_applies_it(pair, tmp_path):
    model = annotate.train(anndata.read_h5ad(pair["ref"]), label_key="cell_type", seed=0, **API_TRAIN)
    calibration = model.ckpt["calibration"]
    assert calibration["temperature"] > 0 and {"ece_before", "ece_after", "n_cells"} <= set(calibration)
    query = anndata.read_h5ad(pair["query"])
    calibrated = annotate.annotate(query, model, probabilities=True)
    model.ckpt["calibration"] = {"temperature": 1.0}
    raw = annotate.annotate(query, model, probabilities=True)
    p, q = calibrated.obsm["scpretrain_probabilities"], raw.obsm["scpretrain_probabilities"]
    logits = np.log(q)  # softmax(l / T) from softmax(l): log-probabilities up to a constant per cell
    np.testing.assert_allclose(p, annotation.softmax(logits, calibration["temperature"]), atol=1e-5)
    assert (calibrated.obs["predicted_labels"] == raw.obs["predicted_labels"]).all()  # the best label is unchanged
    assert calibrated.uns["scpretrain"]["temperature"] == calibration["temperature"]


# --------------------------------------------------------------------------- the Python API equals the command line


def test_the_api_gives_what_the_command_line_writes(pair, tmp_path):
    annotate.main(annotate.parse_args(["train", "--reference", str(pair["ref"]), "--label_key", "cell_type",
                                       "--save_model", str(tmp_path / "cli.pt"), "--seed", "3", *TRAIN]))
    annotate.main(annotate.parse_args(["predict", "--model", str(tmp_path / "cli.pt"), "--query", str(pair["query"]),
                                       "--out", str(tmp_path / "cli.h5ad"), "--majority_voting", "--n_clusters", "5",
                                       "--mode", "prob_match", "--p_thres", "0.6", "--seed", "3",
                                       "--log_level", "WARNING"]))
    model = annotate.train(anndata.read_h5ad(pair["ref"]), label_key="cell_type", seed=3, **API_TRAIN)
    assert model.digest == annotation.AnnotationModel.load(tmp_path / "cli.pt").digest  # the same classifier
    query = anndata.read_h5ad(pair["query"])
    api = annotate.annotate(query, model, majority_voting=True, n_clusters=5, mode="prob_match", p_thres=0.6, seed=3)
    cli = anndata.read_h5ad(tmp_path / "cli.h5ad")
    columns = ["predicted_labels", "conf_score", "over_clustering", "majority_voting"]
    pd.testing.assert_frame_equal(api.obs[columns].astype(str), cli.obs[columns].astype(str))
    np.testing.assert_array_equal(api.obsm["X_scpretrain"], cli.obsm["X_scpretrain"])
    api_uns, cli_uns = dict(api.uns["scpretrain"]), dict(cli.uns["scpretrain"])
    for key in set(api_uns) | set(cli_uns):
        if key not in ("model", "reference"):  # where the model was saved, the reference file's name
            assert np.all(np.asarray(api_uns[key]) == np.asarray(cli_uns[key])), key
    assert "predicted_labels" not in query.obs  # a copy by default ...
    annotate.annotate(query, model, copy=False)
    assert "predicted_labels" in query.obs and "X_scpretrain" in query.obsm  # ... or in place


def test_save_and_load_round_trip_and_embed(pair, tmp_path):
    from helpers import save_encoder
    from model import Encoder

    model = annotate.train(anndata.read_h5ad(pair["ref"]), label_key="cell_type", **API_TRAIN)
    model.save(tmp_path / "m.pt")
    again = annotate.load(tmp_path / "m.pt")
    assert again.digest == model.digest and again.classes == model.classes
    encoder = save_encoder(tmp_path / "enc.pt", Encoder(40, 8), pair["genes"])
    embedded = annotate.embed(anndata.read_h5ad(pair["query"]), str(encoder))
    assert embedded.obsm["X_scpretrain"].shape == (90, 8) and "predicted_labels" not in embedded.obs


# --------------------------------------------------------------------------- streamed queries


def write_layouts(root: Path, counts, types):
    """The same counts in the layouts an h5ad keeps them in: CSR X, dense X, raw.X, a layer."""
    genes = gene_names(counts.shape[1])
    base = adata_of(counts, types, genes)
    files = {}
    base.write_h5ad(root / "csr.h5ad")
    files["CSR X"] = (root / "csr.h5ad", {})
    dense = base.copy()
    dense.X = np.asarray(counts, dtype=np.float32)
    dense.write_h5ad(root / "dense.h5ad")
    files["dense X"] = (root / "dense.h5ad", {})
    logged = base.copy()
    logged.raw = base.copy()
    logged.X = sp.csr_matrix(np.log1p(counts / counts.sum(1, keepdims=True) * 1e4).astype(np.float32))
    logged.write_h5ad(root / "raw.h5ad")
    files["raw.X"] = (root / "raw.h5ad", {})
    layered = logged.copy()
    layered.raw = None
    layered.layers["counts"] = sp.csr_matrix(counts, dtype=np.float32)
    layered.write_h5ad(root / "layer.h5ad")
    files["a layer"] = (root / "layer.h5ad", {"layer": "counts"})
    return files


def test_a_query_streamed_in_tiny_blocks_equals_the_query_read_whole(pair, tmp_path):
    counts, types = toy_counts(70, 40, 3, 13)
    counts[:, 0] += 1
    model = annotate.train(anndata.read_h5ad(pair["ref"]), label_key="cell_type", **API_TRAIN)
    model.save(tmp_path / "m.pt")
    for layout, (path, options) in write_layouts(tmp_path, counts, types).items():
        flags = [f"--{k}" if v is True else f"--{k}={v}" for k, v in options.items()]
        outs = []
        for how in (["--chunk_cells", "3"], ["--in_memory"]):
            out = tmp_path / f"{path.stem}_{how[0][2:]}.h5ad"
            before = sha(path)
            annotate.main(annotate.parse_args(["predict", "--model", str(tmp_path / "m.pt"), "--query", str(path),
                                               "--out", str(out), "--majority_voting", "--n_clusters", "4",
                                               "--probabilities", *how, *flags, "--log_level", "WARNING"]))
            assert sha(path) == before, layout  # the query file is never written
            outs.append(out)
        streamed, whole = (anndata.read_h5ad(o) for o in outs)
        pd.testing.assert_frame_equal(streamed.obs, whole.obs, obj=layout)
        np.testing.assert_allclose(streamed.obsm["X_scpretrain"], whole.obsm["X_scpretrain"], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(streamed.obsm["scpretrain_probabilities"], whole.obsm["scpretrain_probabilities"],
                                   rtol=1e-5, atol=1e-7)


def test_a_file_written_by_streaming_holds_the_querys_own_data_unchanged(pair, tmp_path):
    model = annotate.train(anndata.read_h5ad(pair["ref"]), label_key="cell_type", **API_TRAIN)
    model.save(tmp_path / "m.pt")
    source = anndata.read_h5ad(pair["query"])
    source.layers["counts"] = source.X.copy()
    source.obsm["X_umap"] = np.arange(180, dtype=np.float32).reshape(90, 2)
    source.uns["note"] = "kept"
    source.write_h5ad(tmp_path / "q.h5ad")
    annotate.main(annotate.parse_args(["predict", "--model", str(tmp_path / "m.pt"), "--query", str(tmp_path / "q.h5ad"),
                                       "--out", str(tmp_path / "o.h5ad"), "--log_level", "WARNING"]))
    with h5py.File(tmp_path / "q.h5ad", "r") as a, h5py.File(tmp_path / "o.h5ad", "r") as b:
        for member in ("X/data", "X/indices", "X/indptr", "layers/counts/data", "var/_index", "obsm/X_umap"):
            np.testing.assert_array_equal(a[member][()], b[member][()], err_msg=member)
    out = anndata.read_h5ad(tmp_path / "o.h5ad")
    assert list(out.obs["study"]) == list(source.obs["study"]) and out.uns["note"] == "kept"
    assert {"predicted_labels", "conf_score"} <= set(out.obs) and out.obsm["X_scpretrain"].shape[0] == 90


# --------------------------------------------------------------------------- figures and large references


def test_the_umap_figure_is_drawn_with_the_named_columns(pair, tmp_path, monkeypatch):
    import annotation_figures

    titles = []
    real_save = annotation_figures._save

    def spy(fig, stem):
        titles.extend(ax.get_title() for ax in fig.axes if ax.get_title())
        titles.append(fig._suptitle.get_text() if fig._suptitle else "")
        return real_save(fig, stem)

    monkeypatch.setattr(annotation_figures, "_save", spy)
    monkeypatch.setattr(annotation_figures, "UMAP_MAX_CELLS", 50)
    model = annotate.train(anndata.read_h5ad(pair["ref"]), label_key="cell_type", **API_TRAIN)
    model.save(tmp_path / "m.pt")
    annotate.main(annotate.parse_args(["predict", "--model", str(tmp_path / "m.pt"), "--query", str(pair["query"]),
                                       "--out", str(tmp_path / "o.h5ad"), "--majority_voting", "--plot",
                                       "--log_level", "WARNING"]))
    for ext in (".png", ".pdf"):
        path = tmp_path / f"o.umap{ext}"
        assert path.exists() and path.stat().st_size > 1000
    assert tmp_path.joinpath("o.umap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"predicted_labels", "majority_voting", "conf_score"} <= set(titles)
    assert any("a seeded sample of 50 of 90 cells" in t for t in titles)


def test_the_per_type_downsample_is_seeded_and_logged(caplog):
    counts, types = toy_counts(300, 20, 3, 5)
    d = data.CellData("ref", sp.csr_matrix(counts), np.array(gene_names(20), dtype=object),
                      np.array([f"c{i}" for i in range(300)], dtype=object),
                      np.array([f"t{t}" for t in types], dtype=object), "human")
    with caplog.at_level("INFO", logger="scpretrain.annotate"):
        a = annotation.downsample_per_type(d, 40, seed=1)
    b, c = annotation.downsample_per_type(d, 40, seed=1), annotation.downsample_per_type(d, 40, seed=2)
    counts_per_type = pd.Series(a.labels).value_counts()
    assert (counts_per_type == np.minimum(pd.Series(d.labels).value_counts(), 40)).all()
    assert list(a.cells) == list(b.cells) and list(a.cells) != list(c.cells)
    assert "at most 40 of each type" in caplog.text and "seed 1" in caplog.text


# --------------------------------------------------------------------------- pre-trained on reference and query


PRETRAIN = ["--pretrain_on_query", "--pt_epoch", "2"]


def test_pretraining_on_the_query_learns_the_shared_genes_and_equals_a_classifier_from_that_saved_encoder(pair, tmp_path):
    """transfer --pretrain_on_query pre-trains on both datasets' shared genes; its classifier is the
    one trained with --query from the encoder it saved (so nothing else differs), and the encoder
    is the one main.py pre-trains on the two datasets cut to those genes."""
    annotate.main(annotate.parse_args(["transfer", "--reference", str(pair["ref"]), "--label_key", "cell_type",
                                       "--query", str(pair["query"]), "--out", str(tmp_path / "a.h5ad"),
                                       "--save_model", str(tmp_path / "a.pt"), "--save_pretrained",
                                       str(tmp_path / "enc.pt"), *PRETRAIN, *TRAIN]))
    enc = torch.load(tmp_path / "enc.pt", weights_only=True)
    assert sorted(enc["gene_universe"]) == pair["kept"]
    assert [d.split(" ")[0] for d in enc["datasets"]] == ["reference", "query"] and enc["epoch"] == 2
    assert not (tmp_path / "enc.pt.resume").exists()
    annotate.main(annotate.parse_args(["train", "--reference", str(pair["ref"]), "--label_key", "cell_type",
                                       "--query", str(pair["query"]), "--pretrained_model", str(tmp_path / "enc.pt"),
                                       "--save_model", str(tmp_path / "b.pt"), *TRAIN]))
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("a", "b"))
    assert a["pretrained_digest"] == b["pretrained_digest"] != "none"
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key])
    # the same two datasets, cut to the shared genes, through the pre-training command line
    ref, query = anndata.read_h5ad(pair["ref"]), anndata.read_h5ad(pair["query"])
    for name, ad in (("r", ref), ("s", query)):
        ad[:, pair["kept"]].copy().write_h5ad(tmp_path / f"{name}.h5ad")
    import main as main_script
    main_script.main(main_script.parse_args(["--is_pretrain", "--kmeans", "--datasets", str(tmp_path / "r.h5ad"),
                                             str(tmp_path / "s.h5ad"), "--pt_epoch", "2", "--normalize", "cp10k", "--hid", "8",
                                             "--save_model", str(tmp_path / "main.pt"), "--log_level", "WARNING"]))
    by_main = torch.load(tmp_path / "main.pt", weights_only=True)
    assert list(by_main["gene_universe"]) == list(enc["gene_universe"])
    for key in enc["model"]:
        torch.testing.assert_close(enc["model"][key], by_main["model"][key])


def test_pretraining_on_the_query_takes_a_device_by_name_or_as_a_device(pair):
    import annotation
    import data
    from settings import PretrainSettings

    ref = data.from_anndata(anndata.read_h5ad(pair["ref"]), "cell_type", name="ref")
    query = data.from_anndata(anndata.read_h5ad(pair["query"]), name="query")
    settings = PretrainSettings(normalize="cp10k", hid=8, pt_epoch=2)
    by_name = annotation.pretrain_with_query(ref, query, settings, "cpu")
    by_device = annotation.pretrain_with_query(ref, query, settings, torch.device("cpu"))
    assert sorted(by_name.gene_universe) == pair["kept"]
    for key, value in by_device.ckpt["model"].items():
        torch.testing.assert_close(by_name.ckpt["model"][key], value)


def test_pretraining_on_the_query_through_the_api_writes_no_file(pair, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ref, query = anndata.read_h5ad(pair["ref"]), anndata.read_h5ad(pair["query"])
    model = annotate.train(ref, "cell_type", query=query, pretrain_on_query=True, pt_epoch=2, **API_TRAIN)
    assert sorted(model.genes) == pair["kept"] and model.ckpt["pretrained_digest"] != "none"
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="give query"):
        annotate.train(ref, "cell_type", pretrain_on_query=True, **API_TRAIN)


@pytest.mark.parametrize("flags, message", [
    (["train", "--save_model", "m.pt", "--pretrain_on_query"], "give --query"),
    (["transfer", "--query", "q.h5ad", "--pretrain_on_query", "--pretrained_model", "p.pt"], "not both"),
    (["transfer", "--query", "q.h5ad", "--save_pretrained", "p.pt"], "only with --pretrain_on_query"),
    (["transfer", "--query", "q.h5ad", "--pretrain_phases", "2"], "only with --pretrain_on_query"),
])
def test_pretraining_on_the_query_refuses_flags_that_cannot_go_with_it(flags, message, capsys):
    with pytest.raises(SystemExit) as stop:
        annotate.parse_args([flags[0], "--reference", "r.h5ad", *flags[1:]])
    assert stop.value.code == 2 and message in capsys.readouterr().err
