#!/usr/bin/env bash
# The GPU checks and figures, in one go on a machine with one CUDA GPU (about 5 minutes on one
# H100 with 16 CPU cores, most of it the CPU writing synthetic data).
#
#   bash bench/gpu_check.sh 2>&1 | tee bench/out/gpu_check.log
#
# 1. the machine: nvidia-smi, torch and CUDA versions
# 2. tests/test_gpu.py: K-means, one pre-training step, main.py --cuda and one-GPU torchrun
#    against the CPU's numbers
# 3. figures: a pre-training epoch at synthetic scale 0.05 (60 datasets, 91,562 cells), one step's
#    60 pre-training heads alone at scales 0.05 and 0.5 (per dataset and heads.py's torch path,
#    against their products' limit), K-means on 160,796 cells at k = 3,215 (one Lloyd iteration vs
#    the sparse product alone, then the whole run), annotation of 1,000,000 cells
# 4. with GPU_CHECK_PHASE1=1 (a second call: it needs the whole 914,763-cell collection written, and
#    up to 9 more minutes): phase 1 of the whole synthetic collection on the GPU, the paper's
#    defaults, 50 epochs (issue 27's goal: under 5 minutes), `/usr/bin/time -v` for its peak
#
#   GPU_CHECK_PHASE1=1 bash bench/gpu_check.sh 2>&1 | tee bench/out/gpu_phase1.log
#
# The synthetic inputs are written at the start, beside the tests, by spare CPU cores (the query of
# step 3 by GPU_CHECK_WRITERS processes, default: the cores less 4); they stay under
# bench/out/ and a second run reuses them. Every step is bounded by `timeout`; a failed step is
# reported and the others still run; the exit status is 1 if any failed. PYTHON picks the
# interpreter (default: python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=bench/out/gpu_check
mkdir -p "$LOGS"
CORES=$(nproc)
WRITERS=${GPU_CHECK_WRITERS:-$((CORES > 5 ? CORES - 4 : 1))}
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

prepare() {  # NAME COMMAND...: write an input in the background, its log in $LOGS/NAME.log
    local name=$1
    shift
    echo "+ $* > $LOGS/$name.log 2>&1 &"
    "$@" > "$LOGS/$name.log" 2>&1 &
    PREPARING[$name]=$!
}

ready() {  # NAME: wait for a background input; false (and its log's tail) if writing it failed
    local start=$SECONDS
    if wait "${PREPARING[$1]}"; then
        echo "  (input $1 ready after waiting $((SECONDS - start)) s)"
        return 0
    fi
    echo "  FAILED: writing input $1; tail of $LOGS/$1.log:"
    tail -n 20 "$LOGS/$1.log"
    FAILED+=("prepare $1")
    return 1
}

run nvidia-smi
run "$PY" -c "import torch; print('torch', torch.__version__, '| CUDA', torch.version.cuda, '| cuDNN',
torch.backends.cudnn.version(), '| GPU available:', torch.cuda.is_available(),
'|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-',
'| NCCL', torch.cuda.nccl.version() if torch.cuda.is_available() else '-')"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "torch sees no CUDA GPU: nothing to check here (install the CUDA build of torch, see README.md)"
    exit 1
fi
echo "CPU cores: $CORES; query writers: $WRITERS"

declare -A PREPARING
echo
if [[ "${GPU_CHECK_PHASE1:-0}" == 1 ]]; then  # the whole collection's phase 1 alone, then stop
    COLLECTION=bench/out/synth_s0.5
    run timeout 300 "$PY" bench/synth.py --scale 0.5 --workers "$((CORES > 2 ? CORES - 1 : 1))" --out "$COLLECTION"
    mapfile -t FILES < <("$PY" -c "import csv; print('\n'.join(r['path'] for r in csv.DictReader(open('$COLLECTION/manifest.csv'))))")
    echo "  ${#FILES[@]} dataset files"
    run timeout 540 /usr/bin/time -v "$PY" main.py --cuda --is_pretrain --kmeans --datasets "${FILES[@]}" \
        --save_model bench/out/gpu_check/phase1_whole.pt
    echo "total: $SECONDS s"
    ((${#FAILED[@]})) && { printf 'failed: %s\n' "${FAILED[@]}"; exit 1; }
    exit 0
fi
prepare epoch_input "$PY" bench/bench_pretrain.py --scale 0.05 --prepare_only
prepare kmeans_input "$PY" bench/bench_kmeans.py --cells 160796 --ks 3215 --prepare_only
prepare annotate_input "$PY" bench/bench_annotate.py --prepare_only --write_workers "$WRITERS"
trap 'kill "${PREPARING[@]}" 2>/dev/null || true' EXIT

run timeout 240 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py

echo
echo "+ epoch at scale 0.05"
if ready epoch_input; then
    run timeout 180 "$PY" bench/bench_pretrain.py --scale 0.05 --device cuda --skip_original --epochs 3
fi

echo
echo "+ the heads alone (bench/bench_heads.py: no data files), scale 0.05 and 0.5"
run timeout 120 "$PY" bench/bench_heads.py --scale 0.05 --device cuda
run timeout 180 "$PY" bench/bench_heads.py --scale 0.5 --device cuda

echo
echo "+ K-means, 160,796 cells, k = 3,215"
if ready kmeans_input; then
    run timeout 120 "$PY" bench/bench_kmeans.py --cells 160796 --ks 3215 --device cuda --iteration_cost
    run timeout 180 "$PY" bench/bench_kmeans.py --cells 160796 --ks 3215 --methods ours --device cuda
fi

echo
echo "+ annotation of 1,000,000 cells"
if ready annotate_input; then
    run timeout 180 "$PY" bench/bench_annotate.py --device cuda --write_workers "$WRITERS"
fi
trap - EXIT

echo
echo "total: $SECONDS s"
if ((${#FAILED[@]})); then
    printf 'failed: %s\n' "${FAILED[@]}"
    exit 1
fi
echo "all GPU checks passed"
