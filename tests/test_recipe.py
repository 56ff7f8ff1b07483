"""Recipes: --normalize, the classifier's regularisation options, --recipe paper|plus."""
import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import annotate
import classifier
import data
import main
from helpers import gene_names, toy_counts, toy_dataset_file
import checkpoints
import cli
from checkpoints import load as load_checkpoint
from model import Classifier
import features as features_mod
import sparse
import settings as st


def test_cp10k_features_equal_an_independent_computation():
    rng = np.random.default_rng(0)
    counts = rng.poisson(1.5, size=(12, 9)).astype(np.float32)
    counts[3] = 0  # an empty cell stays empty
    d = data.CellData("toy", sp.csr_matrix(counts), np.array([f"G{i}" for i in range(9)], dtype=object),
                      np.array([f"c{i}" for i in range(12)], dtype=object), None, "human")
    totals = counts.sum(1, keepdims=True)
    expected = np.log1p(np.divide(counts * 1e4, totals, out=np.zeros_like(counts), where=totals > 0))
    np.testing.assert_allclose(features_mod.features(d, "cp10k").toarray(), expected, rtol=1e-5)
    np.testing.assert_allclose(features_mod.features(d).toarray(), np.log1p(counts), rtol=1e-6)
    with pytest.raises(ValueError):
        features_mod.features(d, "tpm")


def test_recipes_fill_unset_flags_and_flags_override_them():
    paper = main.parse_args(["--kmeans"])
    assert (paper.normalize, paper.ft_batch_size, paper.ft_dropout, paper.ft_weight_decay, paper.ft_early_stop) == \
        ("none", 5000, 0.0, 0.0, "accuracy")
    plus = main.parse_args(["--kmeans", "--recipe", "plus"])
    assert plus.normalize == "cp10k" and plus.ft_batch_size == 256 and plus.ft_dropout > 0
    mixed = main.parse_args(["--kmeans", "--recipe", "plus", "--normalize", "none", "--ft_batch_size", "64"])
    assert mixed.normalize == "none" and mixed.ft_batch_size == 64 and mixed.ft_dropout == plus.ft_dropout


@pytest.mark.parametrize("criterion, score, best, expected", [
    ("accuracy", (0.8, 0.5), (0.8, 0.9), False), ("accuracy", (0.81, 2.0), (0.8, 0.1), True),
    ("loss", (0.5, 0.4), (0.9, 0.5), True), ("loss", (0.9, 0.6), (0.5, 0.5), False),
    ("accuracy_then_loss", (0.8, 0.4), (0.8, 0.5), True), ("accuracy_then_loss", (0.8, 0.6), (0.8, 0.5), False),
    ("accuracy_then_loss", (0.7, 0.1), (0.8, 0.5), False),
])
def test_early_stopping_criteria(criterion, score, best, expected):
    assert classifier.improves(score, best, criterion) is expected
    assert classifier.improves(score, None, criterion)


def test_dropout_acts_only_while_training():
    torch.manual_seed(0)
    clf = Classifier(20, 3, 8, dropout=0.5)
    x = torch.rand(6, 20)
    clf.eval()
    first = clf(x)
    assert torch.equal(first, clf(x))  # no dropout at inference
    plain = Classifier(20, 3, 8)
    plain.load_state_dict(clf.state_dict())
    assert torch.allclose(plain.eval()(x), first)
    clf.train()
    torch.manual_seed(1)
    assert not torch.allclose(clf(x), first)


def test_plus_recipe_sweep_runs_and_records_its_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(main.cli, "DEFAULT_MODEL", tmp_path / "none.pt")  # baseline only, whatever models/ holds
    paths = [str(toy_dataset_file(tmp_path / "a.h5", n_cells=150, n_genes=30, n_types=3, seed=1))]
    frame = main.main(main.parse_args(["--kmeans", "--datasets", *paths, "--save_result", str(tmp_path / "r.csv"),
                                       "--recipe", "plus", "--ft_epoch", "20", "--hid", "8", "--log_level", "WARNING"]))
    assert len(frame) == 1 and frame["accuracy"].between(0, 1).all()
    paper = main.main(main.parse_args(["--kmeans", "--datasets", *paths, "--save_result", str(tmp_path / "r.csv"),
                                       "--ft_epoch", "20", "--hid", "8", "--log_level", "WARNING"]))
    assert paper["run_id"].nunique() == 2  # another recipe, another identity


