"""annotate.py: train a classifier on a reference, label queries, write them back (tiny fixtures)."""
import anndata
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import annotate
import annotation
import checkpoints
import data
import main
from helpers import gene_names, toy_counts, toy_dataset_file, write_cellblast_h5
from checkpoints import load as load_checkpoint
import genes as gn

N_GENES = 40


def reference_adata(n_cells=160, seed=1, genes=None):
    counts, types = toy_counts(n_cells, N_GENES, 3, seed)
    obs = pd.DataFrame({"cell_type": [f"type_{t}" for t in types], "batch": np.where(np.arange(n_cells) % 2, "a", "b")},
                       index=[f"cell{i}" for i in range(n_cells)])
    var = pd.DataFrame(index=genes if genes is not None else gene_names(N_GENES))
    return anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A reference h5ad, a small pretrained encoder over its genes, and a classifier trained on it."""
    root = tmp_path_factory.mktemp("annotate")
    ref = root / "ref.h5ad"
    reference_adata().write_h5ad(ref)
    other = toy_dataset_file(root / "other.h5", n_cells=80, n_genes=N_GENES, seed=9, labelled=False)
    pretrained = root / "pretrained.pt"
    main.main(main.parse_args(["--is_pretrain", "--kmeans", "--datasets", str(other), "--save_model", str(pretrained),
                               "--pt_epoch", "2", "--batch_num", "2", "--avg_cluster_num", "20", "--hid", "16",
                               "--log_level", "WARNING"]))
    clf = root / "clf.pt"
    annotate.main(annotate.parse_args(["train", "--reference", str(ref), "--label_key", "cell_type",
                                       "--pretrained_model", str(pretrained), "--save_model", str(clf),
                                       "--ft_epoch", "40", "--patience", "10", "--log_level", "WARNING"]))
    return {"root": root, "ref": ref, "pretrained": pretrained, "clf": clf}


def predict(trained, query, out, *extra):
    return annotate.main(annotate.parse_args(["predict", "--model", str(trained["clf"]), "--query", str(query),
                                              "--out", str(out), "--log_level", "WARNING", *extra]))


def reference_probabilities(trained, X_aligned):
    """Independent: the classifier's dense forward pass on log1p of a matrix in the model's gene order,
    its logits divided by the checkpoint's calibration temperature."""
    clf, ckpt = checkpoints.load_classifier(trained["clf"])
    with torch.no_grad():
        x = torch.from_numpy(np.log1p(np.asarray(X_aligned, dtype=np.float32)))
        return torch.softmax(clf(x) / ckpt["calibration"]["temperature"], 1).numpy(), ckpt


def test_train_writes_a_self_describing_classifier(trained):
    ckpt = load_checkpoint(trained["clf"], kind="scpretrain-classifier")
    assert ckpt["classes"] == ["type_0", "type_1", "type_2"]
    assert ckpt["gene_universe"] == gene_names(N_GENES)
    assert ckpt["label_key"] == "cell_type" and ckpt["reference"]["n_cells"] == 160
    assert ckpt["n_train"] + ckpt["n_val"] == 160 and ckpt["n_val"] == 16
    assert 0 <= ckpt["validation_accuracy"] <= 1
    assert ckpt["pretrained_digest"] != "none" and ckpt["config"]["ft_epoch"] == 40
    assert ckpt["model"]["encoder.linear.weight"].shape == (16, N_GENES)
    base = ckpt["linear_base"]  # the default recipe blends in a logistic regression: its C and share recorded
    assert base["mode"] == "blend" and base["C"] > 0 and 0 <= base["share"] <= 1


