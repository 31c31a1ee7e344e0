#!/usr/bin/env bash
# Everything gpu_mlp still has to measure on a GPU, as one prepared run.
#
# GPU time is scarce (a lent machine, 15 minutes a session, its start included), so this
# runs the checks most worth having first and skips, saying so, any section that would
# not finish within the budget; a second call can name the sections the first skipped.
#
#   bash bench/gpu_check.sh --prepare      # here, before: wheels the GPU machine lacks
#   bash bench/gpu_check.sh [SECTION ...]  # there, from the repository root
#   bash bench/gpu_check.sh --list [SECTION ...]   # the commands, run nowhere
#
# Sections, in the order they run (default: all): see SECTIONS below. Everything lands
# under $OUT (or ./gpu-check-out): check.log (all output), a log or JSON per section,
# results/ (bench/run.py's folders) and MANIFEST.md (the GPU, the versions, each
# command, its exit status and seconds), machine paths replaced by "." -- ready to be
# copied under bench/results/<date>-<gpu>/. BUDGET_S (default 540) bounds the whole run.
set -u
cd "$(dirname "$0")/.."

# name:seconds it is expected to take; it may take twice that, within the budget
SECTIONS="info:10 tests:60 jobs:45 busy:30 job:60 mlp:180 conv:110 dp:30 cold:30
          cublas:15 rows:15 optim:20 budget:40"
KIT=.gpu-check   # what --prepare brings (git-ignored; send it with the run: carry it)

expected() {  # expected NAME: a section's seconds, or nothing for an unknown name
    local s
    for s in $SECTIONS; do [ "${s%%:*}" = "$1" ] && echo "${s#*:}" && return; done
}

if [ "${1:-}" = "--prepare" ]; then
    # The GPU machine has no network and no dp-accounting or Opacus (the DP job and the
    # DP bench need them): their wheels, for its Python 3.12, installed there by the run.
    rm -rf "$KIT/wheels" && mkdir -p "$KIT/wheels"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d "$KIT/wheels" "dp-accounting==0.6.0" dm-tree "opacus==1.6.0" || exit 1
    # the GPU kit's busy-fraction probe, where the shared kit is beside the repository
    [ -f ../shared/gpu/busy.py ] && cp ../shared/gpu/busy.py "$KIT/"
    ls "$KIT" "$KIT/wheels"
    echo "now: the device tool's run with command 'bash bench/gpu_check.sh', carry [\"$KIT\"]"
    exit 0
fi

list=false
[ "${1:-}" = "--list" ] && { list=true; shift; }
wanted=${*:-$(for s in $SECTIONS; do printf '%s ' "${s%%:*}"; done)}
for name in $wanted; do
    if [ -z "$(expected "$name")" ]; then
        echo "gpu_check.sh: unknown section '$name'; the sections: $(for s in $SECTIONS; do
            printf '%s ' "${s%%:*}"; done)" >&2
        exit 2
    fi
done

OUT=${OUT:-$PWD/gpu-check-out}
RESULTS=$OUT/results
BUDGET_S=${BUDGET_S:-540}
T0=$(date +%s)

# step SECTION LOG COMMAND...: run COMMAND until its section's end (set by the loop
# below), its output in LOG too (a file under $OUT; "-": check.log only), its exit
# status and seconds in the manifest; with --list, only say it
step() {
    local section=$1 into=/dev/null shown rc t limit
    [ "$2" != - ] && into=$OUT/$2
    shift 2
    shown=$(printf ' %q' "$@")
    if $list; then echo "$section:$shown"; return 0; fi
    t=$(date +%s)
    limit=$(( section_end > t ? section_end - t : 1 ))
    echo "=== [t=$(( t - T0 ))s] $section:$shown"
    timeout "$limit" "$@" 2>&1 | tee "$into"
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "(stopped after $limit s: the section's time was up)"
    echo "| $section | \`${shown# }\` | $rc | $(( $(date +%s) - t )) |" >> "$OUT/MANIFEST.md"
}

