"""main.py end to end on tiny collections: pre-training phases, checkpoints, resume, the sweep."""
import json
import os
import sys

import numpy as np
import pandas as pd
import pytest
import torch

import data
import classifier
import finetune
import main
import pretrain
from helpers import launched_vs_single, toy_dataset_file
import cli
from checkpoints import load as load_checkpoint
from errors import CheckpointError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pretrain_args(collection, save, *extra):
    return main.parse_args(["--is_pretrain", "--kmeans", "--datasets", *collection, "--save_model", str(save),
                            "--pt_epoch", "3", "--batch_num", "4", "--avg_cluster_num", "20", "--hid", "16",
                            "--log_level", "WARNING", *extra])


def test_phase1_writes_a_self_describing_checkpoint(collection, tmp_path):
    final = main.main(pretrain_args(collection, tmp_path / "p1.pt"))
    ckpt = torch.load(tmp_path / "p1.pt", weights_only=True)
    assert ckpt["kind"] == "scpretrain-encoder" and ckpt["phase"] == 1 and ckpt["epoch"] == 3
    assert ckpt["model"]["linear.weight"].shape == (16, len(ckpt["gene_universe"]))
    assert ckpt["gene_universe"] == sorted(ckpt["gene_universe"])
    assert ckpt["config"]["pt_epoch"] == 3 and ckpt["model_args"]["hid"] == 16
    assert ckpt["datasets"] == ["alpha", "beta", "gamma"]  # the unlabelled one is pre-training data too
    assert len(ckpt["losses"]) == 3 and ckpt["loss"] == pytest.approx(final["losses"][-1])
    assert not (tmp_path / "p1.pt.resume").exists()


def test_loss_falls_over_epochs(collection, tmp_path):
    final = main.main(pretrain_args(collection, tmp_path / "p.pt", "--pt_epoch", "6", "--pt_lr", "1e-2"))
    assert final["losses"][-1] < final["losses"][0]


def test_same_seed_gives_identical_weights(collection, tmp_path):
    a = main.main(pretrain_args(collection, tmp_path / "a.pt"))
    b = main.main(pretrain_args(collection, tmp_path / "b.pt"))
    c = main.main(pretrain_args(collection, tmp_path / "c.pt", "--seed", "1"))
    assert torch.equal(a["model"]["linear.weight"], b["model"]["linear.weight"])
    assert not torch.equal(a["model"]["linear.weight"], c["model"]["linear.weight"])


def test_interrupted_run_resumes_to_the_same_encoder(collection, tmp_path, monkeypatch):
    full = main.main(pretrain_args(collection, tmp_path / "full.pt", "--pt_epoch", "4"))
    real_epoch = pretrain.train_epoch

    def interrupted(*args, **kwargs):
        if args[-1] == 3:  # the epoch number
            raise KeyboardInterrupt
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(pretrain, "train_epoch", interrupted)
    with pytest.raises(SystemExit) as exc:  # Ctrl-C: one line, exit 130
        main.main(pretrain_args(collection, tmp_path / "cut.pt", "--pt_epoch", "4"))
    assert exc.value.code == 130
    assert (tmp_path / "cut.pt.resume").exists() and not (tmp_path / "cut.pt").exists()
    monkeypatch.setattr(pretrain, "train_epoch", real_epoch)
    resumed = main.main(pretrain_args(collection, tmp_path / "cut.pt", "--pt_epoch", "4", "--resume"))
    assert resumed["epoch"] == 4
    assert torch.equal(full["model"]["linear.weight"], resumed["model"]["linear.weight"])
    assert resumed["losses"] == full["losses"]


def test_resume_refuses_another_runs_checkpoint(collection, tmp_path, monkeypatch):
    real_epoch = pretrain.train_epoch
    monkeypatch.setattr(pretrain, "train_epoch",
                        lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt) if a[-1] == 2 else real_epoch(*a, **k))
    with pytest.raises(SystemExit):
        main.main(pretrain_args(collection, tmp_path / "cut.pt"))
    monkeypatch.setattr(pretrain, "train_epoch", real_epoch)
    with pytest.raises(SystemExit) as exc:
        main.main(pretrain_args(collection, tmp_path / "cut.pt", "--resume", "--seed", "7"))
    assert exc.value.code == 1


def test_phase2_reclusters_the_encoder_output_and_continues(collection, tmp_path):
    p1 = main.main(pretrain_args(collection, tmp_path / "p1.pt"))
    p2 = main.main(pretrain_args(collection, tmp_path / "p2.pt", "--pretrain_output",
                                 "--pretrained_model", str(tmp_path / "p1.pt")))
    assert p2["phase"] == 2 and p2["gene_universe"] == p1["gene_universe"]
    assert p2["config"]["pretrain_output"] is True
    assert not torch.equal(p1["model"]["linear.weight"], p2["model"]["linear.weight"])


