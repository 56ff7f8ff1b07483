"""The GPU path against the CPU's numbers: K-means, one pre-training step, main.py end to end, torchrun.

Every test needs a CUDA GPU and is skipped without one (bench/gpu_check.sh runs this file on a
GPU machine). Tolerances allow for float32 rounding and the GPU's non-deterministic atomics
(``index_add_``, scatter in the cross-entropy backward); TF32 stays off (torch's default).
"""
import os
import sys

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from sklearn.datasets import make_blobs

import annotate
import classifier
import data
import kmeans
import main
import pretrain
from helpers import gene_names, launched_vs_single, toy_counts
from checkpoints import load as load_checkpoint
from model import ModelConfig, PretrainModel, offset_targets
from sparse import DeviceCSR
import features as features_mod

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")


def sparse_log_counts():
    counts, _ = toy_counts(n_cells=500, n_genes=200, n_types=5, seed=4)
    keep = np.random.default_rng(4).random(counts.shape) < 0.35
    return features_mod.log1p_features(sp.csr_matrix(counts * keep))


# --------------------------------------------------------------------------- K-means


@needs_cuda
@pytest.mark.parametrize("tol", [kmeans.DEFAULT_TOL, -1])
def test_kmeans_on_cuda_matches_cpu(tol):
    X = sparse_log_counts()
    for k in (5, 10):
        cpu = kmeans.kmeans(X, k, seed=0, device="cpu", tol=tol)
        gpu = kmeans.kmeans(X, k, seed=0, device="cuda", tol=tol)
        assert gpu.labels.shape == cpu.labels.shape and gpu.labels.max() < k
        assert gpu.inertia == pytest.approx(cpu.inertia, rel=1e-3)
    blobs, _ = make_blobs(n_samples=800, n_features=10, centers=8, cluster_std=0.3, center_box=(-20, 20),
                          random_state=1)
    blobs = blobs.astype(np.float32)
    cpu, gpu = kmeans.kmeans(blobs, 8, seed=0, tol=tol), kmeans.kmeans(blobs, 8, seed=0, device="cuda", tol=tol)
    np.testing.assert_array_equal(gpu.labels, cpu.labels)  # well separated: no cell near a boundary
    assert gpu.n_iter_run == cpu.n_iter_run


# --------------------------------------------------------------------------- one pre-training step


def one_step(paths, labels, device: torch.device, sparse: bool, on_device: bool = False):
    """One step of phase 1 built as pretrain.run_pretraining builds it: (loss, encoder weight gradient);
    ``on_device``: the step's cells gathered from the collection held on the device."""
    coll = pretrain.build_collection(data.load_collection(paths))
    counts = [[int(lab.max()) + 1 for lab in per_d] for per_d in labels]
    torch.manual_seed(1)
    model = PretrainModel(ModelConfig(n_genes=len(coll.gene_universe), hid=16), counts).to(device)
    step_module = pretrain.MultiTaskStep(model)
    targets = [offset_targets(per_d, c) for per_d, c in zip(labels, counts)]
    rows = pretrain.epoch_batches([X.shape[0] for X in coll.features], 4, 0, 1, 1)[0]
    source = pretrain.step_source(coll, device) if on_device else None
    assert (source is not None) == on_device
    host = pretrain.prepare_step(coll, targets, rows, sparse, device, source)
    loss = step_module(*pretrain.step_inputs(host, device))
    loss.backward()
    return float(loss.detach()), model.encoder.linear.weight_t.grad.detach().cpu()


@needs_cuda
def test_pretraining_step_on_cuda_matches_cpu(collection):
    coll = pretrain.build_collection(data.load_collection(collection))
    labels = [kmeans.pseudo_labels(X, 20, seed=0) for X in coll.features]  # the same pseudo-labels for both
    cpu_loss, cpu_grad = one_step(collection, labels, torch.device("cpu"), sparse=True)  # the CPU's default
    assert cpu_grad.abs().max() > 0
    for sparse in (False, True):  # the GPU's default is dense
        for on_device in (False, True):  # the default: the collection on the GPU
            gpu_loss, gpu_grad = one_step(collection, labels, torch.device("cuda"), sparse, on_device)
            assert gpu_loss == pytest.approx(cpu_loss, rel=1e-5)
            torch.testing.assert_close(gpu_grad, cpu_grad, rtol=1e-4, atol=1e-6)