def test_pretraining_records_normalize_and_phase2_refuses_another(tmp_path):
    path = str(toy_dataset_file(tmp_path / "a.h5", n_cells=120, n_genes=30, seed=1, labelled=False))
    flags = ["--is_pretrain", "--kmeans", "--datasets", path, "--pt_epoch", "1", "--batch_num", "2",
             "--avg_cluster_num", "20", "--hid", "8", "--log_level", "WARNING"]
    main.main(main.parse_args([*flags, "--save_model", str(tmp_path / "p1.pt"), "--normalize", "cp10k"]))
    assert load_checkpoint(tmp_path / "p1.pt")["normalize"] == "cp10k"
    with pytest.raises(SystemExit) as exc:
        main.main(main.parse_args([*flags, "--save_model", str(tmp_path / "p2.pt"), "--pretrain_output",
                                   "--pretrained_model", str(tmp_path / "p1.pt")]))
    assert exc.value.code == 1


def test_classifier_feeds_the_query_what_it_was_trained_on(tmp_path):
    counts, types = toy_counts(150, 30, 3, 2)
    adata = anndata.AnnData(X=sp.csr_matrix(counts), obs=pd.DataFrame({"t": [f"t{i}" for i in types]},
                                                                         index=[f"c{i}" for i in range(150)]),
                            var=pd.DataFrame(index=gene_names(30)))
    adata.write_h5ad(tmp_path / "ref.h5ad")
    annotate.main(annotate.parse_args(["train", "--reference", str(tmp_path / "ref.h5ad"), "--label_key", "t",
                                       "--save_model", str(tmp_path / "clf.pt"), "--recipe", "plus", "--hid", "8",
                                       "--ft_epoch", "10", "--log_level", "WARNING"]))
    ckpt = load_checkpoint(tmp_path / "clf.pt", kind="scpretrain-classifier")
    assert ckpt["normalize"] == "cp10k" and ckpt["config"]["ft_dropout"] > 0
    annotate.main(annotate.parse_args(["predict", "--model", str(tmp_path / "clf.pt"), "--query",
                                       str(tmp_path / "ref.h5ad"), "--out", str(tmp_path / "o.h5ad"),
                                       "--probabilities", "--log_level", "WARNING"]))
    clf, _ = checkpoints.load_classifier(tmp_path / "clf.pt")
    cp10k = np.log1p(counts * 1e4 / counts.sum(1, keepdims=True)).astype(np.float32)
    with torch.no_grad():  # the logits divided by the calibration temperature
        expected = torch.softmax(clf(torch.from_numpy(cp10k)) / ckpt["calibration"]["temperature"], 1).numpy()
    written = pd.read_csv(tmp_path / "o.probabilities.csv", index_col="cell")
    np.testing.assert_allclose(written[ckpt["classes"]].to_numpy(), expected, atol=1e-5)


# --------------------------------------------------------------------------- sparse fine-tuning


def toy_features(n_cells=120, n_genes=40, seed=5):
    counts, types = toy_counts(n_cells=n_cells, n_genes=n_genes, n_types=3, seed=seed)
    return features_mod.log1p_features(sp.csr_matrix(counts)), types


def test_sparse_training_rows_give_the_dense_rows_and_drop_stored_values():
    X, _ = toy_features()
    rows = np.random.default_rng(0).permutation(X.shape[0])[:50]
    sparse = classifier.TrainingRows(X, rows, "cpu", sparse=True)
    dense = classifier.TrainingRows(X, rows, "cpu", sparse=False)
    positions = np.array([3, 0, 49, 7])
    np.testing.assert_array_equal(sparse.batch(positions).csr().toarray(), dense.batch(positions).numpy())
    np.testing.assert_array_equal(sparse.batch(None).csr().toarray(), X[rows].toarray())
    torch.manual_seed(0)
    x = sparse.batch(None, dropout=0.5).csr().toarray()
    kept = x[X[rows].toarray() != 0]
    assert 0 < (kept == 0).sum() < kept.size  # some stored values dropped, not all
    np.testing.assert_allclose(kept[kept != 0], 2 * X[rows].toarray()[x != 0], rtol=1e-6)  # the rest scaled


