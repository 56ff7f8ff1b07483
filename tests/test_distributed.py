"""Pre-training with the datasets sharded across torchrun's ranks: two processes on one node, and
two "nodes" (torchrun agents joined by c10d rendezvous on 127.0.0.1, each with its own output
folder), against one plain process: the same encoder within float tolerance, the same K-means
labels per dataset, each rank holding only its own datasets; and an epoch checkpoint written by
one process resumed by two. All traffic stays on the loopback interface."""
import os
import socket
import subprocess
import sys
import uuid

import pytest
import torch

import main
import pretrain
from checkpoints import load as load_checkpoint
from helpers import launched_vs_single

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240


def free_port() -> int:
    """A port the kernel says is free on 127.0.0.1 now (bound to port 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_interface() -> str | None:
    """The loopback interface's name for GLOO_SOCKET_IFNAME (lo on Linux, lo0 on macOS)."""
    names = [name for _, name in socket.if_nameindex()] if hasattr(socket, "if_nameindex") else []
    return next((n for n in ("lo", "lo0") if n in names), None)



BASE = ["--is_pretrain", "--kmeans", "--pt_epoch", "3", "--batch_num", "3", "--avg_cluster_num", "20", "--hid", "16",
        "--log_level", "WARNING"]
needs_distributed = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def assert_same_as_one_process(one: dict, sharded: dict, world: int) -> None:
    """The encoder and losses of one process within float tolerance, the same pseudo-labels, and
    every dataset held by exactly one rank, none by all."""
    assert sharded["losses"] == pytest.approx(one["losses"], rel=1e-4)
    torch.testing.assert_close(one["model"]["linear.weight"], sharded["model"]["linear.weight"], atol=1e-5, rtol=1e-4)
    assert not torch.equal(sharded["model"]["linear.weight"], torch.zeros_like(sharded["model"]["linear.weight"]))
    assert sharded["pseudo_label_digests"] == one["pseudo_label_digests"]
    held = sharded["shards"]
    assert [part["rank"] for part in held] == list(range(world))
    assert sorted(d for part in held for d in part["datasets"]) == sorted(one["datasets"])  # a partition
    total = one["shards"][0]["cells"]
    assert all(0 < part["cells"] < total for part in held) and sum(part["cells"] for part in held) == total


@needs_distributed
def test_two_processes_match_one(collection, tmp_path):
    base = ["main.py", *BASE, "--datasets", *collection]
    one, two = launched_vs_single(base, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                         "--nproc_per_node", "2"], tmp_path, ROOT)
    assert_same_as_one_process(one, two, world=2)


@needs_distributed
def test_an_epoch_checkpoint_of_one_process_resumes_under_two(collection, tmp_path, monkeypatch):
    argv = [*BASE, "--datasets", *collection, "--save_model", str(tmp_path / "cut.pt")]
    real_epoch = pretrain.train_epoch
    monkeypatch.setattr(pretrain, "train_epoch",
                        lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt) if a[-1] == 3 else real_epoch(*a, **k))
    with pytest.raises(SystemExit):
        main.main(main.parse_args(argv))
    assert (tmp_path / "cut.pt.resume").exists()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              "main.py", *argv, "--resume"], cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=TIMEOUT_S)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    monkeypatch.setattr(pretrain, "train_epoch", real_epoch)
    whole = main.main(main.parse_args([*BASE, "--datasets", *collection, "--save_model", str(tmp_path / "whole.pt")]))
    cut = load_checkpoint(tmp_path / "cut.pt")
    assert cut["epoch"] == 3 and len(cut["shards"]) == 2
    assert cut["losses"] == pytest.approx(whole["losses"], rel=1e-4)
    torch.testing.assert_close(cut["model"]["linear.weight"], whole["model"]["linear.weight"], atol=1e-5, rtol=1e-4)


@needs_distributed
@pytest.mark.skipif(loopback_interface() is None, reason="no loopback interface to keep the traffic on")
def test_two_nodes_c10d_rendezvous_match_one_process(collection, tmp_path):
    base = ["main.py", *BASE, "--datasets", *collection]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": loopback_interface(),
           "MASTER_ADDR": "127.0.0.1"}
    single = subprocess.run([sys.executable, *base, "--save_model", str(tmp_path / "one.pt")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=TIMEOUT_S)
    assert single.returncode == 0, single.stderr[-2000:]

    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}",
                "--rdzv_id", f"scpretrain-test-{uuid.uuid4().hex[:8]}", "--local_addr", "127.0.0.1",
                "--max_restarts", "0"]
    nodes = []
    for name in ("node0", "node1"):  # each "machine" writes to its own folder
        out = tmp_path / name
        out.mkdir()
        log = open(tmp_path / f"{name}.log", "w")
        proc = subprocess.Popen([*launcher, *base, "--save_model", str(out / "model.pt")], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT, text=True)
        nodes.append((proc, log, out))
    try:
        codes = [proc.wait(timeout=TIMEOUT_S) for proc, _, _ in nodes]
    finally:
        for proc, log, _ in nodes:
            if proc.poll() is None:  # only the agents this test started, by their own handles
                proc.kill()
                proc.wait(timeout=30)
            log.close()
    logs = "\n".join((tmp_path / f"{n}.log").read_text()[-1500:] for n in ("node0", "node1"))
    assert codes == [0, 0], logs
    saved = [out / "model.pt" for _, _, out in nodes if (out / "model.pt").exists()]
    assert len(saved) == 1, logs  # rank 0's node saves; the other node writes nothing
    assert not any((out / "model.pt.resume").exists() for _, _, out in nodes)

    assert_same_as_one_process(load_checkpoint(tmp_path / "one.pt"), load_checkpoint(saved[0]), world=2)