@needs_cuda
@pytest.mark.parametrize("sigmoid", [True, False])
def test_batched_heads_on_cuda_match_float64_and_the_cpus_fused_path(sigmoid):
    """heads.py's torch path as a GPU runs it (auto on CUDA) against the float64 cross-entropies
    and the CPU's fused path (tests/test_heads.py checks both on the CPU)."""
    from test_heads import COUNTS, ROWS, assert_matches, batched, make_step, reference

    model, labels, targets, z, den = make_step(COUNTS + [[300, 600, 151]], ROWS + [200], seed=8, sigmoid=sigmoid)
    ids = list(range(len(COUNTS) + 1))
    cpu = batched(model, targets, z, den, ids, sigmoid, "fused")
    model = model.cuda()
    z_gpu = z.detach().cuda().requires_grad_(True)
    gpu = batched(model, [t.cuda() for t in targets], z_gpu, den.cuda(), ids, sigmoid, "auto")
    gpu = (gpu[0].cpu(), gpu[1].cpu(), [g.cpu() for g in gpu[2]], [g.cpu() for g in gpu[3]])
    assert_matches(gpu, reference(model.cpu(), labels, z, den, ids, sigmoid), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gpu[0], cpu[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gpu[1], cpu[1], rtol=1e-4, atol=1e-6)


@needs_cuda
def test_device_csr_on_cuda_gathers_what_scipy_does():
    X = sparse_log_counts()
    store = DeviceCSR(X, torch.device("cuda"))
    rows = np.random.default_rng(0).permutation(X.shape[0])[:97]
    want = X[rows].toarray()
    np.testing.assert_array_equal(store.dense(rows).cpu().numpy(), want)
    batch = store.sparse(rows)
    np.testing.assert_array_equal(batch.x.to_dense().cpu().numpy(), want)
    np.testing.assert_array_equal(batch.x_t.to_dense().cpu().numpy(), want.T)
    np.testing.assert_array_equal(store.take(rows).dense(np.arange(5)).cpu().numpy(), want[:5])


# --------------------------------------------------------------------------- fine-tuning with a linear base


@needs_cuda
@pytest.mark.parametrize("linear_base", ["residual", "blend"])
def test_fine_tuning_with_a_linear_base_on_cuda_matches_cpu(linear_base):
    counts, types = toy_counts(n_cells=150, n_genes=40, n_types=3, seed=5)
    X = features_mod.log1p_features(sp.csr_matrix(counts))
    args = main.parse_args(["--kmeans", "--ft_epoch", "12", "--patience", "100", "--hid", "8",
                            "--ft_linear_base", linear_base, "--recipe", "plus"])
    main.cli.resolve_recipe(args)
    args.ft_dropout = 0.0  # dropout masks are drawn by different generators on the two devices
    split = (np.arange(0, 90), np.arange(90, 120), np.arange(120, 150))
    trained = []
    for device in ("cpu", "cuda"):
        settings = main.cli.classifier_settings(args)
        clf = classifier.build_classifier(3, X.shape[1], settings, 0)
        clf, epochs, accuracy = classifier.train_classifier(clf, X, types, split, settings, 0, torch.device(device))
        assert clf.base is not None
        trained.append((clf, epochs, {k: v.detach().cpu() for k, v in clf.state_dict().items()}))
    (cpu_clf, cpu_epochs, cpu_state), (gpu_clf, gpu_epochs, gpu_state) = trained
    assert gpu_epochs == cpu_epochs
    for key in cpu_state:  # 12 Adam epochs from float32 rounding apart (the CPU's sparse products, the GPU's dense)
        torch.testing.assert_close(gpu_state[key], cpu_state[key], rtol=1e-2, atol=2e-3)
    test = split[2]
    np.testing.assert_allclose(classifier.predict_proba(gpu_clf, X, test, "cuda"),
                               classifier.predict_proba(cpu_clf, X, test, "cpu"), atol=1e-3)


@needs_cuda
def test_annotate_predict_on_cuda_matches_cpu_with_a_blended_base(tmp_path):
    counts, types = toy_counts(n_cells=200, n_genes=30, n_types=3, seed=2)
    obs = pd.DataFrame({"t": [f"t{i}" for i in types]}, index=[f"c{i}" for i in range(200)])
    anndata.AnnData(X=sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=gene_names(30))).write_h5ad(
        tmp_path / "ref.h5ad")
    annotate.main(annotate.parse_args(["train", "--reference", str(tmp_path / "ref.h5ad"), "--label_key", "t",
                                       "--save_model", str(tmp_path / "clf.pt"), "--recipe", "plus", "--hid", "8",
                                       "--ft_epoch", "10", "--device", "cuda", "--log_level", "WARNING"]))
    ckpt = load_checkpoint(tmp_path / "clf.pt", kind="scpretrain-classifier")
    assert ckpt["model_args"]["linear_base"] == "blend"
    ckpt["model"]["base_share"] = torch.tensor(0.5)  # both parts in play, whatever validation chose
    torch.save(ckpt, tmp_path / "clf.pt")
    written = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"o_{device}.h5ad"
        annotate.main(annotate.parse_args(["predict", "--model", str(tmp_path / "clf.pt"), "--query",
                                           str(tmp_path / "ref.h5ad"), "--out", str(out), "--probabilities",
                                           "--device", device, "--log_level", "WARNING"]))
        written[device] = pd.read_csv(tmp_path / f"o_{device}.probabilities.csv", index_col="cell")
    np.testing.assert_allclose(written["cuda"].to_numpy(), written["cpu"].to_numpy(), atol=1e-4)
    assert (written["cpu"].to_numpy().argmax(1) == np.searchsorted(ckpt["classes"], obs["t"])).mean() > 0.5


