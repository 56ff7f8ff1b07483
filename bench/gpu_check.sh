#!/usr/bin/env bash
# The GPU checks and figures, in one go on a machine with one CUDA GPU (planned for under 8 minutes
# on one H100, most of it the CPU writing synthetic data; not yet run: the project had no GPU).
#
#   bash bench/gpu_check.sh 2>&1 | tee bench/out/gpu_check.log
#
# 1. the machine: nvidia-smi, torch and CUDA versions
# 2. tests/test_gpu.py: K-means, one pre-training step, main.py --cuda and one-GPU torchrun
#    against the CPU's numbers
# 3. figures: a pre-training epoch at synthetic scale 0.05 (60 datasets, 91,562 cells), K-means on
#    160,796 cells at k = 3,215, annotation of 1,000,000 cells
# Generated data stays under bench/out/ (reused by a second run). Every step is bounded by
# `timeout`; a failed step is reported and the others still run; the exit status is 1 if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench/out/gpu_check
mkdir -p "$OUT"
FAILED=()

run() {  # print the command, run it, time it, and note a failure without stopping
    echo
    echo "+ $*"
    local start=$SECONDS
    if "$@"; then
        echo "  ($((SECONDS - start)) s)"
    else
        local code=$?
        echo "  FAILED with exit status $code after $((SECONDS - start)) s"
        FAILED+=("$*")
    fi
}

run nvidia-smi
run python -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| cuDNN',
torch.backends.cudnn.version(), '| GPU available:', torch.cuda.is_available(),
'|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-',
'| NCCL', torch.cuda.nccl.version() if torch.cuda.is_available() else '-')"
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "torch sees no CUDA GPU: nothing to check here (install the CUDA build of torch, see README.md)"
    exit 1
fi

# The 1,000,000-cell query (~850M non-zeros, ~7 GB) takes minutes of one CPU core to write: start it
# now, beside the other steps, on a spare core (the GPU timings below may share the host with it).
echo
echo "+ python bench/bench_annotate.py --prepare_only > $OUT/annotate_prepare.log 2>&1 &"
python bench/bench_annotate.py --prepare_only > "$OUT/annotate_prepare.log" 2>&1 &
PREPARE=$!
trap 'kill "$PREPARE" 2>/dev/null || true' EXIT

run timeout 300 python -m pytest -q -rs tests/test_gpu.py
run timeout 300 python bench/bench_pretrain.py --scale 0.05 --device cuda --skip_original --epochs 3
run timeout 360 python bench/bench_kmeans.py --cells 160796 --ks 3215 --methods ours --device cuda

echo
echo "+ wait for the 1,000,000-cell query ($OUT/annotate_prepare.log)"
if wait "$PREPARE"; then
    run timeout 300 python bench/bench_annotate.py --device cuda
else
    echo "  FAILED: writing the query; tail of its log:"
    tail -n 20 "$OUT/annotate_prepare.log"
    FAILED+=("bench/bench_annotate.py --prepare_only")
fi
trap - EXIT

echo
echo "total: $SECONDS s"
if ((${#FAILED[@]})); then
    printf 'failed: %s\n' "${FAILED[@]}"
    exit 1
fi
echo "all GPU checks passed"
