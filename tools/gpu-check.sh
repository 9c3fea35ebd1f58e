#!/usr/bin/env bash
# tools/gpu-check.sh — prove the CUDA backend on a GPU machine that has no Rust toolchain.
#
#   tools/gpu-check.sh pack   # here (Rust machine): build release binaries + test executables into .gpu/
#   tools/gpu-check.sh run    # there (GPU machine, repo root with .gpu/ copied along): run the checks
#
# `run` prints the device and library versions, runs the CUDA parity tests, the POD fixtures through
# `podgpu fidelity --device cuda` and a short `podgpu train` on a real data sample (each only when
# the binary has that subcommand), and ends with a table. Each step has its own time limit; the whole
# run stays under 8 minutes. See docs/GPU.md.
set -uo pipefail
cd "$(dirname "$0")/.."
GPU_DIR=.gpu
MAX_MIB=64

pack() {
    set -e
    echo "== building release binaries and test executables (cargo -j 1)"
    cargo build --release -j 1 --bins
    # --no-run builds the test executables; their paths come from cargo's JSON messages.
    local json
    json="$(cargo test --release -j 1 --no-run --message-format=json \
        --test cuda_parity --test cuda_device --test cuda_nvrtc)"
    rm -rf "$GPU_DIR"
    mkdir -p "$GPU_DIR/bin" "$GPU_DIR/data"
    cp target/release/podgpu "$GPU_DIR/bin/"
    echo "$json" | python3 -c '
import json, sys, shutil
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        name = m["target"]["name"]
        shutil.copy(m["executable"], sys.argv[1] + "/bin/" + name)
        print("test executable:", name)
' "$GPU_DIR"
    # Debug info is not needed there; stripping keeps the folder small.
    strip "$GPU_DIR"/bin/* 2>/dev/null || true
    # Fixtures and a small real-data sample, when they exist in the repo.
    if [ -d tests/fixtures ]; then cp -r tests/fixtures "$GPU_DIR/data/fixtures"; fi
    # The small real CIFAR-10 sample the README's run command uses (6 MB, lossless).
    cp datasets/cifar10-small.bin "$GPU_DIR/data/"
    cp tools/gpu-check.sh "$GPU_DIR/"
    local total
    total=$(du -sm "$GPU_DIR" | cut -f1)
    echo "== $GPU_DIR is ${total} MiB (limit ${MAX_MIB} MiB)"
    du -sh "$GPU_DIR"/bin/* "$GPU_DIR"/data/* 2>/dev/null || true
    if [ "$total" -gt "$MAX_MIB" ]; then echo "ERROR: $GPU_DIR exceeds ${MAX_MIB} MiB"; exit 1; fi
}

# ---------------------------------------------------------------------------------------------
# run: on the GPU machine
# ---------------------------------------------------------------------------------------------

RESULTS=()
record() { RESULTS+=("$(printf '%-34s %-8s %6ss  %s' "$1" "$2" "$3" "$4")"); }

# step NAME LIMIT_SECONDS COMMAND...: runs with a time limit, records PASS/FAIL/TIMEOUT.
# The whole run must stay under 8 minutes: no step may run past TOTAL_LIMIT seconds after the start.
TOTAL_LIMIT=460
RUN_START=$(date +%s)

step() {
    local name="$1" limit="$2"
    shift 2
    local left=$(( TOTAL_LIMIT - ($(date +%s) - RUN_START) ))
    if [ "$left" -lt 5 ]; then
        skip "$name" "no time left in the ${TOTAL_LIMIT}s budget"
        return 1
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo
    echo "=================== $name (limit ${limit}s)"
    echo "\$ $*"
    local t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    local dt=$(( $(date +%s) - t0 ))
    case $rc in
        0) record "$name" PASS "$dt" "" ;;
        124|137) record "$name" TIMEOUT "$dt" "limit ${limit}s" ;;
        *) record "$name" FAIL "$dt" "exit $rc" ;;
    esac
    return $rc
}

skip() { echo; echo "=================== $1: SKIPPED ($2)"; record "$1" SKIPPED 0 "$2"; }

cuda_lib_dirs() {
    # PyTorch's venv on the GPU machines, then any other Python env's nvidia wheels.
    local d
    for d in /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib \
             /usr/local/lib/python3*/dist-packages/nvidia/*/lib \
             "$HOME"/.local/lib/python3*/site-packages/nvidia/*/lib; do
        [ -d "$d" ] && printf '%s:' "$d"
    done
}

run() {
    local start bin
    start=$RUN_START
    bin="$GPU_DIR/bin"
    if [ ! -x "$bin/podgpu" ]; then
        echo "no $bin/podgpu: run 'tools/gpu-check.sh pack' on the build machine and copy $GPU_DIR here"
        exit 2
    fi
    local libs
    libs="$(cuda_lib_dirs)"
    export PODGPU_CUDA_LIBS="${libs%:}${PODGPU_CUDA_LIBS:+:$PODGPU_CUDA_LIBS}"
    export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:-}"
    # The tests fail instead of skipping when no GPU is usable.
    export PODGPU_REQUIRE_GPU=1
    export PODGPU_CACHE_DIR="${PODGPU_CACHE_DIR:-$PWD/$GPU_DIR/cache}"
    echo "PODGPU_CUDA_LIBS=$PODGPU_CUDA_LIBS"

    echo "=================== device"
    if command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv || true
    else
        echo "nvidia-smi not found"
    fi
    ls /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib 2>/dev/null | grep -E 'lib(cudnn|cublas|cublasLt|nvrtc)\.so' | sort -u || true

    # Device, library versions and where each library was loaded from (printed by the test).
    step "device + libraries" 45 "$bin/cuda_device" --nocapture --test-threads=1
    step "kernels compile (NVRTC)" 45 "$bin/cuda_nvrtc" --nocapture
    step "parity CPU vs GPU" 180 "$bin/cuda_parity" --nocapture --test-threads=1

    if "$bin/podgpu" help fidelity > /dev/null 2>&1; then
        if [ -d "$GPU_DIR/data/fixtures" ]; then
            step "fidelity fixtures on GPU" 90 "$bin/podgpu" fidelity --device cuda "$GPU_DIR/data/fixtures"
        else
            skip "fidelity fixtures on GPU" "no fixtures packed (tests/fixtures missing)"
        fi
    else
        skip "fidelity fixtures on GPU" "this podgpu has no 'fidelity' subcommand yet"
    fi

    # Short training run on the shipped CIFAR-10 sample: the loss must fall and the accuracy rise as
    # on the CPU (compare with the same command and --device cpu). PODGPU_TRAIN_ARGS overrides it.
    if "$bin/podgpu" help train > /dev/null 2>&1; then
        if [ -f "$GPU_DIR/data/cifar10-small.bin" ]; then
            rm -rf "$GPU_DIR/run-train"
            # shellcheck disable=SC2086
            step "short train on GPU" 100 "$bin/podgpu" train ${PODGPU_TRAIN_ARGS:-resnet18 --data $GPU_DIR/data/cifar10-small.bin --device cuda --epochs 3 --batch-size 64 --feature-dim 64 --out $GPU_DIR/run-train} \
                && step "eval of the GPU run" 30 "$bin/podgpu" eval --device cuda --checkpoint "$GPU_DIR/run-train/last.safetensors" --data "$GPU_DIR/data/cifar10-small.bin"
        else
            skip "short train on GPU" "no data sample packed"
        fi
    else
        skip "short train on GPU" "this podgpu has no 'train' subcommand yet"
    fi

    echo
    echo "=================== summary ($(( $(date +%s) - start ))s total)"
    printf '%-34s %-8s %7s  %s\n' "step" "result" "time" "note"
    local r failed=0
    for r in "${RESULTS[@]}"; do
        echo "$r"
        case "$r" in *" FAIL "*|*" TIMEOUT "*) failed=1 ;; esac
    done
    return $failed
}

case "${1:-}" in
    pack) pack ;;
    run) run ;;
    *) echo "usage: $0 pack|run   (see docs/GPU.md)"; exit 2 ;;
esac