# --------------------------------------------------------------------------- main.py end to end


@needs_cuda
def test_main_cuda_pretrains_then_sweeps(collection, tmp_path):
    save = tmp_path / "p1.pt"
    common = ["--hid", "16", "--log_level", "WARNING", "--cuda"]
    final = main.main(main.parse_args(["--is_pretrain", "--kmeans", "--datasets", *collection, "--save_model",
                                       str(save), "--pt_epoch", "2", "--batch_num", "4", "--avg_cluster_num",
                                       "20", *common]))
    ckpt = load_checkpoint(save)
    assert ckpt["epoch"] == 2 and ckpt["config"]["cuda"] is True
    assert ckpt["model"]["linear.weight"].device.type == "cpu"  # checkpoints load anywhere
    assert np.isfinite(final["losses"]).all()
    frame = main.main(main.parse_args(["--kmeans", "--datasets", *collection, "--pretrained_model", str(save),
                                       "--save_result", str(tmp_path / "ft.csv"), "--ft_epoch", "20",
                                       "--patience", "5", *common]))
    assert len(frame) == 2 * 2 and set(frame["dataset"]) == {"alpha", "beta"}
    assert frame["accuracy"].between(0, 1).all()


@pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_nccl_available()),
                    reason="torch built without NCCL")
@needs_cuda
def test_torchrun_one_gpu_matches_one_process(collection, tmp_path):
    base = ["main.py", "--is_pretrain", "--kmeans", "--cuda", "--datasets", *collection, "--pt_epoch", "1",
            "--batch_num", "3", "--avg_cluster_num", "20", "--hid", "16", "--log_level", "WARNING"]
    one, run = launched_vs_single(base, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                         "--nproc_per_node", "1"], tmp_path, ROOT)
    assert one["losses"][0] == pytest.approx(run["losses"][0], rel=1e-4)
    torch.testing.assert_close(one["model"]["linear.weight"], run["model"]["linear.weight"], atol=1e-5, rtol=1e-4)
