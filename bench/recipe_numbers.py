"""The README recipe on the demo collection, run end to end, and the digests of what it computes.

    python bench/recipe_numbers.py --out bench/out/numbers/now                 # this checkout
    python bench/recipe_numbers.py --repo /tmp/old --out bench/out/numbers/old  # another checkout's scripts
    python bench/recipe_numbers.py --compare bench/out/numbers/old bench/out/numbers/now

Runs phase 1, phase 2, the fine-tuning sweep (``--fold2 5``), ``rf_svm_lr.py`` for rf, svm and lr,
and ``clus.py`` (with its UMAP coordinates), each writing into ``--out``. Then writes
``manifest.json``: per checkpoint, the SHA-256 of every tensor; per CSV, the SHA-256 of its rows
with the columns that are not results left out (``seconds``; ``run_id``, whose digest includes
settings a refactor may spell differently; ``data_id``, the datasets' digests, a column newer than
some outputs compared). ``--digest DIR`` writes the manifest of an existing folder. ``--compare``
prints what differs between two manifests and exits 1 if anything does. A bench, not a test:
it takes a few minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_RESULTS = ("seconds", "run_id", "data_id")


def recipe(out: Path) -> list[list[str]]:
    p1, p2 = out / "pretrained.pt", out / "pretrained_phase2.pt"
    steps = [
        ["main.py", "--is_pretrain", "--kmeans", "--save_model", str(p1)],
        ["main.py", "--is_pretrain", "--kmeans", "--pretrain_output", "--pretrained_model", str(p1),
         "--save_model", str(p2)],
        ["main.py", "--kmeans", "--pretrained_model", str(p2), "--fold2", "5", "--save_result", str(out / "finetune.csv")],
    ]
    steps += [["rf_svm_lr.py", "--clf", clf, "--pretrained_model", str(p2), "--save_result", str(out / "offshelf.csv")]
              for clf in ("rf", "svm", "lr")]
    steps.append(["clus.py", "--pretrained_model", str(p2), "--save_result", str(out / "clustering.csv")])
    return steps


def run_recipe(repo: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    for step in recipe(out):
        t0 = time.time()
        print("+", " ".join(step), flush=True)
        done = subprocess.run([sys.executable, *step], cwd=repo, env=env, capture_output=True, text=True)
        (out / "logs.txt").open("a").write(f"+ {' '.join(step)}\n{done.stderr}\n")
        if done.returncode != 0:
            sys.exit(f"failed ({done.returncode}): {' '.join(step)}\n{done.stderr[-3000:]}")
        print(f"  {time.time() - t0:.1f} s", flush=True)


def tensor_digests(path: Path) -> dict:
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {key: hashlib.sha256(value.contiguous().numpy().tobytes()).hexdigest()[:16]
            for key, value in sorted(ckpt["model"].items())}


def csv_digest(path: Path) -> dict:
    import pandas as pd

    frame = pd.read_csv(path)
    keep = [c for c in frame.columns if c not in NOT_RESULTS]
    text = frame[keep].to_csv(index=False, float_format="%.17g")
    return {"rows": len(frame), "columns": keep, "sha256": hashlib.sha256(text.encode()).hexdigest()[:16]}


def manifest(out: Path) -> dict:
    found = {}
    for path in sorted(out.glob("*.pt")):
        found[path.name] = tensor_digests(path)
    for path in sorted(out.glob("*.csv")):
        found[path.name] = csv_digest(path)
    return found


def compare(a: Path, b: Path) -> int:
    left, right = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    differs = 0
    for name in sorted(set(left) | set(right)):
        if left.get(name) == right.get(name):
            print(f"same     {name}")
        else:
            differs += 1
            print(f"DIFFERS  {name}:\n  {a}: {left.get(name)}\n  {b}: {right.get(name)}")
    print(f"{len(set(left) | set(right)) - differs} of {len(set(left) | set(right))} outputs identical")
    return 1 if differs else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", default=str(ROOT), help="checkout whose scripts are run (default: this one)")
    p.add_argument("--out", help="folder for the outputs and manifest.json")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two output folders' manifests")
    p.add_argument("--digest", metavar="DIR", help="(re)write the manifest of an existing output folder")
    args = p.parse_args(argv)
    if args.digest:
        (Path(args.digest) / "manifest.json").write_text(json.dumps(manifest(Path(args.digest)), indent=1, sort_keys=True))
        return 0
    if args.compare:
        return compare(*map(Path, args.compare))
    if not args.out:
        p.error("--out is required unless --compare")
    out = Path(args.out).resolve()
    run_recipe(Path(args.repo), out)
    (out / "manifest.json").write_text(json.dumps(manifest(out), indent=1, sort_keys=True))
    print(f"manifest: {out / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