def test_gpu_style_sparse_rows_drop_the_same_values_in_the_batch_and_its_transpose():
    """What a GPU trains on (a torch CSR batch and its transpose), built here on the CPU."""
    X, _ = toy_features()
    rows = np.random.default_rng(0).permutation(X.shape[0])[:50]
    part = sparse.DeviceTrainingCSR(sp.csr_matrix(X[rows], dtype=np.float32), torch.device("cpu"))
    whole = part.batch()
    np.testing.assert_array_equal(whole.x.to_dense().numpy(), X[rows].toarray())
    np.testing.assert_array_equal(whole.x_t.to_dense().numpy(), X[rows].toarray().T)
    torch.manual_seed(0)
    dropped = part.batch(dropout=0.5)
    x, x_t = dropped.x.to_dense().numpy(), dropped.x_t.to_dense().numpy()
    np.testing.assert_array_equal(x_t, x.T)  # the same values dropped in both
    kept = x[X[rows].toarray() != 0]
    assert 0 < (kept == 0).sum() < kept.size


@pytest.mark.parametrize("linear_base", ["none", "residual", "blend"])
@pytest.mark.parametrize("batch_size", [5000, 32])  # one batch of all cells, and several
def test_sparse_and_dense_fine_tuning_agree(batch_size, linear_base):
    X, types = toy_features()
    args = main.parse_args(["--kmeans", "--ft_epoch", "15", "--patience", "100", "--hid", "8",
                            "--ft_batch_size", str(batch_size), "--ft_linear_base", linear_base])
    cli.resolve_recipe(args)
    split = (np.arange(0, 80), np.arange(80, 100), np.arange(100, 120))
    results = {}
    for batch_format in ("dense", "sparse"):
        args.ft_batch_format = batch_format
        clf = classifier.build_classifier(3, X.shape[1], cli.classifier_settings(args), 0)
        clf, epochs, accuracy = classifier.train_classifier(clf, X, types, split, cli.classifier_settings(args), 0, torch.device("cpu"))
        results[batch_format] = (clf.state_dict(), epochs, accuracy)
    (dense_state, dense_epochs, dense_acc), (sparse_state, sparse_epochs, sparse_acc) = results.values()
    assert dense_epochs == sparse_epochs == 15 and sparse_acc == dense_acc
    for key in dense_state:
        torch.testing.assert_close(sparse_state[key], dense_state[key], rtol=1e-4, atol=1e-5)
    assert not torch.equal(dense_state["out.weight"], classifier.build_classifier(3, 40, cli.classifier_settings(args), 0).state_dict()["out.weight"])


def test_auto_batch_format_is_sparse_on_cpu_for_csr_only():
    assert sparse.sparse_products("auto", torch.device("cpu"))
    assert not sparse.sparse_products("dense", torch.device("cpu"))
    assert not sparse.sparse_products("auto", torch.device("cuda"))
    assert sparse.sparse_products("sparse", torch.device("cuda"))
    with pytest.raises(ValueError, match="batch format"):
        sparse.sparse_products("csr", "cpu")
    X, types = toy_features()  # PCA inputs are dense: batched dense whatever the format asks
    settings = cli.classifier_settings(main.parse_args(["--kmeans", "--ft_epoch", "2", "--hid", "8",
                                                        "--ft_batch_format", "sparse"]))
    clf = classifier.build_classifier(3, X.shape[1], settings, 0)
    split = (np.arange(0, 80), np.arange(80, 100), np.arange(100, 120))
    _, epochs, _ = classifier.train_classifier(clf, X.toarray(), types, split, settings, 0, "cpu")
    assert epochs == 2


# --------------------------------------------------------------------------- the linear base


