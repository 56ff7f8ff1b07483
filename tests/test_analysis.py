"""rf_svm_lr.py, clus.py and fig.py end to end on tiny fixtures, checked against sklearn."""
import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, adjusted_rand_score

import checkpoints
import clus
import cli
import data
import fig
import genes as gn
import rf_svm_lr
import splits
from errors import CheckpointError
from helpers import save_encoder, toy_counts, toy_dataset_file
from model import Encoder

OFFSHELF_COLUMNS = ["dataset", "data_id", "species", "n_cells", "n_genes", "n_classes", "n_train", "n_val", "n_test", "seed",
                    "repeat", "classifier", "run_id", "features", "accuracy", "kappa", "auprc", "auroc", "n_scored_classes",
                    "seconds"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """Two labelled datasets, one unlabelled, and a pretrained encoder over their genes."""
    root = tmp_path_factory.mktemp("analysis")
    paths = [toy_dataset_file(root / "alpha.h5", n_cells=120, n_genes=50, n_types=3, seed=1),
             toy_dataset_file(root / "beta.h5", n_cells=100, n_genes=40, n_types=4, seed=2),
             toy_dataset_file(root / "gamma.h5", n_cells=80, n_genes=45, seed=3, labelled=False)]
    universe = sorted(set().union(*(gn.map_genes(data.read_any(p).genes, "human") for p in paths)))
    torch.manual_seed(0)
    model = save_encoder(root / "pretrained.pt", Encoder(len(universe), 8), universe)
    return {"datasets": [str(p) for p in paths], "model": str(model), "root": root}


def common_flags(fixtures, *datasets):
    return ["--datasets", *(datasets or fixtures["datasets"]), "--pretrained_model", fixtures["model"],
            "--log_level", "WARNING"]


# --------------------------------------------------------------------------- rf_svm_lr.py


@pytest.mark.parametrize("clf", ["rf", "svm", "lr"])
def test_offshelf_writes_one_row_per_dataset_repeat_and_feature_set(fixtures, tmp_path, clf):
    out = tmp_path / "offshelf.csv"
    rf_svm_lr.main(rf_svm_lr.parse_args(["--clf", clf, "--save_result", str(out), "--fold1", "2",
                                         *common_flags(fixtures)]))
    rows = pd.read_csv(out)
    assert list(rows.columns) == OFFSHELF_COLUMNS
    assert len(rows) == 2 * 2 * 2  # labelled datasets x repeats x feature sets; gamma is unlabelled
    assert set(rows["dataset"]) == {"alpha", "beta"} and set(rows["classifier"]) == {clf}
    assert set(rows["features"]) == {"PCA", "scPretrain"}
    assert set(rows["seed"]) == set(splits.repeat_seeds(0, 2, 1))
    assert rows["accuracy"].between(0, 1).all() and rows["kappa"].between(-1, 1).all()
    assert rows["auprc"].between(0, 1).all() and rows["auroc"].between(0, 1).all()
    assert (rows["n_scored_classes"] <= rows["n_classes"]).all()
    alpha = rows[rows["dataset"] == "alpha"].iloc[0]
    assert (alpha["n_train"], alpha["n_val"], alpha["n_test"]) == (72, 12, 36)  # the sweep's split
    assert (tmp_path / "offshelf.csv.args.json").exists()


def test_offshelf_pca_row_matches_sklearn_and_skips_finished_rows(fixtures, tmp_path):
    out = tmp_path / "offshelf.csv"
    flags = ["--clf", "lr", *common_flags(fixtures, fixtures["datasets"][0])]
    args = rf_svm_lr.parse_args(["--save_result", str(out), *flags])
    rf_svm_lr.main(args)
    rf_svm_lr.main(args)  # same model, settings and seed: nothing to redo
    rows = pd.read_csv(out)
    assert len(rows) == 2
    rf_svm_lr.main(rf_svm_lr.parse_args(["--save_result", str(tmp_path / "again.csv"), *flags]))
    again = pd.read_csv(tmp_path / "again.csv")
    assert rows.drop(columns="seconds").equals(again.drop(columns="seconds"))  # same seed, same numbers
    rf_svm_lr.main(rf_svm_lr.parse_args(["--save_result", str(out), *flags, "--pca_dim", "5"]))
    grown = pd.read_csv(out)  # another setting: another run identity, appended beside the first
    assert len(grown) == 4 and grown["run_id"].nunique() == 2
    # independent: split, log1p, PCA on the first 500 training cells, logistic regression
    X, types = toy_counts(120, 50, 3, 1)
    train, _, test = splits.split_cells(120, 0, 0.6, 0.1, 1000, 1000)
    X = np.log1p(X)
    pca = PCA(n_components=min(200, len(train[:500]) - 1, 50), random_state=0).fit(X[train[:500]])
    Z = pca.transform(X)
    lr = LogisticRegression(max_iter=10000, random_state=0).fit(Z[train], types[train])
    pca_row = rows[rows["features"] == "PCA"].iloc[0]
    assert pca_row["accuracy"] == pytest.approx(accuracy_score(types[test], lr.predict(Z[test])), abs=1e-6)


def test_class_missing_from_training_gets_the_lowest_score():
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(40, 3)), np.repeat([0, 2], 20)
    for name in rf_svm_lr.CLASSIFIERS:
        clf = rf_svm_lr.make_classifier(name, 0).fit(X, y)
        scores = rf_svm_lr.class_scores(clf, X, 3)
        assert scores.shape == (40, 3)
        assert (scores[:, 1] < np.minimum(scores[:, 0], scores[:, 2])).all()


