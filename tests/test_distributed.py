"""Pre-training across "nodes": two torchrun agents joined by c10d rendezvous on 127.0.0.1.

Each agent stands for one machine (``--nnodes 2 --nproc_per_node 1``) with its own output folder;
the encoder that the rank-0 node saves must match one plain process, within the tolerance of
tests/test_main.py::test_torchrun_two_processes_match_one. All traffic stays on the loopback
interface: the rendezvous endpoint and ``--local_addr`` are 127.0.0.1 and gloo is bound to it.
"""
import os
import socket
import subprocess
import sys
import uuid

import pytest
import torch

from checkpoints import load as load_checkpoint

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



@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
@pytest.mark.skipif(loopback_interface() is None, reason="no loopback interface to keep the traffic on")
def test_two_nodes_c10d_rendezvous_match_one_process(collection, tmp_path):
    base = ["main.py", "--is_pretrain", "--kmeans", "--datasets", *collection, "--pt_epoch", "1", "--batch_num", "3",
            "--avg_cluster_num", "20", "--hid", "16", "--log_level", "WARNING"]
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

    one, two = load_checkpoint(tmp_path / "one.pt"), load_checkpoint(saved[0])
    assert one["losses"][0] == pytest.approx(two["losses"][0], rel=1e-4)
    torch.testing.assert_close(one["model"]["linear.weight"], two["model"]["linear.weight"], atol=1e-5, rtol=1e-4)
    assert not torch.equal(two["model"]["linear.weight"], torch.zeros_like(two["model"]["linear.weight"]))
