"""What writing an epoch checkpoint costs an epoch: synchronously (``checkpoints.save``) against
in the background (``checkpoints.BackgroundWriter``), with two-thread GEMMs standing in for the
epoch's work (prints figures; not a test).

    python bench/bench_checkpoint_write.py --checkpoint bench/out/full/p1_50.pt.resume
    python bench/bench_checkpoint_write.py --size_mb 140      # a made-up checkpoint of that size

Each repeat times, in turn: the work alone, one synchronous write then the work, and one write
handed to a ``BackgroundWriter`` then the work and the writer's ``finish``. The written file goes
to ``--out`` (bench/out by default), a disk like the one a run writes to.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="a checkpoint to write (e.g. an epoch checkpoint, FILE.resume)")
    p.add_argument("--size_mb", type=float, default=140.0, help="without --checkpoint: random weights of this size")
    p.add_argument("--work_products", type=int, default=12, help="2048 x 2048 products standing in for an epoch")
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "out" / "checkpoint_write.pt")
    return p.parse_args(argv)


def made_up_checkpoint(size_mb: float) -> dict:
    import torch

    floats = int(size_mb * 2**20 / 4)
    rows = max(1, floats // 200)
    gen = torch.Generator().manual_seed(0)
    return {"kind": "bench", "model": {"w": torch.randn(rows, 200, generator=gen)}, "losses": [1.0, 0.5]}


def main(args) -> dict:
    import torch

    import checkpoints
    import synth

    torch.set_num_threads(args.threads)
    state = torch.load(args.checkpoint, weights_only=False) if args.checkpoint else made_up_checkpoint(args.size_mb)
    size = sum(t.numel() * t.element_size() for t in checkpoints._tensors(state)) / 2**20
    a = torch.randn(2048, 2048)

    def work():
        for _ in range(args.work_products):
            a @ a

    def synchronous():
        checkpoints.save(state, args.out)
        work()

    def background():
        writer = checkpoints.BackgroundWriter()
        writer.submit(state, args.out)
        work()
        writer.finish()

    ways = {"work alone": work, "synchronous write, then work": synchronous, "background write beside work": background}
    seconds = {name: [] for name in ways}
    work()  # warm-up
    for _ in range(args.repeats):
        for name, run in ways.items():
            t = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - t)
    args.out.unlink(missing_ok=True)
    print(f"checkpoint {size:.0f} MiB of tensors; {args.threads} threads; {args.repeats} repeats round-robin; "
          f"code {synth.code_version(('checkpoints.py', 'files.py'))}")
    alone = statistics.median(seconds["work alone"])
    for name, s in seconds.items():
        med = statistics.median(s)
        print(f"{name:<30} median {med:6.2f} s  min {min(s):6.2f} s  over the work alone {med - alone:+.2f} s")
    return {name: statistics.median(s) for name, s in seconds.items()}


if __name__ == "__main__":
    main(parse_args())