section() {
    case $1 in
    info)
        step info - nvidia-smi
        step info - python3 -m gpu_mlp info ;;
    tests)  # correctness first: every -m gpu test, the captured graphs' among them
        step tests gpu-tests.log python3 -m pytest -m gpu -q -n 12 -p no:cacheprovider \
            --durations=15 tests ;;
    jobs)   # the CLI's jobs on the GPU, the kernels cached, and the default one on its CPU
        for options in "" "--model cnn" "--optimizer adam --lr 0.003" \
                       "--dp-clip 1 --dp-noise 1" "--device cpu"; do
            # shellcheck disable=SC2086  # the options split into words
            step jobs - python3 -m gpu_mlp train \
                $( [[ $options == *--device* ]] || echo --device cuda ) $options
        done ;;
    cold)   # the first run on a new machine: an empty kernel cache, by kernel
        step cold - python3 bench/cold_start.py --out "$OUT/cold.json" ;;
    busy)   # kernel time over wall time per step, pool allocations per step, vs PyTorch
        if $list || [ -f "$KIT/busy.py" ]; then
            step busy - python3 "$KIT/busy.py" --out "$OUT/busy.json"
        else
            echo "busy: skipped ($KIT/busy.py absent: bash bench/gpu_check.sh --prepare)"
        fi ;;
    job)    # the main jobs against the same training in PyTorch, on this GPU
        step job - python3 bench/job.py --device cuda --rounds 3 --out "$OUT/job-mlp.json"
        step job - python3 bench/job.py --device cuda --rounds 3 --out "$OUT/job-cnn.json" \
            -- --model cnn ;;
    mlp)    # issue 19's grid: vs PyTorch eager, torch.graph and the GEMM-only bound
        step mlp - python3 bench/run.py --devices cuda --impls gpu_mlp,torch,torch.graph,gemm \
            --widths 4096,1024,256,64 --max-time 0.25 --out "$RESULTS/cuda-float32" ;;
    conv)   # issue 20's grid: vs cuDNN, time and peak memory
        step conv - python3 bench/run.py --devices cuda --grid conv --impls gpu_mlp,torch \
            --batches 256,64,1024 --max-time 0.25 --out "$RESULTS/cuda-float32-conv" ;;
    dp)     # a DP-SGD step against the plain one and Opacus
        step dp - python3 bench/dp_step.py --device cuda --rounds 2 --max-time 1 \
            --out "$RESULTS/cuda-float32-dp" ;;
    cublas) # the ctypes cuBLAS binding's host time, eager GEMMs against a graph
        step cublas - python3 bench/cublas_overhead.py --out "$OUT/cublas.json" ;;
    rows)   # softmax rows: a thread a row against a warp
        step rows - python3 bench/rows.py --out "$OUT/rows.json" ;;
    optim)
        step optim - python3 bench/optim_step.py --device cuda --repeats 20 \
            --out "$RESULTS/cuda-float32-optim" ;;
    budget) # the conv blocks' cost in time: a column budget 4x the default
        step budget - python3 bench/run.py --devices cuda --grid conv --impls gpu_mlp \
            --modes output --batches 256,1024 --column-budget 64 --max-time 0.25 \
            --out "$RESULTS/cuda-float32-conv-budget-64" ;;
    esac
}

# the whole run: the manifest's head, then the sections while the budget lasts
run() {
    if ls "$KIT"/wheels/*.whl > /dev/null 2>&1; then
        python3 -m pip install --quiet --no-index --no-deps --no-compile --target /tmp/gm-site \
            "$KIT"/wheels/*.whl || echo "the wheels of $KIT/wheels did not install"
    fi
    {
        echo "# GPU check of gpu_mlp, $(date -u +%Y-%m-%d)"
        echo
        echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
        echo "- GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total \
                       --format=csv,noheader 2>&1 | head -1)"
        echo "- $(python3 -c 'import sys, numpy, cupy, torch
print(f"Python {sys.version.split()[0]}, NumPy {numpy.__version__}, CuPy {cupy.__version__}, "
      f"PyTorch {torch.__version__} (CUDA {torch.version.cuda})")' 2>&1 | tail -1)"
        echo "- the run: \`bash bench/gpu_check.sh ${wanted% }\`, a budget of $BUDGET_S s"
        echo
        echo "| section | command | exit | seconds |"
        echo "| --- | --- | --- | --- |"
    } > "$OUT/MANIFEST.md"
    local name seconds now
    for name in $wanted; do
        seconds=$(expected "$name") now=$(date +%s)
        if (( now + seconds > T0 + BUDGET_S )); then
            echo "=== $name: skipped, its $seconds s would pass the budget of $BUDGET_S s"
            echo "| $name | (skipped: the budget) | - | 0 |" >> "$OUT/MANIFEST.md"
            continue
        fi
        # twice the expected time, but never past the budget
        section_end=$(( now + 2 * seconds < T0 + BUDGET_S ? now + 2 * seconds : T0 + BUDGET_S ))
        section "$name"
    done
    echo "=== [t=$(( $(date +%s) - T0 ))s] done: $OUT"
}

if $list; then
    for name in $wanted; do section "$name"; done
    exit 0
fi
mkdir -p "$RESULTS"
export PYTHONPATH=/tmp/gm-site:$PWD PYTHONUNBUFFERED=1
run 2>&1 | tee "$OUT/check.log"
# no path of this machine in what goes back (and into bench/results/): the results'
# folder (whose files go under bench/results/<date>-<gpu>/) becomes ".", as does the
# repository's root
grep -rlI -e "$OUT" -e "$PWD" -e /tmp/gm-site "$OUT" | xargs -r sed -i -e "s#$OUT#.#g" \
    -e "s#$PWD#.#g" -e "s#/tmp/gm-site#<wheels>#g"