def test_query_with_permuted_missing_and_extra_genes_gets_the_aligned_predictions(trained, tmp_path):
    ref = anndata.read_h5ad(trained["ref"])
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(N_GENES, N_GENES - 6, replace=False))  # 6 model genes missing
    order = rng.permutation(len(keep))
    X = ref.X[:, keep[order]].toarray()
    extra = rng.poisson(2.0, size=(ref.n_obs, 5)).astype(np.float32)
    query = anndata.AnnData(X=sp.csr_matrix(np.hstack([X, extra])), obs=ref.obs.copy(),
                            var=pd.DataFrame(index=[*np.array(gene_names(N_GENES))[keep[order]],
                                                    *[f"EXTRA{i}" for i in range(5)]]))
    query.write_h5ad(tmp_path / "q.h5ad")
    table = predict(trained, tmp_path / "q.h5ad", tmp_path / "out.h5ad", "--probabilities", "--chunk_cells", "50")
    aligned = np.zeros((ref.n_obs, N_GENES), np.float32)
    aligned[:, keep[order]] = X
    expected, ckpt = reference_probabilities(trained, aligned)
    written = pd.read_csv(tmp_path / "out.probabilities.csv", index_col="cell")
    np.testing.assert_allclose(written[ckpt["classes"]].to_numpy(), expected, atol=1e-5)
    best = np.array(ckpt["classes"])[expected.argmax(1)]
    confident = expected.max(1) >= 0.5
    np.testing.assert_array_equal(table["predicted_labels"].to_numpy()[confident], best[confident])


def test_best_match_gives_every_cell_its_best_label_and_prob_match_every_label_above_the_threshold(trained, tmp_path):
    best = predict(trained, trained["ref"], tmp_path / "best.h5ad")  # the default mode: best match
    assert not (best["predicted_labels"] == "Unassigned").any()
    conf = best["conf_score"].to_numpy()
    thres = float(np.median(conf[conf < 1]))  # a threshold that some cells pass and some do not
    table = predict(trained, trained["ref"], tmp_path / "out.h5ad", "--mode", "prob_match", "--p_thres", repr(thres),
                    "--probabilities")
    probs = pd.read_csv(tmp_path / "out.probabilities.csv", index_col="cell")
    for cell, label in table["predicted_labels"].items():  # independent: the classes at or above it, best first
        passing = probs.loc[cell][probs.loc[cell] >= thres].sort_values(ascending=False)
        assert label == ("|".join(passing.index) if len(passing) else "Unassigned")
    low = table["conf_score"] < thres
    assert low.any() and (table.loc[low, "predicted_labels"] == "Unassigned").all()
    assert (table["conf_score"] == best["conf_score"]).all()  # the mode changes the labels, not the confidence


def test_prob_match_joins_every_passing_label_from_the_most_probable():
    probs = np.array([[0.6, 0.4, 0.0], [0.3, 0.65, 0.05], [0.34, 0.33, 0.33], [0.2, 0.35, 0.45]])
    assert list(annotation.prob_match_labels(probs, ["a", "b", "c"], 0.35)) == ["a|b", "b", "Unassigned", "c|b"]
    labels, conf = annotation.best_labels(probs, ["a", "b", "c"])
    assert list(labels) == ["a", "b", "a", "c"] and list(conf) == [0.6, 0.65, 0.34, 0.45]


def test_majority_voting_votes_on_the_best_labels_even_in_prob_match(trained, tmp_path):
    table = predict(trained, trained["ref"], tmp_path / "out.h5ad", "--mode", "prob_match", "--p_thres", "0.99",
                    "--majority_voting", "--n_clusters", "5", "--probabilities")
    probs = pd.read_csv(tmp_path / "out.probabilities.csv", index_col="cell")
    best = probs.idxmax(axis=1)
    assert (table["predicted_labels"] == "Unassigned").any()  # many cells pass no label at 0.99 ...
    assert not (table["majority_voting"] == "Unassigned").any()  # ... but the vote is on the best labels
    for _, cluster in table.groupby("over_clustering"):
        counts = best.loc[cluster.index].value_counts()
        assert cluster["majority_voting"].iloc[0] == sorted(counts[counts == counts.max()].index)[0]


def test_majority_voting_gives_one_label_per_over_cluster(trained, tmp_path):
    table = predict(trained, trained["ref"], tmp_path / "out.h5ad", "--majority_voting", "--n_clusters", "6")
    assert table["over_clustering"].nunique() == 6
    assert (table.groupby("over_clustering")["majority_voting"].nunique() == 1).all()
    for _, cluster in table.groupby("over_clustering"):  # the label is the cluster's most frequent prediction
        counts = cluster["predicted_labels"].value_counts()
        assert cluster["majority_voting"].iloc[0] in counts[counts == counts.max()].index