def logistic_grid_choice(X, codes, split):
    """Independent: scikit-learn's logistic regression for each C, the first best on validation."""
    from sklearn.linear_model import LogisticRegression

    train, val = split[0], split[1]
    fits = [LogisticRegression(C=c, max_iter=3000).fit(X[train], codes[train]) for c in classifier.LINEAR_C_GRID]
    accs = [np.mean(f.predict(X[val]) == codes[val]) for f in fits]
    return fits[int(np.argmax(accs))], max(accs)


def logistic_objective(X, y, weight, bias, C):
    """scikit-learn's multinomial objective: C times the summed cross-entropy plus |W|^2 / 2."""
    logits = X @ weight.T + bias
    logits = logits - logits.max(1, keepdims=True)
    nll = -(logits[np.arange(len(y)), y] - np.log(np.exp(logits).sum(1))).sum()
    return C * nll + 0.5 * float((weight ** 2).sum())


@pytest.mark.parametrize("solver", ["torch", "sklearn"])
def test_linear_base_is_the_validation_tuned_logistic_regression(solver):
    X, types = toy_features(n_cells=150, n_genes=30, seed=3)
    split = (np.arange(0, 90), np.arange(90, 120), np.arange(120, 150))
    base = classifier.fit_linear_base(X, types, split, 4, solver=solver)  # a fourth class no cell has
    fit, accuracy = logistic_grid_choice(X, types, split)
    assert base.C == fit.C and base.val_accuracy == pytest.approx(accuracy)
    logits = X.toarray() @ base.weight.T + base.bias
    np.testing.assert_allclose(logits[:, :3], fit.decision_function(X), rtol=1e-2, atol=1e-2)
    train = split[0]
    ours = logistic_objective(X.toarray()[train], types[train], base.weight[:3], base.bias[:3], base.C)
    theirs = logistic_objective(X.toarray()[train], types[train], fit.coef_, fit.intercept_, fit.C)
    assert ours == pytest.approx(theirs, rel=1e-4)  # the same objective, stopped by the same rule (tol 1e-4)
    assert (logits[:, 3] < logits[:, :3].min(1) - 10).all()  # never predicted