def test_missing_pretrained_model_says_how_to_make_one(fixtures, tmp_path):
    with pytest.raises(CheckpointError, match="python main.py --is_pretrain --kmeans"):
        checkpoints.load_encoder(tmp_path / "none.pt", cli.PRETRAIN_HINT)
    argv = ["--save_result", str(tmp_path / "o.csv"), "--datasets", *fixtures["datasets"],
            "--pretrained_model", str(tmp_path / "none.pt"), "--log_level", "WARNING"]
    for script in (rf_svm_lr, clus):
        with pytest.raises(SystemExit) as exit_info:
            script.main(script.parse_args(argv))
        assert exit_info.value.code == 1
    assert not (tmp_path / "o.csv").exists()


# --------------------------------------------------------------------------- clus.py and the pipeline to fig.py


def test_clustering_rows_match_sklearn_then_fig_draws_them(fixtures, tmp_path):
    results = tmp_path / "results"
    rf_svm_lr.main(rf_svm_lr.parse_args(["--clf", "rf", "--save_result", str(results / "offshelf.csv"),
                                         *common_flags(fixtures)]))
    clus.main(clus.parse_args(["--save_result", str(results / "clustering.csv"), "--n_seeds", "2", "--no_umap",
                               *common_flags(fixtures)]))
    rows = pd.read_csv(results / "clustering.csv")
    assert len(rows) == 2 * 2 * 2  # datasets x feature sets x seeds
    assert {"dataset", "features", "seed", "ari", "nmi", "silhouette"} <= set(rows.columns)
    assert rows["ari"].between(-1, 1).all() and rows["nmi"].between(0, 1).all()
    assert rows["silhouette"].between(-1, 1).all() and set(rows["seed"]) == {0, 1}
    assert not list(results.glob("umap_*"))
    # independent: PCA to 50 components of log1p on all cells, K-means with k = 3 types
    X, types = toy_counts(120, 50, 3, 1)
    Z = PCA(n_components=50, random_state=0).fit_transform(np.log1p(X))
    expected = adjusted_rand_score(types, KMeans(3, n_init=1, random_state=1).fit_predict(Z))
    got = rows.query("dataset == 'alpha' and features == 'PCA' and seed == 1")["ari"].item()
    assert got == pytest.approx(expected, abs=1e-6)

    written = fig.main(fig.parse_args(["--results_dir", str(results), "--log_level", "WARNING"]))
    names = {p.name for p in written}
    assert {"offshelf_rf_accuracy.png", "offshelf_rf_auroc.pdf", "clustering_ari.png", "clustering_nmi.pdf",
            "summary.png", "summary.pdf"} <= names
    assert not any(n.startswith("finetune_") for n in names)  # no finetune.csv: noted, skipped
    for p in written:
        assert p.stat().st_size > 0


def test_umap_figure_of_the_chosen_dataset(fixtures, tmp_path):
    tiny = toy_dataset_file(tmp_path / "tiny.h5", n_cells=40, n_genes=30, n_types=2, seed=5)
    out = tmp_path / "clustering.csv"
    clus.main(clus.parse_args(["--save_result", str(out), "--n_seeds", "1", "--umap_dataset", "tiny",
                               *common_flags(fixtures, fixtures["datasets"][0], str(tiny))]))
    png = tmp_path / "umap_tiny.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 1000
    coords = pd.read_csv(tmp_path / "umap_tiny.csv")
    assert len(coords) == 2 * 40 and set(coords["features"]) == {"PCA", "scPretrain"}
    assert np.isfinite(coords[["umap1", "umap2"]].to_numpy()).all()
    assert not (tmp_path / "umap_alpha.png").exists()


