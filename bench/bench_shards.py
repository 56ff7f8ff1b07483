"""Pre-training in two processes on one CPU: the datasets sharded across the ranks against every
rank holding the whole collection (the layout before sharding), and one process with two
threads as the reference (prints figures; not a test).

    python bench/bench_shards.py --datasets $(cat bench/out/synth_s0.5/paths.txt) --epochs 2
    python bench/bench_shards.py --replicated_repo /tmp/replicated ...   # a checkout of the layout before

Each run is ``main.py --is_pretrain --kmeans`` with the paper's defaults but ``--pt_epoch``, as
the user runs it: ``torchrun --standalone --nproc_per_node 2`` with ``OMP_NUM_THREADS=1`` (one
thread a rank), or one plain process with two threads. Measured: every rank's peak resident
memory (its ``VmHWM``, read from /proc while it runs), the K-means wall time (from the first
K-means line to the first epoch, in the log: every rank has clustered by then), each epoch's
time (the log's), the wall clock, and the largest difference between the encoders saved.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import synth  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", required=True, help="the collection's files")
    p.add_argument("--epochs", type=int, default=2, help="--pt_epoch of every run (default: %(default)s)")
    p.add_argument("--replicated_repo", default=None,
                   help="a checkout of the layout before sharding (every rank reads everything, DDP), run as the "
                        "'replicated' case; without it that case is skipped")
    p.add_argument("--runs", nargs="+", default=["sharded", "replicated", "one process"],
                   help="which runs, in order (default: %(default)s)")
    p.add_argument("--out", default=str(synth.DEFAULT_OUT / "shards"))
    p.add_argument("--log_level", default="INFO", help="main.py's --log_level (DEBUG logs the peak memory at each stage)")
    return p.parse_args(argv)


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        try:
            kids = [int(k) for t in os.listdir(f"/proc/{parent}/task")
                    for k in open(f"/proc/{parent}/task/{t}/children").read().split()]
        except OSError:
            kids = []
        found += kids
        frontier += kids
    return found


def peak_mib(pid: int) -> float | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def workers_of(pid: int) -> list[int]:
    """The descendants running main.py (torchrun's workers, or the process itself)."""
    out = []
    for child in [pid, *children(pid)]:
        try:
            cmd = open(f"/proc/{child}/cmdline").read()
        except OSError:
            continue
        if "main.py" in cmd and "torch.distributed.run" not in cmd:
            out.append(child)
    return out


def run(name: str, repo: Path, launcher: list[str], threads: int, args, save: Path) -> dict:
    env = {**synth.bench_env(), "OMP_NUM_THREADS": str(threads)}
    command = [*launcher, "main.py", "--is_pretrain", "--kmeans", "--datasets", *(str(Path(d).resolve()) for d in args.datasets),
               "--pt_epoch", str(args.epochs), "--save_model", str(save), "--log_level", args.log_level]
    log_path = Path(args.out) / f"{name.replace(' ', '_')}.log"
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=repo, env=env, stdout=log, stderr=subprocess.STDOUT)
        peaks: dict[int, float] = {}
        while proc.poll() is None:
            for pid in workers_of(proc.pid):
                value = peak_mib(pid)
                if value is not None:
                    peaks[pid] = max(peaks.get(pid, 0.0), value)
            time.sleep(0.5)
    wall = time.time() - t0
    text = log_path.read_text()
    if proc.returncode != 0:
        print(text[-3000:], file=sys.stderr)
        raise SystemExit(f"{name} failed")
    return {"run": name, "wall_s": round(wall, 1), "peak_mib_per_rank": sorted(round(v) for v in peaks.values()),
            "kmeans_s": kmeans_seconds(text), "epoch_s": [float(s) for s in re.findall(r"epoch \d+: loss [\d.]+.*?\(([\d.]+)s", text)],
            "save": save}


def kmeans_seconds(text: str) -> float | None:
    """From the first line after reading (the gene universe) to the first epoch's start."""
    stamp = lambda line: datetime.strptime(line[:8], "%H:%M:%S")  # noqa: E731
    lines = text.splitlines()
    first = next((l for l in lines if "K-means k=" in l), None)
    epoch = next((l for l in lines if re.search(r"phase \d epoch 1:", l)), None)
    universe = next((l for l in lines if "gene universe:" in l), None)
    if not (first and epoch and universe):
        return None
    seconds = re.search(r"epoch 1: .*\(([\d.]+)s", epoch)
    return round((stamp(epoch) - stamp(universe)).total_seconds() - float(seconds.group(1)), 1)


def largest_difference(a: Path, b: Path) -> float:
    import torch

    x, y = (torch.load(p, weights_only=True)["model"]["linear.weight"] for p in (a, b))
    return float((x - y).abs().max())


def main(args) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    plans = {"sharded": (ROOT, torchrun, 1), "one process": (ROOT, [sys.executable], 2)}
    if args.replicated_repo:
        plans["replicated"] = (Path(args.replicated_repo), torchrun, 1)
    print(f"code {synth.code_version()}; {len(args.datasets)} datasets", flush=True)
    results = []
    for name in args.runs:
        if name not in plans:
            print(f"{name}: skipped (no --replicated_repo)")
            continue
        repo, launcher, threads = plans[name]
        result = run(name, repo, launcher, threads, args, out / f"{name.replace(' ', '_')}.pt")
        print(result, flush=True)
        results.append(result)
    reference = next((r for r in results if r["run"] == "one process"), None)
    for r in results:
        if reference and r is not reference:
            print(f"{r['run']} vs one process: largest encoder weight difference "
                  f"{largest_difference(r['save'], reference['save']):.3g}")


if __name__ == "__main__":
    main(parse_args())