def test_majority_vote_and_heterogeneous():
    predicted = np.array(["a", "a", "b", "b", "b", "c", "a", "b"], dtype=object)
    clusters = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    assert list(annotation.majority_vote(predicted, clusters)) == ["a", "a", "a", "b", "b", "b", "a", "a"]
    assert list(annotation.majority_vote(predicted, clusters, min_prop=0.7)[:3]) == ["Heterogeneous"] * 3


def test_written_h5ad_keeps_the_query_and_adds_the_annotation(trained, tmp_path):
    query = reference_adata(n_cells=50, seed=3)
    query.layers["counts"] = query.X.copy()
    query.obs["note"] = "kept"
    query.write_h5ad(tmp_path / "q.h5ad")
    predict(trained, tmp_path / "q.h5ad", tmp_path / "out.h5ad", "--majority_voting")
    out = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert (out.X != query.X).nnz == 0 and (out.layers["counts"] != query.layers["counts"]).nnz == 0
    pd.testing.assert_index_equal(out.var_names, query.var_names)
    pd.testing.assert_frame_equal(out.obs[query.obs.columns], query.obs)
    assert {"predicted_labels", "conf_score", "over_clustering", "majority_voting"} <= set(out.obs.columns)
    assert out.obsm["X_scpretrain"].shape == (50, 16) and out.obsm["X_scpretrain"].dtype == np.float32
    assert out.uns["scpretrain"]["n_model_genes_found"] == N_GENES
    csv = pd.read_csv(tmp_path / "out.csv")
    assert list(csv["cell"]) == list(query.obs_names) and len(csv) == 50


def test_mouse_query_on_a_human_model_maps_orthologs(tmp_path):
    table = pd.read_csv(gn.ORTHOLOG_TABLE).dropna(subset=["human__gene_name", "mouse__gene_name"])
    pairs = table[table["human__gene_name"].str.upper() != table["mouse__gene_name"].str.upper()].head(N_GENES)
    human, mouse = list(pairs["human__gene_name"]), list(pairs["mouse__gene_name"])
    ref = reference_adata(genes=human)
    ref.write_h5ad(tmp_path / "ref.h5ad")
    clf = tmp_path / "clf.pt"
    annotate.main(annotate.parse_args(["train", "--reference", str(tmp_path / "ref.h5ad"), "--label_key", "cell_type",
                                       "--save_model", str(clf), "--hid", "8", "--ft_epoch", "5",
                                       "--log_level", "WARNING"]))
    mouse_query = reference_adata(genes=mouse)
    mouse_query.write_h5ad(tmp_path / "mouse.h5ad")
    args = ["--model", str(clf), "--log_level", "WARNING"]
    as_mouse = annotate.main(annotate.parse_args(["predict", *args, "--query", str(tmp_path / "mouse.h5ad"),
                                                  "--out", str(tmp_path / "m.h5ad")]))
    as_human = annotate.main(annotate.parse_args(["predict", *args, "--query", str(tmp_path / "ref.h5ad"),
                                                  "--out", str(tmp_path / "h.h5ad")]))
    assert anndata.read_h5ad(tmp_path / "m.h5ad").uns["scpretrain"]["n_model_genes_found"] == N_GENES
    np.testing.assert_allclose(as_mouse["conf_score"], as_human["conf_score"], atol=1e-6)