def test_unknown_umap_dataset_is_a_clear_error(fixtures, tmp_path):
    with pytest.raises(SystemExit):
        clus.main(clus.parse_args(["--save_result", str(tmp_path / "c.csv"), "--umap_dataset", "nowhere",
                                   *common_flags(fixtures)]))


# --------------------------------------------------------------------------- fig.py on hand-made CSVs


def finetune_frame():
    """Three datasets, two repeats; scPretrain's mean accuracy is higher on alpha and gamma only."""
    rows = []
    for dataset, base, ours in [("alpha", 0.70, 0.80), ("beta", 0.90, 0.85), ("gamma", 0.50, 0.60)]:
        for repeat, shift in enumerate([-0.01, 0.01]):
            rows.append({"dataset": dataset, "method": "Without pretraining", "repeat": repeat,
                         "accuracy": base + shift, "kappa": base - 0.1, "auprc": base, "auroc": base})
            rows.append({"dataset": dataset, "method": "scPretrain", "repeat": repeat,
                         "accuracy": ours + shift, "kappa": ours - 0.1, "auprc": ours, "auroc": base})
    rows.append({"dataset": "delta", "method": "scPretrain", "repeat": 0, "accuracy": 0.9, "kappa": 0.8,
                 "auprc": 0.9, "auroc": 0.9})  # no baseline: not compared
    return pd.DataFrame(rows)


def test_wins_are_counted_on_per_dataset_means():
    paired = fig.paired_means(finetune_frame(), "method", "Without pretraining", "accuracy")
    assert list(paired["dataset"]) == ["alpha", "beta", "gamma"]
    assert paired["x"].tolist() == pytest.approx([0.70, 0.90, 0.50])
    assert paired["y"].tolist() == pytest.approx([0.80, 0.85, 0.60])
    assert fig.count_wins(paired) == (2, 3)
    ties = fig.paired_means(finetune_frame(), "method", "Without pretraining", "auroc")
    assert fig.count_wins(ties) == (0, 3)  # equal is not a win


def test_fig_writes_png_and_pdf_per_metric(tmp_path):
    finetune_frame().to_csv(tmp_path / "finetune.csv", index=False)
    written = fig.main(fig.parse_args(["--results_dir", str(tmp_path), "--log_level", "WARNING"]))
    expected = {f"finetune_{m}.{ext}" for m in ("accuracy", "kappa", "auprc", "auroc") for ext in ("png", "pdf")}
    assert {p.name for p in written} == expected | {"summary.png", "summary.pdf"}
    for p in written:
        assert p.exists() and p.stat().st_size > 0
    assert (tmp_path / "finetune_accuracy.png").read_bytes()[:8] == PNG_SIGNATURE
    assert (tmp_path / "finetune_accuracy.pdf").read_bytes()[:4] == b"%PDF"


def test_fig_without_any_csv_writes_nothing(tmp_path):
    assert fig.main(fig.parse_args(["--results_dir", str(tmp_path), "--log_level", "WARNING"])) == []
    assert list(tmp_path.iterdir()) == []


def test_malformed_csv_names_the_file_and_the_problem(tmp_path):
    bad = tmp_path / "finetune.csv"
    finetune_frame().drop(columns=["kappa", "method"]).to_csv(bad, index=False)
    with pytest.raises(data.DataError, match=r"finetune\.csv: missing required columns \['method', 'kappa'\]"):
        fig.read_result_csv(bad, fig.FINETUNE)
    with pytest.raises(SystemExit) as exit_info:
        fig.main(fig.parse_args(["--results_dir", str(tmp_path), "--log_level", "WARNING"]))
    assert exit_info.value.code == 1
    frame = finetune_frame().astype({"auprc": object})
    frame.loc[0, "auprc"] = "high"
    frame.to_csv(bad, index=False)
    with pytest.raises(data.DataError, match=r"finetune\.csv: column 'auprc' must hold numbers, found \['high'\]"):
        fig.read_result_csv(bad, fig.FINETUNE)
    bad.write_text("")
    with pytest.raises(data.DataError, match="finetune.csv: is empty"):
        fig.read_result_csv(bad, fig.FINETUNE)