def test_bad_checkpoints_give_clear_errors(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        load_checkpoint(corrupt)
    other = tmp_path / "other.pt"
    torch.save({"kind": "something-else"}, other)
    with pytest.raises(CheckpointError, match="expected a 'scpretrain-encoder'"):
        load_checkpoint(other)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_cuda_flag_falls_back_to_cpu_with_a_message(collection, tmp_path, capfd):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the fallback is for machines without one")
    final = main.main(pretrain_args(collection, tmp_path / "p.pt", "--cuda", "--pt_epoch", "1",
                                    "--log_level", "INFO"))
    assert final["epoch"] == 1
    assert capfd.readouterr().err.count("no CUDA GPU is available") == 1


# --------------------------------------------------------------------------- fine-tuning sweep


@pytest.fixture
def pretrained(collection, tmp_path):
    path = tmp_path / "pre.pt"
    main.main(pretrain_args(collection, path, "--pt_epoch", "2"))
    return path


def sweep_args(collection, pretrained_path, out, *extra):
    return main.parse_args(["--kmeans", "--datasets", *collection, "--pretrained_model", str(pretrained_path),
                            "--save_result", str(out), "--ft_epoch", "40", "--patience", "5", "--hid", "16",
                            "--log_level", "WARNING", *extra])


def test_sweep_writes_paired_rows_and_args(collection, pretrained, tmp_path):
    out = tmp_path / "ft.csv"
    frame = main.main(sweep_args(collection, pretrained, out, "--fold2", "2"))
    assert len(frame) == 2 * 2 * 2  # labelled datasets x repeats x methods
    assert set(frame["method"]) == {"scPretrain", "Without pretraining"}
    assert set(frame["dataset"]) == {"alpha", "beta"}
    for _, pair in frame.groupby(["dataset", "seed"]):  # one split serves both methods
        assert pair["n_train"].nunique() == 1 and pair["n_test"].nunique() == 1 and len(pair) == 2
    for m in ("accuracy", "kappa", "auprc", "auroc"):
        assert frame[m].between(-1, 1).all()
    assert frame.loc[frame.dataset == "alpha", "n_train"].iloc[0] == int(0.6 * 150)
    saved = json.loads((tmp_path / "ft.csv.args.json").read_text())
    (run_id,) = frame["run_id"].unique()
    assert saved["identities"][run_id]["args"]["fold2"] == 2
    assert pd.read_csv(out).shape == frame.shape


def test_sweep_resumes_without_redoing_rows(collection, pretrained, tmp_path, monkeypatch):
    out = tmp_path / "ft.csv"
    main.main(sweep_args(collection, pretrained, out))
    calls = []
    monkeypatch.setattr(finetune, "run_task", lambda task, *a, **k: calls.append(task) or [])
    frame = main.main(sweep_args(collection, pretrained, out))
    assert calls == [] and len(frame) == 4
    main.main(sweep_args(collection, pretrained, out, "--fold2", "2"))
    assert len(calls) == 2  # only the new repeat of each dataset


def test_sweep_is_repeatable(collection, pretrained, tmp_path):
    a = main.main(sweep_args(collection, pretrained, tmp_path / "a.csv"))
    b = main.main(sweep_args(collection, pretrained, tmp_path / "b.csv"))
    cols = ["accuracy", "kappa", "auprc", "auroc", "epochs"]
    np.testing.assert_array_equal(a[cols].to_numpy(), b[cols].to_numpy())


def test_jobs_give_identical_results(collection, pretrained, tmp_path):
    a = main.main(sweep_args(collection, pretrained, tmp_path / "a.csv", "--threads", "1"))
    b = main.main(sweep_args(collection, pretrained, tmp_path / "b.csv", "--threads", "1", "--jobs", "2"))
    cols = ["dataset", "method", "accuracy", "kappa", "auprc", "auroc", "epochs"]
    pd.testing.assert_frame_equal(a[cols], b[cols])


def test_pca_ft_runs_both_methods(collection, pretrained, tmp_path):
    frame = main.main(sweep_args(collection, pretrained, tmp_path / "p.csv", "--pca_ft", "--pca_dim", "10"))
    assert len(frame) == 4 and frame["pca_ft"].all()


def test_pca_projection_of_the_encoder_is_exact_in_the_pca_subspace():
    rng = np.random.default_rng(0)
    args = main.parse_args(["--hid", "8"])
    genes = np.array([f"G{i}" for i in range(12)], dtype=object)
    components = np.linalg.qr(rng.normal(size=(12, 5)))[0].T.astype(np.float32)
    mean = rng.random(12).astype(np.float32)
    settings = cli.classifier_settings(args)
    gene_clf = classifier.build_classifier(3, len(genes), settings, 0)
    pca_clf = classifier.build_classifier(3, len(genes), settings, 0, pca=(components, mean))
    x_pca = rng.normal(size=(4, 5)).astype(np.float32)
    x = x_pca @ components + mean
    with torch.no_grad():
        np.testing.assert_allclose(gene_clf.encoder(torch.from_numpy(x)).numpy(),
                                   pca_clf.encoder(torch.from_numpy(x_pca)).numpy(), atol=1e-5)


def test_sweep_stops_when_the_universe_covers_no_gene(pretrained, tmp_path):
    other = toy_dataset_file(tmp_path / "other.h5", n_cells=60, n_genes=20, seed=5)
    with h5_rename_genes(other, "OTHER"):
        with pytest.raises(SystemExit):
            main.main(sweep_args([str(other)], pretrained, tmp_path / "x.csv"))
    assert not (tmp_path / "x.csv").exists()


class h5_rename_genes:
    def __init__(self, path, prefix):
        self.path, self.prefix = path, prefix

    def __enter__(self):
        import h5py

        with h5py.File(self.path, "r+") as h5:
            n = len(h5["var_names"])
            del h5["var_names"]
            h5["var_names"] = np.array([f"{self.prefix}{i}".encode() for i in range(n)])

    def __exit__(self, *exc):
        return False


def test_np_input_and_ann_input_on_the_demo(tmp_path):
    h5ad = os.path.join(ROOT, "dataset", "pbmc68k_reduced_scanpy.h5ad")
    demo = data.read_h5ad(h5ad, label_key="bulk_labels", layer="raw", values="log1p")  # X is scaled
    pre = tmp_path / "pre.pt"
    main.main(main.parse_args(["--is_pretrain", "--datasets", h5ad, "--label_key", "bulk_labels", "--save_model",
                               str(pre), "--pt_epoch", "1", "--hid", "16", "--log_level", "WARNING",
                               "--layer", "raw", "--log_transformed"]))
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "feature.npy", demo.X.toarray())
    np.save(folder / "label.npy", np.asarray(demo.labels, dtype=str))
    np.save(folder / "gene_list.npy", np.asarray(demo.genes, dtype=str))
    common = ["--pretrained_model", str(pre), "--ft_epoch", "15", "--patience", "3", "--hid", "16",
              "--label_key", "bulk_labels", "--log_level", "WARNING", "--layer", "raw", "--log_transformed"]
    a = main.main(main.parse_args(["--ann_input", h5ad, "--save_result", str(tmp_path / "a.csv"), *common]))
    b = main.main(main.parse_args(["--np_input", str(folder), "--save_result", str(tmp_path / "b.csv"), *common]))
    assert len(a) == len(b) == 2
    assert a["n_cells"].iloc[0] == b["n_cells"].iloc[0] == 700
    assert a["n_classes"].iloc[0] == b["n_classes"].iloc[0] == 10
    np.testing.assert_allclose(a["accuracy"], b["accuracy"])  # same data, same seed


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_pca_pt_says_it_is_not_available(capsys):
    with pytest.raises(SystemExit) as exc:
        main.parse_args(["--is_pretrain", "--kmeans", "--pca_pt"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--pca_pt" in err and "not available" in err and "--pca_ft" in err


def test_a_failed_epoch_checkpoint_write_stops_the_run(collection, tmp_path, monkeypatch, capsys):
    """Epoch checkpoints are written in the background: a failure still stops the run, with the
    write's own error, and no final checkpoint is written."""
    import checkpoints
    from errors import OutputError

    real_save, calls = checkpoints.save, []

    def failing_second(ckpt, path):
        calls.append(path)
        if len(calls) == 2:
            raise OutputError(f"{path}: writing failed (no space left on device); the earlier file is kept")
        return real_save(ckpt, path)

    monkeypatch.setattr(checkpoints, "save", failing_second)
    with pytest.raises(SystemExit) as exc:
        main.main(pretrain_args(collection, tmp_path / "cut.pt", "--pt_epoch", "4"))
    assert exc.value.code == 1
    assert "no space left on device" in capsys.readouterr().err
    assert len(calls) == 2  # epoch 3's checkpoint was never started: the run stopped at it
    assert (tmp_path / "cut.pt.resume").exists() and not (tmp_path / "cut.pt").exists()