def test_binary_linear_base_gives_scikit_learns_probabilities():
    X, types = toy_features(n_cells=150, n_genes=30, seed=4)
    keep = np.flatnonzero(types < 2)
    X, types = X[keep], types[keep]
    n = len(types)
    split = (np.arange(0, n // 2), np.arange(n // 2, 3 * n // 4), np.arange(3 * n // 4, n))
    base = classifier.fit_linear_base(X, types, split, 2)
    fit, _ = logistic_grid_choice(X, types, split)
    probs = torch.softmax(torch.from_numpy(X.toarray() @ base.weight.T + base.bias), 1).numpy()
    np.testing.assert_allclose(probs, fit.predict_proba(X), atol=1e-3)  # two solvers of one objective


def test_linear_base_needs_two_training_classes():
    X, types = toy_features()
    rows = np.flatnonzero(types == 0)
    assert classifier.fit_linear_base(X, types, (rows[:10], rows[10:15], rows[15:]), 3) is None


def linear_base_args(mode: str, *extra: str):
    return main.parse_args(["--kmeans", "--recipe", "plus", "--ft_epoch", "30", "--hid", "8",
                            "--ft_linear_base", mode, *extra])


def test_recipes_choose_their_linear_base():
    assert main.parse_args(["--kmeans"]).ft_linear_base == "none"
    assert main.parse_args(["--kmeans", "--recipe", "plus"]).ft_linear_base == "blend"


def test_residual_training_starts_from_the_regression_and_ends_no_lower_on_validation():
    X, types = toy_features(n_cells=150, n_genes=30, seed=3)
    split = (np.arange(0, 90), np.arange(90, 120), np.arange(120, 150))
    args = linear_base_args("residual")
    fit, lr_accuracy = logistic_grid_choice(X, types, split)
    clf = classifier.build_classifier(3, X.shape[1], cli.classifier_settings(args), 0)
    clf, _, accuracy = classifier.train_classifier(clf, X, types, split, cli.classifier_settings(args), 0, torch.device("cpu"))
    assert clf.base_mode == "residual" and not any(p.requires_grad for p in clf.base.parameters())
    assert accuracy >= lr_accuracy
    # a network that cannot move stays the regression: the zeroed output layer adds nothing
    args.ft_lr = 1e-12
    clf = classifier.build_classifier(3, X.shape[1], cli.classifier_settings(args), 0)
    clf, _, accuracy = classifier.train_classifier(clf, X, types, split, cli.classifier_settings(args), 0, torch.device("cpu"))
    assert accuracy == pytest.approx(lr_accuracy)
    assert not clf.out.weight.any() and not clf.out.bias.any()
    probs = classifier.predict_proba(clf, X, split[2], torch.device("cpu"))
    np.testing.assert_allclose(probs, fit.predict_proba(X[split[2]]), atol=1e-3)  # two solvers of one objective


def test_blend_trains_the_network_alone_then_mixes_in_the_regression_by_validation():
    X, types = toy_features(n_cells=150, n_genes=30, seed=3)
    split = (np.arange(0, 90), np.arange(90, 120), np.arange(120, 150))
    alone = classifier.build_classifier(3, X.shape[1], cli.classifier_settings(linear_base_args("none")), 0)
    alone, alone_epochs, alone_accuracy = classifier.train_classifier(alone, X, types, split, cli.classifier_settings(linear_base_args("none")),
                                                                      0, torch.device("cpu"))
    args = linear_base_args("blend")
    clf = classifier.build_classifier(3, X.shape[1], cli.classifier_settings(args), 0)
    clf, epochs, accuracy = classifier.train_classifier(clf, X, types, split, cli.classifier_settings(args), 0, torch.device("cpu"))
    assert clf.base_mode == "blend" and epochs == alone_epochs
    for key, value in alone.state_dict().items():  # the network is the one trained alone
        torch.testing.assert_close(clf.state_dict()[key], value)
    fit, lr_accuracy = logistic_grid_choice(X, types, split)
    assert float(clf.base_share) in classifier.BLEND_SHARES and accuracy >= max(alone_accuracy, lr_accuracy)
    test = split[2]
    clf.base_share.fill_(0.0)  # share 0: the network's own probabilities
    np.testing.assert_allclose(classifier.predict_proba(clf, X, test, "cpu"),
                               classifier.predict_proba(alone, X, test, "cpu"), atol=1e-6)
    clf.base_share.fill_(1.0)  # share 1: the regression's (scikit-learn's, up to its solver's tolerance)
    np.testing.assert_allclose(classifier.predict_proba(clf, X, test, "cpu"), fit.predict_proba(X[test]), atol=1e-3)
    regression = classifier.predict_proba(clf, X, test, "cpu")
    clf.base_share.fill_(0.5)  # between: the normalised geometric mean of the two
    p_net = classifier.predict_proba(alone, X, test, "cpu")
    mixed = np.sqrt(p_net * regression)
    np.testing.assert_allclose(classifier.predict_proba(clf, X, test, "cpu"), mixed / mixed.sum(1, keepdims=True),
                               atol=1e-5)


def test_fixed_linear_c_and_blend_share_are_used_instead_of_the_validation_choice():
    X, types = toy_features(n_cells=150, n_genes=30, seed=3)
    split = (np.arange(0, 90), np.arange(90, 120), np.arange(120, 150))
    args = linear_base_args("blend", "--ft_linear_c", "0.37", "--ft_blend_share", "0.6")
    settings = cli.classifier_settings(args)
    assert (settings.ft_linear_c, settings.ft_blend_share) == (0.37, 0.6)
    clf = classifier.build_classifier(3, X.shape[1], settings, 0)
    clf, _, _ = classifier.train_classifier(clf, X, types, split, settings, 0, torch.device("cpu"))
    assert clf.base_c == pytest.approx(0.37) and float(clf.base_share) == pytest.approx(0.6)
    from sklearn.linear_model import LogisticRegression
    fit = LogisticRegression(C=0.37, max_iter=3000).fit(X[split[0]], types[split[0]])
    logits = X.toarray() @ clf.base.weight.detach().numpy().T + clf.base.bias.detach().numpy()
    np.testing.assert_allclose(logits, fit.decision_function(X), rtol=1e-2, atol=1e-2)  # the regression at that C
    chosen = cli.classifier_settings(linear_base_args("blend", "--ft_linear_c", "chosen"))
    assert chosen.ft_linear_c == st.CHOSEN and chosen.ft_blend_share == st.CHOSEN  # the plus recipe chooses both
    assert "ft_linear_c" not in chosen.identity() and settings.identity()["ft_linear_c"] == 0.37
    for bad in (["--ft_linear_c", "0"], ["--ft_linear_c", "-1"], ["--ft_blend_share", "1.5"]):
        with pytest.raises(SystemExit):
            linear_base_args("blend", *bad)


@pytest.mark.parametrize("mode", ["residual", "blend"])
def test_linear_base_travels_in_the_checkpoint_and_reads_a_query_in_its_own_gene_order(tmp_path, mode):
    n_genes = 30
    counts, types = toy_counts(150, n_genes, 3, 2)
    obs = pd.DataFrame({"t": [f"t{i}" for i in types]}, index=[f"c{i}" for i in range(150)])
    anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=gene_names(n_genes))).write_h5ad(
        tmp_path / "ref.h5ad")
    annotate.main(annotate.parse_args(["train", "--reference", str(tmp_path / "ref.h5ad"), "--label_key", "t",
                                       "--save_model", str(tmp_path / "clf.pt"), "--recipe", "plus", "--hid", "8",
                                       "--ft_epoch", "10", "--ft_linear_base", mode, "--log_level", "WARNING"]))
    ckpt = load_checkpoint(tmp_path / "clf.pt", kind="scpretrain-classifier")
    assert ckpt["model_args"]["linear_base"] == mode and ckpt["model"]["base.weight"].shape == (3, n_genes)
    assert ckpt["config"]["ft_linear_base"] == mode
    if mode == "blend":  # whatever share validation chose, predict with both parts in play
        ckpt["model"]["base_share"] = torch.tensor(0.5)
        torch.save(ckpt, tmp_path / "clf.pt")
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(n_genes, n_genes - 5, replace=False))[rng.permutation(n_genes - 5)]
    anndata.AnnData(X=sp.csr_matrix(counts[:, keep]), obs=obs,
                    var=pd.DataFrame(index=np.array(gene_names(n_genes))[keep])).write_h5ad(tmp_path / "q.h5ad")
    annotate.main(annotate.parse_args(["predict", "--model", str(tmp_path / "clf.pt"), "--query", str(tmp_path / "q.h5ad"),
                                       "--out", str(tmp_path / "o.h5ad"), "--probabilities", "--log_level", "WARNING"]))
    aligned = np.zeros_like(counts)
    aligned[:, keep] = counts[:, keep]
    totals = aligned.sum(1, keepdims=True)
    cp10k = np.log1p(np.divide(aligned * 1e4, totals, out=np.zeros_like(aligned), where=totals > 0)).astype(np.float32)
    clf, _ = checkpoints.load_classifier(tmp_path / "clf.pt")
    temperature = ckpt["calibration"]["temperature"]
    with torch.no_grad():
        expected = torch.softmax(clf(torch.from_numpy(cp10k)) / temperature, 1).numpy()
        without_base = torch.softmax(clf.network(torch.from_numpy(cp10k)) / temperature, 1).numpy()
    written = pd.read_csv(tmp_path / "o.probabilities.csv", index_col="cell")[ckpt["classes"]].to_numpy()
    np.testing.assert_allclose(written, expected, atol=1e-5)
    assert not np.allclose(written, without_base, atol=1e-3)  # the base's logits are in the probabilities


def test_a_checkpoint_without_linear_base_in_its_model_args_loads_as_the_network_alone():
    torch.manual_seed(0)
    clf = Classifier(12, 3, 8).eval()
    ckpt = checkpoints.classifier_checkpoint(clf, gene_names(12), ["a", "b", "c"], fed=checkpoints.Feeding(),
                                             label_key="t", info={"reference": {"name": "r"}})
    del ckpt["model_args"]["linear_base"]  # written before the option existed
    checkpoints.validate_classifier(ckpt, "ckpt")
    loaded = checkpoints.classifier_from(ckpt)
    x = torch.rand(5, 12)
    assert loaded.base is None and torch.equal(loaded(x), clf(x))
