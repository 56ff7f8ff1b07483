"""The GPU path against the CPU's numbers: K-means, one pre-training step, main.py end to end, torchrun.

Every test needs a CUDA GPU and is skipped without one (bench/gpu_check.sh runs this file on a
GPU machine). Tolerances allow for float32 rounding and the GPU's non-deterministic atomics
(``index_add_``, scatter in the cross-entropy backward); TF32 stays off (torch's default).
"""
import os
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.datasets import make_blobs

import data
import kmeans
import main
import pretrain
from helpers import launched_vs_single, toy_counts
from model import DeviceCSR, ModelConfig, PretrainModel, load_checkpoint, offset_targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")


def sparse_log_counts():
    counts, _ = toy_counts(n_cells=500, n_genes=200, n_types=5, seed=4)
    keep = np.random.default_rng(4).random(counts.shape) < 0.35
    return data.log1p_features(sp.csr_matrix(counts * keep))


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
    host = pretrain.prepare_step(coll, targets, rows, 0, 1, sparse, source)
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