def test_embed_writes_the_pretrained_representation(trained, tmp_path):
    rep = annotate.main(annotate.parse_args(["embed", "--pretrained_model", str(trained["pretrained"]), "--query",
                                             str(trained["ref"]), "--out", str(tmp_path / "e.h5ad"),
                                             "--log_level", "WARNING"]))
    out = anndata.read_h5ad(tmp_path / "e.h5ad")
    assert list(out.obsm) == ["X_scpretrain"] and "predicted_labels" not in out.obs
    encoder_ckpt = load_checkpoint(trained["pretrained"])
    universe = encoder_ckpt["gene_universe"]
    ref = anndata.read_h5ad(trained["ref"])
    aligned = pd.DataFrame(ref.X.toarray(), columns=ref.var_names).reindex(columns=universe, fill_value=0)
    weight, bias = encoder_ckpt["model"]["linear.weight"].numpy(), encoder_ckpt["model"]["linear.bias"].numpy()
    expected = 1 / (1 + np.exp(-(np.log1p(aligned.to_numpy(np.float32)) @ weight.T + bias)))
    np.testing.assert_allclose(out.obsm["X_scpretrain"], expected, atol=1e-5)
    np.testing.assert_allclose(rep, expected, atol=1e-5)


def test_labelled_query_gets_contingency_and_mapped_scores(trained, tmp_path):
    label_map = tmp_path / "map.csv"
    pd.DataFrame({"model": ["type_0", "type_1", "type_2"], "query": ["zero", "one", ""]}).to_csv(label_map, index=False)
    query = reference_adata(seed=1)
    query.obs["given"] = query.obs["cell_type"].map({"type_0": "zero", "type_1": "one", "type_2": "two"})
    query.write_h5ad(tmp_path / "q.h5ad")
    table = predict(trained, tmp_path / "q.h5ad", tmp_path / "out.h5ad", "--query_label_key", "given",
                    "--label_map", str(label_map), "--group_key", "batch")
    for suffix in (".csv", ".png", ".pdf"):
        assert (tmp_path / f"out.contingency_predicted_labels{suffix}").exists()
    contingency = pd.read_csv(tmp_path / "out.contingency_predicted_labels.csv", index_col=0)
    assert contingency.to_numpy().sum() == query.n_obs
    scores = pd.read_csv(tmp_path / "out.scores.csv")
    overall = scores[(scores["group"] == "all") & (scores["labels"] == "predicted_labels")].iloc[0]
    given = query.obs["given"].to_numpy()
    scored = np.isin(given, ["zero", "one"])  # "two" has no model counterpart
    mapped = table["predicted_labels"].map({"type_0": "zero", "type_1": "one"}).fillna("-").to_numpy()
    assert overall["n_scored"] == scored.sum()
    assert overall["accuracy"] == pytest.approx(np.mean(mapped[scored] == given[scored]))
    assert set(scores["group"]) == {"all", "a", "b"}


@pytest.mark.parametrize("argv, message", [
    (["predict", "--model", "{pretrained}", "--query", "{ref}"], "is a pretrained encoder, not a classifier"),
    (["predict", "--model", "{clf}", "--query", "{unrelated}"], "shares no gene with the model's"),
    (["predict", "--model", "{clf}", "--query", "{ref}", "--out", "{root}/x.csv"], "must end in .h5ad"),
    (["predict", "--model", "{clf}", "--query", "{ref}", "--query_label_key", "nope"], "no label column 'nope'"),
    (["train", "--reference", "{ref}", "--label_key", "nope", "--save_model", "{root}/m.pt"], "no label column 'nope'"),
    (["train", "--reference", "{ref}", "--label_key", "cell_type", "--save_model", "{root}"], "is a folder"),
])
def test_bad_inputs_give_one_clear_line(trained, tmp_path, capsys, argv, message):
    unrelated = toy_dataset_file(tmp_path / "unrelated.h5", n_cells=30, n_genes=10)
    with __import__("h5py").File(unrelated, "r+") as h5:
        del h5["var_names"]
        h5["var_names"] = np.array([f"OTHER{i}".encode() for i in range(10)])
    paths = {**{k: str(v) for k, v in trained.items()}, "unrelated": str(unrelated)}
    argv = [a.format(**paths) for a in argv]
    if "--out" not in argv and argv[0] == "predict":
        argv += ["--out", str(tmp_path / "o.h5ad")]
    with pytest.raises(SystemExit) as exc:
        annotate.main(annotate.parse_args(argv))
    assert exc.value.code == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_bad_options_are_refused_by_the_parser():
    for argv in (["predict", "--model", "m", "--query", "q", "--p_thres", "1.5"],
                 ["predict", "--model", "m", "--query", "q", "--label_map", "m.csv"],
                 ["train", "--reference", "r", "--save_model", "m", "--ft_epoch", "0"]):
        with pytest.raises(SystemExit) as exc:
            annotate.parse_args(argv)
        assert exc.value.code == 2


def test_cellblast_query_is_written_as_h5ad(trained, tmp_path):
    ref = anndata.read_h5ad(trained["ref"])
    path = write_cellblast_h5(tmp_path / "q.h5", ref.X.toarray(), list(ref.var_names))
    table = predict(trained, path, tmp_path / "out.h5ad")
    out = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert out.n_obs == ref.n_obs and list(out.obs["predicted_labels"]) == list(table["predicted_labels"])
    np.testing.assert_allclose(out.X.toarray(), ref.X.toarray())


def test_a_classifier_whose_weights_disagree_with_its_model_args_is_one_clear_error(trained, tmp_path):
    from checkpoints import classifier_from
    from errors import CheckpointError

    ckpt = load_checkpoint(trained["clf"], kind="scpretrain-classifier")
    ckpt["model"]["out.weight"] = ckpt["model"]["out.weight"][:-1]
    with pytest.raises(CheckpointError, match="'out.weight' has shape .* need"):
        classifier_from(ckpt, "clf.pt")
    del ckpt["model"]["hidden.bias"]
    with pytest.raises(CheckpointError, match=r"missing \['hidden.bias'\]"):
        classifier_from(ckpt, "clf.pt")


def test_output_holds_text_as_plain_strings_when_the_query_holds_pandas_string_dtype(trained, tmp_path):
    """pandas 3 reads text as its string dtype, which anndata refuses to write unless allowed (and
    anndata < 0.11 cannot read): the output must write anyway, as plain strings, with the same text."""
    ref = anndata.read_h5ad(trained["ref"])
    typed = pd.StringDtype()
    obs = pd.DataFrame({"donor": pd.array(np.where(np.arange(ref.n_obs) % 3, "d1", "d2"), dtype=typed),
                        "state": pd.Categorical(pd.array(np.where(np.arange(ref.n_obs) % 2, "x", "y"), dtype=typed))},
                       index=pd.Index(pd.array(ref.obs_names, dtype=typed)))
    var = pd.DataFrame({"symbol": pd.array(ref.var_names, dtype=typed)}, index=pd.Index(pd.array(ref.var_names, dtype=typed)))
    query = anndata.AnnData(X=ref.X.copy(), obs=obs, var=var)
    query.raw = query.copy()
    query.write_h5ad(tmp_path / "q.h5ad")  # the fixture itself may write nullable strings (conftest allows it)
    with anndata.settings.override(allow_write_nullable_strings=False):
        predict(trained, tmp_path / "q.h5ad", tmp_path / "out.h5ad")
    encodings, source = {}, {}
    with h5py.File(tmp_path / "out.h5ad", "r") as f:
        f.visititems(lambda name, item: encodings.__setitem__(name, item.attrs.get("encoding-type")))
    with h5py.File(tmp_path / "q.h5ad", "r") as f:
        f.visititems(lambda name, item: source.__setitem__(name, item.attrs.get("encoding-type")))
    assert encodings["obs/_index"] == "string-array"  # the obs predict writes: plain strings
    assert not any(v == "nullable-string-array" for k, v in encodings.items() if k.startswith("obs"))
    assert all(encodings[k] == v for k, v in source.items() if not k.startswith("obs"))  # the rest as it was
    out = anndata.read_h5ad(tmp_path / "out.h5ad")
    assert list(out.obs_names) == list(ref.obs_names) and list(out.var_names) == list(ref.var_names)
    assert list(out.obs["donor"]) == list(obs["donor"]) and list(out.obs["state"]) == list(obs["state"])
    assert list(out.raw.var_names) == list(ref.var_names)
    assert out.obs["predicted_labels"].isin(["type_0", "type_1", "type_2"]).all()
